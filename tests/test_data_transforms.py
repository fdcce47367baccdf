"""Batch transforms: ranges per sample, shared FPS column subset, seeding, shapes."""

from __future__ import annotations

import math

import pytest
import torch

from pointbert.data.transforms import (
    augment,
    fps_subsample,
    jitter,
    partseg_scale_shift,
    random_subset,
    rotate_y,
    scale_translate,
)
from pointbert.ops import fps, gather


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def affine_factors(fn, B: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Recover per-sample scale (B, 3) and shift (B, 3) of an affine transform from points 0 and 1."""
    x = torch.stack([torch.zeros(B, 3), torch.ones(B, 3)], dim=1)  # (B, 2, 3)
    y = fn(x, gen(seed))
    return y[:, 1] - y[:, 0], y[:, 0]


def test_scale_translate_ranges_and_independence():
    scale, shift = affine_factors(scale_translate)
    assert scale.min() >= 2 / 3 - 1e-6 and scale.max() <= 3 / 2 + 1e-6
    assert shift.abs().max() <= 0.2 + 1e-6
    assert (scale[:, 0] != scale[:, 1]).all()  # three independent axis factors
    assert scale.std(0).min() > 0.1 and scale[:, 0].unique().numel() == 256  # per sample
    s2, t2 = affine_factors(scale_translate)
    assert torch.equal(scale, s2) and torch.equal(shift, t2)  # seeded
    s3, _ = affine_factors(scale_translate, seed=1)
    assert not torch.equal(scale, s3)


def test_partseg_scale_shift_is_isotropic():
    scale, shift = affine_factors(partseg_scale_shift)
    assert torch.allclose(scale[:, 0], scale[:, 1]) and torch.allclose(scale[:, 0], scale[:, 2])
    assert scale.min() >= 0.8 - 1e-6 and scale.max() <= 1.25 + 1e-6 and shift.abs().max() <= 0.1 + 1e-6


def test_rotate_y_and_jitter():
    x = torch.randn(8, 100, 3, generator=gen(3))
    y = rotate_y(x, gen())
    assert torch.allclose(y[..., 1], x[..., 1]) and torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    angles = torch.atan2(y[:, 0, 2], y[:, 0, 0]) - torch.atan2(x[:, 0, 2], x[:, 0, 0])
    assert angles.remainder(2 * math.pi).unique().numel() == 8
    j = jitter(x, gen(), sigma=0.5, clip=0.05) - x
    assert j.abs().max() <= 0.05 + 1e-6 and (j.abs() == 0.05).any()
    assert torch.equal(augment(x, "none"), x)
    assert torch.equal(augment(x, "scale_translate", gen()), scale_translate(x, gen()))
    with pytest.raises(ValueError, match="unknown augmentation"):
        augment(x, "mixup", gen())


def test_fps_subsample_recipe():
    x = torch.rand(4, 2000, 3, generator=gen(5))
    out = fps_subsample(x, 512, 600, gen())
    assert out.shape == (4, 512, 3)
    pool = gather(x, fps(x, 600))  # (4, 600, 3): every output point is one of the FPS pool
    assert (out[:, :, None, :] == pool[:, None, :, :]).all(-1).any(-1).all()
    # the same column subset for every sample: identical clouds give identical outputs
    same = fps_subsample(x[:1].expand(3, -1, -1), 512, 600, gen(7))
    assert torch.equal(same[0], same[1]) and torch.equal(same[1], same[2])
    assert torch.equal(fps_subsample(x, 512, 600, gen(7)), fps_subsample(x, 512, 600, gen(7)))
    assert torch.equal(fps_subsample(x, 512), gather(x, fps(x, 512)))  # evaluation: plain FPS
    small = torch.rand(2, 1024, 3, generator=gen(1))
    perm = fps_subsample(small, 1024, 1200, gen())  # pool capped at N: all points, shuffled
    assert torch.equal(perm.sort(dim=1).values, small.sort(dim=1).values)
    with pytest.raises(ValueError, match="cannot take 1100 points"):
        fps_subsample(small, 1100, 1200, gen())


@pytest.mark.gpu
def test_generator_on_other_device_than_points_is_fine():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA to mix devices")
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.rand(2, 64, 3)
    assert scale_translate(x, g).device == x.device


def test_random_subset_takes_distinct_points_per_cloud_and_is_seeded():
    x = torch.randn(4, 100, 3)
    y = random_subset(x, 30, gen(0))
    assert y.shape == (4, 30, 3) and torch.equal(y, random_subset(x, 30, gen(0)))
    for b in range(4):  # every point of the subset is a distinct point of its own cloud
        hit = (y[b][:, None] == x[b][None]).all(-1)  # (30, 100)
        assert (hit.sum(1) == 1).all() and hit.any(0).sum() == 30
    assert not torch.equal(y[0], x[0, :30]) and not torch.equal(random_subset(x, 30, gen(1)), y)
    rows = [set(map(tuple, y[b].tolist())) for b in range(2)]
    first = [set(map(tuple, x[b, :30].tolist())) for b in range(2)]
    assert rows != first  # not a prefix
    assert random_subset(x, 100, gen(0)) is x  # already the right size: unchanged
    with pytest.raises(ValueError, match="cannot take 101 points from clouds of 100"):
        random_subset(x, 101, gen(0))
