"""Point patches: points -> centers (FPS) + neighborhoods (kNN), and the mini-PointNet patch embedding.

Spec 1.2-1.3. Every model (tokenizer, pre-training, fine-tuning, part segmentation) splits a cloud
the same way, so grouping lives here once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import memory, ops


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


def _foldable(norm: nn.Module) -> bool:
    """An affine BatchNorm with running statistics (not, e.g., a layer swapped for ``nn.Identity``)."""
    return getattr(norm, "running_var", None) is not None and getattr(norm, "weight", None) is not None


class PatchEmbed(nn.Module):
    """Mini-PointNet applied to every patch independently (spec 1.3).

    per-point MLP 3 -> 128 -> 256, max-pool, concat [global ; per-point] (512), per-point MLP
    512 -> 512 -> embed_dim, max-pool (the official widths, ``hidden_dims`` = (128, 256, 512)). The
    per-point MLPs are Linear layers over the flattened points (the official Conv1d(k=1) layers, same
    weights up to a trailing unit dimension); BatchNorm sees the same B*G*K samples either way.

    Four fast paths compute the same function (tests/test_speed_paths.py checks them against the plain
    Conv1d layout); each is an instance attribute that can be switched off:

    * ``split_global`` (on): the first layer of ``second_conv`` acts on [g ; f] with g the same for
      all K points of a patch, and ``W [g ; f] = W_g g + W_f f``; so ``W_g g + b`` is computed once per
      patch (B*G rows) and added to ``W_f f`` (B*G*K rows). A quarter fewer FLOPs in the module, and
      no (B*G*K, 2*h1) concatenation is built or kept for backward. Parameters are unchanged
      (``second_conv.0.weight`` is still (h2, 2*h1)), so checkpoints and the official importer are too.
    * ``compose_local`` (on; with ``split_global``): ``W_f f`` is computed from the first conv's
      hidden activations r (h0 wide) instead of f = W1 r + b1 (h1 wide): ``W_f f = (W_f W1) r + W_f b1``,
      with the (h2, h0) product formed once per call from the current weights. f itself is still
      computed, for the max-pool g. A (P*K, h0) @ (h0, h2) product replaces a (P*K, h1) @ (h1, h2) one:
      half the multiply-adds of that layer with the official widths, forward and backward. Without
      autograd the sum is not a separate pass: the product is accumulated in place into the per-patch
      term copied to every point (with autograd that is left out: its different rounding of the
      gradients that BatchNorm makes zero, the biases before it, is amplified by Adam).
    * ``fold_bn`` (on; eval mode only): each BatchNorm uses its running statistics, so it is an affine
      map folded into the Linear before it (``W * s``, ``(b - mean) * s + beta``, ``s = gamma / sqrt(var +
      eps)``), computed on the fly from the current parameters: no pass over the activations.
    * ``chunk_patches`` (256; eval mode with ``fold_bn``, CPU): the module is then a map per patch, so it
      runs over chunks of that many patches; every activation stays small (reused heap memory rather than
      freshly mapped pages from the OS, and closer to the caches). 0 disables.

    On CPU, its first training-mode forward with autograd on applies :mod:`pointbert.memory`'s policy (freed
    memory kept for reuse; process-wide, once; ``POINTBERT_KEEP_MEMORY=0`` keeps glibc's default).

    The max-pools are :func:`pointbert.ops.max_pool`: the official ``Tensor.max(dim)`` values, one arg-max
    per channel in backward.
    """

    split_global = True
    compose_local = True
    fold_bn = True
    chunk_patches = 256

    def __init__(self, embed_dim: int = 256, hidden_dims: tuple[int, int, int] = (128, 256, 512)):
        super().__init__()
        h0, h1, h2 = hidden_dims
        self.embed_dim, self.local_dim = embed_dim, h1
        self.first_conv = nn.Sequential(
            nn.Linear(3, h0), nn.BatchNorm1d(h0), nn.ReLU(inplace=True), nn.Linear(h0, h1))
        self.second_conv = nn.Sequential(
            nn.Linear(2 * h1, h2), nn.BatchNorm1d(h2), nn.ReLU(inplace=True), nn.Linear(h2, embed_dim))

    @staticmethod
    def _fold(linear: nn.Linear, bn: nn.BatchNorm1d) -> tuple[Tensor, Tensor]:
        """Weight and bias of ``bn(linear(x))`` with ``bn``'s running statistics: one affine map."""
        s = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        return linear.weight * s[:, None], (linear.bias - bn.running_mean) * s + bn.bias

    def forward(self, neighborhoods: Tensor) -> Tensor:
        """neighborhoods (B, G, K, 3) -> embeddings (B, G, embed_dim)."""
        B, G, K, _ = neighborhoods.shape
        if self.training and neighborhoods.device.type == "cpu" and torch.is_grad_enabled():
            memory.on_cpu_training()  # freed memory kept for reuse, once per process (pointbert.memory)
        bn0, bn2 = self.first_conv[1], self.second_conv[1]
        fold = self.fold_bn and not self.training and _foldable(bn0) and _foldable(bn2)
        weights = self._weights(fold)  # once per call, shared by the chunks
        x = neighborhoods.reshape(B * G, K, 3)
        chunk = self.chunk_patches if fold and x.device.type == "cpu" else 0  # folded: a map per patch
        if chunk and B * G > chunk:
            return torch.cat([self._embed(c, fold, weights) for c in x.split(chunk)]).view(B, G, -1)
        return self._embed(x, fold, weights).view(B, G, -1)

    def _weights(self, fold: bool) -> tuple[Tensor, ...]:
        """(W0, b0, W2, b2, W_f W1, W_f b1): the first and third Linear, BatchNorm folded in with ``fold``;
        the last two only with ``split_global`` and ``compose_local`` (else None)."""
        lin0, bn0, _, lin1 = self.first_conv
        lin2, bn2, _, _ = self.second_conv
        w0, b0 = self._fold(lin0, bn0) if fold else (lin0.weight, lin0.bias)
        w2, b2 = self._fold(lin2, bn2) if fold else (lin2.weight, lin2.bias)
        if not (self.split_global and self.compose_local):
            return w0, b0, w2, b2, None, None
        w_f = w2[:, self.local_dim:]
        return w0, b0, w2, b2, w_f @ lin1.weight, w_f @ lin1.bias

    def _embed(self, x: Tensor, fold: bool, weights: tuple[Tensor, ...]) -> Tensor:
        """(P, K, 3) patches -> (P, embed_dim), with :meth:`_weights`."""
        P, K, _ = x.shape
        h1 = self.local_dim
        _, bn0, _, lin1 = self.first_conv
        _, bn2, _, lin3 = self.second_conv
        w0, b0, w, b, w_composed, b_composed = weights
        r = F.linear(x.reshape(P * K, 3), w0, b0)
        r = (r if fold else bn0(r)).relu_()  # (P*K, h0)
        f = lin1(r).view(P, K, h1)  # (P, K, h1) per-point features
        g = ops.max_pool(f, 1, keepdim=True)  # (P, 1, h1) patch-global feature
        if self.split_global:
            w_g, w_f = w[:, :h1], w[:, h1:]
            if w_composed is not None and not torch.is_grad_enabled():  # W_f f = (W_f W1) r + W_f b1
                # no autograd: the per-patch term W_g g + b + W_f b1 copied to every point, the per-point
                # product accumulated into it in place (no pass for the sum)
                h = F.linear(g, w_g, b + b_composed).expand(P, K, -1).contiguous().view(P * K, -1)
                h.addmm_(r, w_composed.t())
            elif w_composed is not None:
                # added out of place: an in-place add on this view would make backward copy the whole
                # gradient (CopySlices)
                h = F.linear(r, w_composed, b_composed).view(P, K, -1) + F.linear(g, w_g, b)
            else:
                h = F.linear(f, w_f)  # (P, K, h2) = W_f f
                h += F.linear(g, w_g, b)  # + (W_g g + b), broadcast over the K points
        else:
            h = F.linear(torch.cat([g.expand(-1, K, -1), f], dim=-1), w, b)  # [global ; local] (P, K, 2*h1)
        h = h.view(P * K, -1)
        f = lin3((h if fold else bn2(h)).relu_()).view(P, K, self.embed_dim)
        return ops.max_pool(f, 1)
