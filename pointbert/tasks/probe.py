"""Linear-SVM probe on frozen features (spec 5.6): ``pointbert probe``, and the features it uses.

Two features of a backbone, both from the unmasked encoder and without augmentation:

* ``projection``: the pre-training contrastive head on the cls token (512-d, not normalised), the
  official validation feature during pre-training (:meth:`pointbert.mpm.PointBERT.probe_features`);
* ``backbone``: ``[cls ; max over patches]`` (2 * dim), the feature the fine-tuning head sees.

A linear SVM (:func:`pointbert.metrics.svm_probe`) is fitted on the train split and scored on the test
split of a labelled dataset.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import Config, ConfigError, apply_dict, apply_overrides, validate
from ..errors import PointBERTError
from ..transformer import Backbone

FEATURES = ("projection", "backbone")


def backbone_of(model: nn.Module) -> Backbone:
    """The backbone of a pre-training model (its query encoder's), a classifier or a part segmenter."""
    if isinstance(model, Backbone):
        return model
    query = getattr(model, "query", None)
    return query.backbone if query is not None else model.backbone


def pretrain_features(model: nn.Module, points: Tensor) -> tuple[Tensor, Tensor]:
    """points (B, N, 3) -> (projection (B, proj_dim), backbone feature (B, 2*dim)) of a
    :class:`~pointbert.mpm.PointBERT`, from one unmasked pass of its query encoder.

    ``projection`` equals ``model.probe_features(points)``; both features share the pass.
    """
    tokens = model.query.backbone.forward_features(points)  # (B, 1+G, dim), unmasked
    return model.query.cls_head(tokens[:, 0]), Backbone.pool(tokens)


def feature_fn(model: nn.Module, feature: str) -> Callable[[Tensor], Tensor]:
    """points (B, N, 3) -> features (B, D) of ``model`` (see the module docstring for ``feature``)."""
    if feature not in FEATURES:
        raise ConfigError(f"feature must be one of {', '.join(FEATURES)}, got {feature!r}")
    if feature == "projection":
        if not hasattr(model, "probe_features"):
            raise ConfigError(f"a {type(model).__name__} has no pre-training projection head; "
                              "use --feature backbone")
        return model.probe_features
    return backbone_of(model)


def probe_data_config(cfg: Config) -> Config | None:
    """The labelled data a probe of ``cfg`` reads: a pre-training config's ``data.probe_dataset`` /
    ``data.probe_path`` (the format detected from the path when no dataset is named), any other config's
    own ``data``. None when a pre-training config names no probe data."""
    if cfg.kind != "pretrain":
        return cfg
    d = cfg.data
    if not d.probe_dataset and not d.probe_path:
        return None
    name = d.probe_dataset
    if not name:
        from ..data.inspect import detect_format

        name = detect_format(Path(d.probe_path))
        name = "folder" if name == "files" else name
    data = {"dataset": name, "path": d.probe_path, "whole": False, "augment": "none"}
    return apply_dict(cfg, {"data": data}, where="probe data")


def run_probe(fn: Callable[[Tensor], Tensor | tuple[Tensor, ...]], train: Any, test: Any, *, num_points: int,
              batch_size: int, device: torch.device, num_workers: int = 0, progress: bool = True,
              standardize: bool = False, drop_last: tuple[int, int] | None = None) -> list[float]:
    """SVM test accuracies (%) of the features ``fn`` returns (one tensor, or a tuple: one accuracy each).

    ``drop_last=(batch, seed)``: fit the SVM on the train shapes a shuffled loader of that batch size with
    ``drop_last`` yields (a seeded random subset of ``len - len % batch``), as the official probe.
    """
    from ..metrics import extract_features, svm_probe

    def stacked(points: Tensor) -> Tensor:  # all features side by side; ``sizes`` records their widths
        out = fn(points)
        parts = out if isinstance(out, tuple) else (out,)
        if not sizes:
            sizes.extend(p.shape[1] for p in parts)
        return torch.cat([p.float() for p in parts], dim=1)

    sizes: list[int] = []
    kw = dict(batch_size=batch_size, device=device, num_points=num_points, num_workers=num_workers,
              progress=progress)
    x_train, y_train = extract_features(stacked, train, desc="probe: train features", **kw)
    if drop_last is not None and len(y_train) >= drop_last[0]:
        keep = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(drop_last[1])).numpy()
        keep = keep[: len(keep) - len(keep) % drop_last[0]]
        x_train, y_train = x_train[keep], y_train[keep]
    x_test, y_test = extract_features(stacked, test, desc="probe: test features", **kw)
    accs, start = [], 0
    for size in sizes:
        cols = slice(start, start + size)
        accs.append(100 * svm_probe(x_train[:, cols], y_train, x_test[:, cols], y_test,
                                    standardize=standardize))
        start += size
    return accs


def probe_command(args: Any) -> int:
    """``pointbert probe (--init CKPT | --random) [--data D] [--feature backbone|projection]``."""
    from ..checkpoint import build_model, config_of, load_model
    from ..data import build_dataset
    from . import apply_data_arg, resolve_device

    if bool(args.init) == bool(args.random):
        raise ConfigError("pass --init CHECKPOINT (a pre-training, classifier or part segmentation "
                          "checkpoint) or --random (a randomly initialised model), exactly one")
    device = resolve_device(args.device)
    if args.init:
        model, ckpt = load_model(args.init, ("pretrain", "classifier", "partseg"), device=device)
        cfg = config_of(ckpt, args.init)
        source = args.init
    else:
        from ..config import preset

        cfg = preset(args.preset or "pretrain")
        if cfg.kind not in ("pretrain", "classifier"):
            raise ConfigError(f"--preset {args.preset}: a {cfg.kind} preset has no backbone to probe; "
                              "give a pretrain or classifier preset")
        cfg = validate(apply_overrides(cfg, list(args.overrides or [])))
        torch.manual_seed(args.seed)
        model = build_model(cfg).to(device).eval()
        source = f"random {cfg.kind} model (preset {args.preset or 'pretrain'}, seed {args.seed})"
    if args.data:
        data_cfg = apply_data_arg(cfg, args.data)
        if cfg.kind == "pretrain":  # the probe reads labels: do not keep the pre-training data's sampling
            data_cfg = apply_dict(data_cfg, {"data": {"whole": False, "augment": "none"}}, where="--data")
    else:
        data_cfg = probe_data_config(cfg)
        if data_cfg is None or (data_cfg.data.dataset != "synthetic" and not data_cfg.data.path):
            raise ConfigError("no labelled data to probe with: pass --data (a dataset folder, or synthetic)")
    if args.init:
        fixed = [o for o in args.overrides or [] if not o.startswith(("data.", "train."))]
        if fixed:
            raise ConfigError(f"override {fixed[0]!r}: with --init the model comes from the checkpoint; "
                              "only data.* and train.* settings apply")
        data_cfg = validate(apply_overrides(data_cfg, list(args.overrides or [])))
    if args.batch_size is not None and args.batch_size <= 0:
        raise PointBERTError(f"--batch-size must be positive, got {args.batch_size}")
    d = data_cfg.data
    train, test = build_dataset(d, "train", seed=args.seed), build_dataset(d, "test", seed=args.seed)
    fn = feature_fn(model, args.feature)
    (acc,) = run_probe(fn, train, test, num_points=d.num_points, device=device,
                       batch_size=args.batch_size or cfg.train.batch_size, num_workers=d.num_workers)
    result = {"svm_acc": acc, "feature": args.feature, "model": source, "data": d.dataset, "path": d.path,
              "num_points": d.num_points, "num_train": len(train), "num_test": len(test)}
    print(f"linear SVM accuracy {acc:.2f} % ({args.feature} features of {source}; {d.dataset} "
          f"{d.path + ' ' if d.path else ''}{len(train)} train / {len(test)} test clouds)")
    if args.out:
        from ..checkpoint import atomic_write_bytes

        atomic_write_bytes(args.out, (json.dumps(result, indent=2) + "\n").encode())
    return 0
