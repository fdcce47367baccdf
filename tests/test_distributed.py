"""Distributed training on CPU (gloo): 2 processes on a global batch == 1 process on the same batch.

DDP averages gradients over ranks and the sampler gives each rank half of every global batch, so with
a model whose forward is per-sample (no BatchNorm batch statistics, no dropout, no random augmentation)
two processes must follow the single-process run up to float summation order. The real tiny
classifier has BatchNorm in its patch embedding, whose per-rank batch statistics legitimately differ
from the full batch's (SyncBatchNorm, ``train.sync_bn``, needs CUDA), so the exact comparison swaps
those layers for identities; the torchrun test then runs the unmodified command end to end.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from pointbert.checkpoint import load_checkpoint, load_model, save_checkpoint
from pointbert.config import OptimConfig, preset
from pointbert.data.folder import FolderDataset
from pointbert.data.synthetic import SyntheticShapes
from pointbert.engine import fit
from pointbert.tasks.finetune import ClassificationTask

ROOT = Path(__file__).resolve().parents[1]


class PerSampleClassification(ClassificationTask):
    """The fine-tuning task with BatchNorm replaced by identities: every sample's loss is independent."""

    def build_model(self) -> nn.Module:
        model = super().build_model()
        for module in list(model.modules()):
            for name, child in module.named_children():
                if isinstance(child, nn.modules.batchnorm._BatchNorm):
                    setattr(module, name, nn.Identity())
        return model

    def training_step(self, model, batch, ctx):
        """The fine-tuning loss without the random FPS-pool column shuffle (it draws per-rank numbers)."""
        from pointbert.tasks.finetune import smoothed_cross_entropy

        logits = model(batch["points"].float())
        return {"loss": smoothed_cross_entropy(logits, batch["label"].long().view(-1))}


def make_task(grad_accum: int) -> PerSampleClassification:
    cfg = preset("tiny-classifier")
    cfg.backbone.drop_path_rate, cfg.head.dropout = 0.0, 0.0
    cfg.data.num_points = cfg.data.point_pool = 128  # all points, used as given (see training_step)
    cfg.data.augment = "none"
    cfg.optim = OptimConfig(lr=2e-3, warmup_epochs=0, schedule="step", grad_clip=1.0)
    cfg.train.epochs, cfg.train.batch_size, cfg.train.grad_accum = 2, 8, grad_accum
    cfg.train.log_every, cfg.train.checkpoint_every = 1, 0
    return PerSampleClassification(cfg, scratch=True,
                                   train_data=SyntheticShapes("train", num_points=128, size=32),
                                   test_data=SyntheticShapes("test", num_points=128, size=15))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str, grad_accum: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        result = fit(make_task(grad_accum), out, device="cpu", quiet=True)
        Path(out, f"result{rank}.json").write_text(json.dumps(result))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _train_rows(out: Path) -> list[dict]:
    rows = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    return [r for r in rows if r["kind"] == "train"]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "single"
    return out, fit(make_task(1), out, device="cpu", quiet=True)


@pytest.mark.parametrize("grad_accum", [2])  # 2 ranks x 2 micro-batches of 2: all-reduce and no_sync
def test_two_gloo_processes_match_one_process(tmp_path, single, grad_accum):
    out_1, result_1 = single
    out_2 = tmp_path / "ddp"
    mp.start_processes(_worker, args=(2, _free_port(), str(out_2), grad_accum), nprocs=2, join=True,
                       start_method="spawn")
    r0, r1 = (json.loads((out_2 / f"result{r}.json").read_text()) for r in range(2))
    assert r0 == r1  # every rank returns rank 0's evaluation

    rows_1, rows_2 = _train_rows(out_1), _train_rows(out_2)
    assert [r["step"] for r in rows_2] == [r["step"] for r in rows_1] == list(range(1, 9))  # rank 0 logs once
    np.testing.assert_allclose([r["loss"] for r in rows_2], [r["loss"] for r in rows_1], rtol=1e-4, atol=1e-5)

    w1, w2 = load_checkpoint(out_1 / "last.pt"), load_checkpoint(out_2 / "last.pt")
    assert w2["world_size"] == 2 and len(w2["rng"]) == 2  # every rank's RNG state, for exact resume
    # Gradients agree to float summation order, so the bulk of the weights agree to rounding. A float-level
    # difference can flip which point wins a max-pool in the patch embedding and route a gradient elsewhere,
    # and Adam (dividing by sqrt(v)) turns such a near-zero gradient into a step of ~lr, so a small fraction
    # of elements may differ by up to the total travel of 8 steps at lr <= 2e-3. Without the all-reduce,
    # each rank would follow its own half batch and the median difference would be of the order of lr.
    diffs = torch.cat([(w2["model"][k] - v).abs().flatten() for k, v in w1["model"].items()])
    stats = {"median": float(diffs.median()), "over_1e-4": float((diffs > 1e-4).float().mean()),
             "max": float(diffs.max())}
    assert stats["median"] < 1e-7 and stats["over_1e-4"] < 0.01 and stats["max"] < 8 * 2e-3, stats
    assert abs(r0["acc"] - result_1["acc"]) <= 100 / 15 + 1e-9  # at most one of 15 test clouds flips


def _pretrain_worker(rank: int, world: int, port: int, out: str, tokenizer: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from pointbert.tasks.pretrain import PretrainTask

    cfg = preset("tiny-pretrain")
    cfg.train.epochs, cfg.train.log_every = 1, 1
    try:
        fit(PretrainTask(cfg, tokenizer), out, device="cpu", quiet=True)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_two_gloo_processes_pretrain_with_every_parameter_in_use(tmp_path):
    """Pre-training under DDP without find_unused_parameters (every trainable parameter gets a gradient with
    the released losses; DDP would fail the second step otherwise) and without broadcasting buffers."""
    from pointbert.mpm import PointBERT
    from pointbert.tasks.pretrain import PretrainTask

    cfg = preset("tiny-pretrain")
    save_checkpoint(tmp_path / "tok.pt", cfg, PointBERT(cfg))  # a pre-training file carries a tokenizer
    task = PretrainTask(cfg, tmp_path / "tok.pt")
    assert not task.find_unused_parameters and not task.broadcast_buffers
    task.cfg.mpm.mix_loss = False  # no contrastive loss: the projection head gets no gradient
    assert task.find_unused_parameters

    out = tmp_path / "ddp"
    mp.start_processes(_pretrain_worker, args=(2, _free_port(), str(out), str(tmp_path / "tok.pt")), nprocs=2,
                       join=True, start_method="spawn")
    rows = _train_rows(out)
    assert len(rows) >= 2 and all(np.isfinite(r["loss"]) for r in rows)
    assert load_checkpoint(out / "last.pt")["world_size"] == 2


def _write_folder_dataset(root: Path) -> None:
    shapes = SyntheticShapes("train", num_points=300, size=30)
    for i in range(len(shapes)):
        item = shapes[i]
        folder = root / shapes.classes[int(item["label"])]
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / f"{i:03d}.npy", item["points"])


@pytest.mark.slow
def test_torchrun_two_processes_run_the_unmodified_command(tmp_path):
    data, out = tmp_path / "clouds", tmp_path / "run"
    _write_folder_dataset(data)  # 15 classes x 2 clouds
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "pointbert", "finetune", "--preset", "tiny-classifier", "--data", str(data), "--scratch",
           "--device", "cpu", "--epochs", "2", "--batch-size", "4", "--out", str(out), "--quiet",
           "data.point_pool=256"]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("training Classifier") == 1  # rank 0 alone talks
    assert "1 x cpu" not in proc.stdout and "2 x cpu" in proc.stdout
    model, ckpt = load_model(out / "best.pt", ("classifier",))
    assert model.num_classes == 15 and ckpt["world_size"] == 2
    last = load_checkpoint(out / "last.pt")
    n_train = len(FolderDataset(data, "train", 256))
    assert last["finished"] and last["step"] == 2 * (n_train // 4)  # global batch 4 = 2 ranks x 2
    rows = _train_rows(out)
    assert [r["step"] for r in rows] == sorted({r["step"] for r in rows})  # no rank logged twice
    assert (out / "curves.png").is_file()
