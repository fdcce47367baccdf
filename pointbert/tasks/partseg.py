"""Part segmentation fine-tuning, the ShapeNetPart recipe (spec 6.5): ``pointbert partseg``.

* model: :class:`~pointbert.heads.PartSegmenter`, its backbone initialised from a pre-training
  checkpoint (``query.backbone.*``), a classifier's backbone, or a whole part-segmentation checkpoint
  (:func:`load_backbone` reports the loaded and new keys);
* step: per-shape isotropic scale U(0.8, 1.25) + shift U(-0.1, 0.1) (``data.augment = partseg``),
  cross-entropy over all points (= the official NLL of log_softmax); BatchNorm momentum set each
  epoch to max(0.1 * 0.5^(epoch // 20), 0.01); batch 16, 2048 points, AdamW + cosine from the preset;
* evaluation on the test split, no augmentation, predictions restricted to the parts of the true
  category: point accuracy, instance mIoU (selects ``best.pt``) and class mIoU, in %. The official
  script logs the running best of each metric independently; ``max_instance_miou`` and
  ``max_class_miou`` are those running maxima (they may come from different epochs).

Data: ShapeNetPart (``train`` = the official ``trainval``), or the synthetic shapes, whose primitives
carry part labels (15 categories, 43 parts: they fit the 16-category, 50-part head).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoint import load_checkpoint
from ..config import Config, ConfigError
from ..engine import Context, Task, eval_loader, fit
from ..errors import CheckpointError
from ..heads import SHAPENETPART_PARTS, PartSegmenter, PartSegMetrics
from . import check_init


def bn_momentum(epoch: int) -> float:
    """The official BatchNorm momentum schedule: 0.1 halved every 20 epochs, at least 0.01 (spec 6.5)."""
    return max(0.1 * 0.5 ** (epoch // 20), 0.01)


def category_parts(dataset_name: str) -> dict:
    """category index (or name, in index order) -> its part labels, for the metrics."""
    if dataset_name == "synthetic":
        from ..data.synthetic import SYNTHETIC_PARTS

        return SYNTHETIC_PARTS
    return SHAPENETPART_PARTS


def load_backbone(model: PartSegmenter, path: str | Path):
    """Initialise ``model`` from a checkpoint, in place; returns an :class:`~.finetune.InitReport`.

    pretrain: ``query.backbone.*`` -> ``backbone.*``; classifier: ``backbone.*``. Every backbone tensor
    must load (the shapes must match) and exactly the segmentation head is left new. partseg: the whole
    model, strictly.
    """
    from .finetune import InitReport

    ckpt = load_checkpoint(path, ("pretrain", "classifier", "partseg"))
    kind, src = ckpt["kind"], ckpt["model"]
    prefix = {"pretrain": "query.backbone.", "classifier": "backbone.", "partseg": ""}[kind]
    take = {("backbone." + k[len(prefix):] if prefix else k): v
            for k, v in src.items() if k.startswith(prefix)}
    ignored = sorted(k for k in src if not k.startswith(prefix))
    target = model.state_dict()
    for k, v in take.items():
        if k not in target or v.shape != target[k].shape:
            shape = tuple(target[k].shape) if k in target else "absent"
            raise CheckpointError(f"{path}: {k} has shape {tuple(v.shape)} there but {shape} in this model; "
                                  "use a --preset or backbone.* / patches.* overrides matching it")
    missing, unexpected = model.load_state_dict(take, strict=False)
    assert not unexpected, unexpected
    backbone = {k for k in target if k.startswith("backbone.")}
    if backbone & set(missing):
        raise CheckpointError(f"{path}: holds no {sorted(backbone & set(missing))[0]}; "
                              "not a matching backbone")
    assert kind != "partseg" or not missing, missing
    return InitReport(str(path), kind, loaded=sorted(take), new=list(missing), ignored=ignored)


class PartSegTask(Task):
    """Part segmentation (spec 6.5). ``init``: a pre-training / classifier / partseg checkpoint;
    ``scratch``: PyTorch default initialisation; one of them unless ``resume``."""

    monitor, mode = "instance_miou", "max"
    reported = ("acc", "instance_miou", "class_miou", "max_instance_miou", "max_class_miou")

    def __init__(self, cfg: Config, init: str | Path | None = None, scratch: bool = False, *,
                 resume: bool = False):
        check_init(init, scratch, resume, "a pre-training checkpoint")
        if cfg.data.dataset not in ("shapenetpart", "synthetic"):
            raise ConfigError("part segmentation needs part labels: data.dataset must be shapenetpart or "
                              f"synthetic, got {cfg.data.dataset!r}")
        super().__init__(cfg)
        self.init = str(init) if init else None
        self.parts = category_parts(cfg.data.dataset)
        num_parts = 1 + max(max(p) for p in self.parts.values())
        if num_parts > cfg.partseg.num_parts or len(self.parts) > cfg.partseg.num_categories:
            raise ConfigError(f"the {cfg.data.dataset} data has {len(self.parts)} categories and {num_parts} "
                              f"parts; the head has partseg.num_categories={cfg.partseg.num_categories}, "
                              f"partseg.num_parts={cfg.partseg.num_parts}")
        self.best = {"max_instance_miou": 0.0, "max_class_miou": 0.0}
        self._test = None

    def build_model(self) -> nn.Module:
        model = PartSegmenter(self.cfg)
        if self.init:
            print(load_backbone(model, self.init).summary(), flush=True)
        return model

    def train_dataset(self) -> Any:
        from ..data import build_dataset

        return build_dataset(self.cfg.data, "train", seed=self.cfg.train.seed)

    def on_step(self, step: int, epoch: int, ctx: Context) -> None:
        m = bn_momentum(epoch)
        for mod in ctx.model.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.momentum = m

    def training_step(self, model: nn.Module, batch: dict[str, Tensor], ctx: Context) -> dict[str, Tensor]:
        from ..data.transforms import augment

        points = augment(batch["points"].float(), self.cfg.data.augment, ctx.generator)  # (B, N, 3)
        parts = batch["parts"].long()  # (B, N)
        logits = model(points, batch["category"].long().view(-1)).float()  # (B, N, P)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), parts.reshape(-1))
        acc = (logits.argmax(-1) == parts).float().mean() * 100
        return {"loss": loss, "acc": acc, "bn_momentum": loss.new_tensor(bn_momentum(ctx.epoch))}

    def evaluate(self, model: nn.Module, ctx: Context) -> dict[str, float]:
        from ..data import build_dataset

        if self._test is None:
            self._test = build_dataset(self.cfg.data, "test", seed=self.cfg.train.seed)
        metrics = PartSegMetrics(self.parts)
        for batch in eval_loader(self._test, self.cfg.train.batch_size, num_workers=self.cfg.data.num_workers,
                                 seed=self.cfg.train.seed, device=ctx.device):
            category = batch["category"].long().view(-1)
            with ctx.autocast():
                logits = model(batch["points"].float(), category)
            metrics.update(logits.float(), batch["parts"].long(), category)
        m = metrics.compute()
        out = {"acc": 100 * m["accuracy"], "instance_miou": 100 * m["instance_miou"],
               "class_miou": 100 * m["class_miou"]}
        self.best["max_instance_miou"] = max(self.best["max_instance_miou"], out["instance_miou"])
        self.best["max_class_miou"] = max(self.best["max_class_miou"], out["class_miou"])
        return {**out, **self.best}

    def state_dict(self) -> dict:
        return dict(self.best)

    def load_state_dict(self, d: dict) -> None:
        self.best.update({k: float(v) for k, v in d.items() if k in self.best})


def partseg_command(args: argparse.Namespace) -> int:
    """``pointbert partseg [--init CKPT | --scratch] [--data PATH]``: writes ``<out>/{last,best}.pt``."""
    from . import config_from_args, out_dir

    cfg = config_from_args(args, "partseg", "partseg", stage="partseg")
    out = out_dir(args, "partseg")
    task = PartSegTask(cfg, init=args.init, scratch=args.scratch, resume=args.resume)
    result = fit(task, out, device=args.device, resume=args.resume, quiet=args.quiet, overwrite=args.overwrite)
    if result and int(os.environ.get("RANK", "0")) == 0:
        r = {k: result.get(k, float("nan")) for k in PartSegTask.reported}
        print(f"instance mIoU {r['instance_miou']:.2f} % (best {r['max_instance_miou']:.2f} %), class mIoU "
              f"{r['class_miou']:.2f} % (best {r['max_class_miou']:.2f} %); checkpoints in {out}")
    return 0
