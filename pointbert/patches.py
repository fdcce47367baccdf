"""Point patches: points -> centers (FPS) + neighborhoods (kNN), and the mini-PointNet patch embedding.

Spec 1.2-1.3. Every model (tokenizer, pre-training, fine-tuning, part segmentation) splits a cloud
the same way, so grouping lives here once.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import ops


@torch.no_grad()
def group(points: Tensor, num_patches: int, patch_size: int) -> tuple[Tensor, Tensor]:
    """Split clouds into overlapping local patches.

    Args:
        points: (B, N, 3) clouds.
        num_patches: G, centers chosen by farthest point sampling from point 0 of each cloud.
        patch_size: K, nearest neighbours of each center (the center itself is one of them).

    Returns:
        neighborhoods: (B, G, K, 3) neighbour coordinates relative to their center (not rescaled).
        centers: (B, G, 3) absolute center coordinates.
    """
    if points.dim() != 3 or points.shape[-1] != 3:
        raise ValueError(f"points must have shape (B, N, 3), got {tuple(points.shape)}")
    if points.shape[1] < patch_size:
        raise ValueError(f"a patch of {patch_size} points needs clouds of at least {patch_size} points, "
                         f"got {points.shape[1]}")
    centers = ops.gather(points, ops.fps(points, num_patches))  # (B, G, 3)
    idx = ops.knn(centers, points, patch_size)  # (B, G, K)
    neighborhoods = ops.gather(points, idx) - centers.unsqueeze(2)  # (B, G, K, 3)
    return neighborhoods, centers


class PatchEmbed(nn.Module):
    """Mini-PointNet applied to every patch independently (spec 1.3).

    per-point MLP 3 -> 128 -> 256, max-pool, concat [global ; per-point] (512), per-point MLP
    512 -> 512 -> embed_dim, max-pool (the official widths, ``hidden_dims`` = (128, 256, 512)). The
    per-point MLPs are Linear layers over the flattened points (the official Conv1d(k=1) layers, same
    weights up to a trailing unit dimension); BatchNorm sees the same B*G*K samples either way.
    """

    def __init__(self, embed_dim: int = 256, hidden_dims: tuple[int, int, int] = (128, 256, 512)):
        super().__init__()
        h0, h1, h2 = hidden_dims
        self.embed_dim, self.local_dim = embed_dim, h1
        self.first_conv = nn.Sequential(
            nn.Linear(3, h0), nn.BatchNorm1d(h0), nn.ReLU(inplace=True), nn.Linear(h0, h1))
        self.second_conv = nn.Sequential(
            nn.Linear(2 * h1, h2), nn.BatchNorm1d(h2), nn.ReLU(inplace=True), nn.Linear(h2, embed_dim))

    def forward(self, neighborhoods: Tensor) -> Tensor:
        """neighborhoods (B, G, K, 3) -> embeddings (B, G, embed_dim)."""
        B, G, K, _ = neighborhoods.shape
        h1 = self.local_dim
        f = self.first_conv(neighborhoods.reshape(B * G * K, 3)).view(B * G, K, h1)
        g = f.amax(dim=1, keepdim=True)  # (B*G, 1, h1) patch-global feature
        f = torch.cat([g.expand(-1, K, -1), f], dim=-1)  # (B*G, K, 2*h1): global first, then local
        f = self.second_conv(f.view(B * G * K, 2 * h1)).view(B * G, K, self.embed_dim)
        return f.amax(dim=1).view(B, G, self.embed_dim)
