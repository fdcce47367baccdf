"""`pointbert data inspect`: format detection, the report, and its exit status."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from pointbert.cli import main
from pointbert.data.inspect import detect_format, inspect_command
from pointbert.data.official import ShapeNet55
from pointbert.errors import DataError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def run(path, dataset="auto", max_files=None) -> int:
    return inspect_command(argparse.Namespace(path=str(path), dataset=dataset, max_files=max_files))


def unit_cloud(seed: int, n: int = 64) -> np.ndarray:
    p = np.random.default_rng(seed).normal(size=(n, 3))
    p -= p.mean(axis=0)
    return (p / np.linalg.norm(p, axis=1).max()).astype(np.float32)


@pytest.fixture
def good(tmp_path) -> Path:
    root = tmp_path / "shapes"
    for c, (ntr, nte) in {"bowl": (3, 1), "night_stand": (2, 2)}.items():
        for split, n in (("train", ntr), ("test", nte)):
            (root / c / split).mkdir(parents=True)
            for i in range(n):
                np.save(root / c / split / f"{c}_{split}_{i}.npy", unit_cloud(i, 64 + 32 * i))
    return root


@pytest.fixture
def bad(tmp_path) -> Path:
    root = tmp_path / "mine"
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            np.savetxt(root / c / f"{i}.xyz", unit_cloud(i) * 30 + 5)
    pts = unit_cloud(9)
    pts[3] = np.nan
    np.save(root / "cat" / "broken.npy", pts)
    np.savetxt(root / "dog" / "same.txt", np.zeros((10, 3)))
    (root / "dog" / "notes.docx").write_bytes(b"PK")
    return root


def test_good_folder(good, capsys):
    assert run(good) == 0
    out = capsys.readouterr().out
    assert "class-per-folder dataset, with train/ and test/ subfolders" in out
    lines = out.splitlines()
    row = next(ln for ln in lines if ln.strip().startswith("night_stand"))
    assert row.split() == ["night_stand", "2", "2", "4"]
    total = next(ln for ln in lines if ln.strip().startswith("total"))
    assert total.split() == ["total", "5", "3", "8"]
    header = next(ln for ln in lines if ln.split()[:2] == ["class", "train"])
    assert header.index("train") + len("train") == row.index("2") + 1  # right-aligned columns
    assert "min 64   median 80   max 128" in out
    assert "normalised          yes" in out
    assert out.rstrip().endswith("Summary: 8 files in 2 classes; no problems.")


def test_bad_folder(bad, capsys):
    assert run(bad) == 1
    out = capsys.readouterr().out
    problems = out[out.index("Problems (3):"):].splitlines()[1:4]
    by_file = {ln.split()[0]: ln for ln in problems}
    assert "3 non-finite values (NaN or inf) among 64 points" in by_file["cat/broken.npy"]
    assert "identical" in by_file["dog/same.txt"]
    assert "unsupported file type '.docx'" in by_file["dog/notes.docx"]
    assert "normalised          no" in out
    assert "Summary: 8 files in 2 classes; 3 problems." in out


def test_max_files_reads_a_spread(good, capsys):
    assert run(good, max_files=3) == 0
    assert "3 of 8, evenly spread (--max-files)" in capsys.readouterr().out


def test_single_files(tmp_path, capsys):
    np.save(tmp_path / "one.npy", unit_cloud(0, 100))
    assert run(tmp_path / "one.npy") == 0
    out = capsys.readouterr().out
    assert out.startswith("one.npy: NPY point cloud") and "points              100" in out
    (tmp_path / "cube.off").write_text("OFF4 4 0\n0 0 0\n1 0 0\n0 1 0\n0 0 1\n3 0 1 2\n3 0 1 3\n3 0 2 3\n"
                                       "3 1 2 3\n")
    assert run(tmp_path / "cube.off") == 0
    assert "OFF mesh" in capsys.readouterr().out
    (tmp_path / "bad.ply").write_text("ply\nformat ascii 1.0\nelement vertex 5\nproperty float x\n"
                                      "property float y\nproperty float z\nend_header\n1 2 3\n")
    assert run(tmp_path / "bad.ply") == 1
    out = capsys.readouterr().out
    assert "bad.ply  truncated PLY: the header says 5 vertices, the file has 1" in out


def test_flat_folder_of_files(tmp_path, capsys):
    for i in range(3):
        np.save(tmp_path / f"{i}.npy", unit_cloud(i))
    assert detect_format(tmp_path) == "files"
    assert run(tmp_path) == 0
    assert "a folder of 3 point-cloud files, no class subfolders" in capsys.readouterr().out


def test_inference_inputs_read_as_predict_reads_them(good, tmp_path, capsys):
    """A (B, N, 3) .npy is B clouds for predict/embed (no problem), one cloud per file in training data."""
    flat = tmp_path / "flat"
    flat.mkdir()
    np.save(flat / "batch.npy", np.stack([unit_cloud(i, 80) for i in range(4)]))
    np.save(flat / "small.npy", unit_cloud(7, 20))
    assert run(flat / "batch.npy") == 0
    out = capsys.readouterr().out
    assert "clouds              4 (a (B, N, 3) .npy holds B clouds)" in out and "80 (every cloud)" in out
    assert run(flat) == 0
    out = capsys.readouterr().out
    assert "all 2; 2 readable" in out and "clouds              5" in out
    assert "1 cloud under 64 points: too few for the official 1k-point models" in out
    np.save(good / "bowl" / "train" / "batch.npy", np.stack([unit_cloud(i, 80) for i in range(4)]))
    assert run(good) == 1
    assert "holds 4 clouds (shape (4, 80, 3)); expected one cloud (N, 3) per file" in capsys.readouterr().out


def test_through_the_cli(good, bad, tmp_path, capsys):
    assert main(["data", "inspect", str(good), "--max-files", "4"]) == 0
    assert "Summary: 8 files in 2 classes" in capsys.readouterr().out
    assert main(["data", "inspect", str(bad)]) == 1
    assert "cat/broken.npy" in capsys.readouterr().out
    assert main(["data", "inspect", str(tmp_path / "absent")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"pointbert data inspect: error: {tmp_path / 'absent'}: no such file or folder"
    assert main(["data", "inspect", str(good), "--dataset", "scanobjectnn"]) == 2
    assert "not a ScanObjectNN folder" in capsys.readouterr().err
    assert main(["data", "inspect", str(good), "--dataset", "file"]) == 2
    assert main(["data", "inspect", str(good), "--dataset", "nonsense"]) == 2
    assert main(["data", "inspect", str(bad), "--max-files", "0"]) == 2
    assert "--max-files must be positive" in capsys.readouterr().err
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "readme.md").write_text("hi")
    assert main(["data", "inspect", str(tmp_path / "nothing")]) == 2
    assert "cannot tell the format" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# official layouts, in miniature
# --------------------------------------------------------------------------------------------------


def test_modelnet_normal_resampled(tmp_path, capsys):
    root = tmp_path / "modelnet40_normal_resampled"
    (root / "night_stand").mkdir(parents=True)
    (root / "modelnet40_shape_names.txt").write_text("airplane\nnight_stand\n")
    (root / "modelnet40_train.txt").write_text("night_stand_0001\nnight_stand_0002\n")
    (root / "modelnet40_test.txt").write_text("night_stand_0003\n")
    for i in (1, 2, 3):
        pts = np.hstack([unit_cloud(i, 50), unit_cloud(i + 10, 50)])
        np.savetxt(root / "night_stand" / f"night_stand_000{i}.txt", pts, delimiter=",", fmt="%.6f")
    assert detect_format(root) == "modelnet40"
    assert run(root) == 0
    out = capsys.readouterr().out
    assert "official ModelNet40" in out and "classes             2 (modelnet40_shape_names.txt)" in out
    (root / "night_stand" / "night_stand_0002.txt").unlink()
    assert run(root) == 1
    assert "1 of 2 listed shapes have no .txt file" in capsys.readouterr().out
    (root / "modelnet40_train_8192pts_fps.dat").write_bytes(b"\x80")  # the cache covers the missing file
    assert run(root) == 0


def test_modelnet_folder_layout_is_read_as_modelnet(tmp_path):
    from pointbert.data.official import MODELNET10_CLASSES

    root = tmp_path / "ModelNet10"
    for c in MODELNET10_CLASSES:
        for split in ("train", "test"):
            (root / c / split).mkdir(parents=True)
            np.save(root / c / split / f"{c}_0001.npy", unit_cloud(1, 64).astype(np.float32))
    assert detect_format(root) == "modelnet10"
    assert run(root) == 0
    (root / "toilet" / "test").rename(root / "toilet" / "val")  # no longer the layout: a class folder
    assert detect_format(root) == "folder"
    (root / "toilet" / "val").rename(root / "toilet" / "test")
    (root / "extra" / "train").mkdir(parents=True)
    assert detect_format(root) == "folder"


def test_shapenet55(tmp_path, capsys):
    root = tmp_path / "ShapeNet55-34"
    (root / "ShapeNet-55").mkdir(parents=True)
    (root / "shapenet_pc").mkdir()
    names = [f"02691156-{i:04x}.npy" for i in range(3)]
    (root / "ShapeNet-55" / "train.txt").write_text("\n".join(names[:2]) + "\n")
    (root / "ShapeNet-55" / "test.txt").write_text(names[2] + "\n")
    for i, n in enumerate(names):
        np.save(root / "shapenet_pc" / n, unit_cloud(i, 128))
    assert detect_format(tmp_path) == detect_format(root) == "shapenet55"
    checkout = tmp_path / "Point-BERT"  # data/ShapeNet55-34/ as in a checkout of the official code
    (checkout / "data").mkdir(parents=True)
    root.rename(checkout / "data" / "ShapeNet55-34")
    assert detect_format(checkout) == "shapenet55" and len(ShapeNet55(checkout, "train")) == 2
    (checkout / "data" / "ShapeNet55-34").rename(root)
    assert run(root) == 0
    assert "official ShapeNet-55" in capsys.readouterr().out
    (root / "shapenet_pc" / names[0]).unlink()
    assert run(root) == 1
    assert "1 of 2 listed files are not in shapenet_pc/" in capsys.readouterr().out


def test_scanobjectnn(tmp_path, capsys):
    for folder in ("main_split", "main_split_nobg"):
        (tmp_path / folder).mkdir()
        for split, n in (("training", 6), ("test", 3)):
            with h5py.File(tmp_path / folder / f"{split}_objectdataset.h5", "w") as h:
                h["data"] = np.zeros((n, 16, 3), np.float32)
                h["label"] = np.arange(n) % 15
    with h5py.File(tmp_path / "main_split" / "test_objectdataset_augmentedrot_scale75.h5", "w") as h:
        h["data"] = np.zeros((2, 16, 3), np.float32)
    assert detect_format(tmp_path) == "scanobjectnn"
    assert run(tmp_path) == 1
    out = capsys.readouterr().out
    assert "objectonly (OBJ_ONLY)" in out and "hardest (PB_T50_RS)" in out
    assert "no label dataset in the h5 file" in out


def test_shapenetpart(tmp_path, capsys):
    (tmp_path / "synsetoffset2category.txt").write_text("Airplane\t02691156\nBag\t02773838\n")
    (tmp_path / "train_test_split").mkdir()
    for split, ids in (("train", ["a1", "a2"]), ("val", ["a3"]), ("test", ["b1"])):
        entries = [f"shape_data/{'02691156' if i[0] == 'a' else '02773838'}/{i}" for i in ids]
        (tmp_path / "train_test_split" / f"shuffled_{split}_file_list.json").write_text(json.dumps(entries))
    for syn, i in (("02691156", "a1"), ("02691156", "a2"), ("02691156", "a3"), ("02773838", "b1")):
        (tmp_path / syn).mkdir(exist_ok=True)
        np.savetxt(tmp_path / syn / f"{i}.txt", np.hstack([unit_cloud(0, 40)] * 2 + [np.zeros((40, 1))]))
    assert detect_format(tmp_path) == "shapenetpart"
    assert run(tmp_path) == 0
    assert "categories          2 (Airplane, Bag)" in capsys.readouterr().out


def test_fewshot(tmp_path, capsys):
    for setting in ("5way_10shot", "10way_20shot"):
        (tmp_path / setting).mkdir()
        for fold in range(10 if setting == "5way_10shot" else 9):
            (tmp_path / setting / f"{fold}.pkl").write_bytes(b"")  # never opened
    assert detect_format(tmp_path) == "fewshot"
    assert run(tmp_path) == 1
    out = capsys.readouterr().out
    assert "5way_10shot" in out and "fold files missing: 9.pkl" in out


def test_shared_fixtures(capsys):
    fixtures = SHARED / "fixtures"
    if not fixtures.is_dir():
        pytest.skip(f"shared fixtures not found at {fixtures}")
    assert run(fixtures / "modelnet40_normal_resampled", max_files=4) == 1  # lists name 12,311, 40 present
    out = capsys.readouterr().out
    assert "9,803 of 9,843 listed shapes have no .txt file" in out and "points per sample   10,000" in out
    assert run(fixtures / "off", max_files=2) == 0
    assert run(fixtures / "shapenet55" / "data") == 1  # split lists only, no points
    assert "41,952" in capsys.readouterr().out


def test_detect_format_refuses_missing_path(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        detect_format(tmp_path / "nope")
