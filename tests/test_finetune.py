"""Classification fine-tuning: loss, initialisation, voting, the finetune and evaluate commands."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F

from pointbert.checkpoint import load_checkpoint, load_model, save_checkpoint
from pointbert.cli import main
from pointbert.config import ConfigError, preset
from pointbert.data.synthetic import SyntheticShapes
from pointbert.errors import CheckpointError
from pointbert.heads import Classifier
from pointbert.mpm import PointBERT
from pointbert.tasks.finetune import (
    ClassificationTask,
    load_init,
    smoothed_cross_entropy,
    vote_accuracy,
    vote_logits,
)

HEAD = {"head.0.weight", "head.0.bias", "head.3.weight", "head.3.bias"}


@pytest.fixture
def small_synthetic(monkeypatch):
    """Built-in synthetic data with a few dozen shapes, so command tests take seconds."""
    monkeypatch.setattr(SyntheticShapes, "DEFAULT_SIZES", {"train": 48, "test": 30})


def tiny_task(**kw) -> ClassificationTask:
    cfg = preset("tiny-classifier")
    kw.setdefault("train_data", SyntheticShapes("train", num_points=256, size=16))
    kw.setdefault("test_data", SyntheticShapes("test", num_points=256, size=15))
    return ClassificationTask(cfg, **kw)


# --------------------------------------------------------------------------------------------------
# Loss (spec 6.1)
# --------------------------------------------------------------------------------------------------


def test_label_smoothing_is_the_official_formula():
    torch.manual_seed(0)
    logits, target, eps = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 0]), 0.2
    C = logits.shape[1]
    dist = torch.full((6, C), eps / (C - 1))
    dist[torch.arange(6), target] = 1 - eps
    manual = -(dist * logits.log_softmax(-1)).sum(-1).mean()
    ours = smoothed_cross_entropy(logits, target, eps)
    torch.testing.assert_close(ours, manual)
    # = torch's smoothing with eps * C / (C - 1); not torch's smoothing with eps itself (eps / C everywhere)
    torch.testing.assert_close(ours, F.cross_entropy(logits, target, label_smoothing=eps * C / (C - 1)))
    assert not torch.allclose(ours, F.cross_entropy(logits, target, label_smoothing=eps))
    torch.testing.assert_close(smoothed_cross_entropy(logits, target, 0.0), F.cross_entropy(logits, target))
    assert smoothed_cross_entropy(logits.bfloat16(), target, eps).dtype == torch.float32


# --------------------------------------------------------------------------------------------------
# Initialisation
# --------------------------------------------------------------------------------------------------


def test_init_from_a_pretrain_checkpoint_takes_exactly_the_backbone(tmp_path, capsys):
    cfg = preset("tiny-pretrain")
    pre = PointBERT(cfg)
    save_checkpoint(tmp_path / "pre.pt", cfg, pre)
    task = tiny_task(init=tmp_path / "pre.pt")
    model = task.build_model()
    report = task.init_report
    assert set(report.new) == HEAD
    state = model.state_dict()
    assert set(report.loaded) == {k for k in state if k.startswith("backbone.")}
    source = pre.state_dict()
    assert all(torch.equal(state[k], source["query." + k]) for k in report.loaded)  # query.backbone.*
    ignored = set(report.ignored)
    assert {"query.mask_token", "query.lm_head.weight", "queue", "queue_ptr"} <= ignored
    assert any(k.startswith("key.") for k in ignored) and any(k.startswith("tokenizer.") for k in ignored)
    assert any(k.startswith("query.cls_head") for k in ignored)
    printed = capsys.readouterr().out
    assert "newly initialised (4): head.0.bias, head.0.weight, head.3.bias, head.3.weight" in printed
    assert f"loaded {len(report.loaded)} tensors: backbone." in printed


def test_init_from_a_classifier_keeps_what_matches(tmp_path):
    cfg = preset("tiny-classifier")  # 10 classes; the synthetic data has 15
    src = Classifier(cfg)
    save_checkpoint(tmp_path / "cls.pt", cfg, src)
    task = tiny_task(init=tmp_path / "cls.pt")
    model = task.build_model()
    assert model.num_classes == 15
    assert set(task.init_report.new) == {"head.3.weight", "head.3.bias"}
    assert set(task.init_report.ignored) == {"head.3.weight", "head.3.bias"}
    assert torch.equal(model.head[0].weight, src.head[0].weight)


def test_init_with_another_backbone_size_names_the_mismatch(tmp_path):
    cfg = preset("tiny-pretrain")
    cfg.backbone.dim, cfg.backbone.pos_hidden = 48, 16
    save_checkpoint(tmp_path / "wide.pt", cfg, PointBERT(cfg))
    with pytest.raises(CheckpointError, match="dim=48.*matching --preset"):
        load_init(Classifier(preset("tiny-classifier")), tmp_path / "wide.pt")
    save_checkpoint(tmp_path / "tiny.pt", preset("tiny-pretrain"), PointBERT(preset("tiny-pretrain")))
    for depth, phrase in ((3, "holds no backbone.blocks.2"), (1, "backbone.blocks.1.* has no place|blocks.1")):
        cfg = preset("tiny-classifier")
        cfg.backbone.depth = depth  # deeper or shallower than the stored backbone (depth 2)
        with pytest.raises(CheckpointError, match=f"({phrase}).*depth=2"):
            load_init(Classifier(cfg), tmp_path / "tiny.pt")


def test_init_or_scratch_is_required():
    with pytest.raises(ConfigError, match="--init CHECKPOINT.*--scratch"):
        tiny_task()
    with pytest.raises(ConfigError, match="not both"):
        tiny_task(init="x.pt", scratch=True)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        tiny_task(init="/nonexistent/x.pt")


def test_num_classes_follow_the_data_except_official_40():
    assert tiny_task(scratch=True).cfg.head.num_classes == 15
    cfg = preset("tiny-classifier")
    cfg.data.dataset, cfg.head.num_classes = "modelnet40", 40
    task = ClassificationTask(cfg, scratch=True, train_data=SyntheticShapes("train", 64, size=15))
    assert task.cfg.head.num_classes == 40
    cfg.head.num_classes = 10
    with pytest.raises(ConfigError, match="smaller than the 15 classes"):
        ClassificationTask(cfg, scratch=True, train_data=SyntheticShapes("train", 64, size=15))


# --------------------------------------------------------------------------------------------------
# Training step and voting
# --------------------------------------------------------------------------------------------------


def test_training_step_and_voting_shapes():
    from pointbert.engine import Context

    task = tiny_task(scratch=True)
    model = task.build_model()
    ctx = Context(device=torch.device("cpu"), generator=torch.Generator().manual_seed(0))
    data = task.train_dataset()
    batch = torch.utils.data.default_collate([data[i] for i in range(4)])
    out = task.training_step(model, batch, ctx)
    assert out["loss"].ndim == 0 and out["loss"].requires_grad and 0 <= float(out["acc"]) <= 100

    model.eval()
    points = batch["points"]
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    v1 = vote_logits(model, points, 256, 300, 3, g1)
    assert v1.shape == (4, 15) and torch.equal(v1, vote_logits(model, points, 256, 300, 3, g2))
    res = vote_accuracy(model, task.test_dataset(), task.cfg, "cpu", views=2, repeats=3, batch_size=8,
                        progress=False)
    assert len(res["vote_accs"]) == 3 and res["vote_acc"] == max(res["vote_accs"])
    assert min(res["vote_accs"]) <= res["vote_acc_mean"] <= res["vote_acc"]


# --------------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------------


def test_finetune_then_evaluate_with_voting(tmp_path, small_synthetic, capsys):
    pre_cfg = preset("tiny-pretrain")
    save_checkpoint(tmp_path / "pre.pt", pre_cfg, PointBERT(pre_cfg))
    out = tmp_path / "run"
    rc = main(["finetune", "--preset", "tiny-classifier", "--data", "synthetic", "--epochs", "1",
               "--out", str(out), "--init", str(tmp_path / "pre.pt"), "--quiet", "optim.label_smoothing=0.2"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "newly initialised (4)" in printed and "best acc" in printed
    for name in ("best.pt", "last.pt", "curves.png", "metrics.jsonl", "config.yaml"):
        assert (out / name).is_file()
    model, ckpt = load_model(out / "best.pt", ("classifier",))
    assert ckpt["class_names"] == SyntheticShapes("test").classes and model.num_classes == 15
    assert ckpt["config"]["optim"]["label_smoothing"] == 0.2 and ckpt["config"]["train"]["epochs"] == 1
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert len(evals) == 1 and set(evals[0]) >= {"acc", "mean_class_acc"}

    rc = main(["evaluate", str(out / "best.pt"), "train.vote_repeats=2", "train.vote_views=3", "--vote",
               "--out", str(tmp_path / "eval.json")])
    assert rc == 0
    table = capsys.readouterr().out
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["acc"] == pytest.approx(evals[0]["acc"]) and result["vote_repeats"] == 2
    assert len(result["vote_accs"]) == 2 and result["num_test"] == 30
    assert re.search(rf"^accuracy +{evals[0]['acc']:.2f} %$", table, re.M)  # the same as during training
    assert "vote accuracy, max of 2" in table and "vote accuracy, mean of 2" in table
    assert "synthetic test: 30 clouds, 15 classes" in table
    # model settings come from the checkpoint: an override of them is refused, not silently ignored
    assert main(["evaluate", str(out / "best.pt"), "backbone.depth=1"]) == 2
    assert "only data.* and train.* settings apply" in capsys.readouterr().err
    # a run folder must be a folder
    (tmp_path / "afile").write_text("x")
    assert main(["finetune", "--preset", "tiny-classifier", "--scratch", "--out", str(tmp_path / "afile")]) == 2
    assert "is a file; the run needs a folder" in capsys.readouterr().err

    # --resume alone continues the run with its stored config; a finished run says so
    assert main(["finetune", "--out", str(out), "--resume", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "already finished" in printed and "changed settings" not in printed
    assert load_checkpoint(out / "last.pt")["step"] == 48 // 8
    # what a resume changes is said (here nothing trains: the new value only reaches the config)
    assert main(["finetune", "--out", str(out), "--resume", "--quiet", "train.log_every=3"]) == 0
    assert "note: resuming with changed settings: train.log_every 10 -> 3" in capsys.readouterr().out
    # the same command without --resume does not wipe the finished run
    before = (out / "last.pt").read_bytes()
    assert main(["finetune", "--preset", "tiny-classifier", "--data", "synthetic", "--out", str(out),
                 "--scratch", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already holds a run" in err and "--overwrite" in err
    assert (out / "last.pt").read_bytes() == before


def test_command_errors_are_one_line_exit_2(tmp_path, small_synthetic, capsys):
    base = ["finetune", "--preset", "tiny-classifier", "--data", "synthetic", "--out", str(tmp_path / "r")]
    assert main([*base, "--init", str(tmp_path / "missing.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"pointbert finetune: error: {tmp_path / 'missing.pt'}: no such checkpoint file"
    assert main(base) == 2
    assert "pass --init CHECKPOINT" in capsys.readouterr().err
    assert main([*base, "--scratch", "--resume"]) == 2
    assert "no checkpoint to resume" in capsys.readouterr().err
    assert main(["finetune", "--preset", "tiny-classifier", "--data", str(tmp_path / "no"), "--scratch"]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "missing.pt")]) == 2


def test_vote_validation_during_training_keeps_best_vote(tmp_path):
    """Spec 6.2: one vote pass when acc > 91.5, or a new best above 90 (here train.vote_above=0, so every
    new best); best_vote.pt keeps the best vote accuracy, also across a resume."""
    from pointbert.engine import fit

    task = tiny_task(scratch=True)
    task.cfg.train.epochs, task.cfg.train.eval_every, task.cfg.train.vote_above = 3, 1, 0.0
    result = fit(task, tmp_path / "run", device="cpu", quiet=True)
    evals = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    best, expect_vote = -1.0, []
    for r in evals:
        expect_vote.append(r["acc"] > 91.5 or (r["acc"] > best and r["acc"] > 0))
        best = max(best, r["acc"])
    assert [("vote_acc" in r) for r in evals] == expect_vote and expect_vote[0]
    votes = [r["vote_acc"] for r in evals if "vote_acc" in r]
    assert result["best_vote_acc"] == max(votes)
    saved = load_checkpoint(tmp_path / "run" / "best_vote.pt")
    assert saved["also_best"] == {"vote_acc": max(votes)}
    assert load_checkpoint(tmp_path / "run" / "last.pt")["task"] == {"best_acc": best}
