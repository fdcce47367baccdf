"""Few-shot classification (spec 2.3, 6.4): ``pointbert fewshot --init CKPT --way 5 --shot 10 --folds 0-9``.

For each fold: fine-tune (:class:`~.finetune.ClassificationTask`, the ``fewshot`` preset: 150-epoch
cosine schedule, ``cls_dim`` 40 with labels 0..way-1) on the support set of the episode, evaluating on
its query set after every epoch. Episodes are the official pickles ``{way}way_{shot}shot/{fold}.pkl``
when ``--data`` is such a folder, otherwise drawn from a labelled dataset (default: the synthetic
shapes) with :func:`~pointbert.data.make_fewshot_episode` seeded by the fold.

Per fold the official number is the BEST query accuracy over the epochs (model selection on the
query set, spec 6.4); the last-epoch accuracy is recorded beside it as the selection-free alternative.
Writes ``<out>/fold_<k>/`` (each a normal run folder), ``<out>/fewshot.json`` (updated after every fold)
and ``<out>/fewshot.md`` (a table with mean +- std over the folds, population std).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import numpy as np

from ..checkpoint import atomic_write_bytes
from ..config import Config, ConfigError, apply_dict, validate
from ..data.official import fewshot_dir
from ..engine import fit


def parse_folds(spec: str) -> list[int]:
    """``"0-9"`` -> [0..9]; ``"0,3,5"`` -> [0, 3, 5]; ranges and single folds may be mixed (``"0-2,7"``)."""
    folds: list[int] = []
    try:
        for item in spec.split(","):
            lo, dash, hi = item.strip().partition("-")
            folds.extend(range(int(lo), int(hi if dash else lo) + 1))
    except ValueError:
        raise ConfigError(f"--folds {spec!r}: expected a range like 0-9 or a list like 0,3,5") from None
    if not folds or min(folds) < 0 or len(set(folds)) != len(folds):
        raise ConfigError(f"--folds {spec!r}: expected distinct non-negative fold numbers")
    return folds


def fewshot_config(cfg: Config, way: int | None, shot: int | None) -> Config:
    """The episode data of a classifier config: ``data.dataset = fewshot`` reading from ``data.path``
    (an official few-shot folder or a labelled dataset; empty = synthetic shapes); --way/--shot applied."""
    for flag, v in (("--way", way), ("--shot", shot)):
        if v is not None and v < 1:
            raise ConfigError(f"{flag} must be positive, got {v}")
    d: dict[str, Any] = {"dataset": "fewshot"}
    if cfg.data.dataset == "synthetic":
        d["path"] = ""
    if way is not None:
        d["way"] = way
    if shot is not None:
        d["shot"] = shot
    cfg = validate(apply_dict(cfg, {"data": d}, where="few-shot"))
    if cfg.head.num_classes < cfg.data.way:
        raise ConfigError(f"head.num_classes ({cfg.head.num_classes}) is smaller than --way ({cfg.data.way})")
    return cfg


def summarise(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Mean and population std over folds of the best and the last-epoch query accuracy (%)."""
    best = np.array([r["best_acc"] for r in rows])
    last = np.array([r["last_acc"] for r in rows])
    return {"best_acc_mean": float(best.mean()), "best_acc_std": float(best.std()),
            "last_acc_mean": float(last.mean()), "last_acc_std": float(last.std())}


def markdown(report: dict[str, Any]) -> str:
    """The results as a markdown table (one row per fold, then mean +- std)."""
    lines = [f"# Few-shot {report['way']}-way {report['shot']}-shot", "",
             f"- model: {report['init']}", f"- episodes: {report['episodes']}",
             f"- protocol: {report['protocol']}", "",
             "| fold | best query acc (%) | best epoch | last-epoch query acc (%) |",
             "| ---: | ---: | ---: | ---: |"]
    for r in report["folds"]:
        lines.append(f"| {r['fold']} | {r['best_acc']:.2f} | {r['best_epoch']} | {r['last_acc']:.2f} |")
    if report["folds"]:
        s = report["summary"]
        lines.append(f"| mean +- std ({len(report['folds'])} folds) | {s['best_acc_mean']:.2f} +- "
                     f"{s['best_acc_std']:.2f} | | {s['last_acc_mean']:.2f} +- {s['last_acc_std']:.2f} |")
    return "\n".join(lines) + "\n"


def fewshot_command(args: argparse.Namespace) -> int:
    """Run the folds one after the other; ``--resume`` continues unfinished folds and skips finished ones."""
    from . import check_init, config_from_args, out_dir
    from .finetune import ClassificationTask

    folds = parse_folds(args.folds)
    check_init(args.init, args.scratch, args.resume, "a pre-training or classifier checkpoint")
    cfg = config_from_args(args, "classifier", "fewshot", stage="fewshot")
    cfg = fewshot_config(cfg, args.way, args.shot)
    out = out_dir(args, "fewshot")
    way, shot = cfg.data.way, cfg.data.shot
    every = cfg.train.eval_every
    episodes = fewshot_dir(cfg.data.path, way, shot) if cfg.data.path else None
    report: dict[str, Any] = {
        "way": way, "shot": shot, "init": args.init or "scratch (random initialisation)",
        "episodes": (f"official pickles {episodes}/<fold>.pkl" if episodes
                     else f"drawn from {cfg.data.path or 'synthetic shapes'}, seeded by the fold"),
        "protocol": (f"fine-tune on the support set for {cfg.train.epochs + cfg.train.extra_epoch} epochs, "
                     f"evaluate on the query set every {every} epoch(s); best = the best query accuracy over "
                     "the evaluations (official), last = the accuracy after the last epoch"),
        "folds": []}
    main = int(os.environ.get("RANK", "0")) == 0
    for i, fold in enumerate(folds):
        fold_out = out / f"fold_{fold}"
        resume = bool(args.resume and (fold_out / "last.pt").is_file())
        if main:
            print(f"few-shot {way}-way {shot}-shot: fold {fold} ({i + 1}/{len(folds)}) -> {fold_out}",
                  flush=True)
        fold_cfg = validate(apply_dict(cfg, {"data": {"fold": fold}}, where=f"fold {fold}"))
        task = ClassificationTask(fold_cfg, init=args.init, scratch=args.scratch, resume=resume)
        result = fit(task, fold_out, device=args.device, resume=resume, quiet=args.quiet,
                     overwrite=args.overwrite)
        row = {"fold": fold, "best_acc": result["best_acc"], "best_epoch": int(result["best_epoch"]),
               "last_acc": result["acc"]}
        report["folds"].append(row)
        report["summary"] = summarise(report["folds"])
        if main:
            print(f"fold {fold}: best query acc {row['best_acc']:.2f} % (epoch {row['best_epoch']}), "
                  f"last epoch {row['last_acc']:.2f} %", flush=True)
            atomic_write_bytes(out / "fewshot.json", (json.dumps(report, indent=2) + "\n").encode())
            atomic_write_bytes(out / "fewshot.md", markdown(report).encode())
    if main:
        s = report["summary"]
        print(f"{way}-way {shot}-shot over {len(folds)} folds: best {s['best_acc_mean']:.2f} +- "
              f"{s['best_acc_std']:.2f} %, last epoch {s['last_acc_mean']:.2f} +- {s['last_acc_std']:.2f} %; "
              f"{out / 'fewshot.md'}")
    return 0
