"""Classification fine-tuning (spec 6.1-6.3): ``pointbert finetune`` and ``pointbert evaluate``.

* :class:`ClassificationTask`: the official recipe. Per training batch: FPS to ``data.point_pool``, one
  random subset of ``data.num_points`` columns for the batch, ScaleAndTranslate, forward, cross-entropy
  (optionally the official label smoothing). After each epoch: overall and mean class accuracy on the
  test split with FPS(num_points) from point 0 and no augmentation; ``best.pt`` by ``acc``.
* :func:`load_init`: backbone weights from a pre-training checkpoint (``query.backbone.*``) or everything
  shape-compatible from a classifier checkpoint, asserting that exactly the head is left new.
* :func:`vote_accuracy`: the voting test of spec 6.3 (``vote_views`` random views per cloud, logits
  averaged, ``vote_repeats`` repetitions; the maximum is the official number, the mean is reported too).
* :func:`smoothed_cross_entropy`: the official smoothing, ``1 - eps`` on the true class and
  ``eps / (C - 1)`` elsewhere (torch's built-in spreads ``eps / C`` over all classes instead).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoint import config_of, load_checkpoint, load_model
from ..config import Config, ConfigError, apply_overrides, validate
from ..engine import Context, Task, derive_seed, fit, resolve_device, resolve_precision, unwrap
from ..errors import CheckpointError, PointBERTError
from ..heads import Classifier
from . import apply_data_arg, check_init, config_from_args, out_dir

__all__ = ["ClassificationTask", "smoothed_cross_entropy", "load_init", "InitReport", "classify",
           "evaluate_classifier", "vote_logits", "vote_accuracy", "finetune_command", "evaluate_command",
           "OFFICIAL_40"]

#: Datasets whose official configs keep ``cls_dim: 40`` whatever the class count (spec 6.2, 11.11).
OFFICIAL_40 = ("modelnet40", "scanobjectnn", "fewshot")


# --------------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------------


def smoothed_cross_entropy(logits: Tensor, target: Tensor, eps: float = 0.0) -> Tensor:
    """Cross-entropy with the official label smoothing (spec 6.1), mean over the batch.

    logits (B, C), target (B,) int64. The target distribution is ``1 - eps`` on the true class and
    ``eps / (C - 1)`` on each other class; loss = ``-sum(target * log_softmax(logits))``. ``eps = 0`` is
    plain cross-entropy. Computed in float32.
    """
    logits = logits.float()
    if eps == 0:
        return F.cross_entropy(logits, target)
    C = logits.shape[-1]
    logp = F.log_softmax(logits, dim=-1)  # (B, C)
    dist = torch.full_like(logp, eps / (C - 1)).scatter_(1, target[:, None], 1 - eps)  # (B, C)
    return -(dist * logp).sum(dim=-1).mean()


# --------------------------------------------------------------------------------------------------
# Initialisation from a pre-training or classifier checkpoint
# --------------------------------------------------------------------------------------------------


@dataclass
class InitReport:
    """What :func:`load_init` did: keys loaded into the model, left newly initialised, and ignored."""

    path: str
    kind: str
    loaded: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"init from {self.path} ({self.kind} checkpoint)\n"
                f"  loaded {len(self.loaded)} tensors: {_grouped(self.loaded)}\n"
                f"  newly initialised ({len(self.new)}): {', '.join(self.new) or 'none'}\n"
                f"  ignored from the checkpoint ({len(self.ignored)}): {_grouped(self.ignored)}")


def _grouped(keys: list[str], depth: int = 2) -> str:
    """``a.b.c, a.b.d, e`` -> ``a.b.* (2), e``: key names summarised by their first ``depth`` parts."""
    groups: dict[str, list[str]] = {}
    for k in keys:
        groups.setdefault(".".join(k.split(".")[:depth]), []).append(k)
    return ", ".join(ks[0] if len(ks) == 1 and ks[0] == p else f"{p}.* ({len(ks)})"
                     for p, ks in groups.items()) or "none"


def load_init(model: Classifier, path: str | Path) -> InitReport:
    """Load a pre-training or classifier checkpoint into ``model`` (in place) and report the keys.

    * pretrain: ``query.backbone.*`` -> ``backbone.*``; the mask token, token head, contrastive head, key
      encoder, tokenizer and queue are ignored. Exactly the head (``head.*``) must be left new.
    * classifier: every tensor whose name and shape match is kept; the rest of the model must be the head
      (e.g. a different number of classes re-initialises the last layer).

    Raises CheckpointError naming the first mismatching tensor when the backbones differ in shape.
    """
    ckpt = load_checkpoint(path, ("pretrain", "classifier"))
    kind, src = ckpt["kind"], ckpt["model"]
    target = model.state_dict()
    head = {k for k in target if k.startswith("head.")}
    # source name -> model name
    if kind == "pretrain":
        prefix = "query.backbone."
        names = {k: "backbone." + k[len(prefix):] for k in src if k.startswith(prefix)}
    else:
        names = {k: k for k in src}
    ignored = [k for k in src if k not in names]
    take: dict[str, Tensor] = {}
    def mismatch(detail: str) -> CheckpointError:
        stored = config_of(ckpt, str(path)).backbone
        return CheckpointError(f"{path}: {detail}; the checkpoint's backbone is dim={stored.dim} "
                               f"depth={stored.depth} num_heads={stored.num_heads}: use a matching --preset or "
                               f"backbone.* overrides")

    for s, k in names.items():
        v = src[s]
        if k not in target:
            if k.startswith("backbone."):
                raise mismatch(f"{k} has no place in this model")
            ignored.append(s)
        elif v.shape != target[k].shape:
            if k not in head:
                raise mismatch(f"{k} has shape {tuple(v.shape)} there, {tuple(target[k].shape)} in this model")
            ignored.append(s)
        else:
            take[k] = v
    missing, unexpected = model.load_state_dict(take, strict=False)
    if unexpected or set(missing) - head:
        raise mismatch(f"holds no {sorted(set(missing) - head)[0]}" if set(missing) - head
                       else f"{unexpected[0]} has no place in this model")
    return InitReport(str(path), kind, loaded=list(take), new=sorted(missing), ignored=sorted(ignored))


# --------------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------------


#: the official runner votes at every evaluation above this accuracy, new best or not (spec 6.2)
VOTE_ALWAYS_ABOVE = 91.5


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


class ClassificationTask(Task):
    """Fine-tune :class:`~pointbert.heads.Classifier` (spec 6.1-6.2). ``best.pt`` by test ``acc``.

    Args:
        cfg: a classifier config. ``head.num_classes`` is set to the dataset's class count, except for
            the official datasets (:data:`OFFICIAL_40`): they keep the configured value (40), as official.
        init: a pre-training or classifier checkpoint to start from (see :func:`load_init`).
        scratch: train from the PyTorch default initialisation; one of ``init``/``scratch`` is required
            unless ``resume`` (the weights then come from the run's ``last.pt``).
        train_data, test_data: datasets to use instead of ``build_dataset(cfg.data, ...)``.

    As the official runner, an evaluation whose accuracy is above 91.5, or a new best above 90
    (``train.vote_above``), adds one voting pass (``vote_acc``, spec 6.2), and ``best_vote.pt`` keeps the
    best of those (the official ``ckpt-best_vote``).
    """

    monitor, mode = "acc", "max"
    also_best = {"vote_acc": "best_vote.pt"}

    def __init__(self, cfg: Config, init: str | Path | None = None, scratch: bool = False, *,
                 resume: bool = False, train_data: Any = None, test_data: Any = None):
        check_init(init, scratch, resume, "a pre-training or classifier checkpoint")
        self._train, self._test = train_data, test_data
        self.init = str(init) if init else None
        self.init_report: InitReport | None = None
        self._best_acc = -1.0  # the best test accuracy so far: the vote rule needs it (spec 6.2)
        super().__init__(cfg)
        self.cfg = self._resolve_num_classes(cfg)

    def _dataset(self, split: str) -> Any:
        from ..data import build_dataset

        return build_dataset(self.cfg.data, split, seed=self.cfg.train.seed)

    def train_dataset(self) -> Any:
        if self._train is None:
            self._train = self._dataset("train")
        return self._train

    def test_dataset(self) -> Any:
        if self._test is None:
            self._test = self._dataset("test")
        return self._test

    @property
    def class_names(self) -> list[str]:
        return list(getattr(self.train_dataset(), "classes", None) or [])

    def _resolve_num_classes(self, cfg: Config) -> Config:
        n = len(self.class_names)
        if not n:
            return cfg
        if cfg.data.dataset in OFFICIAL_40:
            if cfg.head.num_classes < n:
                raise ConfigError(f"head.num_classes ({cfg.head.num_classes}) is smaller than the {n} "
                                  f"classes of the {cfg.data.dataset} data")
            return cfg
        return validate(apply_overrides(cfg, [f"head.num_classes={n}"], where="dataset classes"))

    def build_model(self) -> nn.Module:
        model = Classifier(self.cfg)
        if self.init:
            self.init_report = load_init(model, self.init)
            if _is_main_process():
                print(self.init_report.summary(), flush=True)
        return model

    def training_step(self, model: nn.Module, batch: dict[str, Tensor], ctx: Context) -> dict[str, Tensor]:
        from ..data.transforms import augment, fps_subsample

        d = self.cfg.data
        points = batch["points"].float()  # (B, N, 3)
        points = fps_subsample(points, d.num_points, d.point_pool, ctx.generator)  # (B, num_points, 3)
        points = augment(points, d.augment, ctx.generator)
        logits = model(points)  # (B, num_classes)
        label = batch["label"].long().view(-1)
        loss = smoothed_cross_entropy(logits, label, self.cfg.optim.label_smoothing)
        acc = (logits.argmax(-1) == label).float().mean() * 100
        return {"loss": loss, "acc": acc}

    def evaluate(self, model: nn.Module, ctx: Context) -> dict[str, float]:
        t = self.cfg.train
        metrics = evaluate_classifier(model, self.test_dataset(), self.cfg, ctx.device, progress=False,
                                      batch_size=t.batch_size, amp_dtype=ctx.amp_dtype)
        acc, best = metrics["acc"], self._best_acc
        self._best_acc = max(acc, best)
        if acc > max(t.vote_above, VOTE_ALWAYS_ABOVE) or (acc > best and acc > t.vote_above):
            vote = vote_accuracy(model, self.test_dataset(), self.cfg, ctx.device, repeats=1, progress=False,
                                 seed=derive_seed(t.seed, 3, ctx.epoch), batch_size=t.batch_size,
                                 amp_dtype=ctx.amp_dtype)
            metrics["vote_acc"] = vote["vote_acc"]
        return metrics

    def state_dict(self) -> dict:
        return {"best_acc": self._best_acc}

    def load_state_dict(self, d: dict) -> None:
        self._best_acc = float(d.get("best_acc", -1.0))

    def checkpoint_extra(self) -> dict:
        return {"class_names": self.class_names}


# --------------------------------------------------------------------------------------------------
# Evaluation and voting (spec 6.2, 6.3)
# --------------------------------------------------------------------------------------------------


def _autocast(device: torch.device, amp_dtype: torch.dtype | None):
    import contextlib

    return contextlib.nullcontext() if amp_dtype is None else torch.autocast(device.type, dtype=amp_dtype)


def classify(model: nn.Module, points: Tensor, amp_dtype: torch.dtype | None = None) -> Tensor:
    """Logits (B, C) float32 of points (B, N, 3) under the given autocast dtype."""
    with _autocast(points.device, amp_dtype):
        return model(points).float()


@torch.no_grad()
def evaluate_classifier(model: nn.Module, dataset: Any, cfg: Config, device: torch.device | str, *,
                        batch_size: int = 32, amp_dtype: torch.dtype | None = None,
                        progress: bool = True) -> dict[str, float]:
    """Plain test accuracy (spec 6.2): FPS(num_points) from point 0, no augmentation, dataset order.

    Returns ``{"acc": overall %, "mean_class_acc": mean per-class %}``. ``model`` must be in eval mode.
    """
    from ..metrics import accuracy, extract_features, mean_class_accuracy

    logits, labels = extract_features(lambda x: classify(model, x, amp_dtype), dataset, batch_size, device,
                                      cfg.data.num_points, num_workers=cfg.data.num_workers,
                                      progress=progress, desc="evaluate")
    return {"acc": 100 * accuracy(logits, labels),
            "mean_class_acc": 100 * mean_class_accuracy(logits, labels)}


@torch.no_grad()
def vote_logits(model: nn.Module, points: Tensor, num_points: int, point_pool: int, views: int,
                generator: torch.Generator, amp_dtype: torch.dtype | None = None) -> Tensor:
    """Voting logits (spec 6.3): points (B, N, 3) -> mean logits over ``views`` views, (B, C) float32.

    FPS(min(point_pool, N)) from point 0 once; each view takes one random subset of ``num_points`` of those
    points (the same columns for the whole batch, as ``np.random.choice`` in the official loop; always a
    random permutation, also when ``num_points`` equals the pool), then ScaleAndTranslate.
    """
    from ..data.transforms import scale_translate
    from ..ops import fps, gather

    pool = min(point_pool, points.shape[1])
    if num_points > pool:
        raise ValueError(f"cannot vote with {num_points}-point views of a {pool}-point pool")
    pooled = gather(points, fps(points, pool))  # (B, pool, 3)
    total = None
    for _ in range(views):
        cols = torch.randperm(pool, generator=generator, device=generator.device)[:num_points]
        view = scale_translate(pooled[:, cols.to(points.device)], generator)  # (B, num_points, 3)
        logits = classify(model, view, amp_dtype)
        total = logits if total is None else total + logits
    return total / views


@torch.no_grad()
def vote_accuracy(model: nn.Module, dataset: Any, cfg: Config, device: torch.device | str, *,
                  views: int | None = None, repeats: int | None = None, seed: int = 0, batch_size: int = 32,
                  amp_dtype: torch.dtype | None = None, progress: bool = True) -> dict[str, Any]:
    """The voting test (spec 6.3): ``repeats`` full passes of ``views``-view voting over ``dataset``.

    Returns ``{"vote_acc": max over repeats (the official number), "vote_acc_mean": mean,
    "vote_accs": every repeat's accuracy}``, in %. Random views come from one generator seeded ``seed``.
    """
    from tqdm.auto import tqdm

    from ..engine import eval_loader
    from ..metrics import accuracy

    device = torch.device(device)
    views = cfg.train.vote_views if views is None else views
    repeats = cfg.train.vote_repeats if repeats is None else repeats
    generator = torch.Generator(device=device).manual_seed(seed)
    accs = []
    bar = tqdm(total=repeats * len(dataset), desc=f"vote {views} views x {repeats}", disable=not progress,
               leave=False, dynamic_ncols=True)
    for _ in range(repeats):
        preds, labels = [], []
        batches = eval_loader(dataset, batch_size, num_workers=cfg.data.num_workers, seed=seed, device=device)
        for batch in batches:
            points = batch["points"].float()
            logits = vote_logits(model, points, cfg.data.num_points, cfg.data.point_pool, views, generator,
                                 amp_dtype)
            preds.append(logits.argmax(-1).cpu())
            labels.append(batch["label"].view(-1).cpu())
            bar.update(len(points))
        accs.append(100 * accuracy(torch.cat(preds), torch.cat(labels)))
    bar.close()
    return {"vote_acc": max(accs), "vote_acc_mean": sum(accs) / len(accs), "vote_accs": accs}


# --------------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------------


def finetune_command(args: Any) -> int:
    """``pointbert finetune [--init CKPT | --scratch] [--preset P] [--data D] [--out DIR] ...``."""
    cfg = config_from_args(args, "classifier", "modelnet40-1k", stage="finetune")
    task = ClassificationTask(cfg, init=args.init, scratch=args.scratch, resume=args.resume)
    out = out_dir(args, "finetune")
    result = fit(task, out, device=args.device, resume=args.resume, quiet=args.quiet, overwrite=args.overwrite)
    if _is_main_process() and result:
        print(f"best acc {result.get('best_acc', float('nan')):.2f} % (epoch {result.get('best_epoch')}), "
              f"last acc {result.get('acc', float('nan')):.2f} %; checkpoints in {out}")
    return 0


def evaluate_command(args: Any) -> int:
    """``pointbert evaluate CKPT [--data D] [--vote] [section.field=value ...]``: prints a small table."""
    device = resolve_device(args.device)
    model, ckpt = load_model(args.checkpoint, ("classifier",), device=device)
    cfg = config_of(ckpt, args.checkpoint)
    fixed = [o for o in args.overrides or [] if not o.startswith(("data.", "train."))]
    if fixed:
        raise ConfigError(f"override {fixed[0]!r}: the model comes from the checkpoint; only data.* and train.* "
                          "settings apply to an evaluation")
    cfg = apply_data_arg(cfg, args.data)
    cfg = validate(apply_overrides(cfg, list(args.overrides or [])))
    if args.batch_size is not None and args.batch_size <= 0:
        raise PointBERTError(f"--batch-size must be positive, got {args.batch_size}")
    batch_size = args.batch_size or cfg.train.batch_size
    # fp32 unless asked (train.precision=bf16): the reported accuracies are fp32 measurements
    amp_dtype = resolve_precision("fp32" if cfg.train.precision == "auto" else cfg.train.precision, device)

    from ..data import build_dataset

    test = build_dataset(cfg.data, "test", seed=args.seed)
    stored = list(ckpt.get("class_names") or [])
    classes = list(getattr(test, "classes", None) or [])
    if stored and classes and stored != classes[: len(stored)]:
        print(f"warning: the checkpoint's classes ({', '.join(stored[:4])}, ...) differ from the data's "
              f"({', '.join(classes[:4])}, ...)", flush=True)
    if classes and len(classes) > unwrap(model).num_classes:
        raise PointBERTError(f"the test data has {len(classes)} classes, the classifier only "
                             f"{unwrap(model).num_classes} outputs")
    where = f"{cfg.data.dataset} {cfg.data.path}" if cfg.data.path else cfg.data.dataset
    if "epoch" in ckpt:
        at = f"epoch {ckpt['epoch']}, step {ckpt.get('step', '?')}"
    else:
        at = f"imported from {ckpt['source']}" if ckpt.get("source") else "no training state stored"
    rows = [("checkpoint", f"{args.checkpoint} ({at})"),
            ("data", f"{where} test: {len(test)} clouds, {len(classes) or '?'} classes, "
                     f"{cfg.data.num_points} points")]
    metrics = evaluate_classifier(model, test, cfg, device, batch_size=batch_size, amp_dtype=amp_dtype)
    rows += [("accuracy", f"{metrics['acc']:.2f} %"),
             ("mean class accuracy", f"{metrics['mean_class_acc']:.2f} %")]
    if args.vote:
        vote = vote_accuracy(model, test, cfg, device, seed=args.seed, batch_size=batch_size,
                             amp_dtype=amp_dtype)
        rows += [(f"vote accuracy, max of {cfg.train.vote_repeats}", f"{vote['vote_acc']:.2f} %"),
                 (f"vote accuracy, mean of {cfg.train.vote_repeats}", f"{vote['vote_acc_mean']:.2f} %"),
                 ("", f"({cfg.train.vote_views} views of {cfg.data.num_points} points from FPS "
                      f"{cfg.data.point_pool}, scale+translate, logits averaged)")]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    if args.out:
        import json

        from ..checkpoint import atomic_write_bytes

        result = {"checkpoint": str(args.checkpoint), "epoch": ckpt.get("epoch"), "data": cfg.data.dataset,
                  "path": cfg.data.path, "num_test": len(test), **metrics}
        if args.vote:
            result.update(vote, vote_views=cfg.train.vote_views, vote_repeats=cfg.train.vote_repeats)
        atomic_write_bytes(args.out, (json.dumps(result, indent=2) + "\n").encode())
    return 0
