"""`pointbert predict | tokenize | embed` and the inference API on tiny checkpoints."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from pointbert.checkpoint import build_model, load_model, save_checkpoint
from pointbert.cli import main
from pointbert.config import preset
from pointbert.errors import DataError
from pointbert.inference import embed, load_clouds, predict, tokenize
from pointbert.ops import fps, gather

CLASSES = [f"class{i}" for i in range(10)]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Tiny classifier / tokenizer / pretrain checkpoints with non-trivial BatchNorm statistics."""
    root = tmp_path_factory.mktemp("ckpts")
    paths = {}
    for kind in ("classifier", "tokenizer", "pretrain"):
        cfg = preset(f"tiny-{kind}")
        torch.manual_seed(0)
        model = build_model(cfg)
        model.train()
        with torch.no_grad():  # a few forward passes give the BatchNorms running statistics
            for _ in range(2):
                x = torch.randn(4, 256, 3)
                model(x) if kind != "tokenizer" else model(x, 1.0)
        paths[kind] = root / f"{kind}.pt"
        extra = {"class_names": CLASSES} if kind == "classifier" else {}
        save_checkpoint(paths[kind], cfg, model, **extra)
    return paths


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")  # clouds about the size of the unit sphere
    rng = np.random.default_rng(0)
    single = root / "single.npy"
    np.save(single, 0.3 * rng.normal(size=(400, 3)).astype(np.float32))
    batch = root / "batch.npy"
    np.save(batch, 0.3 * rng.normal(size=(5, 300, 6)).astype(np.float32))  # xyz + normals
    folder = root / "folder"
    folder.mkdir()
    np.save(folder / "b_cloud.npy", 0.3 * rng.normal(size=(500, 3)).astype(np.float32))
    np.savetxt(folder / "a_cloud.txt", 0.3 * rng.normal(size=(350, 6)), delimiter=",")
    np.save(folder / "c_cloud.npy", 0.3 * rng.normal(size=(256, 3)).astype(np.float32))
    (folder / "notes.md").write_text("ignored\n")
    return {"single": single, "batch": batch, "folder": folder, "txt": folder / "a_cloud.txt"}


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def fps_np(points: np.ndarray, n: int) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(points[..., :3], dtype=np.float32))
    x = x[None] if x.dim() == 2 else x
    return gather(x, fps(x, n))


# --------------------------------------------------------------------------------------------------
# Commands: shapes, dtypes, equality with the model, determinism
# --------------------------------------------------------------------------------------------------


def test_predict_single_and_batch(ckpts, inputs, tmp_path, capsys):
    out = tmp_path / "logits.npy"
    code, text, err = run(capsys, "predict", ckpts["classifier"], inputs["single"], "--out", out,
                          "--top", "2")
    assert code == 0 and err == ""
    logits = np.load(out)
    assert logits.shape == (1, 10) and logits.dtype == np.float32
    model, _ = load_model(ckpts["classifier"])
    with torch.no_grad():
        expected = model(fps_np(np.load(inputs["single"]), 256)).numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)
    first = CLASSES[int(expected.argmax())]
    assert text.startswith(f"single.npy  {first} (") and text.count("class") == 2

    code, text, _ = run(capsys, "predict", ckpts["classifier"], inputs["batch"], "--out", out,
                        "--batch-size", "2")
    assert code == 0
    logits = np.load(out)
    assert logits.shape == (5, 10)
    with torch.no_grad():
        expected = model(fps_np(np.load(inputs["batch"]), 256)).numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)
    assert [line.split()[0] for line in text.splitlines()[:5]] == [f"batch.npy[{i}]" for i in range(5)]


def test_folder_and_txt_input(ckpts, inputs, tmp_path, capsys):
    out = tmp_path / "feat.npy"
    code, text, _ = run(capsys, "embed", ckpts["classifier"], inputs["folder"], "--out", out)
    assert code == 0
    names = ["a_cloud.txt", "b_cloud.npy", "c_cloud.npy"]
    assert [line.split()[1] for line in text.splitlines()[:3]] == names
    feats = np.load(out)
    assert feats.shape == (3, 64) and feats.dtype == np.float32
    points, names = load_clouds(inputs["folder"], 256)
    assert names == ["a_cloud.txt", "b_cloud.npy", "c_cloud.npy"] and points.shape == (3, 256, 3)
    txt = np.loadtxt(inputs["txt"], delimiter=",")[:, :3]
    np.testing.assert_allclose(points[0], fps_np(txt, 256)[0].numpy(), atol=1e-6)
    np.testing.assert_array_equal(points[2], np.load(inputs["folder"] / "c_cloud.npy"))  # exactly 256: as is

    code, _, _ = run(capsys, "tokenize", ckpts["tokenizer"], inputs["txt"], "--out", tmp_path / "tok.npy")
    assert code == 0 and np.load(tmp_path / "tok.npy").shape == (1, 16)


def test_embed_equals_backbone(ckpts, inputs, tmp_path, capsys):
    points = fps_np(np.load(inputs["batch"]), 256)
    for kind in ("pretrain", "classifier"):
        out = tmp_path / f"{kind}.npy"
        assert run(capsys, "embed", ckpts[kind], inputs["batch"], "--out", out, "--batch-size", "3")[0] == 0
        model, _ = load_model(ckpts[kind])
        with torch.no_grad():
            expected = model.backbone(points).numpy()
        feats = np.load(out)
        assert feats.shape == (5, 64) and feats.dtype == np.float32
        np.testing.assert_allclose(feats, expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(embed(model, points, batch_size=5), expected, rtol=1e-5, atol=1e-6)


def test_tokenize(ckpts, inputs, tmp_path, capsys):
    points = fps_np(np.load(inputs["batch"]), 256)
    for kind in ("tokenizer", "pretrain"):
        out = tmp_path / f"{kind}.npy"
        code, text, _ = run(capsys, "tokenize", ckpts[kind], inputs["batch"], "--out", out)
        assert code == 0 and "distinct of 16" in text
        ids = np.load(out)
        assert ids.shape == (5, 16) and ids.dtype == np.int64
        model, _ = load_model(ckpts[kind])
        tokenizer = model.tokenizer if kind == "pretrain" else model
        np.testing.assert_array_equal(ids, tokenizer.tokenize(points).numpy())
        np.testing.assert_array_equal(tokenize(model, points, batch_size=2), ids)
        assert ids.min() >= 0 and ids.max() < 64


def test_deterministic_and_vote(ckpts, inputs, tmp_path, capsys):
    a, b, c = tmp_path / "a.npy", tmp_path / "b.npy", tmp_path / "c.npy"
    for out, bs in ((a, "32"), (b, "32"), (c, "1")):
        assert run(capsys, "predict", ckpts["classifier"], inputs["batch"], "--out", out, "--vote", "3",
                   "--batch-size", bs)[0] == 0
    voted = np.load(a)
    assert voted.shape == (5, 10) and voted.dtype == np.float32
    np.testing.assert_array_equal(voted, np.load(b))  # two runs: identical
    np.testing.assert_allclose(voted, np.load(c), rtol=1e-5, atol=1e-6)  # batch size does not matter
    plain = tmp_path / "plain.npy"
    run(capsys, "predict", ckpts["classifier"], inputs["batch"], "--out", plain)
    assert not np.allclose(voted, np.load(plain))
    run(capsys, "predict", ckpts["classifier"], inputs["batch"], "--out", b, "--vote", "3", "--seed", "1")
    assert not np.allclose(voted, np.load(b))

    # the API: one view of the whole pool is the plain prediction up to the random scale and shift
    model, _ = load_model(ckpts["classifier"])
    pool, _ = load_clouds(inputs["batch"], 300)
    assert pool.shape == (5, 300, 3)  # 300 points < point_pool: the pool is every point
    np.testing.assert_array_equal(predict(model, pool, vote=3, num_points=256), voted)

    t1, t2 = tmp_path / "t1.npy", tmp_path / "t2.npy"
    run(capsys, "tokenize", ckpts["pretrain"], inputs["folder"], "--out", t1)
    run(capsys, "tokenize", ckpts["pretrain"], inputs["folder"], "--out", t2, "--batch-size", "1")
    np.testing.assert_array_equal(np.load(t1), np.load(t2))


def test_load_clouds_sizes_and_normalize(tmp_path):
    rng = np.random.default_rng(1)
    same = tmp_path / "same.npy"
    np.save(same, rng.normal(size=(3, 100, 3)).astype(np.float32))
    points, names = load_clouds(same, 256, min_points=16)
    assert points.shape == (3, 100, 3) and names == ["same.npy[0]", "same.npy[1]", "same.npy[2]"]
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    np.save(mixed / "a.npy", rng.normal(size=(100, 3)).astype(np.float32))
    np.save(mixed / "b.npy", rng.normal(size=(300, 3)).astype(np.float32))
    warned = []
    points, _ = load_clouds(mixed, 256, warn=warned.append)
    assert points.shape == (2, 256, 3) and len(warned) == 1 and "a.npy: only 100 points" in warned[0]
    np.testing.assert_array_equal(points[0, :100], np.load(mixed / "a.npy"))
    again, _ = load_clouds(mixed, 256, warn=warned.append)
    np.testing.assert_array_equal(points, again)
    with pytest.warns(UserWarning, match="only 100 points"):
        load_clouds(mixed, 256)
    unit, _ = load_clouds(same, 100, normalize=True)
    radius = np.linalg.norm(unit - unit.mean(axis=1, keepdims=True), axis=-1).max(axis=1)
    np.testing.assert_allclose(radius, 1.0, rtol=1e-5)
    with pytest.raises(DataError, match="same.npy \\(cloud 0\\): too few points \\(100\\)"):
        load_clouds(same, 256, min_points=128)


# --------------------------------------------------------------------------------------------------
# Bad input: one clear line on stderr naming the file, exit status 2, no traceback
# --------------------------------------------------------------------------------------------------


def bad_inputs(root):
    rng = np.random.default_rng(2)
    cases = {}

    def npy(name, array):
        np.save(root / name, array)
        return root / name

    cases["missing"] = (root / "nowhere.npy", "no such file")
    cases["empty"] = (npy("empty.npy", np.zeros((0, 3), np.float32)), "no points")
    nan = rng.normal(size=(300, 3)).astype(np.float32)
    nan[5, 1] = np.nan
    cases["nan"] = (npy("nan.npy", nan), "non-finite")
    inf = rng.normal(size=(2, 300, 3)).astype(np.float32)
    inf[1, 3, 0] = np.inf
    cases["inf batch"] = (npy("inf.npy", inf), "non-finite")
    cases["shape"] = (npy("flat.npy", np.zeros(30, np.float32)), "shape")
    cases["columns"] = (npy("two.npy", np.zeros((300, 2), np.float32)), "column")
    cases["batch columns"] = (npy("two_b.npy", np.zeros((2, 300, 2), np.float32)), "column")
    cases["few"] = (npy("few.npy", rng.normal(size=(10, 3)).astype(np.float32)), "too few points")
    (root / "empty_dir").mkdir()
    cases["empty folder"] = (root / "empty_dir", "no point-cloud files")
    (root / "bad.txt").write_text("1 2 3\nfoo bar baz\n")
    cases["text"] = (root / "bad.txt", "bad.txt")
    return cases


def test_bad_inputs_exit_2(ckpts, tmp_path, capsys):
    official = tmp_path / "Point-BERT.pth"
    torch.save({"base_model": {"module.cls_token": torch.zeros(1, 1, 8)}}, official)
    for what, (path, phrase) in bad_inputs(tmp_path).items():
        code, out, err = run(capsys, "predict", ckpts["classifier"], path, "--out", tmp_path / "o.npy")
        assert code == 2, what
        assert err.count("\n") == 1 and path.name in err and phrase in err, (what, err)
        assert "Traceback" not in err and out == ""

    good = tmp_path / "good.npy"
    np.save(good, 0.3 * np.random.default_rng(3).normal(size=(300, 3)).astype(np.float32))
    evil, plain, text = tmp_path / "evil.pt", tmp_path / "plain.pkl", tmp_path / "config.yaml"
    torch.save({"model": print}, evil)
    plain.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    text.write_text("model: {}\n")
    numpy_meta = tmp_path / "ModelNet_1k.pth"
    torch.save({"base_model": {"module.cls_token": torch.zeros(1, 1, 8)}, "acc": np.float64(93.2)}, numpy_meta)
    checkpoint_cases = [
        ("predict", ckpts["tokenizer"], "is a tokenizer checkpoint, expected classifier"),
        ("tokenize", ckpts["classifier"], "is a classifier checkpoint, expected tokenizer or pretrain"),
        ("embed", ckpts["tokenizer"], "expected pretrain or classifier"),
        ("embed", official, "not a recognised official Point-BERT checkpoint"),
        ("embed", tmp_path / "missing.pt", "no such checkpoint file"),
        ("embed", tmp_path, "no such checkpoint file (a folder)"),
        ("predict", evil, "refuses to unpickle builtins.print: loading it would execute code"),
        ("predict", plain, "a plain Python pickle, not written by torch.save"),
        ("predict", text, "not a PyTorch checkpoint file (it is a text file)"),
        ("predict", numpy_meta, "not a recognised official"),  # numpy scalars: readable; converted, incomplete
    ]
    for command, ckpt, phrase in checkpoint_cases:
        code, _, err = run(capsys, command, ckpt, good, "--out", tmp_path / "o.npy")
        assert code == 2 and err.count("\n") == 1 and ckpt.name in err and phrase in err, err

    damaged = tmp_path / "damaged.pt"
    torch.save({**torch.load(ckpts["classifier"], weights_only=True), "model": [1]}, damaged)
    code, _, err = run(capsys, "predict", damaged, good, "--out", tmp_path / "o.npy")
    assert code == 2 and "a damaged pointbert checkpoint" in err and err.count("\n") == 1, err
    for flags, phrase in ((["--num-points", "8"], "needs at least 16"), (["--batch-size", "0"], "positive"),
                          (["--vote", "-1"], "--vote"), (["--device", "cuda:7"], "not available"),
                          (["--device", "meta"], "not a device that computes"),
                          (["--device", "cpu:3"], "not a device that computes"), (["--top", "0"], "--top")):
        if flags[0] == "--device" and torch.cuda.is_available():
            continue
        code, _, err = run(capsys, "predict", ckpts["classifier"], good, "--out", tmp_path / "o.npy", *flags)
        assert code == 2 and phrase in err and err.count("\n") == 1, err
    # an output path that cannot be written: one line naming it (not a temporary file), no traceback
    code, _, err = run(capsys, "embed", ckpts["classifier"], good, "--out", good / "f.npy")  # under a file
    assert code == 2 and err.count("\n") == 1 and "good.npy/f.npy" in err and ".tmp" not in err, err
    # an output that would overwrite what is read: refused, both left intact
    before = good.read_bytes(), ckpts["classifier"].read_bytes()
    for out, what in ((good, "is the input"), (ckpts["classifier"], "is the checkpoint")):
        code, _, err = run(capsys, "predict", ckpts["classifier"], good, "--out", out)
        assert code == 2 and what in err and err.count("\n") == 1, err
    assert (good.read_bytes(), ckpts["classifier"].read_bytes()) == before
    # coordinates so large that float32 distances overflow: refused instead of NaN results
    huge = tmp_path / "huge.npy"
    np.save(huge, 1e30 * np.load(good))
    code, _, err = run(capsys, "embed", ckpts["classifier"], huge, "--out", tmp_path / "o.npy")
    assert code == 2 and "too large for float32 distances" in err and err.count("\n") == 1, err
    # outputs get the permissions open() would give them, not the temporary file's owner-only 0600
    code, _, _ = run(capsys, "embed", ckpts["classifier"], good, "--out", tmp_path / "perm.npy")
    mask = os.umask(0)
    os.umask(mask)
    assert code == 0 and (tmp_path / "perm.npy").stat().st_mode & 0o777 == 0o666 & ~mask


def test_outputs_exact_name_row_names_and_scale_warning(ckpts, inputs, tmp_path, capsys):
    out = tmp_path / "feats.bin"  # written under exactly the name given, with the row names beside it
    code, printed, err = run(capsys, "embed", ckpts["classifier"], inputs["folder"], "--out", out)
    assert code == 0 and err == "" and "feats.names.txt" in printed
    assert np.load(out).shape[0] == 3 and not (tmp_path / "feats.bin.npy").exists()
    assert (tmp_path / "feats.names.txt").read_text().split() == ["a_cloud.txt", "b_cloud.npy", "c_cloud.npy"]
    code, _, err = run(capsys, "predict", ckpts["classifier"], inputs["single"], "--out", tmp_path)
    assert code == 2 and "is a folder" in err and err.count("\n") == 1
    big = tmp_path / "big.npy"
    np.save(big, 50 * np.load(inputs["single"]))
    code, _, err = run(capsys, "predict", ckpts["classifier"], big, "--out", tmp_path / "l.npy")
    assert code == 0 and "pass --normalize" in err
    code, _, err = run(capsys, "predict", ckpts["classifier"], big, "--out", tmp_path / "l.npy", "--normalize")
    assert code == 0 and err == ""


def test_segment_command_labels_within_the_category(inputs, tmp_path, capsys):
    from pointbert.data.official import SHAPENETPART_PARTS
    from pointbert.inference import segment

    cfg = preset("tiny-partseg")
    cfg.data.dataset = "shapenetpart"
    torch.manual_seed(0)
    model = build_model(cfg)
    ckpt = tmp_path / "partseg.pt"
    save_checkpoint(ckpt, cfg, model)
    out = tmp_path / "parts.npy"
    code, printed, err = run(capsys, "segment", ckpt, inputs["batch"], "--category", "chair", "--out", out)
    assert code == 0 and err == "", err
    labels, points = np.load(out), np.load(tmp_path / "parts.points.npy")
    assert labels.shape == (5, 256) and points.shape == (5, 256, 3) and labels.dtype == np.int64
    assert set(np.unique(labels)) <= set(SHAPENETPART_PARTS["Chair"]) and "Chair: part 12" in printed
    # the restricted argmax, by hand: the model's logits over the chair's parts only
    chair = list(SHAPENETPART_PARTS).index("Chair")
    with torch.no_grad():
        logits = model.eval()(torch.from_numpy(points), torch.full((5,), chair))
    parts = torch.tensor(SHAPENETPART_PARTS["Chair"])
    np.testing.assert_array_equal(labels, parts[logits[..., parts].argmax(-1)].numpy())
    np.testing.assert_array_equal(segment(model, points, chair, parts.tolist(), batch_size=2), labels)
    code, _, err = run(capsys, "segment", ckpt, inputs["batch"], "--category", "Sofa", "--out", out)
    assert code == 2 and "not one of Airplane, Bag" in err and err.count("\n") == 1
    code, _, err = run(capsys, "predict", ckpt, inputs["batch"], "--out", out)
    assert code == 2 and "is a partseg checkpoint, expected classifier" in err
    # the same predictions drawn: render needs the category
    png = tmp_path / "parts.png"
    code, _, err = run(capsys, "render", ckpt, inputs["batch"], "--out", png, "--max-clouds", "2")
    assert code == 2 and "give the clouds' --category" in err and not png.exists()
    code, printed, err = run(capsys, "render", ckpt, inputs["batch"], "--out", png, "--category", "chair",
                             "--max-clouds", "2")
    assert code == 0 and png.stat().st_size > 10_000 and f"wrote {png}" in printed
