"""Official dataset loaders: miniature files in the exact published formats, the genuine ModelNet
fixtures, and (marked ``data``) the full shared ModelNet40."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from pointbert.config import DataConfig
from pointbert.data import build_dataset
from pointbert.data.official import (
    MODELNET40_CLASSES,
    SCANOBJECTNN_CLASSES,
    SHAPENETPART_CATEGORIES,
    SHAPENETPART_PARTS,
    EpisodeDataset,
    ModelNet,
    ModelNetFewShot,
    ScanObjectNN,
    ShapeNet55,
    ShapeNetPart,
    load_numpy_pickle,
    make_fewshot_episode,
    pc_normalize,
)
from pointbert.errors import DataError
from pointbert.ops import fps

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
MN_FIXTURE = SHARED / "fixtures" / "modelnet40_normal_resampled"
SN_FIXTURE = SHARED / "fixtures" / "shapenet55" / "data"
MN_FULL = SHARED / "ModelNet40"

needs_fixture = pytest.mark.skipif(not MN_FIXTURE.is_dir(),
                                   reason=f"shared fixtures not found at {MN_FIXTURE}")


def check_contract(item: dict, n: int | None = None, parts: bool = False) -> None:
    assert isinstance(item["points"], np.ndarray) and item["points"].dtype == np.float32
    assert item["points"].ndim == 2 and item["points"].shape[1] == 3
    assert n is None or len(item["points"]) == n
    assert isinstance(item["label"], np.int64)
    if parts:
        assert item["parts"].dtype == np.int64 and item["parts"].shape == (len(item["points"]),)
        assert isinstance(item["category"], np.int64)


def in_unit_sphere(p: np.ndarray) -> bool:
    r = np.linalg.norm(p, axis=1)
    return bool(np.isclose(r.max(), 1, atol=1e-5) and np.allclose(p.mean(0), 0, atol=1e-5))


# --------------------------------------------------------------------------------------------------
# writers of miniature datasets in the official formats (also used by test_data_cache.py)
# --------------------------------------------------------------------------------------------------


def write_shapenet55(root: Path, n_train: int = 3, n_test: int = 2, points: int = 8192) -> Path:
    """data/ShapeNet55-34/{shapenet_pc, ShapeNet-55} + data/shapenet_synset_dict.json."""
    rng = np.random.default_rng(0)
    base = root / "ShapeNet55-34"
    (base / "shapenet_pc").mkdir(parents=True)
    (base / "ShapeNet-55").mkdir()
    synsets = ["02691156", "03001627", "04379243"]
    names = {"train": [], "test": []}
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            name = f"{synsets[i % 3]}-{split}{i:04d}abc.npy"
            cloud = rng.normal(size=(points, 3)) * 0.3 + 0.2
            np.save(base / "shapenet_pc" / name, cloud.astype(np.float32))
            names[split].append(name)
        (base / "ShapeNet-55" / f"{split}.txt").write_text("\n".join(names[split]) + "\n")
    (root / "shapenet_synset_dict.json").write_text(json.dumps(
        {"04379243": "table", "02691156": "airplane", "03001627": "chair", "02747177": "trash bin"}))
    return root


def write_scanobjectnn(root: Path, n: int = 6) -> Path:
    """main_split/ and main_split_nobg/ h5 files with the real keys (data, label, mask)."""
    rng = np.random.default_rng(1)
    for sub, stem in (("main_split", "objectdataset"), ("main_split_nobg", "objectdataset"),
                      ("main_split", "objectdataset_augmentedrot_scale75")):
        (root / sub).mkdir(parents=True, exist_ok=True)
        for split in ("training", "test"):
            with h5py.File(root / sub / f"{split}_{stem}.h5", "w") as f:
                f["data"] = rng.normal(size=(n, 2048, 3)).astype(np.float32) * 2  # not normalised
                f["label"] = (np.arange(n) % 15).astype(np.int64)
                f["mask"] = np.zeros((n, 2048), np.int64)
    return root


def write_shapenetpart(root: Path) -> Path:
    """synsetoffset2category.txt, <synset>/<id>.txt rows 'x y z nx ny nz part', json split lists."""
    rng = np.random.default_rng(2)
    cats = [("Airplane", "02691156"), ("Mug", "03797390"), ("Table", "04379243")]
    (root / "train_test_split").mkdir(parents=True)
    (root / "synsetoffset2category.txt").write_text("".join(f"{c}\t{s}\n" for c, s in cats))
    lists = {"train": [], "val": [], "test": []}
    k = 0
    for split, count in (("train", 3), ("val", 2), ("test", 2)):
        for _ in range(count):
            cat, syn = cats[k % 3]
            (root / syn).mkdir(exist_ok=True)
            n = 1500 + 100 * k
            parts = rng.choice(SHAPENETPART_PARTS[cat], n)
            rows = np.concatenate([rng.normal(size=(n, 6)) + 3, parts[:, None]], 1)
            np.savetxt(root / syn / f"m{k:03d}.txt", rows, fmt=["%.6f"] * 6 + ["%d"])
            lists[split].append(f"shape_data/{syn}/m{k:03d}")
            k += 1
    for split, entries in lists.items():
        (root / "train_test_split" / f"shuffled_{split}_file_list.json").write_text(json.dumps(entries))
    return root


def write_fewshot(root: Path, way: int = 5, shot: int = 2, fold: int = 0, queries: int = 3) -> Path:
    """{way}way_{shot}shot/{fold}.pkl: dict train/test of (points (8192, 6) float32, new, original)."""
    rng = np.random.default_rng(3)
    orig = rng.permutation(40)[:way]
    data = {}
    for split, per in (("train", shot), ("test", queries)):
        items = [(rng.normal(size=(8192, 6)).astype(np.float32), new, int(orig[new]))
                 for new in range(way) for _ in range(per)]
        data[split] = [items[i] for i in rng.permutation(len(items))]
    (root / f"{way}way_{shot}shot").mkdir(parents=True)
    with open(root / f"{way}way_{shot}shot" / f"{fold}.pkl", "wb") as f:
        pickle.dump(data, f)
    return root


def write_modelnet_dat(root: Path, split: str = "train", n: int = 5, points: int = 8192) -> Path:
    """modelnet40_{split}_{points}pts_fps.dat: [list of (N, 6) float32, list of int32 (1,)]."""
    rng = np.random.default_rng(4)
    root.mkdir(parents=True, exist_ok=True)
    (root / "modelnet40_shape_names.txt").write_text("\n".join(MODELNET40_CLASSES) + "\n")
    pts = [rng.normal(size=(points, 6)).astype(np.float32) for _ in range(n)]
    labels = [np.array([i * 7 % 40], dtype=np.int32) for i in range(n)]
    with open(root / f"modelnet40_{split}_{points}pts_fps.dat", "wb") as f:
        pickle.dump([pts, labels], f)
    return root


# --------------------------------------------------------------------------------------------------
# ModelNet (genuine fixtures)
# --------------------------------------------------------------------------------------------------


@needs_fixture
def test_modelnet_fixture_names_missing_files_and_offers_present_only():
    with pytest.raises(DataError) as e:
        ModelNet(MN_FIXTURE, "train")
    msg = str(e.value)
    assert "9803 of 9843" in msg and "modelnet40_train.txt" in msg and "airplane/airplane_0021.txt" in msg
    assert "present_only=True" in msg and "\n" not in msg
    ds = ModelNet(MN_FIXTURE, "train", num_points=256, present_only=True)
    assert len(ds) == 40 and ds.missing == 9803
    assert ds.classes == list(MODELNET40_CLASSES)
    assert list(np.bincount(ds.labels)) == [20, 20]
    with pytest.raises(DataError, match="none of the 2468"):
        ModelNet(MN_FIXTURE, "test", present_only=True)


@needs_fixture
def test_modelnet_fixture_items_official_sampling():
    ds = ModelNet(MN_FIXTURE, "train", num_points=128, present_only=True, seed=0)
    raw = ds.raw(3)
    assert raw.shape == (10000, 3) and in_unit_sphere(raw)  # pc_norm'ed xyz, normals dropped
    a, b = ds[3], ds[3]
    check_contract(a, 128)
    assert not np.array_equal(a["points"], b["points"])  # train: point order permuted per call
    assert np.array_equal(np.sort(a["points"], 0), np.sort(b["points"], 0))  # same FPS set
    # the FPS set starts at point 0 and is a set of raw points, normalised again after the FPS (spec 2.2)
    idx = fps(torch.from_numpy(raw)[None], 128)[0].numpy()
    assert idx[0] == 0
    np.testing.assert_allclose(np.sort(a["points"], 0), np.sort(pc_normalize(raw[idx]), 0), atol=1e-6)
    np.testing.assert_allclose(a["points"].mean(0), 0, atol=1e-6)
    ten = ModelNet(MN_FIXTURE, "train", num_classes=10, num_points=64, present_only=True)
    assert ten.classes[0] == "bathtub" and len(ten.classes) == 10 and set(ten.labels) == {0}


def test_modelnet_dat_pickle_and_bad_structures(tmp_path):
    root = write_modelnet_dat(tmp_path / "mn")
    ds = ModelNet(root, "train")
    assert ds.num_points == 8192 and len(ds) == 5 and list(ds.labels) == [0, 7, 14, 21, 28]
    item = ds[1]
    check_contract(item, 8192)
    assert in_unit_sphere(item["points"])
    test_like = ModelNet(root, "train").raw(1)
    assert np.array_equal(np.sort(test_like, 0), np.sort(item["points"], 0))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "modelnet40_shape_names.txt").write_text("\n".join(MODELNET40_CLASSES))
    with open(bad / "modelnet40_train_8192pts_fps.dat", "wb") as f:
        pickle.dump({"points": []}, f)
    with pytest.raises(DataError, match="modelnet40_train_8192pts_fps.dat: expected a pickled"):
        ModelNet(bad, "train")
    with open(bad / "modelnet40_train_8192pts_fps.dat", "wb") as f:
        pickle.dump([[np.zeros((10, 6), np.float32)], [np.array([99], np.int32)]], f)
    with pytest.raises(DataError, match="label"):
        ModelNet(bad, "train")


class _Evil:
    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_restricted_unpickler_never_runs_code(tmp_path):
    marker = tmp_path / "pwned"
    root = tmp_path / "mn"
    root.mkdir()
    (root / "modelnet40_shape_names.txt").write_text("\n".join(MODELNET40_CLASSES))
    with open(root / "modelnet40_train_8192pts_fps.dat", "wb") as f:
        pickle.dump([[_Evil(str(marker))], [np.array([0], np.int32)]], f)
    with pytest.raises(DataError, match="refusing to load.*posix.system|refusing to load.*os.system"):
        ModelNet(root, "train")
    assert not marker.exists()
    (tmp_path / "trunc.pkl").write_bytes(pickle.dumps([np.zeros(3)])[:20])
    with pytest.raises(DataError, match="trunc.pkl: truncated or not a pickle"):
        load_numpy_pickle(tmp_path / "trunc.pkl")
    # numpy arrays, dtypes and scalars of every pickle protocol load
    for proto in range(2, pickle.HIGHEST_PROTOCOL + 1):
        obj = {"a": np.arange(6, dtype=np.int32).reshape(2, 3), "s": np.float32(2.5), "t": (1, "x")}
        (tmp_path / "ok.pkl").write_bytes(pickle.dumps(obj, protocol=proto))
        back = load_numpy_pickle(tmp_path / "ok.pkl")
        assert np.array_equal(back["a"], obj["a"]) and back["s"] == 2.5 and back["t"] == (1, "x")


def test_modelnet_folder_layout_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("bed", "chair", "airplane"):
        for s, n in (("train", 3), ("test", 2)):
            (tmp_path / c / s).mkdir(parents=True)
            for i in range(n):
                cloud = rng.normal(size=(1024, 3)).astype(np.float32)
                np.save(tmp_path / c / s / f"{c}_{i + 1:04d}.npy", cloud)
    ds = ModelNet(tmp_path, "test")
    assert ds.layout == "folder" and ds.classes == ["airplane", "bed", "chair"] and len(ds) == 6
    item = ds[5]
    check_contract(item, 1024)
    assert item["label"] == 2 and in_unit_sphere(item["points"])
    np.testing.assert_array_equal(ds[5]["points"], item["points"])  # test: not permuted
    assert ModelNet(tmp_path, "train", num_classes=10).classes == ["bed", "chair"]
    with pytest.raises(DataError, match="not a ModelNet folder"):
        ModelNet(tmp_path / "bed", "train")
    with pytest.raises(DataError, match="ModelNet folder not found"):
        ModelNet(tmp_path / "nope", "train")
    with pytest.raises(DataError, match="split must be"):
        ModelNet(tmp_path, "validation")


# --------------------------------------------------------------------------------------------------
# ShapeNet-55
# --------------------------------------------------------------------------------------------------


def test_shapenet55_random_subset_normalised_and_whole(tmp_path):
    root = write_shapenet55(tmp_path / "data")
    ds = ShapeNet55(root, "train", num_points=1024)
    assert len(ds) == 3 and ds.root.name == "ShapeNet55-34"
    assert ds.classes == ["airplane", "trash bin", "chair", "table"]  # the synset dict, sorted by synset
    assert [ds.classes[i] for i in ds.labels] == ["airplane", "chair", "table"]
    a, b = ds[0], ds[0]
    check_contract(a, 1024)
    assert in_unit_sphere(a["points"]) and not np.array_equal(a["points"], b["points"])
    whole = ShapeNet55(root, "train", whole=True)
    assert len(whole) == 5 and whole.files[0].name.startswith("02691156-test")  # test list first
    test = ShapeNet55(root, "test", num_points=512)
    np.testing.assert_array_equal(test[1]["points"], test[1]["points"])  # evaluation: seeded per item
    (root / "ShapeNet55-34" / "shapenet_pc" / ds.files[1].name).unlink()
    with pytest.raises(DataError, match="1 of 3 files listed in ShapeNet-55/train.txt are missing"):
        ShapeNet55(root, "train")
    assert len(ShapeNet55(root, "train", present_only=True)) == 2


@pytest.mark.skipif(not SN_FIXTURE.is_dir(), reason=f"shared fixtures not found at {SN_FIXTURE}")
def test_shapenet55_genuine_lists(tmp_path):
    base = tmp_path / "data" / "ShapeNet55-34"
    (base / "shapenet_pc").mkdir(parents=True)
    (base / "ShapeNet-55").symlink_to(SN_FIXTURE / "ShapeNet55-34" / "ShapeNet-55")
    (tmp_path / "data" / "shapenet_synset_dict.json").symlink_to(SN_FIXTURE / "shapenet_synset_dict.json")
    first = (SN_FIXTURE / "ShapeNet55-34" / "ShapeNet-55" / "train.txt").read_text().split()[:2]
    for name in first:
        np.save(base / "shapenet_pc" / name, np.random.default_rng(0).normal(size=(8192, 3)).astype("f4"))
    with pytest.raises(DataError, match="41950 of 41952 files"):
        ShapeNet55(tmp_path / "data", "train")
    ds = ShapeNet55(tmp_path / "data", "train", present_only=True, whole=True)
    assert len(ds) == 2 and len(ds.classes) == 55
    names = json.loads((SN_FIXTURE / "shapenet_synset_dict.json").read_text())
    assert ds.classes[ds.labels[0]] == names[first[0][:8]]


# --------------------------------------------------------------------------------------------------
# ScanObjectNN
# --------------------------------------------------------------------------------------------------


def test_scanobjectnn_variants(tmp_path):
    root = write_scanobjectnn(tmp_path / "ScanObjectNN")
    for variant in ("objectbg", "objectonly", "hardest"):
        ds = ScanObjectNN(root, "train", variant)
        assert len(ds) == 6 and ds.classes == list(SCANOBJECTNN_CLASSES)
        item = ds[2]
        check_contract(item, 2048)
        raw = ds.raw(2)
        assert np.array_equal(np.sort(item["points"], 0), np.sort(raw, 0))  # not normalised, permuted
        assert not np.array_equal(item["points"], raw)
        test = ScanObjectNN(root, "test", variant)
        np.testing.assert_array_equal(test[2]["points"], test.raw(2))  # test: as stored
    sub = ScanObjectNN(root / "main_split_nobg", "test", "objectonly")  # the sub-folder itself as root
    assert sub.files[0].parent.name == "main_split_nobg"
    with h5py.File(root / "main_split" / "test_objectdataset.h5", "w") as f:
        f["points"] = np.zeros((2, 2048, 3), np.float32)
        f["label"] = np.zeros(2, np.int64)
    with pytest.raises(DataError, match=r"test_objectdataset.h5: missing h5 dataset\(s\) data \(found: lab"):
        ScanObjectNN(root, "test", "objectbg")
    (root / "main_split" / "test_objectdataset.h5").write_bytes(b"not hdf5")
    with pytest.raises(DataError, match="not a readable HDF5 file"):
        ScanObjectNN(root, "test", "objectbg")
    with pytest.raises(DataError, match="variant must be one of"):
        ScanObjectNN(root, "test", "pb_t50_rs")


# --------------------------------------------------------------------------------------------------
# ShapeNetPart
# --------------------------------------------------------------------------------------------------


def test_shapenetpart_table():
    assert SHAPENETPART_CATEGORIES[0] == "Airplane" and SHAPENETPART_CATEGORIES[-1] == "Table"
    ids = [p for c in SHAPENETPART_CATEGORIES for p in SHAPENETPART_PARTS[c]]
    assert ids == list(range(50))
    assert SHAPENETPART_PARTS["Motorbike"] == (30, 31, 32, 33, 34, 35)
    assert SHAPENETPART_PARTS["Table"] == (47, 48, 49)


def test_shapenetpart_items_splits_and_errors(tmp_path):
    root = write_shapenetpart(tmp_path / "shapenetcore_partanno_segmentation_benchmark_v0_normal")
    tv = ShapeNetPart(root, "trainval")
    assert len(tv) == 5 and len(ShapeNetPart(root, "train")) == 3 and len(ShapeNetPart(root, "val")) == 2
    assert [tv.classes[i] for i in tv.labels] == ["Airplane", "Mug", "Table", "Airplane", "Mug"]
    item = tv[1]
    check_contract(item, 2048, parts=True)
    assert item["category"] == item["label"] == SHAPENETPART_CATEGORIES.index("Mug")
    assert set(item["parts"]) <= set(SHAPENETPART_PARTS["Mug"])
    pts, parts = tv.raw(1)
    assert pts.shape == (1600, 3) and in_unit_sphere(pts)
    assert np.isin(item["points"], pts).all()  # resampled (with replacement) from the normalised cloud
    test = ShapeNetPart(root, "test", num_points=4096)
    a, b = test[0], test[0]
    np.testing.assert_array_equal(a["points"], b["points"])  # seeded per item at test time
    assert len(np.unique(a["points"], axis=0)) < 4096 and len(a["points"]) == 4096  # with replacement
    bad = root / "04379243" / "m002.txt"
    rows = np.loadtxt(bad)
    rows[0, 6] = 3  # an Airplane part in a Table
    np.savetxt(bad, rows)
    with pytest.raises(DataError, match="m002.txt: part label 3 is not a Table part"):
        ShapeNetPart(root, "train", cache_size=0)[2]
    (root / "train_test_split" / "shuffled_val_file_list.json").write_text('["shape_data/99999999/x"]')
    with pytest.raises(DataError, match="shuffled_val_file_list.json: bad entry"):
        ShapeNetPart(root, "val")


# --------------------------------------------------------------------------------------------------
# few-shot
# --------------------------------------------------------------------------------------------------


def test_fewshot_official_pickle(tmp_path):
    root = write_fewshot(tmp_path / "ModelNetFewshot")
    sup, qry = ModelNetFewShot(root, "train", 5, 2, 0), ModelNetFewShot(root, "test", 5, 2, 0)
    assert len(sup) == 10 and len(qry) == 15 and sorted(set(sup.labels)) == list(range(5))
    original = dict(zip(sup.labels.tolist(), sup.original_labels.tolist()))
    assert sup.classes == [MODELNET40_CLASSES[original[k]] for k in range(5)]
    item = sup[0]
    check_contract(item, 8192)
    assert in_unit_sphere(item["points"])
    with pytest.raises(DataError, match="3.pkl: few-shot episode not found"):
        ModelNetFewShot(root, "train", 5, 2, 3)
    # DATASET.md spells the folders 5way10shot/ (spec 11.15): read as well, also through build_dataset
    (root / "5way_2shot").rename(root / "5way2shot")
    assert ModelNetFewShot(root, "test", 5, 2, 0).labels.tolist() == qry.labels.tolist()
    cfg = DataConfig(dataset="fewshot", path=str(root), way=5, shot=2, fold=0)
    assert build_dataset(cfg, "train").labels.tolist() == sup.labels.tolist()


def test_make_fewshot_episode_protocol():
    labels = np.repeat(np.arange(12), 40)  # 12 classes x 40 shapes
    train, test = np.arange(0, len(labels), 2), np.arange(1, len(labels), 2)  # 20 + 20 per class
    ep = make_fewshot_episode(labels, 5, 10, 3, train_indices=train, test_indices=test)
    assert ep.support.shape == (50,) and ep.query.shape == (100,) and ep.classes.shape == (5,)
    assert set(ep.support) <= set(train) and set(ep.query) <= set(test)
    assert len(set(ep.support)) == 50 and len(set(ep.query)) == 100
    for c in ep.classes:
        assert (labels[ep.support] == c).sum() == 10 and (labels[ep.query] == c).sum() == 20
    again = make_fewshot_episode(labels, 5, 10, 3, train_indices=train, test_indices=test)
    assert all(np.array_equal(x, y) for x, y in zip(ep, again))
    other = make_fewshot_episode(labels, 5, 10, 4, train_indices=train, test_indices=test)
    assert not np.array_equal(ep.support, other.support)
    shared = make_fewshot_episode(labels, 10, 20, 0)  # one pool: support and queries disjoint
    assert not set(shared.support) & set(shared.query)
    with pytest.raises(DataError, match="only 0 classes"):
        make_fewshot_episode(labels, 5, 30, 0, train_indices=train, test_indices=test)


def test_fewshot_from_synthetic_via_build_dataset():
    cfg = DataConfig(dataset="fewshot", path="", way=5, shot=10, fold=2, num_points=64)
    sup, qry = build_dataset(cfg, "train"), build_dataset(cfg, "test")
    assert isinstance(sup, EpisodeDataset) and len(sup) == 50 and len(qry) == 100
    assert sorted(set(sup.labels)) == list(range(5)) and sup.classes == qry.classes
    check_contract(sup[0], 64)
    assert sup[7]["label"] == sup.labels[7]


# --------------------------------------------------------------------------------------------------
# build_dataset
# --------------------------------------------------------------------------------------------------


def test_build_dataset_dispatch(tmp_path):
    sn = write_shapenet55(tmp_path / "sn")
    so = write_scanobjectnn(tmp_path / "so")
    sp = write_shapenetpart(tmp_path / "sp")
    fs = write_fewshot(tmp_path / "fs")
    syn = build_dataset(DataConfig(dataset="synthetic", num_points=128), "train")
    assert len(syn) == 2000 and syn[0]["points"].shape == (128, 3)
    assert len(build_dataset(DataConfig(dataset="synthetic", num_points=128, whole=True), "train")) == 2500
    d = build_dataset(DataConfig(dataset="shapenet55", path=str(sn), whole=True, num_points=256), "train")
    assert isinstance(d, ShapeNet55) and len(d) == 5 and d[0]["points"].shape == (256, 3)
    d = build_dataset(DataConfig(dataset="scanobjectnn", path=str(so), variant="hardest"), "test")
    assert isinstance(d, ScanObjectNN) and d.variant == "hardest"
    d = build_dataset(DataConfig(dataset="shapenetpart", path=str(sp), num_points=2048), "train")
    assert isinstance(d, ShapeNetPart) and d.split == "trainval"
    d = build_dataset(DataConfig(dataset="fewshot", path=str(fs), way=5, shot=2), "test")
    assert isinstance(d, ModelNetFewShot) and len(d) == 15
    for c in ("a", "b"):
        for s in ("train", "test"):
            (tmp_path / "folder" / c / s).mkdir(parents=True)
            np.savetxt(tmp_path / "folder" / c / s / "x.xyz", np.random.default_rng(0).normal(size=(50, 3)))
    d = build_dataset(DataConfig(dataset="folder", path=str(tmp_path / "folder"), num_points=32), "train")
    assert d.classes == ["a", "b"] and d[0]["points"].shape == (32, 3)
    with pytest.raises(DataError, match="data.path is empty"):
        build_dataset(DataConfig(dataset="modelnet40"), "train")
    with pytest.raises(DataError, match="data.dataset must be one of"):
        build_dataset(DataConfig(dataset="kitti"), "train")
    with pytest.raises(DataError, match="variant must be one of"):
        build_dataset(DataConfig(dataset="scanobjectnn", path=str(so)), "train")


@needs_fixture
def test_build_dataset_modelnet_fixture_reports_missing():
    with pytest.raises(DataError, match="files listed in modelnet40_train.txt are missing"):
        build_dataset(DataConfig(dataset="modelnet40", path=str(MN_FIXTURE)), "train")


def test_package_import_is_light():
    code = ("import sys, pointbert.data; assert 'torch' not in sys.modules and 'numpy' not in sys.modules, "
            "sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy'))")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_dataloader_workers_draw_different_permutations(tmp_path):
    torch = pytest.importorskip("torch")
    ds = ScanObjectNN(write_scanobjectnn(tmp_path, n=4), "train", "objectbg")
    ds.points[:] = ds.points[:1]  # identical clouds: only the permutations differ

    def orders(workers: int) -> list[list[float]]:
        torch.manual_seed(0)
        loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=workers)
        return [b["points"][0, :4, 0].tolist() for b in loader]

    first = orders(2)
    assert first[0] != first[1]  # worker 0 and worker 1 use different streams
    assert first == orders(2)  # and a seeded run repeats
    single = orders(0)
    assert single[0] != single[1]  # one process: one stream, a fresh permutation per item


# --------------------------------------------------------------------------------------------------
# the full shared ModelNet40 (1024-point .npy folder)
# --------------------------------------------------------------------------------------------------


@pytest.mark.data
@pytest.mark.skipif(not MN_FULL.is_dir(), reason=f"shared ModelNet40 not found at {MN_FULL}")
def test_full_modelnet40_folder():
    train = build_dataset(DataConfig(dataset="modelnet40", path=str(MN_FULL)), "train")
    test = ModelNet(MN_FULL, "test")
    assert (len(train), len(test)) == (9843, 2468)
    assert train.classes == list(MODELNET40_CLASSES) == test.classes
    assert list(np.bincount(test.labels))[:3] == [100, 50, 100]  # airplane, bathtub, bed
    item = test[0]
    check_contract(item, 1024)
    assert in_unit_sphere(item["points"]) and item["label"] == 0
    ten = ModelNet(MN_FULL, "train", num_classes=10)
    assert ten.classes == ["bathtub", "bed", "chair", "desk", "dresser", "monitor", "night_stand", "sofa",
                           "table", "toilet"] and len(ten) == 3991
