"""`pointbert data prepare` and CachedDataset: contents, keys, staleness, atomic writes."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_data_official import (
    MN_FIXTURE,
    check_contract,
    needs_fixture,
    write_modelnet_dat,
    write_scanobjectnn,
    write_shapenet55,
    write_shapenetpart,
)

from pointbert.cli import main
from pointbert.config import DataConfig
from pointbert.data import build_dataset
from pointbert.data.cache import CachedDataset, _npy_header, find_cache, prepare_cache
from pointbert.data.official import ModelNet, ScanObjectNN, ShapeNetPart, _fps
from pointbert.errors import DataError


def quiet(*_):
    pass


def copy_modelnet_subset(dst: Path, n_per_class: int = 3) -> Path:
    """A complete small official ModelNet40 folder: the fixture's files plus matching list files."""
    ids = [f"{c}_{i:04d}" for c in ("airplane", "bathtub") for i in range(1, n_per_class + 1)]
    for i in ids:
        (dst / i.rsplit("_", 1)[0]).mkdir(parents=True, exist_ok=True)
        shutil.copy(MN_FIXTURE / i.rsplit("_", 1)[0] / f"{i}.txt", dst / i.rsplit("_", 1)[0])
    shutil.copy(MN_FIXTURE / "modelnet40_shape_names.txt", dst)
    (dst / "modelnet40_train.txt").write_text("\n".join(ids[:2] + ids[n_per_class:n_per_class + 2]) + "\n")
    (dst / "modelnet40_test.txt").write_text("\n".join([ids[n_per_class - 1], ids[-1]]) + "\n")
    return dst


def test_prepare_refuses_an_out_inside_the_dataset_before_writing(tmp_path, capsys):
    data = tmp_path / "shapes"
    for c in ("a", "b"):
        for split in ("train", "test"):
            (data / c / split).mkdir(parents=True)
            np.save(data / c / split / "0.npy", np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32))
    for out in (data / "cache", data):
        assert main(["data", "prepare", str(data), "--out", str(out)]) == 2
        assert "inside the dataset" in capsys.readouterr().err
    assert sorted(p.name for p in data.iterdir()) == ["a", "b"]  # nothing written
    assert main(["data", "prepare", str(data), "--out", str(data / ".mine")]) == 0  # hidden: not read as data


@needs_fixture
def test_prepare_command_on_genuine_fixture(tmp_path, capsys):
    out = tmp_path / "cache"
    rc = main(["data", "prepare", str(MN_FIXTURE), "--num-points", "64", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "9803 of 9843 files listed in modelnet40_train.txt are missing" in err
    rc = main(["data", "prepare", str(MN_FIXTURE), "--num-points", "64", "--out", str(out), "--skip-bad"])
    text = capsys.readouterr().out
    assert rc == 0 and "40 shapes x 64 points" in text and "9803 listed files missing" in text
    assert "test: skipped, no files present" in text
    cache = out / "modelnet40"
    ds = CachedDataset(cache, "train")
    assert len(ds) == 40 and ds.classes[:2] == ["airplane", "bathtub"]
    assert isinstance(ds._parts[0]["points"], np.memmap)
    src = ModelNet(MN_FIXTURE, "train", present_only=True)
    np.testing.assert_allclose(np.sort(ds[7]["points"], 0), np.sort(_fps(src.raw(7), 64, renormalize=True), 0))
    check_contract(ds[7], 64)
    batch = ds.__getitems__([7, 39, 7])  # the DataLoader's batched fetch: same contract, own shuffles
    assert [b["label"] for b in batch] == [0, 1, 0]
    assert not np.array_equal(batch[0]["points"], batch[2]["points"])
    for b, i in zip(batch, (7, 39, 7)):
        check_contract(b, 64)
        np.testing.assert_array_equal(np.sort(b["points"], 0), np.sort(ds[i]["points"], 0))
    with pytest.raises(DataError, match="no test split in this cache"):
        CachedDataset(cache, "test")


@needs_fixture
def test_official_fps_presampling_key_staleness_and_rebuild(tmp_path, caplog):
    root = copy_modelnet_subset(tmp_path / "modelnet40_normal_resampled")
    [cache] = prepare_cache(root, split="test", log=quiet, progress=False)  # auto-detected; default 8192
    assert cache == root / ".pointbert-cache" / "modelnet40"
    m = json.loads((cache / "manifest.json").read_text())
    assert m["splits"]["test"]["num_points"] == 8192 and m["splits"]["test"]["settings"]["fps"] is True
    prepare_cache(root, split="train", num_points=256, log=quiet, progress=False)
    train = CachedDataset(cache, "train")
    test = build_dataset(DataConfig(dataset="modelnet40", path=str(root)), "test")  # picks the cache up
    assert isinstance(test, CachedDataset) and len(test) == 2 and list(test.labels) == [0, 1]
    stored = _fps(ModelNet(root, "test").raw(0), 8192, renormalize=True)
    np.testing.assert_array_equal(test[0]["points"], stored)  # test split: stored order
    # normalised after the FPS pre-sampling, as the official loader normalises its 8192-point cache
    np.testing.assert_allclose(stored.mean(0), 0, atol=1e-6)
    assert abs(np.linalg.norm(stored, axis=1).max() - 1) < 1e-6
    np.testing.assert_array_equal(ModelNet(root, "test", num_points=8192)[0]["points"], stored)
    a, b = train[1], train[1]
    assert not np.array_equal(a["points"], b["points"]) and np.array_equal(np.sort(a["points"], 0),
                                                                          np.sort(b["points"], 0))
    files = sorted(p.name for p in cache.iterdir())
    mtimes = {p: p.stat().st_mtime_ns for p in cache.iterdir()}
    logs = []
    prepare_cache(root, split="train", num_points=256, log=logs.append, progress=False)
    prepare_cache(root, split="test", log=logs.append, progress=False)
    assert all("up to date" in s for s in logs)
    assert {p: p.stat().st_mtime_ns for p in cache.iterdir()} == mtimes  # nothing rewritten
    # a changed source file is never used silently
    f = root / "airplane" / "airplane_0001.txt"
    f.write_text(f.read_text().replace("0", "1", 1))
    os.utime(f, ns=(1, 1))
    with pytest.raises(DataError, match="stale cache: the train source files .* changed.*data prepare"):
        CachedDataset(cache, "train")
    CachedDataset(cache, "test")  # the other split is still valid
    assert len(files) == 7  # manifest + labels, points and sources of two splits
    logs.clear()
    prepare_cache(root, num_points=256, log=logs.append, progress=False)
    assert "train: 4 shapes x 256 points" in logs[0] and "test: 2 shapes x 256 points" in logs[1]
    CachedDataset(cache, "train")
    new_files = sorted(p.name for p in cache.iterdir())
    assert len(new_files) == len(files) and new_files != files  # old train files replaced, not left behind
    assert CachedDataset(cache, "test")[0]["points"].shape == (256, 3)  # a changed setting: rebuilt
    assert not any(p.name.startswith(".") for p in cache.iterdir())  # no temporary files left
    shutil.rmtree(root / "bathtub")
    with pytest.raises(DataError, match="stale cache: .*bathtub_0003.txt: source file is gone"):
        CachedDataset(cache, "test")
    assert len(CachedDataset(cache, "test", verify=False)) == 2
    moved = shutil.move(cache, tmp_path / "moved")  # a cache whose source is gone: used, with a warning
    shutil.rmtree(root)
    with caplog.at_level("WARNING"):
        assert len(CachedDataset(moved, "test")) == 2
    assert "not found; using the cache without checking it" in caplog.text


def test_interrupted_prepare_keeps_the_previous_cache(tmp_path, monkeypatch):
    root = write_scanobjectnn(tmp_path / "ScanObjectNN")
    prepare_cache(root, "scanobjectnn", "test", log=quiet, progress=False)
    cache = root / ".pointbert-cache" / "scanobjectnn-hardest"
    before = sorted(p.name for p in cache.iterdir())

    def boom(self, i):
        if i == 3:
            raise KeyboardInterrupt
        return self.points[i]

    with h5py_touch(root / "main_split" / "test_objectdataset_augmentedrot_scale75.h5"):
        monkeypatch.setattr(ScanObjectNN, "raw", boom)
        with pytest.raises(KeyboardInterrupt):
            prepare_cache(root, "scanobjectnn", "test", log=quiet, progress=False)
        monkeypatch.undo()
    assert sorted(p.name for p in cache.iterdir()) == before  # nothing half-written, no temp files


class h5py_touch:
    """Context: bump a file's mtime (so its cache key changes)."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        st = self.path.stat()
        os.utime(self.path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))

    def __exit__(self, *exc):
        return False


def test_scanobjectnn_shapenet55_shapenetpart_and_dat_caches(tmp_path):
    so = write_scanobjectnn(tmp_path / "ScanObjectNN")
    caches = prepare_cache(so, log=quiet, progress=False)  # auto: all three variants
    assert sorted(c.name for c in caches) == [f"scanobjectnn-{v}" for v in ("hardest", "objectbg",
                                                                           "objectonly")]
    ds = build_dataset(DataConfig(dataset="scanobjectnn", path=str(so), variant="objectonly"), "test")
    assert isinstance(ds, CachedDataset) and len(ds) == 6
    np.testing.assert_array_equal(ds[4]["points"], ScanObjectNN(so, "test", "objectonly").raw(4))
    assert ds.labels.tolist() == ScanObjectNN(so, "test", "objectonly").labels.tolist()

    sn = write_shapenet55(tmp_path / "sn")
    [c] = prepare_cache(sn, "shapenet55", log=quiet, progress=False)
    whole = build_dataset(DataConfig(dataset="shapenet55", path=str(sn), whole=True, num_points=500), "train")
    assert len(whole) == 5 and whole[0]["points"].shape == (500, 3)
    assert np.isclose(np.linalg.norm(whole[0]["points"], axis=1).max(), 1, atol=1e-5)
    assert json.loads((c / "manifest.json").read_text())["splits"]["train"]["num_points"] == 8192

    sp = write_shapenetpart(tmp_path / "sp")
    [c] = prepare_cache(sp, log=quiet, progress=False)
    assert sorted(json.loads((c / "manifest.json").read_text())["splits"]) == ["test", "train", "val"]
    tv = build_dataset(DataConfig(dataset="shapenetpart", path=str(sp), num_points=1000), "train")
    assert isinstance(tv, CachedDataset) and len(tv) == 5
    item = tv[4]
    check_contract(item, 1000, parts=True)
    pts, parts = ShapeNetPart(sp, "val").raw(1)
    assert np.isin(item["points"], pts).all() and set(item["parts"]) <= set(parts)
    test = CachedDataset(c, "test")
    np.testing.assert_array_equal(test[1]["points"], test[1]["points"])
    assert test[1]["points"].shape == (2048, 3)
    with pytest.raises(DataError, match="--num-points does not apply to ShapeNetPart"):
        prepare_cache(sp, num_points=512, log=quiet, progress=False)

    mn = write_modelnet_dat(tmp_path / "mn")
    [c] = prepare_cache(mn, split="train", log=quiet, progress=False)  # the .dat is the source: kept as is
    ds = CachedDataset(c, "train")
    assert len(ds) == 5 and ds[0]["points"].shape == (8192, 3) and ds.labels.tolist() == [0, 7, 14, 21, 28]
    # reduced by --num-points from the .dat: normalised as stored, not again after the FPS (as official)
    [c] = prepare_cache(mn, split="train", num_points=512, out=tmp_path / "mn512", log=quiet, progress=False)
    raw = ModelNet(mn, "train").raw(0)
    np.testing.assert_array_equal(np.sort(CachedDataset(c, "train")[0]["points"], 0), np.sort(_fps(raw, 512), 0))


def test_skip_bad_files_and_header_fixup(tmp_path):
    root = tmp_path / "objects"
    rng = np.random.default_rng(0)
    for c in ("cone", "cube"):
        for s in ("train", "test"):
            (root / c / s).mkdir(parents=True)
            for i in range(3):
                np.save(root / c / s / f"{c}_{i}.npy", rng.normal(size=(300, 3)).astype(np.float32))
    (root / "cube" / "train" / "cube_1.npy").write_bytes(b"garbage")
    with pytest.raises(DataError, match="cube_1.npy"):
        prepare_cache(root, "folder", "train", log=quiet, progress=False, out=tmp_path / "c")
    logs = []
    [c] = prepare_cache(root, "folder", "train", skip_bad=True, log=logs.append, progress=False,
                        out=tmp_path / "c")
    assert "5 shapes x 300 points" in logs[0] and "1 unreadable skipped (first:" in logs[0]
    ds = CachedDataset(c, "train")
    assert len(ds) == 5 and ds.labels.tolist() == [0, 0, 0, 1, 1] and find_cache(c) == c
    np.save(root / "cone" / "train" / "cone_7.npy", rng.normal(size=(300, 3)).astype(np.float32))
    with pytest.raises(DataError, match="stale cache: the train source files"):  # a file was added
        CachedDataset(c, "train")
    prepare_cache(root, "folder", "train", skip_bad=True, log=quiet, progress=False, out=tmp_path / "c")
    assert len(CachedDataset(c, "train")) == 6
    np.save(root / "cone" / "test" / "cone_9.npy", rng.normal(size=(200, 3)).astype(np.float32))
    with pytest.raises(DataError, match="has 200 points, the others 300; pass --num-points"):
        prepare_cache(root, "folder", "test", log=quiet, progress=False, out=tmp_path / "c")
    prepare_cache(root, "folder", "test", num_points=100, log=quiet, progress=False, out=tmp_path / "c")
    assert CachedDataset(c, "test")[6]["points"].shape == (100, 3)
    # the .npy header reserved for the largest shape is rewritten, same length, for fewer rows
    for rows in (0, 1, 12345):
        h = _npy_header(np.float32, (rows, 3), len(_npy_header(np.float32, (10**12, 3))))
        assert len(h) % 64 == 0
    with pytest.raises(DataError, match="nothing to prepare for synthetic"):
        prepare_cache(root, "synthetic", log=quiet)
    with pytest.raises(DataError, match="not a pointbert cache"):
        CachedDataset(tmp_path)
