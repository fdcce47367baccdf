"""benchmarks/pack_modelnet40.py: the packed ModelNet40 unpacks to the same layout and the same points."""

from __future__ import annotations

import numpy as np

from benchmarks.pack_modelnet40 import main, morton_order


def test_pack_unpack_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    src, clouds = tmp_path / "ModelNet40", {}
    for cls in ("airplane", "chair"):
        for split in ("train", "test"):
            for i in range(2):
                name = f"{cls}/{split}/{cls}_{i:04d}.npy"
                clouds[name] = rng.uniform(-1, 1, (64, 3)).astype(np.float32)
                (src / name).parent.mkdir(parents=True, exist_ok=True)
                np.save(src / name, clouds[name])
    packed = tmp_path / "mn.f16.npz.xz"
    main(["pack", str(src), str(packed)])
    main(["unpack", str(packed), str(tmp_path / "out")])
    for name, pts in clouds.items():
        back = np.load(tmp_path / "out" / name)
        assert back.dtype == np.float32 and back.shape == pts.shape
        rounded = pts.astype(np.float16).astype(np.float32)
        assert np.abs(rounded - pts).max() < 5e-4
        assert np.array_equal(back[0], rounded[0])  # point 0 stays first
        assert np.array_equal(back[np.lexsort(back.T)], rounded[np.lexsort(rounded.T)])  # same points


def test_morton_order_is_a_permutation_that_groups_neighbours():
    pts = np.random.default_rng(1).uniform(-1, 1, (512, 3))
    order = morton_order(pts)
    assert np.array_equal(np.sort(order), np.arange(512))
    step = np.linalg.norm(np.diff(pts[order], axis=0), axis=1).mean()
    assert step < 0.5 * np.linalg.norm(np.diff(pts, axis=0), axis=1).mean()
