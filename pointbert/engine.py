"""The one training loop. Every stage is a :class:`Task`; :func:`fit` does the rest.

A task supplies four things: ``build_model`` (on CPU, initialised or with weights loaded),
``train_dataset`` (items are dicts of arrays/scalars), ``training_step`` (loss of one batch, already
on the device; augmentation happens here) and ``evaluate``. The engine owns everything else:

* **device and precision**: ``cuda`` when available, else ``cpu``; ``train.precision`` ``auto`` is
  bf16 autocast on CUDA and fp32 elsewhere; ``fp16`` adds a GradScaler. ``training_step`` runs inside
  autocast; backward and the optimizer step run outside it.
* **optimizer** (spec 1.7): AdamW with two groups; no weight decay for 1-D parameters, ``*.bias`` and
  the names in ``model.no_weight_decay()``; frozen parameters are left out. L2 gradient clipping
  (``optim.grad_clip``; 0 = off), gradient accumulation (``train.grad_accum`` micro-batches per step).
* **learning rate**: :func:`lr_at`, a pure function; ``optim.schedule`` ``epoch`` is the official timm
  CosineLRScheduler stepped per epoch, ``step`` a per-iteration warm-up + cosine.
* **data**: :class:`EpochSampler` is a pure function of ``(seed, epoch)``: a seeded permutation, trimmed to
  whole global batches (the official ``drop_last``) and sharded across ranks like ``DistributedSampler``.
  :class:`SeededItems` reseeds numpy's and Python's global RNGs from ``(seed, epoch, index)`` before
  every item, so item randomness does not depend on workers, ranks or restarts.
* **batch sizes**: ``train.batch_size`` is the global batch of one optimizer step. Each of the
  ``world_size`` ranks runs ``grad_accum`` micro-batches of ``batch_size // (world_size * grad_accum)``;
  the union of the ranks' micro-batch ``m`` of step ``s`` is exactly the single-process micro-batch.
* **checkpoints** (rank 0 writes, atomically): ``last.pt`` every ``train.checkpoint_every`` steps and at
  each epoch end; ``best.pt`` whenever ``metrics[task.monitor]`` improves. ``last.pt`` holds model,
  optimizer, scaler, position (epoch, step, batch in epoch), every rank's RNG states and the task state,
  so ``fit(..., resume=True)`` continues exactly where the file was written: a run killed at any moment
  and resumed ends with the same weights and metrics as an uninterrupted one.
* **logging** (rank 0): a tqdm bar per epoch (loss, lr, samples/s, ETA), ``metrics.jsonl`` (one JSON
  object per log step and per evaluation), ``log.txt``, ``config.yaml``, TensorBoard when installed, and
  ``curves.png`` at the end.
* **distributed**: under ``torchrun`` (``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` set) the model is wrapped in
  DDP (gradients averaged, so the global batch keeps its meaning; BatchNorm becomes SyncBatchNorm with
  ``train.sync_bn`` on CUDA). Evaluation runs on rank 0 on the unwrapped model while the other ranks
  wait; the metrics are then broadcast so every rank returns the same result.

Task contract details: ``training_step`` receives the (possibly DDP-wrapped) model in train mode; use
:func:`unwrap` for attribute access. ``evaluate`` receives the unwrapped model in eval mode under
``torch.no_grad()`` (it may use ``ctx.autocast()``). ``on_step`` is called before each optimizer step.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import inspect
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import memory
from .checkpoint import atomic_write_bytes, describe_mismatch, load_checkpoint, save_checkpoint
from .config import Config, OptimConfig, save_yaml
from .errors import CheckpointError, PointBERTError
from .transformer import compile_blocks

__all__ = ["Task", "Context", "fit", "lr_at", "unwrap", "setup_distributed", "param_groups",
           "build_optimizer", "resolve_device", "resolve_precision", "eval_loader", "EpochSampler",
           "SeededItems", "TrainingError", "derive_seed"]

DIST_TIMEOUT = datetime.timedelta(minutes=int(os.environ.get("POINTBERT_DIST_TIMEOUT_MIN", "60")))


class TrainingError(PointBERTError):
    """Training cannot start or continue (nothing to resume, a non-finite loss, a bad batch size)."""


# --------------------------------------------------------------------------------------------------
# Task and Context
# --------------------------------------------------------------------------------------------------


class Task:
    """One training stage. Subclass and implement build_model, train_dataset, training_step, evaluate."""

    monitor: str = "acc"  # metric of ``evaluate`` that selects ``best.pt`` ("" = no best checkpoint)
    mode: str = "max"  # "max" or "min"
    also_best: dict[str, str] = {}  # other metrics (same mode) with a best file: {"vote_acc": "best_vote.pt"}
    find_unused_parameters: bool = False  # DDP: some parameters get no gradient in some steps
    broadcast_buffers: bool = True  # DDP: copy rank 0's buffers to every rank before each forward

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def build_model(self) -> nn.Module:
        """The model on CPU, initialised (and with any pre-trained weights loaded)."""
        raise NotImplementedError

    def train_dataset(self) -> torch.utils.data.Dataset:
        """Training items: dicts of arrays / scalars (collated into a dict of tensors)."""
        raise NotImplementedError

    def training_step(self, model: nn.Module, batch: dict[str, Tensor], ctx: Context) -> dict[str, Tensor]:
        """Loss of one (micro-)batch, already on ``ctx.device``: ``{"loss": scalar, **scalars to log}``."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, ctx: Context) -> dict[str, float]:
        """Metrics after an epoch (epochs eval_every, 2 eval_every, ... counted from 0, and the last one)."""
        return {}

    def on_step(self, step: int, epoch: int, ctx: Context) -> None:
        """Called before each optimizer step (iteration-based schedules: temperature, KL weight, ...)."""

    def state_dict(self) -> dict:
        """Extra task state stored in checkpoints and restored on resume."""
        return {}

    def load_state_dict(self, d: dict) -> None:
        pass

    def checkpoint_extra(self) -> dict:
        """Extra top-level entries stored in every checkpoint, e.g. ``{"class_names": [...]}``."""
        return {}


def _print(msg: str) -> None:
    print(msg, flush=True)


@dataclass
class Context:
    """What a task sees of the running loop. ``epoch``/``step`` are updated by the loop."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    is_main: bool = True
    amp_dtype: torch.dtype | None = None  # autocast dtype, None = fp32
    generator: torch.Generator | None = None  # on ``device``: the augmentation RNG, saved in checkpoints
    epoch: int = 0
    step: int = 0  # index of the current optimizer step (= optimizer steps completed before it)
    out: Path = field(default_factory=lambda: Path("."))
    log: Callable[[str], None] = _print  # prints on rank 0 only (and appends to out/log.txt)
    # Extensions beyond the minimal contract.
    cfg: Config | None = None
    local_rank: int = 0
    steps_per_epoch: int = 0
    num_epochs: int = 0  # epochs actually run (train.epochs + 1 with train.extra_epoch)
    model: nn.Module | None = None  # the unwrapped model
    optimizer: torch.optim.Optimizer | None = None

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.num_epochs

    def autocast(self) -> contextlib.AbstractContextManager:
        """``torch.autocast`` for this run's precision (a no-op in fp32)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


# --------------------------------------------------------------------------------------------------
# Learning rate and optimizer (spec 1.7)
# --------------------------------------------------------------------------------------------------


def lr_at(epoch_or_step: float, cfg: OptimConfig, total: int, warmup: int) -> float:
    """The learning rate at an epoch (``cfg.schedule == "epoch"``) or a global step (``"step"``).

    ``epoch``: the official timm 0.4.5 ``CosineLRScheduler(t_initial=total, warmup_t=warmup,
    warmup_lr_init=cfg.warmup_lr, lr_min=cfg.min_lr)`` stepped once after each epoch. The LR is constant
    within an epoch; epoch 0 trains at ``warmup_lr`` (at ``lr`` when there is no warm-up); epoch ``e >= 1``
    at ``f(e - 1)`` with ``f(t) = warmup_lr + t (lr - warmup_lr) / warmup`` for ``t < warmup``,
    ``min_lr + (lr - min_lr)(1 + cos(pi t / total)) / 2`` for ``warmup <= t < total`` (cosine on the
    absolute ``t``) and ``min_lr`` afterwards. ``total`` is ``train.epochs``, ``warmup``
    ``optim.warmup_epochs``.

    ``step``: a continuous function of the (possibly fractional) global step ``s``: linear warm-up from
    ``warmup_lr`` to ``lr`` over ``warmup`` steps, then a cosine from ``lr`` to ``min_lr`` over the
    remaining ``total - warmup`` steps, ``min_lr`` after ``total``.
    """
    lr, lo, w0 = cfg.lr, cfg.min_lr, cfg.warmup_lr
    if cfg.schedule == "epoch":
        e = int(math.floor(epoch_or_step))
        if e <= 0:
            return w0 if warmup > 0 else lr
        t = e - 1
        if t < warmup:
            return w0 + t * (lr - w0) / warmup
        if t >= total:
            return lo
        return lo + 0.5 * (lr - lo) * (1 + math.cos(math.pi * t / total))
    if cfg.schedule == "step":
        s = float(epoch_or_step)
        if s < warmup:
            return w0 + s * (lr - w0) / warmup
        if s >= total:
            return lo
        ratio = (s - warmup) / max(1, total - warmup)
        return lo + 0.5 * (lr - lo) * (1 + math.cos(math.pi * ratio))
    raise ValueError(f"optim.schedule must be epoch or step, got {cfg.schedule!r}")


def split_weight_decay(model: nn.Module) -> tuple[list[str], list[str]]:
    """(decayed, not decayed) trainable parameter names: spec 1.7's rule, names relative to ``model``."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or name in skip:
            no_decay.append(name)
        else:
            decay.append(name)
    return decay, no_decay


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The two AdamW groups of the official builder: ``[no decay (wd 0), decay (wd weight_decay)]``."""
    params = dict(model.named_parameters())
    decay, no_decay = split_weight_decay(model)
    return [{"params": [params[n] for n in no_decay], "weight_decay": 0.0},
            {"params": [params[n] for n in decay], "weight_decay": weight_decay}]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the two weight-decay groups. ``cfg.fused``: torch's fused kernel (one pass over all
    parameters; 4-10% of a CPU fine-tuning step saved in benchmarks/README.md) where this torch and device have it, else
    the per-tensor loop the official code uses; both give the same update up to float rounding."""
    groups = param_groups(model, cfg.weight_decay)
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.fused:
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, ValueError):  # a device (or torch) without the fused kernel
            pass
    return torch.optim.AdamW(groups, **kwargs)


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """A checked ``torch.device``: ``None``/``"auto"`` = CUDA when available (``cuda:LOCAL_RANK`` under
    torchrun), else CPU. Unknown or unavailable devices are a one-line :class:`TrainingError`."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if name is None or name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise TrainingError(f"device {name!r} is not a device name (cpu, cuda, cuda:1, mps, ...)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainingError(f"device {name!r}: CUDA is not available to this torch build "
                                f"({torch.__version__}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise TrainingError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise TrainingError(f"device {name!r}: MPS is not available on this machine")
    if dev.type == "meta" or (dev.type == "cpu" and dev.index not in (None, 0)):
        raise TrainingError(f"device {name!r}: not a device that computes here (cpu, cuda, cuda:1, mps, ...)")
    return dev


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype of ``train.precision``: auto = bf16 on CUDA (fp16 without bf16 support), else fp32."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None
    raise ValueError(f"train.precision must be auto, fp32, bf16 or fp16, got {precision!r}")


# --------------------------------------------------------------------------------------------------
# Data: a sampler that is a pure function of (seed, epoch); items reseeded by (seed, epoch, index)
# --------------------------------------------------------------------------------------------------


class EpochSampler(torch.utils.data.Sampler):
    """Seeded per-epoch permutation, trimmed to whole global batches, sharded across ranks.

    Rank ``r`` gets ``perm[r::world_size]`` (``DistributedSampler`` semantics), so the per-rank batch
    ``b`` of size ``batch_size // world_size`` holds exactly the samples of the global batch ``b``.
    Yields ``(epoch, index)`` pairs (read by :class:`SeededItems`), starting at ``start_batch`` global
    batches into the epoch (resuming mid-epoch). ``shuffle=False`` keeps dataset order.
    """

    def __init__(self, size: int, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True):
        if batch_size % world_size:
            raise TrainingError(f"train.batch_size ({batch_size}) must be divisible by the number of "
                                f"processes ({world_size})")
        self.size, self.batch_size, self.rank, self.world_size = size, batch_size, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.start_batch = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return self.size // self.batch_size

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def indices(self, epoch: int) -> np.ndarray:
        """This rank's sample indices of ``epoch`` (all of its batches)."""
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.size)
        else:
            order = np.arange(self.size)
        order = order[: self.batches_per_epoch * self.batch_size]  # drop_last, globally
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        per_rank = self.batch_size // self.world_size
        for i in self.indices(self.epoch)[self.start_batch * per_rank :]:
            yield self.epoch, int(i)

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * (self.batch_size // self.world_size)


class SeededItems(torch.utils.data.Dataset):
    """Wraps a dataset: item ``(epoch, index)`` is ``dataset[index]`` drawn with numpy's and Python's
    global RNGs seeded from ``(seed, epoch, index)``. In the main process (``num_workers=0``) the global
    states are restored afterwards, so loading has no side effects on the training RNG."""

    def __init__(self, dataset: torch.utils.data.Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        in_main = torch.utils.data.get_worker_info() is None
        if in_main:
            np_state, py_state = np.random.get_state(), random.getstate()
        np.random.seed([self.seed % 2**32, epoch % 2**32, index % 2**32])
        random.seed(f"{self.seed}/{epoch}/{index}")
        try:
            return self.dataset[index]
        finally:
            if in_main:
                np.random.set_state(np_state)
                random.setstate(py_state)


class _InOrder(torch.utils.data.Sampler):
    def __init__(self, size: int, epoch: int):
        self.size, self.epoch = size, epoch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, i) for i in range(self.size))

    def __len__(self) -> int:
        return self.size


def resolve_workers(num_workers: int, device: torch.device) -> int:
    """``data.num_workers``, with -1 (auto) resolved: the official 4 loader processes on the CPU and 8 feeding
    a GPU (one process serves about 4,000 samples/s of 8192-point clouds: benchmarks/bench_data.py --large),
    never more than this process's share of the CPUs (torchrun's LOCAL_WORLD_SIZE processes per machine)."""
    if num_workers >= 0:
        return num_workers
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    share = cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(8 if device.type == "cuda" else 4, share))


def eval_loader(dataset: torch.utils.data.Dataset, batch_size: int, *, num_workers: int = 0, seed: int = 0,
                device: torch.device | str = "cpu") -> Iterator[dict[str, Any]]:
    """Batches of ``dataset`` in order, every item reseeded from ``(seed, 0, index)`` as in training, moved
    to ``device``. The last batch may be smaller. For evaluation loops."""
    device = torch.device(device)
    loader = torch.utils.data.DataLoader(
        SeededItems(dataset, seed), batch_size=batch_size, sampler=_InOrder(len(dataset), 0),
        num_workers=resolve_workers(num_workers, device), pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(seed))
    for batch in loader:
        yield _to_device(batch, device)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


# --------------------------------------------------------------------------------------------------
# Distributed
# --------------------------------------------------------------------------------------------------


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def setup_distributed(backend: str | None = None) -> tuple[int, int, int]:
    """``(rank, local_rank, world_size)`` from the torchrun environment; initialises the process group once
    (``nccl`` when CUDA is available, else ``gloo``). A plain single process returns ``(0, 0, 1)``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 0, 1
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, timeout=DIST_TIMEOUT)
        atexit.register(_destroy_process_group)
    return dist.get_rank(), local_rank, dist.get_world_size()


def _destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# --------------------------------------------------------------------------------------------------
# RNG state: plain data and tensors, loadable with torch.load(weights_only=True)
# --------------------------------------------------------------------------------------------------


def derive_seed(*parts: int) -> int:
    """A seed for a stream of its own, from integers (the run's seed, a tag, a rank, an epoch, ...)."""
    return int(np.random.SeedSequence([p % 2**32 for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _rng_state(ctx: Context) -> dict[str, Any]:
    np_key, np_keys, np_pos, np_gauss, np_cached = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "device": ctx.device.type,  # the generator's state is only valid on its own kind of device
        "torch": torch.get_rng_state(),
        "generator": ctx.generator.get_state(),
        "numpy": {"key": np_key, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_gauss), "cached_gaussian": float(np_cached)},
        "python": {"version": py_version, "internal": list(py_internal), "gauss_next": py_gauss},
    }
    if ctx.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(ctx.device)
    return state


def _set_rng_state(state: dict[str, Any], ctx: Context) -> None:
    torch.set_rng_state(state["torch"])
    ctx.generator.set_state(state["generator"])
    n = state["numpy"]
    np.random.set_state((n["key"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if ctx.device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], ctx.device)


def _seed_all(seed: int, ctx: Context) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    ctx.generator.manual_seed(derive_seed(seed, 1))


# --------------------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------------------


class _Recorder:
    """metrics.jsonl, log.txt and TensorBoard on rank 0; nothing elsewhere."""

    def __init__(self, out: Path, enabled: bool):
        self.out, self.enabled, self.tb = out, enabled, None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
        except Exception:  # noqa: BLE001 - tensorboard is optional
            self.tb = None

    def log(self, msg: str) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        tqdm.write(msg, file=sys.stdout)
        with open(self.out / "log.txt", "a") as f:
            f.write(msg + "\n")

    def record(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            prefix = row.get("kind", "train")
            for k, v in row.items():
                if k not in ("step", "epoch", "time", "kind") and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{prefix}/{k}", v, row["step"])

    def truncate(self, step: int, epoch: int) -> None:
        """On resume: drop rows written after the checkpoint (train rows past ``step``, evaluations of
        epochs not finished in the checkpoint)."""
        path = self.out / "metrics.jsonl"
        if not self.enabled or not path.is_file():
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by the kill
            is_eval = row.get("kind") == "eval"
            if (is_eval and row["epoch"] < epoch) or (not is_eval and row["step"] <= step):
                keep.append(line)
        path.write_text("".join(k + "\n" for k in keep))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _fmt(v: float) -> str:
    if isinstance(v, int) or (isinstance(v, float) and v.is_integer() and abs(v) < 1e6):
        return str(int(v))
    return f"{v:.3e}" if v != 0 and (abs(v) < 1e-2 or abs(v) >= 1e4) else f"{v:.4f}"


# --------------------------------------------------------------------------------------------------
# fit: setup, then the epoch loop
# --------------------------------------------------------------------------------------------------


@dataclass
class _State:
    """Position of the run: what a checkpoint must hold besides weights and RNG."""

    epoch: int = 0  # the epoch to run (or being run)
    step: int = 0  # optimizer steps completed
    batch_in_epoch: int = 0  # optimizer steps completed in ``epoch``
    metrics: dict[str, float] = field(default_factory=dict)  # latest evaluation
    best_metrics: dict[str, float] = field(default_factory=dict)  # evaluation of the best epoch (+ "epoch")
    also_best: dict[str, float] = field(default_factory=dict)  # best value of each of ``task.also_best``
    finished: bool = False


def fit(task: Task, out: str | Path, *, device: str | torch.device | None = None, resume: bool = False,
        quiet: bool = False, overwrite: bool = True) -> dict[str, float]:
    """Train ``task`` into the run folder ``out``.

    Returns the last evaluation's metrics plus ``best_<name>`` for every metric of the best evaluation
    by ``task.monitor`` (and ``best_epoch``), e.g. ``{"acc", "mean_class_acc", "best_acc",
    "best_mean_class_acc", "best_epoch"}``. Every rank returns the same dict.

    Writes ``out/last.pt``, ``out/best.pt`` (when ``task.monitor`` is set), ``out/metrics.jsonl``,
    ``out/config.yaml``, ``out/log.txt`` and ``out/curves.png``. ``resume=True`` continues from
    ``out/last.pt`` (a clear error if there is none; a finished run returns its metrics at once).
    ``overwrite=False`` refuses to start a fresh run in a folder that already holds ``last.pt``.
    """
    cfg = task.cfg
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise TrainingError(f"--out {out}: is a file; the run needs a folder")
    ctx = _setup_context(task, out, device)
    rec = _Recorder(out, ctx.is_main)
    ctx.log = rec.log
    last_path = out / "last.pt"

    if resume and not last_path.is_file():
        raise TrainingError(f"{last_path}: no checkpoint to resume from; run without --resume to start")
    if not resume and not overwrite and last_path.is_file():
        raise TrainingError(f"{out} already holds a run (last.pt); pass --resume to continue it, "
                            "--overwrite to start it again, or choose another --out")

    if cfg.train.compile and ctx.device.type == "cpu" and not any(
            shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "clang++", "c++") if c):
        raise TrainingError("train.compile on CPU needs a C++ compiler (g++, clang++ or $CXX); install one "
                            "or set train.compile=false")
    _seed_all(cfg.train.seed, ctx)  # model init is identical on every rank and in a single process
    model = task.build_model()
    _seed_all(derive_seed(cfg.train.seed, ctx.rank, 2), ctx)  # per-rank training randomness
    if cfg.train.sync_bn and ctx.world_size > 1:
        if ctx.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            ctx.log("train.sync_bn: SyncBatchNorm needs CUDA; keeping per-process BatchNorm on "
                    f"{ctx.device.type}")
    model.to(ctx.device)
    optimizer = build_optimizer(model, cfg.optim)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=ctx.amp_dtype == torch.float16)
    ctx.model, ctx.optimizer = model, optimizer

    dataset = task.train_dataset()
    loader, sampler = _build_loader(dataset, cfg, ctx)
    ctx.steps_per_epoch = sampler.batches_per_epoch
    ctx.num_epochs = cfg.train.epochs + (1 if cfg.train.extra_epoch else 0)
    if ctx.steps_per_epoch == 0:
        raise TrainingError(f"the training set has {len(dataset)} samples, fewer than one batch of "
                            f"{cfg.train.batch_size}; lower --batch-size")

    state = _State()
    if resume:
        if ctx.is_main:  # a kill during a checkpoint write leaves its temporary file behind
            for tmp in out.glob(".*.pt.*.tmp"):
                tmp.unlink(missing_ok=True)
        state = _restore(last_path, task, model, optimizer, scaler, ctx)
        if state.epoch >= ctx.num_epochs:
            ctx.log(f"{out}: this run already finished ({ctx.num_epochs} epochs); nothing to do")
            return _result(state)
        ctx.log(f"resuming {last_path} at epoch {state.epoch}, step {state.step} "
                f"(batch {state.batch_in_epoch}/{ctx.steps_per_epoch})")
        rec.truncate(state.step, state.epoch)
    elif ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        for name in ("metrics.jsonl", "log.txt", "best.pt"):
            (out / name).unlink(missing_ok=True)
    if ctx.is_main:
        save_yaml(cfg, out / "config.yaml")

    if cfg.train.compile:
        n = compile_blocks(model, mode=cfg.train.compile_mode)
        ctx.log(f"train.compile: {n} modules compiled on first use, mode {cfg.train.compile_mode} "
                "(the first steps are slow)")
    train_model: nn.Module = model
    if ctx.world_size > 1:
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=ids, find_unused_parameters=task.find_unused_parameters,
            **({} if task.broadcast_buffers else _no_forward_buffer_sync()))

    precision = "fp32" if ctx.amp_dtype is None else str(ctx.amp_dtype).removeprefix("torch.")
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ctx.log(f"training {type(model).__name__} ({n_params / 1e6:.2f}M trainable parameters) on "
            f"{ctx.world_size} x {ctx.device} ({precision}), "
            f"{len(dataset)} samples, {ctx.num_epochs} epochs x {ctx.steps_per_epoch} steps of "
            f"{cfg.train.batch_size}, out {out}")
    # the official per-epoch schedule trains epoch e at f(e - 1): its warm-up is over from epoch warmup + 1 on
    over = cfg.optim.warmup_epochs + (1 if cfg.optim.schedule == "epoch" else 0)
    if cfg.optim.warmup_epochs > 0 and ctx.num_epochs <= over:
        ctx.log(f"warning: {ctx.num_epochs} epochs with optim.warmup_epochs={cfg.optim.warmup_epochs}: the learning "
                f"rate stays in its warm-up, far below optim.lr, for the whole run (the warm-up is over from epoch "
                f"{over} on, counting from 0)")

    def save_last() -> None:
        _save(last_path, task, model, optimizer, scaler, state, ctx)

    try:
        while state.epoch < ctx.num_epochs:
            epoch = state.epoch
            ctx.epoch = epoch
            sampler.set_epoch(epoch, start_batch=state.batch_in_epoch)
            train_one_epoch(task, train_model, loader, optimizer, scaler, ctx, state, rec, save_last, quiet)
            ctx.step = state.step  # during evaluation: optimizer steps completed
            # as the official loops: every eval_every epochs, skipping epoch 0 (spec 4.6, 5.6, 6.2); and the last
            if (epoch > 0 and epoch % cfg.train.eval_every == 0) or epoch + 1 == ctx.num_epochs:
                state.metrics = _evaluate(task, train_model, ctx)
                _log_eval(state, ctx, rec)
                if _improved(task, state):
                    state.best_metrics = {**state.metrics, "epoch": epoch}
                    if ctx.is_main:
                        _save(out / "best.pt", task, model, None, None, state, ctx, rng=False)
                for key, name in task.also_best.items():
                    new, old = state.metrics.get(key), state.also_best.get(key)
                    if new is not None and (old is None or (new > old if task.mode == "max" else new < old)):
                        state.also_best[key] = new
                        if ctx.is_main:
                            _save(out / name, task, model, None, None, state, ctx, rng=False)
            state.epoch, state.batch_in_epoch = epoch + 1, 0
            state.finished = state.epoch >= ctx.num_epochs
            save_last()
            if ctx.is_main and epoch >= ctx.num_epochs - cfg.train.keep_epochs:  # official ckpt-epoch-<e>
                atomic_write_bytes(out / f"epoch-{epoch:03d}.pt", last_path.read_bytes())
    finally:
        rec.close()
    result = _result(state)
    if ctx.is_main:
        from .viz import plot_curves

        plot_curves(out / "metrics.jsonl", out / "curves.png")
        if result:
            ctx.log("done: " + ", ".join(f"{k} {_fmt(v)}" for k, v in result.items()))
    return result


def train_one_epoch(task: Task, model: nn.Module, loader: torch.utils.data.DataLoader,
                    optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, ctx: Context,
                    state: _State, rec: _Recorder, save_last: Callable[[], None], quiet: bool) -> None:
    """The remaining optimizer steps of ``state.epoch``: on_step, lr, micro-batches, clip, step, log, save."""
    cfg = ctx.cfg
    accum, clip = cfg.train.grad_accum, cfg.optim.grad_clip
    sched_total, sched_warmup, where = _schedule_span(ctx)
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    sums: dict[str, Tensor] = {}  # logged scalars summed over the log window (per micro-batch)
    window_steps, window_start = 0, time.perf_counter()
    bar = None
    if ctx.is_main and not quiet:
        from tqdm import tqdm

        bar = tqdm(total=ctx.steps_per_epoch, initial=state.batch_in_epoch, dynamic_ncols=True,
                   desc=f"epoch {state.epoch}/{ctx.num_epochs - 1}", leave=ctx.steps_per_epoch >= 10, file=sys.stdout)
    epoch_start, epoch_steps, lr, last_loss = time.perf_counter(), 0, 0.0, float("nan")
    batches = iter(loader)
    model.train()
    for _ in range(state.batch_in_epoch, ctx.steps_per_epoch):
        ctx.step = state.step
        task.on_step(state.step, state.epoch, ctx)
        lr = lr_at(state.epoch if where == "epoch" else state.step, cfg.optim, sched_total, sched_warmup)
        for g in optimizer.param_groups:
            g["lr"] = lr
        for m in range(accum):
            batch = _to_device(next(batches), ctx.device)
            sync = contextlib.nullcontext() if (not ddp or m == accum - 1) else model.no_sync()
            with sync:
                with ctx.autocast():
                    outputs = task.training_step(model, batch, ctx)
                scaler.scale(outputs["loss"] / accum).backward()
            for k, v in outputs.items():
                v = torch.as_tensor(v, device=ctx.device).detach().float()
                sums[k] = sums[k] + v if k in sums else v
        if clip > 0:
            scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_(params, clip)
            sums["grad_norm"] = sums.get("grad_norm", 0) + norm.detach().float() * accum
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.batch_in_epoch += 1
        window_steps += 1
        epoch_steps += 1

        last_of_epoch = state.batch_in_epoch == ctx.steps_per_epoch
        if state.step % cfg.train.log_every == 0 or last_of_epoch:
            row = _log_row(sums, window_steps * accum, lr, state, ctx, window_start)
            if not math.isfinite(row["loss"]):
                raise TrainingError(f"non-finite loss at epoch {state.epoch}, step {state.step}: {row}; "
                                    "lower optim.lr, enable optim.grad_clip or use --precision fp32")
            rec.record(row)
            last_loss = row["loss"]
            if bar is not None:
                bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}", sps=f"{row['samples_per_s']:.1f}")
            sums, window_steps, window_start = {}, 0, time.perf_counter()
        if bar is not None:
            bar.update(1)
        every = cfg.train.checkpoint_every
        if every and state.step % every == 0 and not last_of_epoch:
            save_last()
    if bar is not None:
        bar.close()
    if quiet:
        dt = time.perf_counter() - epoch_start
        sps = epoch_steps * cfg.train.batch_size / max(dt, 1e-9)
        ctx.log(f"epoch {state.epoch}/{ctx.num_epochs - 1}: step {state.step}, lr {lr:.3e}, "
                f"loss {last_loss:.4f}, {sps:.1f} samples/s, {dt:.1f} s")


def _schedule_span(ctx: Context) -> tuple[int, int, str]:
    o, t = ctx.cfg.optim, ctx.cfg.train
    if o.schedule == "epoch":
        return t.epochs, o.warmup_epochs, "epoch"
    return ctx.total_steps, o.warmup_epochs * ctx.steps_per_epoch, "step"


def _log_row(sums: dict[str, Tensor], n: int, lr: float, state: _State, ctx: Context,
             window_start: float) -> dict[str, Any]:
    names = sorted(sums)
    values = torch.stack([sums[k].to(ctx.device) for k in names]) / n
    if _distributed():
        dist.all_reduce(values)
        values /= ctx.world_size
    dt = time.perf_counter() - window_start
    steps = n // ctx.cfg.train.grad_accum
    row: dict[str, Any] = {"kind": "train", "step": state.step, "epoch": state.epoch, "lr": lr}
    row.update({k: float(v) for k, v in zip(names, values.tolist())})
    row["samples_per_s"] = steps * ctx.cfg.train.batch_size / max(dt, 1e-9)
    row["time"] = time.time()
    return row


def _no_forward_buffer_sync() -> dict[str, bool]:
    """DDP's switch for no buffer broadcast before each forward (renamed in recent torch; synced at init)."""
    params = inspect.signature(nn.parallel.DistributedDataParallel).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def _evaluate(task: Task, model: nn.Module, ctx: Context) -> dict[str, float]:
    """Evaluation on rank 0 (unwrapped model, eval mode, no grad); other ranks wait for the broadcast."""
    metrics: dict[str, float] = {}
    if ctx.is_main:
        inner = unwrap(model)
        inner.eval()
        with torch.no_grad():
            metrics = {k: float(v) for k, v in task.evaluate(inner, ctx).items()}
        inner.train()
    if _distributed():
        box = [metrics]
        dist.broadcast_object_list(box, src=0)
        metrics = box[0]
    return metrics


def _improved(task: Task, state: _State) -> bool:
    key = task.monitor
    if not key or key not in state.metrics:
        return False
    if key not in state.best_metrics:
        return True
    new, old = state.metrics[key], state.best_metrics[key]
    return new > old if task.mode == "max" else new < old


def _log_eval(state: _State, ctx: Context, rec: _Recorder) -> None:
    if not state.metrics:
        return
    rec.record({"kind": "eval", "step": state.step, "epoch": state.epoch, **state.metrics,
                "time": time.time()})
    ctx.log(f"eval epoch {state.epoch}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in state.metrics.items()))


def _result(state: _State) -> dict[str, float]:
    return {**state.metrics, **{f"best_{k}": v for k, v in {**state.best_metrics, **state.also_best}.items()}}


def _setup_context(task: Task, out: Path, device: str | torch.device | None) -> Context:
    dev = resolve_device(device) if device else None
    backend = None if dev is None else ("nccl" if dev.type == "cuda" else "gloo")
    rank, local_rank, world = setup_distributed(backend)
    if dev is None:
        dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if dev.type == "cuda":
        if world > 1 or dev.index is None:
            dev = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
        torch.cuda.set_device(dev)
    if task.cfg.train.batch_size % (world * task.cfg.train.grad_accum):
        raise TrainingError(f"train.batch_size ({task.cfg.train.batch_size}) must be divisible by processes "
                            f"x train.grad_accum ({world} x {task.cfg.train.grad_accum})")
    if dev.type == "cpu":
        if not task.cfg.train.keep_memory:
            memory.automatic = False  # nor at the models' first training forward
        elif memory.automatic:  # POINTBERT_KEEP_MEMORY=0 holds for the commands too
            memory.keep_freed_memory()
    gen = torch.Generator(device=dev)
    return Context(device=dev, rank=rank, world_size=world, is_main=rank == 0,
                   amp_dtype=resolve_precision(task.cfg.train.precision, dev), generator=gen, out=out,
                   cfg=task.cfg, local_rank=local_rank)


def _build_loader(dataset: torch.utils.data.Dataset, cfg: Config,
                  ctx: Context) -> tuple[torch.utils.data.DataLoader, EpochSampler]:
    sampler = EpochSampler(len(dataset), cfg.train.batch_size, rank=ctx.rank, world_size=ctx.world_size,
                           seed=cfg.train.seed)
    micro = cfg.train.batch_size // (ctx.world_size * cfg.train.grad_accum)
    workers = resolve_workers(cfg.data.num_workers, ctx.device)
    loader = torch.utils.data.DataLoader(
        SeededItems(dataset, cfg.train.seed), batch_size=micro, sampler=sampler, num_workers=workers,
        pin_memory=ctx.device.type == "cuda", drop_last=True, persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(cfg.train.seed))  # never draws from the global RNG
    return loader, sampler


def _gather_rng(ctx: Context) -> list[dict[str, Any]]:
    mine = _rng_state(ctx)
    if not _distributed():
        return [mine]
    everyone: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(everyone, mine)
    return everyone


def _save(path: Path, task: Task, model: nn.Module, optimizer: torch.optim.Optimizer | None,
          scaler: torch.amp.GradScaler | None, state: _State, ctx: Context, rng: bool = True) -> None:
    """Save on rank 0. With ``rng`` (``last.pt``) every rank takes part: the RNG states are gathered."""
    states = _gather_rng(ctx) if rng else None
    if not ctx.is_main:
        return
    extra: dict[str, Any] = {}
    if optimizer is not None:
        extra.update(optimizer=optimizer.state_dict(), scaler=scaler.state_dict() if scaler else {})
    if states is not None:
        extra["rng"] = states
    save_checkpoint(path, ctx.cfg, unwrap(model), step=state.step, epoch=state.epoch,
                    batch_in_epoch=state.batch_in_epoch, metrics=state.metrics,
                    best_metrics=state.best_metrics, also_best=state.also_best, finished=state.finished,
                    world_size=ctx.world_size,
                    task=task.state_dict(), **extra, **task.checkpoint_extra())


def _restore(path: Path, task: Task, model: nn.Module, optimizer: torch.optim.Optimizer,
             scaler: torch.amp.GradScaler, ctx: Context) -> _State:
    ckpt = load_checkpoint(path, (ctx.cfg.kind,))
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError:
        raise CheckpointError(f"{path}: weights do not match this run's config "
                              f"({describe_mismatch(model, ckpt['model'])}); resume with the run's own "
                              "settings, or start a new run with another --out") from None
    if "optimizer" not in ckpt:
        raise CheckpointError(f"{path}: holds no optimizer state; it is not a training checkpoint")
    optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    task.load_state_dict(ckpt.get("task", {}))
    rng = ckpt.get("rng") or []
    # the device's generator state differs in kind (CPU Mersenne twister, CUDA Philox): compare the sizes,
    # which also covers checkpoints written before the device was recorded
    written_on = {r.get("device", "cuda" if "cuda" in r else "cpu") for r in rng}
    same_device = all(r["generator"].numel() == ctx.generator.get_state().numel() for r in rng)
    if len(rng) == ctx.world_size and same_device:
        _set_rng_state(rng[ctx.rank], ctx)
    else:
        ctx.log(f"{path}: written by {len(rng)} process(es) on {'/'.join(sorted(written_on)) or '?'}, resumed "
                f"by {ctx.world_size} on {ctx.device.type}: the random streams restart (data order is unaffected)")
        _seed_all(derive_seed(ctx.cfg.train.seed, ctx.rank, ckpt["step"]), ctx)
    return _State(epoch=int(ckpt["epoch"]), step=int(ckpt["step"]),
                  batch_in_epoch=int(ckpt["batch_in_epoch"]), metrics=dict(ckpt.get("metrics", {})),
                  best_metrics=dict(ckpt.get("best_metrics", {})), also_best=dict(ckpt.get("also_best", {})),
                  finished=bool(ckpt.get("finished", False)))
