"""`pointbert demo`: the whole method on the built-in synthetic shapes, on a laptop CPU in minutes.

1. train a small point tokenizer (dVAE) on the training shapes, without labels;
2. pre-train a small backbone with masked point modeling, mixing and momentum contrast, without labels;
3. compare the pre-trained backbone against the same backbone from random initialisation on tasks with
   few labels, over several seeds: a linear SVM on frozen features, few-shot episodes (5-way 10-shot),
   and fine-tuning with 10 labels per class;
4. write ``report.md`` (the table, mean ± std), ``results.json`` and pictures: clouds with their patches,
   a masked cloud with its tokens, the tokenizer's reconstructions, training curves.

Every stage is an ordinary run folder under ``--out``; an interrupted demo continues where it stopped.
The scale is the ``demo-*`` presets (:func:`pointbert.config._demo`); overrides apply to all stages.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import Config, apply_overrides, preset, validate
from .engine import fit, resolve_device
from .errors import PointBERTError


class InMemory:
    """A labelled dataset materialised once (synthetic shapes are generated per item otherwise)."""

    def __init__(self, base: Any, indices: np.ndarray | None = None):
        idx = np.arange(len(base)) if indices is None else np.asarray(indices)
        self.items = [base[int(i)] for i in idx]
        self.labels = np.array([int(it["label"]) for it in self.items], dtype=np.int64)
        self.classes = list(base.classes)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


class RandomSubset:
    """Each access returns ``num_points`` random points of the item (the official ShapeNet-55 sampling,
    spec 2.1): fresh ones every time for training (numpy's global RNG, which the engine seeds per item),
    a fixed subset per item otherwise."""

    def __init__(self, base: InMemory, num_points: int, train: bool):
        self.base, self.num_points, self.train = base, num_points, train
        self.labels, self.classes = base.labels, base.classes

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        item = dict(self.base[i])
        n = len(item["points"])
        rng = np.random if self.train else np.random.default_rng(i)
        item["points"] = item["points"][rng.permutation(n)[: self.num_points]]
        item.pop("parts", None)
        return item


def per_class_subset(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Indices of ``per_class`` random items of every class (seeded)."""
    rng = np.random.default_rng(seed)
    return np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class]
                                   for c in np.unique(labels)]))


def _mean_std(values: list[float]) -> str:
    return f"{np.mean(values):.1f} ± {np.std(values):.1f}"


def demo_configs(overrides: list[str]) -> dict[str, Config]:
    """The three demo presets with the same dotted overrides applied to each."""
    cfgs = {}
    for kind in ("tokenizer", "pretrain", "classifier"):
        c = preset(f"demo-{kind}")
        cfgs[kind] = validate(apply_overrides(c, overrides)) if overrides else c
    return cfgs


def _same_settings(path: Path, args: Any) -> None:
    """A rerun continues the stages already done: only with the settings they were made with."""
    keys = ("overrides", "seeds", "train_size", "test_size", "way", "shot", "fewshot_epochs", "labels_per_class",
            "finetune_epochs")
    now = {k: getattr(args, k) for k in keys}
    now["overrides"] = list(now["overrides"] or [])
    if path.is_file():
        before = json.loads(path.read_text())
        changed = [f"--{k.replace('_', '-')} {before.get(k)} -> {now[k]}" for k in keys if before.get(k) != now[k]]
        if changed:
            raise PointBERTError(f"{path.parent}: holds a demo made with other settings ({'; '.join(changed)}); "
                                 "rerun with the same settings to continue, or choose another --out")
    else:
        path.write_text(json.dumps(now, indent=1) + "\n")


def demo_command(args: Any) -> int:
    from .data.official import EpisodeDataset, make_fewshot_episode
    from .data.synthetic import SyntheticShapes
    from .tasks.finetune import ClassificationTask
    from .tasks.pretrain import PretrainTask
    from .tasks.probe import backbone_of, run_probe
    from .tasks.tokenizer import TokenizerTask

    for flag in ("seeds", "train_size", "test_size", "way", "shot", "fewshot_epochs", "labels_per_class",
                 "finetune_epochs"):
        if getattr(args, flag) < 1:
            raise PointBERTError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    resolve_device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfgs = demo_configs(list(args.overrides or []))
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    device, quiet = args.device, args.quiet

    def run(task, folder: str, verbose: bool = True) -> dict[str, float]:
        """One run folder; comparison runs print one line here and their log to <folder>/console.txt."""
        start = time.perf_counter()
        path = out / folder
        path.mkdir(parents=True, exist_ok=True)
        resume = (path / "last.pt").is_file()
        if verbose:
            result = fit(task, path, device=device, resume=resume, quiet=quiet)
        else:
            with open(path / "console.txt", "a") as f, contextlib.redirect_stdout(f):
                result = fit(task, path, device=device, resume=resume, quiet=True)
            print(f"  {folder}: test accuracy {result['acc']:.1f} %", flush=True)
        timings[folder] = timings.get(folder, 0.0) + time.perf_counter() - start
        return result

    # ---- data: generated once, kept in memory ----------------------------------------------------
    n_pts = 1024
    print(f"demo: generating synthetic shapes ({args.train_size} train, {args.test_size} test, "
          f"{len(SyntheticShapes().classes)} classes)", flush=True)
    train = InMemory(SyntheticShapes("train", n_pts, size=args.train_size, seed=0))
    test = InMemory(SyntheticShapes("test", n_pts, size=args.test_size, seed=0))
    need = max(args.shot, args.labels_per_class)  # checked now, not after the tokenizer and pre-training
    for split, data, least in (("train", train, need), ("test", test, 1)):
        enough = int((np.bincount(data.labels) >= least).sum())
        if enough < args.way:
            raise PointBERTError(f"--{split}-size {len(data)}: only {enough} classes have {least} shapes; the "
                                 f"few-label steps need {args.way} (raise --{split}-size, or lower --way, --shot or "
                                 "--labels-per-class)")
    _same_settings(out / "settings.json", args)

    # ---- 1. tokenizer, 2. pre-training (no labels are read) --------------------------------------
    print("demo: 1/4 training the point tokenizer (dVAE) without labels", flush=True)
    tok_cfg = cfgs["tokenizer"]
    n_sub = tok_cfg.data.num_points
    tok_task = TokenizerTask(tok_cfg)
    tok_task.train_dataset = lambda: RandomSubset(train, n_sub, True)  # type: ignore[method-assign]
    tok_task._test = RandomSubset(test, n_sub, False)
    run(tok_task, "tokenizer")

    print("demo: 2/4 masked point modeling pre-training without labels", flush=True)
    pre_task = PretrainTask(cfgs["pretrain"], tokenizer=out / "tokenizer" / "last.pt")
    pre_task.train_dataset = lambda: RandomSubset(train, n_sub, True)  # type: ignore[method-assign]
    pre_task._probe_data = (train, test)
    pre = run(pre_task, "pretrain")
    pretrained = out / "pretrain" / "last.pt"

    # ---- 3. pre-trained vs from scratch ----------------------------------------------------------
    seeds = list(range(args.seeds))
    results: dict[str, dict[str, list[float]]] = {}

    def record(what: str, arm: str, value: float) -> None:
        results.setdefault(what, {}).setdefault(arm, []).append(float(value))

    print("demo: 3/4 linear SVM on frozen features: pre-trained vs random initialisation", flush=True)
    from .checkpoint import build_model, load_model

    model, _ = load_model(pretrained, ("pretrain",))
    probe_kw = dict(num_points=cfgs["classifier"].data.num_points, batch_size=64,
                    device=torch.device("cpu"), progress=False)
    record("linear SVM, all labels", "pre-trained", run_probe(backbone_of(model), train, test, **probe_kw)[0])
    for s in seeds:
        torch.manual_seed(s)
        rand = build_model(cfgs["pretrain"]).eval()
        record("linear SVM, all labels", "scratch", run_probe(backbone_of(rand), train, test, **probe_kw)[0])

    cls_cfg = cfgs["classifier"]
    print(f"demo: 4/4 fine-tuning with few labels ({len(seeds)} seeds x pre-trained / scratch)", flush=True)
    for s in seeds:
        # support from the training shapes, 20 queries per class from the test shapes
        ep = make_fewshot_episode(train.labels, args.way, args.shot, seed=s, queries=0)
        support = EpisodeDataset(train, ep.support, ep.classes)
        q_idx = np.concatenate([np.random.default_rng(s).permutation(np.flatnonzero(test.labels == c))[:20]
                                for c in ep.classes])
        query = EpisodeDataset(test, q_idx, ep.classes)
        few = validate(apply_overrides(cls_cfg, [f"train.seed={s}", f"train.epochs={args.fewshot_epochs}",
                                                 "train.eval_every=5", f"train.batch_size={min(10, len(support))}"]))
        for arm, init in (("pre-trained", str(pretrained)), ("scratch", None)):
            task = ClassificationTask(few, init=init, scratch=init is None, train_data=support, test_data=query,
                                      resume=(out / f"fewshot_{arm}_{s}" / "last.pt").is_file())
            r = run(task, f"fewshot_{arm}_{s}", verbose=False)
            record(f"few-shot {args.way}-way {args.shot}-shot", arm, r["acc"])

        subset = InMemory(train, per_class_subset(train.labels, args.labels_per_class, seed=s))
        low = validate(apply_overrides(cls_cfg, [f"train.seed={s}", f"train.epochs={args.finetune_epochs}",
                                                 f"train.eval_every={args.finetune_epochs}",
                                                 f"train.batch_size={min(cls_cfg.train.batch_size, len(subset))}"]))
        for arm, init in (("pre-trained", str(pretrained)), ("scratch", None)):
            task = ClassificationTask(low, init=init, scratch=init is None, train_data=subset, test_data=test,
                                      resume=(out / f"lowlabel_{arm}_{s}" / "last.pt").is_file())
            r = run(task, f"lowlabel_{arm}_{s}", verbose=False)
            record(f"fine-tune, {args.labels_per_class} labels per class", arm, r["acc"])

    # ---- 4. report -------------------------------------------------------------------------------
    pictures = render_demo(out, pretrained, test)
    total = time.perf_counter() - t0
    report = write_report(out, results, timings, total, pre, args, pictures)
    print("\n" + report, flush=True)
    return 0


def write_report(out: Path, results: dict, timings: dict, total: float, pre: dict, args: Any,
                 pictures: list[str]) -> str:
    rows = ["| task | pre-trained | from scratch | gain |", "| --- | ---: | ---: | ---: |"]
    for what, arms in results.items():
        p, s = arms["pre-trained"], arms["scratch"]
        rows.append(f"| {what} | {_mean_std(p)} | {_mean_std(s)} | {np.mean(p) - np.mean(s):+.1f} |")
    stage_time = {k.split("_")[0]: 0.0 for k in timings}
    for k, v in timings.items():
        stage_time[k.split("_")[0]] += v
    lines = [
        "# pointbert demo: what pre-training buys", "",
        f"Test accuracy (%) on the synthetic shapes, mean ± std over {args.seeds} seeds "
        "(few-shot: one episode per seed; fine-tune: one label subset per seed; SVM: the one pre-trained "
        "backbone, against one random backbone per seed).", "",
        *rows, "",
        "- pre-training used the unlabelled training shapes only (tokenizer, then masked point modeling);",
        f"- few-shot: {args.way} classes, {args.shot} labelled shapes each, 20 test queries per class, "
        f"{args.fewshot_epochs} epochs, accuracy after the last epoch (no selection on the queries);",
        f"- fine-tune: {args.labels_per_class} labelled shapes per class, {args.finetune_epochs} epochs, "
        "accuracy on the whole test split after the last epoch;",
        "- linear SVM: scikit-learn LinearSVC on frozen [cls ; max] features of all training shapes.", "",
        f"Wall time {total / 60:.1f} min: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in stage_time.items())
        + f" ({torch.get_num_threads()} CPU threads).", "",
        *[f"![{Path(p).parent.name if Path(p).name == 'curves.png' else Path(p).stem}]"
          f"({Path(p).relative_to(out)})" for p in pictures], "",
    ]
    text = "\n".join(lines)
    (out / "report.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"results": results, "timings_s": timings,
                                                  "pretrain": pre}, indent=2))
    return text


def render_demo(out: Path, pretrained: Path, test: InMemory) -> list[str]:
    """Pictures of the tokenizer and the pre-trained model at work on test shapes."""
    from .checkpoint import load_model
    from .mpm import block_mask
    from .viz import patch_panels, render_panels

    model, _ = load_model(pretrained, ("pretrain",))
    tok = model.tokenizer
    picks = [int(np.flatnonzero(test.labels == c)[0]) for c in range(0, len(test.classes), 3)][:4]
    points = torch.stack([torch.from_numpy(test[i]["points"]) for i in picks])
    from .data.transforms import fps_subsample

    points = fps_subsample(points, model.cfg.data.num_points)
    pictures = []
    with torch.no_grad():
        torch.manual_seed(0)
        nb, centers = tok.group(points)
        ids = tok.tokenize_patches(nb, centers)
        mask = block_mask(centers, model.cfg.mpm.mask_ratio)
        coarse, fine = tok.decode(ids, centers)
        recon = (fine + centers[:, :, None]).reshape(len(picks), -1, 3)
    panels = []
    for b, i in enumerate(picks):
        name = test.classes[int(test.labels[i])]
        panels += patch_panels(nb[b], centers[b], mask[b], ids[b], title=name)
        panels.append({"points": recon[b].numpy(), "title": "tokenizer reconstruction from the ids"})
    pictures.append(str(render_panels(panels, out / "patches_masks_tokens.png", cols=4,
                                      title="test shapes: patches, a block mask, token ids, reconstruction")))
    for stage in ("tokenizer", "pretrain"):
        if (out / stage / "curves.png").is_file():
            pictures.append(str(out / stage / "curves.png"))
    return pictures
