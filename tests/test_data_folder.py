"""pointbert.data.folder: class-per-folder datasets, their three split modes, and bad files."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from pointbert.data.folder import FolderDataset, scan_folder
from pointbert.errors import DataError

MODELNET40 = Path(__file__).resolve().parents[2] / "shared" / "data" / "ModelNet40"


def cloud(seed: int, n: int = 100) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3)).astype(np.float32) * 5 + 2


def make_split_dataset(root: Path, classes=("chair", "airplane", "table"), n_train=4, n_test=2) -> Path:
    """root/<class>/{train,test}/<class>_NNNN.npy, like the shared ModelNet40."""
    k = 0
    for c in classes:
        for split, n in (("train", n_train), ("test", n_test)):
            (root / c / split).mkdir(parents=True)
            for _ in range(n):
                np.save(root / c / split / f"{c}_{k:04d}.npy", cloud(k))
                k += 1
    return root


def make_flat_dataset(root: Path, sizes=(("bench", 10), ("cup", 5), ("lamp", 1))) -> Path:
    """root/<class>/*.{npy,txt,xyz}: mixed formats, no split subfolders."""
    k = 0
    for c, n in sizes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            pts = cloud(k)
            if i % 3 == 0:
                np.save(root / c / f"{i:03d}.npy", pts)
            elif i % 3 == 1:
                np.savetxt(root / c / f"{i:03d}.txt", np.hstack([pts, pts]), delimiter=",")
            else:
                np.savetxt(root / c / f"{i:03d}.xyz", pts)
            k += 1
    return root


def test_split_subfolders(tmp_path):
    root = make_split_dataset(tmp_path / "ds")
    (root / ".cache").mkdir()  # hidden: ignored
    (root / "chair" / "train" / ".DS_Store").write_text("x")
    train, test = FolderDataset(root, "train", 64), FolderDataset(root, "test", 64)
    every = FolderDataset(root, "all", 64)
    assert train.classes == test.classes == ["airplane", "chair", "table"]  # sorted names = class ids
    assert (len(train), len(test), len(every)) == (12, 6, 18)
    assert train.kind == "split subfolders"
    assert all(f.parent.name == "train" for f in train.files)
    assert all(f.parent.name == "test" for f in test.files)
    assert train.labels.dtype == np.int64 and list(np.bincount(train.labels)) == [4, 4, 4]
    for i in (0, 5, 11):
        item = train[i]
        assert item["points"].shape == (64, 3) and item["points"].dtype == np.float32
        assert item["label"] == train.labels[i] == train.classes.index(train.files[i].parts[-3])
        assert np.linalg.norm(item["points"], axis=1).max() <= 1 + 1e-5  # normalised, then FPS


def test_items_match_the_file(tmp_path):
    root = make_split_dataset(tmp_path / "ds", classes=("a",), n_train=1, n_test=1)
    raw = np.load(root / "a" / "train" / "a_0000.npy")
    plain = FolderDataset(root, "train", num_points=None, normalize=False)[0]["points"]
    np.testing.assert_array_equal(plain, raw)
    normed = FolderDataset(root, "train", num_points=None)[0]["points"]
    c = raw - raw.mean(axis=0)
    np.testing.assert_allclose(normed, c / np.linalg.norm(c, axis=1).max(), atol=1e-6)
    fitted = FolderDataset(root, "train", num_points=32)[0]["points"]
    np.testing.assert_array_equal(fitted[0], normed[0])  # FPS from point 0


def test_dataloader_batches(tmp_path):
    ds = FolderDataset(make_split_dataset(tmp_path / "ds"), "train", 48)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=5, shuffle=True)))
    assert batch["points"].shape == (5, 48, 3) and batch["points"].dtype == torch.float32
    assert batch["label"].dtype == torch.int64


def test_small_clouds_are_repeated_with_one_warning(tmp_path, caplog):
    root = tmp_path / "ds"
    (root / "a").mkdir(parents=True)
    for i in range(3):
        np.save(root / "a" / f"{i}.npy", cloud(i, n=10))
    ds = FolderDataset(root, "all", num_points=32)
    with caplog.at_level(logging.WARNING, logger="pointbert.data.folder"):
        items = [ds[i]["points"] for i in range(3)]
    assert all(p.shape == (32, 3) for p in items)
    assert len(caplog.records) == 1 and "only 10 points" in caplog.text
    np.testing.assert_array_equal(ds[1]["points"], items[1])  # deterministic per item


def test_meshes_and_mixed_formats(tmp_path):
    root = make_flat_dataset(tmp_path / "ds")
    (root / "cube").mkdir()
    (root / "cube" / "c.off").write_text("OFF\n4 4 0\n0 0 0\n1 0 0\n0 1 0\n0 0 1\n3 0 1 2\n3 0 1 3\n"
                                         "3 0 2 3\n3 1 2 3\n")
    ds = FolderDataset(root, "all", 128, mesh_points=512)
    assert ds.classes == ["bench", "cube", "cup", "lamp"] and len(ds) == 17
    assert ds.check(progress=False) == []
    assert all(ds[i]["points"].shape == (128, 3) for i in range(len(ds)))


def test_seeded_random_split(tmp_path):
    root = make_flat_dataset(tmp_path / "ds")
    train = FolderDataset(root, "train", test_fraction=0.2)
    test = FolderDataset(root, "test", test_fraction=0.2)
    assert train.kind == "random split"
    assert set(train.files).isdisjoint(test.files) and len(train) + len(test) == 16
    # stratified: 20% of 10 -> 2, of 5 -> 1; a class of 1 file stays in train
    assert list(np.bincount(test.labels, minlength=3)) == [2, 1, 0]
    again = FolderDataset(root, "test", test_fraction=0.2)
    assert again.files == test.files
    other = [FolderDataset(root, "test", test_fraction=0.2, seed=s).files for s in range(1, 6)]
    assert any(o != test.files for o in other)
    assert len(FolderDataset(root, "train", test_fraction=0.0)) == 16


def test_split_file(tmp_path):
    root = make_flat_dataset(tmp_path / "ds")
    split = tmp_path / "test_files.txt"
    split.write_text("# the test files\nbench/000.npy\n./cup/001.txt\n\nlamp\\000.npy\n")
    test = FolderDataset(root, "test", split_file=split)
    train = FolderDataset(root, "train", split_file=split)
    assert test.kind == "split file"
    names = [f.relative_to(root).as_posix() for f in test.files]
    assert names == ["bench/000.npy", "cup/001.txt", "lamp/000.npy"]
    assert len(train) == 13 and set(train.files).isdisjoint(test.files)

    split.write_text("bench/000.npy\nbench/nope.npy\n")
    with pytest.raises(DataError, match=r"test_files\.txt:2: bench/nope\.npy is not a file of"):
        FolderDataset(root, "test", split_file=split)
    with pytest.raises(DataError, match="no such split file"):
        FolderDataset(root, "test", split_file=tmp_path / "absent.txt")
    with pytest.raises(DataError, match="use one or the other"):
        FolderDataset(make_split_dataset(tmp_path / "ds2"), "test", split_file=split)


@pytest.mark.parametrize("case", ["missing", "file", "no_classes", "empty_class", "unknown_ext", "half_split",
                                  "no_test_files", "bad_split_name"])
def test_layout_problems_refuse_to_start(tmp_path, case):
    root = tmp_path / "ds"
    expect = {"missing": "no such folder", "file": "is a file", "no_classes": "no class subfolders",
              "empty_class": "no point-cloud files", "unknown_ext": "unsupported file type '.jpg'",
              "half_split": "has no train/ or test/ subfolder", "no_test_files": "no test files",
              "bad_split_name": "split must be one of"}[case]
    named = {"empty_class": "empty", "unknown_ext": "photo.jpg", "half_split": "odd"}.get(case, "ds")
    split = "test"
    if case == "file":
        root.write_text("x")
    elif case == "no_classes":
        root.mkdir()
        np.save(root / "loose.npy", cloud(0))
    elif case in ("empty_class", "unknown_ext"):
        make_flat_dataset(root)
        (root / "empty").mkdir()
        if case == "unknown_ext":
            (root / "empty").rmdir()
            (root / "cup" / "photo.jpg").write_bytes(b"\xff\xd8")
    elif case == "half_split":
        make_split_dataset(root)
        (root / "odd").mkdir()
        np.save(root / "odd" / "x.npy", cloud(0))
    elif case == "no_test_files":
        make_split_dataset(root, n_test=0)
    elif case == "bad_split_name":
        make_split_dataset(root)
        split = "val"
    with pytest.raises(DataError) as info:
        FolderDataset(root, split)
    assert expect in str(info.value) and named in str(info.value)


def test_many_layout_problems_are_counted(tmp_path):
    root = make_flat_dataset(tmp_path / "ds")
    for name in ("a.png", "b.png", "c.png"):
        (root / "cup" / name).write_bytes(b"x")
    assert len(scan_folder(root).problems) == 3
    with pytest.raises(DataError, match=r"a\.png: unsupported .* \(and 2 more problems; see `pointbert data"):
        FolderDataset(root, "all")


def _with_bad_files(root: Path) -> list[Path]:
    make_split_dataset(root)
    bad = [root / "chair" / "train" / "chair_bad.npy", root / "table" / "train" / "table_same.txt",
           root / "airplane" / "train" / "airplane_empty.xyz"]
    pts = cloud(0)
    pts[7, 1] = np.nan
    np.save(bad[0], pts)
    np.savetxt(bad[1], np.ones((20, 3)))  # degenerate: every point identical
    bad[2].write_text("")
    return bad


def test_bad_content_raises_naming_the_file(tmp_path):
    bad = _with_bad_files(tmp_path / "ds")
    ds = FolderDataset(tmp_path / "ds", "train", 64)  # construction does not read files
    for path in bad:
        with pytest.raises(DataError) as info:
            ds[ds.files.index(path)]
        assert str(path) in str(info.value)
    problems = dict(ds.check(progress=False))
    assert set(problems) == {str(p) for p in bad}
    assert "1 non-finite" in problems[str(bad[0])] and "identical" in problems[str(bad[1])]
    assert "empty" in problems[str(bad[2])]


def test_skip_bad_replaces_and_counts(tmp_path, caplog):
    bad = _with_bad_files(tmp_path / "ds")
    ds = FolderDataset(tmp_path / "ds", "train", 64, skip_bad=True)
    with caplog.at_level(logging.WARNING, logger="pointbert.data.folder"):
        items = [ds[i] for i in range(len(ds))]
        again = ds[ds.files.index(bad[0])]  # known bad: skipped without re-reading
    assert all(it["points"].shape == (64, 3) and np.isfinite(it["points"]).all() for it in items)
    assert sorted(p for p, _ in ds.bad_files) == sorted(str(p) for p in bad)
    assert len(caplog.records) == 1 and "skip_bad" in caplog.text
    i = ds.files.index(bad[0])
    assert again["label"] == ds.labels[(i + 1) % len(ds)]  # replaced by the next good item
    assert len(ds.bad_files) == 3

    only_bad = tmp_path / "only_bad"
    (only_bad / "a").mkdir(parents=True)
    (only_bad / "a" / "x.npy").write_bytes(b"")
    with pytest.raises(DataError, match="none of the 1 all files is readable"):
        FolderDataset(only_bad, "all", skip_bad=True)[0]


@pytest.mark.data
def test_shared_modelnet40():
    if not MODELNET40.is_dir():
        pytest.skip(f"shared ModelNet40 not found at {MODELNET40}")
    train, test = FolderDataset(MODELNET40, "train"), FolderDataset(MODELNET40, "test")
    assert (len(train), len(test)) == (9843, 2468)
    assert len(train.classes) == 40 and train.classes[0] == "airplane" and train.classes[-1] == "xbox"
    assert train.kind == "split subfolders"
    for ds in (train, test):
        for i in (0, len(ds) // 2, len(ds) - 1):
            item = ds[i]
            assert item["points"].shape == (1024, 3) and item["points"].dtype == np.float32
            assert ds.classes[item["label"]] == ds.files[i].parts[-3]
