"""Every training stage through ``pointbert.cli.main`` on tiny presets and miniature data, each writing a
checkpoint the next stage accepts: train-tokenizer -> pretrain --tokenizer -> finetune / fewshot /
partseg / probe --init."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pointbert.checkpoint import config_of, load_checkpoint
from pointbert.cli import main
from pointbert.data.official import SHAPENETPART_PARTS
from pointbert.data.synthetic import SYNTHETIC_CLASSES, SYNTHETIC_PARTS, generate_shape

QUIET = ["--quiet", "--epochs", "1", "--batch-size", "4"]


def _rows(run: Path, kind: str) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """A folder dataset (3 classes x 4 train / 2 test synthetic shapes, 300 points) and a miniature
    ShapeNetPart in its official text format (3 categories x 6 shapes, synthetic parts mapped onto the
    category's ShapeNetPart part ids)."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for c in range(3):
        for split, n in (("train", 4), ("test", 2)):
            d = root / "folder" / SYNTHETIC_CLASSES[c] / split
            d.mkdir(parents=True)
            for i in range(n):
                np.save(d / f"{i}.npy", generate_shape(c, 300, rng)[0])
    sp = root / "shapenetpart"
    lines, lists = [], {"train": [], "val": [], "test": []}
    for k, (name, cat) in enumerate({"airplane": "Airplane", "chair": "Chair", "mug": "Mug"}.items()):
        synset = f"0{k}000000"
        lines.append(f"{cat}\t{synset}")
        ids = np.array(SHAPENETPART_PARTS[cat])
        (sp / synset).mkdir(parents=True)
        for i in range(6):
            pts, parts = generate_shape(SYNTHETIC_CLASSES.index(name), 400, rng)
            labels = ids[parts - min(SYNTHETIC_PARTS[name])]  # class-local part -> ShapeNetPart part id
            rows = np.concatenate([pts, np.zeros_like(pts), labels[:, None]], 1)
            np.savetxt(sp / synset / f"m{i}.txt", rows, fmt="%.6f %.6f %.6f %.1f %.1f %.1f %d")
            lists["train" if i < 3 else "val" if i < 4 else "test"].append(f"shape_data/{synset}/m{i}")
    (sp / "synsetoffset2category.txt").write_text("\n".join(lines) + "\n")
    (sp / "train_test_split").mkdir()
    for split, entries in lists.items():
        (sp / "train_test_split" / f"shuffled_{split}_file_list.json").write_text(json.dumps(entries))
    return {"folder": root / "folder", "shapenetpart": sp}


@pytest.fixture(scope="module")
def tokenizer_run(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "tokenizer"
    assert main(["train-tokenizer", "--preset", "tiny-tokenizer", "--data", str(data["folder"]),
                 "--out", str(out), *QUIET, "train.log_every=1", "tokenizer.kl_delay=1"]) == 0
    return out


@pytest.fixture(scope="module")
def pretrain_run(data, tokenizer_run) -> Path:
    out = tokenizer_run.parent / "pretrain"
    assert main(["pretrain", "--preset", "tiny-pretrain", "--tokenizer", str(tokenizer_run / "last.pt"),
                 "--data", str(data["folder"]), "--out", str(out), *QUIET,
                 f"data.probe_path={data['folder']}"]) == 0
    return out


def test_tokenizer_stage_schedules_per_iteration(tokenizer_run):
    from pointbert.tokenizer import gumbel_temperature, kl_weight

    ckpt = load_checkpoint(tokenizer_run / "last.pt", ("tokenizer",))
    cfg = config_of(ckpt)
    assert (tokenizer_run / "best.pt").is_file()
    rows = _rows(tokenizer_run, "train")
    assert [r["step"] for r in rows] == [1, 2, 3]  # 12 clouds, batch 4, logged every step
    # row of step s averages optimizer step s - 1: the schedules move within the epoch, per iteration
    for r in rows:
        assert r["temperature"] == pytest.approx(gumbel_temperature(r["step"] - 1, cfg.tokenizer))
        assert r["kl_weight"] == pytest.approx(kl_weight(r["step"] - 1, cfg.tokenizer))
        assert r["loss"] == pytest.approx(r["recon"] + r["kl_weight"] * r["kl"], rel=1e-5)
    assert len({r["temperature"] for r in rows}) == 3 and rows[0]["kl_weight"] == 0 < rows[-1]["kl_weight"]
    (ev,) = _rows(tokenizer_run, "eval")
    assert {"CDL1", "CDL2", "F-Score"} <= set(ev) and ev["CDL1"] > 0
    assert load_checkpoint(tokenizer_run / "best.pt")["best_metrics"]["CDL1"] == ev["CDL1"]


def test_pretrain_stage_keeps_the_tokenizer_frozen_and_probes(pretrain_run, tokenizer_run):
    from pointbert.tasks.pretrain import load_tokenizer_checkpoint

    ckpt = load_checkpoint(pretrain_run / "best.pt", ("pretrain",))
    (ev,) = _rows(pretrain_run, "eval")
    assert 0 <= ev["svm_acc"] <= 100 and 0 <= ev["svm_acc_backbone"] <= 100
    assert ckpt["best_metrics"]["svm_acc"] == ev["svm_acc"]
    assert {"mpm_loss", "mix_loss", "mpm_acc"} <= set(_rows(pretrain_run, "train")[0])
    tok_state, _ = load_tokenizer_checkpoint(tokenizer_run / "last.pt")
    pre_state, pre_cfg = load_tokenizer_checkpoint(pretrain_run / "last.pt")  # tokenizer.* of a pretrain file
    assert pre_cfg.kind == "pretrain" and set(pre_state) == set(tok_state)
    trained = dict(load_checkpoint(pretrain_run / "last.pt")["model"])
    params = {n for n, _ in nn.Module.named_parameters(_tokenizer_of(pre_cfg))}
    for name in params:  # frozen: parameters unchanged (BatchNorm statistics may move, spec 11.8)
        assert torch.equal(trained["tokenizer." + name], tok_state[name]), name


def _tokenizer_of(cfg):
    from pointbert.tokenizer import DiscreteVAE

    return DiscreteVAE(cfg)


def test_pretrain_needs_a_tokenizer(tmp_path, capsys):
    assert main(["pretrain", "--preset", "tiny-pretrain", "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--tokenizer" in err[0]


def test_fewshot_needs_init_or_scratch_before_any_fold(tmp_path, capsys):
    assert main(["fewshot", "--preset", "tiny-classifier", "--out", str(tmp_path / "f")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and "--scratch" in err


def test_pretrain_features_match_probe_features():
    from pointbert.config import preset
    from pointbert.mpm import PointBERT
    from pointbert.tasks.probe import pretrain_features

    torch.manual_seed(0)
    model = PointBERT(preset("tiny-pretrain")).eval()
    points = torch.randn(3, 256, 3)
    proj, pooled = pretrain_features(model, points)
    assert torch.allclose(proj, model.probe_features(points), atol=1e-6)
    assert torch.allclose(pooled, model.query.backbone(points), atol=1e-6)


def test_probe_drop_last_fits_on_a_seeded_subset_of_whole_batches(monkeypatch):
    """Spec 5.6 / 11.19: the official probe's shuffled train loader drops its last partial batch."""
    from pointbert import metrics
    from pointbert.data.synthetic import SyntheticShapes
    from pointbert.tasks.probe import run_probe

    fitted = []

    def spy(x_train, y_train, x_test, y_test, standardize=False):
        fitted.append(torch.as_tensor(x_train).clone())
        return 0.5

    monkeypatch.setattr(metrics, "svm_probe", spy)
    train, test = SyntheticShapes("train", num_points=64, size=23), SyntheticShapes("test", num_points=64, size=5)
    kw = dict(num_points=64, batch_size=8, device=torch.device("cpu"))
    fn = lambda p: p.mean(1)  # noqa: E731 - a 3-d feature per cloud
    assert run_probe(fn, train, test, **kw) == [50.0] and len(fitted[-1]) == 23
    run_probe(fn, train, test, drop_last=(8, 1), **kw)
    run_probe(fn, train, test, drop_last=(8, 1), **kw)
    run_probe(fn, train, test, drop_last=(8, 2), **kw)
    everything = {tuple(r.tolist()) for r in fitted[0]}
    assert len(fitted[1]) == 16 and {tuple(r.tolist()) for r in fitted[1]} <= everything
    assert torch.equal(fitted[1], fitted[2]) and not torch.equal(fitted[1], fitted[3])


def test_finetune_accepts_the_pretrain_checkpoint(pretrain_run, data, tmp_path):
    out = tmp_path / "ft"
    assert main(["finetune", "--preset", "tiny-classifier", "--init", str(pretrain_run / "last.pt"),
                 "--data", str(data["folder"]), "--out", str(out), *QUIET]) == 0
    assert load_checkpoint(out / "last.pt")["kind"] == "classifier"


def test_fewshot_runs_folds_and_reports_mean_and_std(pretrain_run, tmp_path, capsys):
    out = tmp_path / "fs"
    assert main(["fewshot", "--preset", "tiny-classifier", "--init", str(pretrain_run / "last.pt"),
                 "--data", "synthetic", "--way", "2", "--shot", "2", "--folds", "0-1", "--out", str(out),
                 *QUIET]) == 0
    report = json.loads((out / "fewshot.json").read_text())
    assert [f["fold"] for f in report["folds"]] == [0, 1] and report["way"] == 2
    for f in report["folds"]:
        evals = _rows(out / f"fold_{f['fold']}", "eval")
        assert f["best_acc"] == max(e["acc"] for e in evals) and f["last_acc"] == evals[-1]["acc"]
        cfg = config_of(load_checkpoint(out / f"fold_{f['fold']}" / "last.pt"))
        assert (cfg.data.dataset, cfg.data.fold, cfg.data.way) == ("fewshot", f["fold"], 2)
    best = [f["best_acc"] for f in report["folds"]]
    assert report["summary"]["best_acc_mean"] == pytest.approx(np.mean(best))
    assert "mean +- std (2 folds)" in (out / "fewshot.md").read_text()
    # the folds are different episodes (seeded by the fold), with labels 0..way-1 of a 10-logit head
    a, b = (load_checkpoint(out / f"fold_{k}" / "last.pt") for k in (0, 1))
    assert len(a["class_names"]) == 2 and a["class_names"] != b["class_names"]
    assert config_of(a).head.num_classes == 10
    # a bare --resume takes the run's config from its fold folders (not the full-size preset): finished folds stay
    capsys.readouterr()
    assert main(["fewshot", "--init", str(pretrain_run / "last.pt"), "--resume", "--folds", "0-1",
                 "--out", str(out), *QUIET]) == 0
    assert json.loads((out / "fewshot.json").read_text())["folds"] == report["folds"]


def test_partseg_accepts_the_pretrain_checkpoint(pretrain_run, data, tmp_path):
    out = tmp_path / "seg"
    assert main(["partseg", "--preset", "tiny-partseg", "--init", str(pretrain_run / "last.pt"),
                 "--data", str(data["shapenetpart"]), "--out", str(out), *QUIET]) == 0
    ckpt = load_checkpoint(out / "best.pt", ("partseg",))
    (ev,) = _rows(out, "eval")
    assert {"acc", "instance_miou", "class_miou", "max_instance_miou", "max_class_miou"} <= set(ev)
    assert ckpt["best_metrics"]["instance_miou"] == ev["instance_miou"]
    assert all(r["bn_momentum"] == pytest.approx(0.1) for r in _rows(out, "train"))
    # the backbone came from the pre-training checkpoint (the first step at lr 1e-6 barely moves it)
    pre = load_checkpoint(pretrain_run / "last.pt")["model"]
    seg = load_checkpoint(out / "last.pt")["model"]
    key = "pos_embed.0.weight"
    assert torch.allclose(seg["backbone." + key], pre["query.backbone." + key], atol=1e-4)


def test_partseg_sets_bn_momentum_each_epoch_and_tracks_running_bests(tmp_path):
    from pointbert.config import preset
    from pointbert.engine import Context
    from pointbert.heads import PartSegmenter
    from pointbert.tasks.partseg import PartSegTask

    task = PartSegTask(preset("tiny-partseg"), scratch=True)
    model = PartSegmenter(task.cfg)
    ctx = Context(device=torch.device("cpu"), model=model)
    task.on_step(0, 45, ctx)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and all(m.momentum == pytest.approx(0.025) for m in bns)
    task.load_state_dict({"max_class_miou": 70.0, "max_instance_miou": 60.0})
    assert task.state_dict() == {"max_instance_miou": 60.0, "max_class_miou": 70.0}


def test_probe_command(pretrain_run, data, tmp_path, capsys):
    pre = str(pretrain_run / "last.pt")
    folder = str(data["folder"])
    assert main(["probe", "--init", pre, "--data", folder, "--out", str(tmp_path / "a.json")]) == 0
    a = json.loads((tmp_path / "a.json").read_text())
    assert (a["feature"], a["num_train"], a["num_test"]) == ("backbone", 12, 6) and 0 <= a["svm_acc"] <= 100
    # the projection feature on the checkpoint's own probe data reproduces the pre-training evaluation
    assert main(["probe", "--init", pre, "--feature", "projection", "--out", str(tmp_path / "b.json")]) == 0
    (ev,) = _rows(pretrain_run, "eval")
    assert json.loads((tmp_path / "b.json").read_text())["svm_acc"] == pytest.approx(ev["svm_acc"])
    assert main(["probe", "--random", "--preset", "tiny-classifier", "--data", str(data["folder"])]) == 0
    assert "linear SVM accuracy" in capsys.readouterr().out
    assert main(["probe", "--random", "--init", pre]) == 2
    assert main(["probe", "--random", "--preset", "tiny-classifier", "--feature", "projection",
                 "--data", str(data["folder"])]) == 2
    assert "projection head" in capsys.readouterr().err
    assert main(["probe", "--random", "--preset", "tiny-tokenizer", "--data", str(data["folder"])]) == 2
    assert "a tokenizer preset has no backbone to probe" in capsys.readouterr().err
