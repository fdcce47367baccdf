"""Batch augmentations and the fine-tuning point sampling (spec 2.6, 6.2).

Every function takes a whole batch ``points`` (B, N, 3) on the training device and draws its random
numbers from one ``torch.Generator`` (on any device: numbers are drawn on the generator's device and
moved), so a seeded run repeats exactly. Each sample gets its own random factors; nothing loops over
the batch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["scale_translate", "partseg_scale_shift", "fps_subsample", "random_subset", "rotate_y", "jitter", "augment",
           "AUGMENTATIONS"]


def _uniform(shape: tuple[int, ...], low: float, high: float, generator: torch.Generator | None,
             like: Tensor) -> Tensor:
    device = generator.device if generator is not None else like.device
    u = torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
    return (low + (high - low) * u).to(like.device, like.dtype)


def scale_translate(points: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """``PointcloudScaleAndTranslate``: per sample and axis, scale ~ U(2/3, 3/2), then shift ~ U(-0.2, 0.2).

    points (B, N, 3) -> (B, N, 3).
    """
    B = points.shape[0]
    scale = _uniform((B, 1, 3), 2 / 3, 3 / 2, generator, points)
    shift = _uniform((B, 1, 3), -0.2, 0.2, generator, points)
    return points * scale + shift


def partseg_scale_shift(points: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Part segmentation: per sample isotropic scale ~ U(0.8, 1.25), then per-axis shift ~ U(-0.1, 0.1).

    points (B, N, 3) -> (B, N, 3).
    """
    B = points.shape[0]
    scale = _uniform((B, 1, 1), 0.8, 1.25, generator, points)
    shift = _uniform((B, 1, 3), -0.1, 0.1, generator, points)
    return points * scale + shift


def rotate_y(points: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Rotate each sample about the y (up) axis by an angle ~ U(0, 2 pi). points (B, N, 3) -> (B, N, 3)."""
    B = points.shape[0]
    a = _uniform((B,), 0.0, 2 * math.pi, generator, points)
    c, s = torch.cos(a), torch.sin(a)
    zero, one = torch.zeros_like(a), torch.ones_like(a)
    R = torch.stack([c, zero, s, zero, one, zero, -s, zero, c], dim=1).view(B, 3, 3)  # (B, 3, 3)
    return points @ R.transpose(1, 2)


def jitter(points: Tensor, generator: torch.Generator | None = None, sigma: float = 0.01,
           clip: float = 0.05) -> Tensor:
    """Add Gaussian noise N(0, sigma^2), clipped to [-clip, clip], to every coordinate. (B, N, 3) -> same."""
    device = generator.device if generator is not None else points.device
    noise = torch.randn(points.shape, generator=generator, device=device, dtype=torch.float32)
    return points + (noise * sigma).clamp_(-clip, clip).to(points.device, points.dtype)


def fps_subsample(points: Tensor, num_points: int, point_pool: int | None = None,
                  generator: torch.Generator | None = None) -> Tensor:
    """The fine-tuning sampling of spec 6.2: FPS, then one random column subset for the whole batch.

    ``idx = FPS(points, min(point_pool, N))`` from point 0 of each cloud; with a ``generator``, one
    random subset of ``num_points`` of those columns (without replacement, the same columns for every
    sample, as ``np.random.choice`` in the official loop) is kept. Without a generator (evaluation) the
    result is the deterministic ``FPS(points, num_points)``.

    Args:
        points: (B, N, 3).
        num_points: points per cloud returned, at most ``min(point_pool, N)``.
        point_pool: FPS pool size (``data.point_pool``; None = ``num_points``).

    Returns:
        (B, num_points, 3).
    """
    from ..ops import fps, gather

    N = points.shape[1]
    if generator is None:
        pool = num_points
    else:
        pool = min(point_pool if point_pool is not None else num_points, N)
    if not 0 < num_points <= min(pool, N):
        raise ValueError(f"cannot take {num_points} points from a pool of {min(pool, N)} "
                         f"(clouds of {N} points)")
    idx = fps(points, pool)  # (B, pool)
    if generator is not None:  # also a pure shuffle when num_points == pool, as np.random.choice is
        cols = torch.randperm(pool, generator=generator, device=generator.device)[:num_points]
        idx = idx[:, cols.to(idx.device)]
    return gather(points, idx)


def random_subset(points: Tensor, num_points: int, generator: torch.Generator | None = None) -> Tensor:
    """``num_points`` random points of each cloud, a different subset per cloud (the ShapeNet-55 sampling of
    spec 2.1, batched): how the tokenizer and pre-training stages read clouds stored with more points than
    ``data.num_points`` (ModelNet40, users' folders). Clouds that already have ``num_points`` are returned
    as they are.

    points (B, N, 3) -> (B, num_points, 3).
    """
    from ..ops import gather

    B, N, _ = points.shape
    if N == num_points:
        return points
    if not 0 < num_points < N:
        raise ValueError(f"cannot take {num_points} points from clouds of {N} points")
    device = generator.device if generator is not None else points.device
    idx = torch.rand(B, N, generator=generator, device=device).argsort(dim=1)[:, :num_points]
    return gather(points, idx.to(points.device))


AUGMENTATIONS = {"scale_translate": scale_translate, "partseg": partseg_scale_shift, "none": None}


def augment(points: Tensor, name: str, generator: torch.Generator | None = None) -> Tensor:
    """Apply the training augmentation named by ``data.augment`` (see :data:`AUGMENTATIONS`)."""
    if name not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {name!r}; choose one of {', '.join(AUGMENTATIONS)}")
    fn = AUGMENTATIONS[name]
    return points if fn is None else fn(points, generator)
