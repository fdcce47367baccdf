"""The built-in procedural dataset: contract, determinism, variety, parts and a render."""

from __future__ import annotations

import numpy as np
import pytest

from pointbert.data.synthetic import SYNTHETIC_CLASSES, SYNTHETIC_PARTS, SyntheticShapes, render_samples


def test_contract_sizes_and_classes():
    train, test = SyntheticShapes("train"), SyntheticShapes("test", num_points=256)
    assert (len(train), len(test)) == (2000, 500) and len(SyntheticShapes("val", size=7)) == 7
    assert train.classes == SYNTHETIC_CLASSES and len(train.classes) >= 10
    assert np.bincount(train.labels).min() == np.bincount(train.labels).max() - 1 or \
        len(set(np.bincount(train.labels))) == 1  # balanced
    item = test[17]
    assert item["points"].dtype == np.float32 and item["points"].shape == (256, 3)
    assert isinstance(item["label"], np.int64) and item["label"] == test.labels[17] == item["category"]
    assert item["parts"].dtype == np.int64 and item["parts"].shape == (256,)
    r = np.linalg.norm(item["points"], axis=1)
    assert np.isclose(r.max(), 1, atol=1e-5) and np.allclose(item["points"].mean(0), 0, atol=1e-5)
    with pytest.raises(IndexError):
        test[500]


def test_deterministic_from_seed_split_index():
    a, b = SyntheticShapes("train", 128), SyntheticShapes("train", 128)
    np.testing.assert_array_equal(a[5]["points"], b[5]["points"])
    np.testing.assert_array_equal(a[5]["points"], a[5]["points"])
    np.testing.assert_array_equal(a[-1]["points"], a[1999]["points"])
    assert not np.array_equal(a[5]["points"], SyntheticShapes("test", 128)[5]["points"])
    assert not np.array_equal(a[5]["points"], SyntheticShapes("train", 128, seed=1)[5]["points"])
    # item i does not depend on the dataset size
    np.testing.assert_array_equal(a[5]["points"], SyntheticShapes("train", 128, size=10)[5]["points"])


def test_parts_belong_to_the_category_and_cover_the_table():
    ds = SyntheticShapes("train", 512, size=len(SYNTHETIC_CLASSES) * 4)
    seen = set()
    for i in range(len(ds)):
        item = ds[i]
        allowed = SYNTHETIC_PARTS[SYNTHETIC_CLASSES[item["category"]]]
        assert set(item["parts"]) <= set(allowed)
        seen |= set(item["parts"].tolist())
    ids = [p for c in SYNTHETIC_CLASSES for p in SYNTHETIC_PARTS[c]]
    assert ids == list(range(len(ids))) and len(ids) <= 50  # fits the 50-part segmentation head
    assert len(seen) >= 0.8 * len(ids)


def test_members_of_a_class_vary():
    ds = SyntheticShapes("train", 1024, size=len(SYNTHETIC_CLASSES) * 3)
    C = len(SYNTHETIC_CLASSES)
    for c in range(C):
        ext = [np.ptp(ds[c + k * C]["points"], axis=0) for k in range(3)]
        assert not np.allclose(ext[0], ext[1], atol=0.02) or not np.allclose(ext[1], ext[2], atol=0.02)


def test_render_png(tmp_path):
    out = render_samples(tmp_path / "synthetic.png", per_class=2, num_points=256)
    assert out.is_file() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
