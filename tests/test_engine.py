"""The training engine: schedule, optimizer groups, data order, accumulation, clipping, exact resume."""

from __future__ import annotations

import json
import math
import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from pointbert import engine
from pointbert.checkpoint import describe_mismatch, load_checkpoint, load_model
from pointbert.config import Config, OptimConfig, preset
from pointbert.data.synthetic import SyntheticShapes
from pointbert.engine import Context, EpochSampler, SeededItems, Task, TrainingError, fit, lr_at
from pointbert.heads import Classifier
from pointbert.mpm import PointBERT
from pointbert.tasks.finetune import ClassificationTask
from pointbert.transformer import compile_blocks

# --------------------------------------------------------------------------------------------------
# A small deterministic task: an MLP over per-point features, max-pooled (no BatchNorm, no dropout).
# --------------------------------------------------------------------------------------------------


class NoisyClouds:
    """Clouds whose items draw from numpy's global RNG, as many official loaders do."""

    classes = ["a", "b", "c"]

    def __init__(self, n: int = 32, points: int = 16):
        self.n, self.points = n, points

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        base = np.random.default_rng(i).normal(size=(self.points, 3)) + (i % 3)
        noise = np.random.normal(scale=0.05, size=(self.points, 3))  # global numpy RNG
        return {"points": (base + noise).astype(np.float32), "label": np.int64(i % 3)}


class PointMLP(nn.Module):
    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 16))
        self.head = nn.Linear(16, 3)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        return self.head(self.mlp(points).amax(dim=1))


class ToyTask(Task):
    monitor = "acc"

    def __init__(self, cfg: Config, noisy: bool = False, n: int = 32):
        super().__init__(cfg)
        self.noisy, self.n = noisy, n

    def build_model(self) -> nn.Module:
        return PointMLP(dropout=0.2 if self.noisy else 0.0)

    def train_dataset(self):
        return NoisyClouds(self.n)

    def training_step(self, model, batch, ctx):
        points = batch["points"]
        if self.noisy:
            points = points + 0.01 * torch.randn(points.shape, generator=ctx.generator)
        logits = model(points)
        return {"loss": nn.functional.cross_entropy(logits, batch["label"])}

    def evaluate(self, model, ctx):
        data = NoisyClouds(12)
        x = torch.stack([torch.as_tensor(data[i]["points"]) for i in range(len(data))])
        y = torch.tensor([i % 3 for i in range(len(data))])
        logits = model(x.to(ctx.device))
        return {"acc": float((logits.argmax(-1).cpu() == y).float().mean() * 100),
                "val_loss": float(nn.functional.cross_entropy(logits.cpu(), y))}


def toy_cfg(**train) -> Config:
    cfg = preset("tiny-classifier")
    cfg.optim = OptimConfig(lr=1e-2, warmup_epochs=1, schedule="step", grad_clip=0.0)
    cfg.train.epochs, cfg.train.batch_size, cfg.train.log_every, cfg.train.checkpoint_every = 2, 8, 1, 0
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def weights(path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


# --------------------------------------------------------------------------------------------------
# Learning rate (spec 1.7)
# --------------------------------------------------------------------------------------------------


def test_epoch_schedule_matches_the_official_timm_values():
    o = OptimConfig(lr=5e-4, warmup_epochs=10)
    at = {e: lr_at(e, o, 300, 10) for e in (0, 1, 2, 10, 11, 150, 300)}
    assert at[0] == at[1] == 1e-6
    assert at[2] == pytest.approx(5.09e-5, rel=1e-3)
    assert at[10] == pytest.approx(4.501e-4, rel=1e-3)
    assert at[11] == pytest.approx(4.986e-4, rel=1e-3)
    assert at[150] == pytest.approx(2.53e-4, rel=2e-3)
    assert at[300] == pytest.approx(1.01e-6, rel=1e-2)
    assert lr_at(301, o, 300, 10) == 1e-6  # t >= epochs: lr_min
    w3 = [lr_at(e, o, 300, 3) for e in (2, 3, 4)]
    assert w3 == pytest.approx([1.67e-4, 3.34e-4, 4.999e-4], rel=2e-3)
    assert lr_at(5.7, o, 300, 10) == lr_at(5, o, 300, 10)  # constant within an epoch
    assert lr_at(0, OptimConfig(lr=5e-4, warmup_epochs=0), 300, 0) == 5e-4  # no warm-up: starts at lr


def test_step_schedule_is_continuous_warmup_then_cosine():
    o = OptimConfig(lr=1e-3, warmup_lr=1e-6, min_lr=1e-5, schedule="step")
    total, warm = 1000, 100
    xs = np.linspace(0, total, 2001)
    ys = np.array([lr_at(x, o, total, warm) for x in xs])
    assert ys[0] == pytest.approx(1e-6) and lr_at(warm, o, total, warm) == pytest.approx(1e-3)
    assert lr_at(50, o, total, warm) == pytest.approx((1e-6 + 1e-3) / 2)
    assert lr_at(total, o, total, warm) == pytest.approx(1e-5)
    assert lr_at((total + warm) / 2, o, total, warm) == pytest.approx((1e-3 + 1e-5) / 2)
    assert np.all(np.diff(ys[xs <= warm]) > 0) and np.all(np.diff(ys[xs >= warm]) <= 0)
    assert np.max(np.abs(np.diff(ys))) < 1e-5  # no jumps


# --------------------------------------------------------------------------------------------------
# Optimizer groups (spec 1.7)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule,epochs,warned", [("epoch", 2, True), ("epoch", 3, False),
                                                     ("step", 1, True), ("step", 2, False)])
def test_a_run_that_never_leaves_its_warmup_is_warned_about(tmp_path, schedule, epochs, warned):
    cfg = toy_cfg(epochs=epochs)
    cfg.optim.schedule = schedule  # warm-up 1 epoch; the epoch schedule leaves it in epoch 2 (from 0)
    fit(ToyTask(cfg, n=8), tmp_path / "run", device="cpu", quiet=True)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    top = max(r["lr"] for r in rows if r["kind"] == "train")
    assert ("stays in its warm-up" in (tmp_path / "run" / "log.txt").read_text()) == warned
    assert (top < 0.5 * cfg.optim.lr) == warned


def test_weight_decay_groups_follow_the_official_rule():
    model = Classifier(preset("tiny-classifier"))
    decay, no_decay = engine.split_weight_decay(model)
    assert "backbone.cls_token" in no_decay  # 3-D, listed by no_weight_decay()
    assert "backbone.cls_pos" in decay  # 3-D, not a token: decayed as the official builder does
    assert "backbone.norm.weight" in no_decay and "head.0.bias" in no_decay
    assert "head.0.weight" in decay and "backbone.blocks.0.attn.qkv.weight" in decay
    for name, p in model.named_parameters():
        assert (name in no_decay) == (p.ndim <= 1 or name.endswith(".bias") or name == "backbone.cls_token")
    opt = engine.build_optimizer(model, OptimConfig(weight_decay=0.05, betas=(0.8, 0.9), eps=1e-7))
    g0, g1 = opt.param_groups
    assert (g0["weight_decay"], g1["weight_decay"]) == (0.0, 0.05)
    assert g0["betas"] == (0.8, 0.9) and g0["eps"] == 1e-7
    assert len(g0["params"]) + len(g1["params"]) == len(list(model.parameters()))


def test_frozen_parameters_are_left_out():
    model = PointBERT(preset("tiny-pretrain"))
    decay, no_decay = engine.split_weight_decay(model)
    names = set(decay) | set(no_decay)
    assert "query.mask_token" in no_decay and "query.backbone.cls_token" in no_decay
    assert not any(n.startswith(("key.", "tokenizer.")) for n in names)
    assert names == {n for n, p in model.named_parameters() if p.requires_grad}


# --------------------------------------------------------------------------------------------------
# Data order: a pure function of (seed, epoch), sharded like DistributedSampler
# --------------------------------------------------------------------------------------------------


def test_sampler_is_seeded_trimmed_and_sharded():
    one = EpochSampler(37, 8, seed=3)
    assert one.batches_per_epoch == 4 and len(one) == 32
    e0, e1 = one.indices(0), one.indices(1)
    assert len(set(e0)) == 32 and not np.array_equal(e0, e1)
    assert np.array_equal(e0, EpochSampler(37, 8, seed=3).indices(0))
    ranks = [EpochSampler(37, 8, rank=r, world_size=2, seed=3) for r in range(2)]
    for b in range(4):  # per-rank batch b (4 each) = global batch b
        union = np.concatenate([s.indices(0)[b * 4:(b + 1) * 4] for s in ranks])
        assert sorted(union) == sorted(e0[b * 8:(b + 1) * 8])
    one.set_epoch(1, start_batch=3)
    assert [i for _, i in one] == list(e1[24:]) and len(one) == 8
    assert all(e == 1 for e, _ in one)
    with pytest.raises(TrainingError, match="divisible"):
        EpochSampler(37, 9, world_size=2)


def test_items_are_reseeded_per_epoch_and_index_and_leave_global_state_alone():
    items = SeededItems(NoisyClouds(8), seed=5)
    np.random.seed(123)
    random.seed(7)
    before = (np.random.get_state()[1].copy(), random.getstate())
    a = items[(0, 3)]["points"]
    items[(1, 3)]
    assert np.array_equal(a, items[(0, 3)]["points"])
    assert not np.array_equal(a, items[(1, 3)]["points"])
    assert np.array_equal(np.random.get_state()[1], before[0]) and random.getstate() == before[1]


def test_batches_do_not_depend_on_workers():
    def batches(workers: int) -> list[torch.Tensor]:
        sampler = EpochSampler(24, 8, seed=1)
        sampler.set_epoch(2)
        loader = torch.utils.data.DataLoader(SeededItems(NoisyClouds(24), 1), batch_size=8, sampler=sampler,
                                             num_workers=workers)
        return [b["points"] for b in loader]

    for a, b in zip(batches(0), batches(2)):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------------
# Accumulation, clipping, checkpoints
# --------------------------------------------------------------------------------------------------


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    full = fit(ToyTask(toy_cfg(batch_size=8, grad_accum=1)), tmp_path / "full", device="cpu", quiet=True)
    acc = fit(ToyTask(toy_cfg(batch_size=8, grad_accum=2)), tmp_path / "acc", device="cpu", quiet=True)
    wa, wb = weights(tmp_path / "full" / "last.pt"), weights(tmp_path / "acc" / "last.pt")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5)
    assert full["acc"] == acc["acc"]
    rows = [[json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
            for d in ("full", "acc")]
    la = [r["loss"] for r in rows[0] if r["kind"] == "train"]
    lb = [r["loss"] for r in rows[1] if r["kind"] == "train"]
    assert len(la) == len(lb) == 8 and np.allclose(la, lb, atol=1e-6)


def test_gradients_are_clipped_to_the_l2_norm(tmp_path, monkeypatch):
    seen = []
    original = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *a, **k):
        params = list(params)
        norm = original(params, max_norm, *a, **k)
        after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        seen.append((max_norm, float(norm), float(after)))
        return norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    cfg = toy_cfg(epochs=1)
    cfg.optim.grad_clip = 0.05
    fit(ToyTask(cfg), tmp_path / "clip", device="cpu", quiet=True)
    assert len(seen) == 4 and all(m == 0.05 for m, _, _ in seen)
    assert all(after <= 0.05 * (1 + 1e-4) for _, _, after in seen)
    assert any(before > 0.05 for _, before, _ in seen)  # it did clip something
    rows = [json.loads(x) for x in (tmp_path / "clip" / "metrics.jsonl").read_text().splitlines()]
    assert all("grad_norm" in r for r in rows if r["kind"] == "train")
    seen.clear()
    cfg.optim.grad_clip = 0.0
    fit(ToyTask(cfg), tmp_path / "noclip", device="cpu", quiet=True)
    assert seen == []


def test_run_folder_contents_and_checkpoints(tmp_path):
    out = tmp_path / "run"
    cfg = toy_cfg(epochs=6, eval_every=4)
    cfg.train.keep_epochs = 2
    result = fit(ToyTask(cfg), out, device="cpu", quiet=True)
    for name in ("last.pt", "best.pt", "metrics.jsonl", "config.yaml", "curves.png", "log.txt"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in out.glob("epoch-*.pt")) == ["epoch-004.pt", "epoch-005.pt"]  # the last two
    assert load_checkpoint(out / "epoch-004.pt")["epoch"] == 5 and "optimizer" in load_checkpoint(out / "epoch-004.pt")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["epoch"] for r in evals] == [4, 5]  # every 4 epochs skipping epoch 0 (official), and the last
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 25))
    assert {"lr", "loss", "samples_per_s", "time", "epoch"} <= set(train[0])
    last = load_checkpoint(out / "last.pt")
    assert last["step"] == 24 and last["epoch"] == 6 and last["finished"]
    assert {"optimizer", "scaler", "rng", "task", "best_metrics", "batch_in_epoch"} <= set(last)
    assert result["acc"] == evals[-1]["acc"] and result["best_acc"] == max(r["acc"] for r in evals)
    best = load_checkpoint(out / "best.pt")
    assert best["metrics"]["acc"] == result["best_acc"] and "optimizer" not in best


def test_context_autocast_and_precision():
    assert engine.resolve_precision("auto", torch.device("cpu")) is None
    assert engine.resolve_precision("bf16", torch.device("cpu")) is torch.bfloat16
    ctx = Context(device=torch.device("cpu"), amp_dtype=torch.bfloat16)
    with ctx.autocast():
        y = nn.Linear(4, 4)(torch.randn(2, 4))
    assert y.dtype == torch.bfloat16
    with pytest.raises(TrainingError, match="not a device"):
        engine.resolve_device("gpu7")


def test_bf16_autocast_trains_on_cpu(tmp_path):
    cfg = toy_cfg(epochs=1, precision="bf16")
    result = fit(ToyTask(cfg), tmp_path / "bf16", device="cpu", quiet=True)
    assert math.isfinite(result["val_loss"])


# --------------------------------------------------------------------------------------------------
# Exact resume with the tiny classifier (dropout, drop path, augmentation, random FPS subsets)
# --------------------------------------------------------------------------------------------------


class Killed(Exception):
    pass


class KillableClassification(ClassificationTask):
    kill_at: int | None = None

    def on_step(self, step, epoch, ctx):
        if step == self.kill_at:
            raise Killed(step)


def tiny_classifier_task(kill_at=None) -> KillableClassification:
    cfg = preset("tiny-classifier")
    cfg.data.num_points, cfg.data.point_pool = 128, 160
    cfg.optim = OptimConfig(lr=1e-3, warmup_epochs=0, schedule="step")
    cfg.train.epochs, cfg.train.batch_size, cfg.train.checkpoint_every, cfg.train.log_every = 2, 8, 2, 1
    task = KillableClassification(cfg, scratch=True, resume=True,
                                  train_data=SyntheticShapes("train", num_points=192, size=32),
                                  test_data=SyntheticShapes("test", num_points=192, size=15))
    task.kill_at = kill_at
    return task


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "A"
    return out, fit(tiny_classifier_task(), out, device="cpu", quiet=True)


@pytest.mark.parametrize("kill_at", [3, 4, 7])  # mid epoch 0, first step of epoch 1, mid epoch 1
def test_killed_and_resumed_run_ends_exactly_like_an_uninterrupted_one(tmp_path, uninterrupted, kill_at):
    out_a, result_a = uninterrupted
    out_b = tmp_path / "B"
    with pytest.raises(Killed):
        fit(tiny_classifier_task(kill_at), out_b, device="cpu", quiet=True)
    assert load_checkpoint(out_b / "last.pt")["step"] == kill_at - kill_at % 2  # 4 steps per epoch
    result_b = fit(tiny_classifier_task(), out_b, device="cpu", resume=True, quiet=True)
    assert result_b == result_a
    wa, wb = weights(out_a / "last.pt"), weights(out_b / "last.pt")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert all(torch.equal(a, b) for a, b in zip(weights(out_a / "best.pt").values(),
                                                  weights(out_b / "best.pt").values()))

    def rows(out):
        return [{k: v for k, v in json.loads(x).items() if k not in ("time", "samples_per_s")}
                for x in (out / "metrics.jsonl").read_text().splitlines()]

    assert rows(out_b) == rows(out_a)  # nothing logged twice, nothing lost


def test_checkpoints_load_as_models_and_finished_runs_stay_finished(uninterrupted, capsys):
    out, result = uninterrupted
    for name in ("best.pt", "last.pt"):
        model, ckpt = load_model(out / name, ("classifier",))
        assert isinstance(model, Classifier) and ckpt["class_names"][:2] == ["table", "chair"]
    assert fit(tiny_classifier_task(), out, device="cpu", resume=True, quiet=True) == result
    assert "already finished" in capsys.readouterr().out


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(TrainingError, match="no checkpoint to resume"):
        fit(ToyTask(toy_cfg()), tmp_path / "nothing", device="cpu", resume=True)


class KilledAt6(ToyTask):
    def on_step(self, step, epoch, ctx):
        if step == 6:
            raise Killed


def test_noisy_toy_task_resumes_exactly(tmp_path):
    """Global torch RNG (dropout), the context generator and numpy item noise all survive a restart."""
    cfg = toy_cfg(epochs=2, checkpoint_every=3)
    a = fit(ToyTask(cfg, noisy=True), tmp_path / "a", device="cpu", quiet=True)

    with pytest.raises(Killed):
        fit(KilledAt6(cfg, noisy=True), tmp_path / "b", device="cpu", quiet=True)
    b = fit(ToyTask(cfg, noisy=True), tmp_path / "b", device="cpu", resume=True, quiet=True)
    assert a == b
    wa, wb = weights(tmp_path / "a" / "last.pt"), weights(tmp_path / "b" / "last.pt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_on_another_kind_of_device_restarts_the_random_streams(tmp_path, capsys):
    """A CUDA generator's state (16 bytes of Philox) cannot be set on a CPU generator, nor the reverse."""
    cfg = toy_cfg(epochs=2, checkpoint_every=3)

    with pytest.raises(Killed):
        fit(KilledAt6(cfg, noisy=True), tmp_path / "b", device="cpu", quiet=True)
    ckpt = load_checkpoint(tmp_path / "b" / "last.pt")
    ckpt["rng"][0].update(device="cuda", generator=torch.zeros(16, dtype=torch.uint8))  # as written on a GPU
    torch.save(ckpt, tmp_path / "b" / "last.pt")
    result = fit(ToyTask(cfg, noisy=True), tmp_path / "b", device="cpu", resume=True)
    assert math.isfinite(result["val_loss"])
    assert "on cuda, resumed by 1 on cpu: the random streams restart" in capsys.readouterr().out


def test_compiled_training_matches_eager_and_saves_plain_checkpoints(tmp_path, uninterrupted, monkeypatch):
    """train.compile: the blocks are compiled (here with dynamo's eager backend, no C++ toolchain needed),
    training gives the eager run's numbers, and checkpoints keep the plain parameter names."""
    compiled, modes = [], []

    def compile_eager(model, mode):  # dynamo's eager backend takes no mode: recorded, not passed on
        modes.append(mode)
        compiled.append(compile_blocks(model, backend="eager"))
        return compiled[-1]

    monkeypatch.setattr(engine, "compile_blocks", compile_eager)
    task = tiny_classifier_task()
    task.cfg.train.compile, task.cfg.train.compile_mode = True, "reduce-overhead"
    torch._dynamo.reset()
    result = fit(task, tmp_path / "compiled", device="cpu", quiet=True)
    torch._dynamo.reset()
    assert compiled and compiled[0] > 1 and modes == ["reduce-overhead"]
    _, expected = uninterrupted
    assert result.keys() == expected.keys()
    for k in expected:
        assert result[k] == pytest.approx(expected[k], rel=1e-4, abs=1e-6), k
    state = torch.load(tmp_path / "compiled" / "last.pt", weights_only=True)["model"]
    assert not any("_orig_mod" in k for k in state)


def test_compile_on_cpu_without_a_compiler_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(engine.shutil, "which", lambda name: None)
    cfg = toy_cfg()
    cfg.train.compile = True
    with pytest.raises(TrainingError, match="needs a C.. compiler"):
        fit(ToyTask(cfg), tmp_path / "nocxx", device="cpu", quiet=True)


def test_describe_mismatch_names_missing_unexpected_and_other_shapes():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    state = {"0.weight": torch.zeros(5, 3), "0.bias": torch.zeros(5), "9.scale": torch.ones(1)}
    msg = describe_mismatch(model, state)
    assert msg == ("2 missing, e.g. 1.weight, 1.bias; 1 unexpected, e.g. 9.scale; "
                   "2 other shape, e.g. 0.weight (5, 3) vs (4, 3), 0.bias (5,) vs (4,)")


def test_auto_workers_follow_the_device_and_the_cpus_per_rank(monkeypatch):
    from pointbert.engine import resolve_workers

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert (resolve_workers(-1, cpu), resolve_workers(-1, cuda), resolve_workers(3, cuda)) == (4, 8, 3)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # 4 CPUs per rank
    assert (resolve_workers(-1, cpu), resolve_workers(-1, cuda), resolve_workers(0, cpu)) == (4, 4, 0)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert resolve_workers(-1, cuda) == 0  # less than one CPU per rank: load in the main process
