"""The CPU-scale ModelNet40 protocol of benchmarks/modelnet40.md, one command for every stage:

    python benchmarks/modelnet40.py --data ../shared/data/ModelNet40 --out runs/modelnet40-small

1. ``pointbert train-tokenizer`` and ``pointbert pretrain`` on the ModelNet40 training shapes, labels unused;
2. ``pointbert probe``: linear SVM on frozen features, the pre-trained backbone and random ones (3 seeds);
3. ``pointbert fewshot``: 5/10-way x 10/20-shot, folds 0-2, pre-trained and from scratch;
4. ``pointbert finetune`` with all labels (5 epochs), both arms, then ``pointbert evaluate --vote``;
5. ``pointbert render``: test shapes with their tokens, reconstructions and masked-patch predictions.

Every stage is the printed ``pointbert`` command, run as a child process; its wall time goes to
``<out>/stages.json``. Rerunning continues where it stopped: finished stages are skipped, an interrupted
training run resumes from its last checkpoint. ``<out>/report.md`` gets the table (``results.json`` the
numbers). ``--scale`` shortens every stage for a smoke test (epochs and folds), not for results.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SETTINGS = [(5, 10), (5, 20), (10, 10), (10, 20)]  # few-shot (way, shot)
ARMS = ("pretrained", "scratch")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/ModelNet40", help="the ModelNet40 folder")
    ap.add_argument("--out", default="runs/modelnet40-small", type=Path)
    ap.add_argument("--folds", default="0-2", help="few-shot folds (episodes), default 0-2")
    ap.add_argument("--probe-seeds", type=int, default=3, help="random backbones probed (seeds 0..n-1)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--smoke", action="store_true", help="1 epoch per stage, 1 fold, 5-way 10-shot only: "
                                                          "checks the pipeline, the numbers mean nothing")
    return ap.parse_args(argv)


class Protocol:
    def __init__(self, args: argparse.Namespace):
        self.args, self.out = args, args.out
        self.out.mkdir(parents=True, exist_ok=True)
        self.stages_file = self.out / "stages.json"
        self.stages = json.loads(self.stages_file.read_text()) if self.stages_file.is_file() else {}
        self.commands: list[str] = []  # the current stage's

    def pointbert(self, *argv: str) -> None:
        """Run one ``pointbert`` command in a child process (the printed line is what a user types)."""
        extra = ["--device", self.args.device] if argv[0] not in ("render",) else []
        cmd = ["pointbert", *argv, *extra]
        line = " ".join(shlex.quote(c) for c in cmd)
        self.commands.append(line.replace(" --resume", ""))
        print(f"\n$ {line}", flush=True)
        subprocess.run([sys.executable, "-m", "pointbert", *cmd[1:]], check=True)

    def stage(self, name: str, run) -> None:
        """Run a stage unless it finished before; add its wall time (all attempts) to stages.json."""
        entry = self.stages.get(name, {"seconds": 0.0, "done": False})
        if entry["done"]:
            print(f"[{name}] done before ({entry['seconds'] / 60:.1f} min), skipped", flush=True)
            return
        print(f"\n[{name}]", flush=True)
        start, self.commands = time.perf_counter(), []
        try:
            run()
            entry["done"] = True
        finally:
            entry["seconds"] += time.perf_counter() - start
            entry["commands"] = self.commands
            self.stages[name] = entry
            self.stages_file.write_text(json.dumps(self.stages, indent=2) + "\n")

    def train(self, command: str, folder: str, *argv: str) -> None:
        out = self.out / folder
        resume = ["--resume"] if (out / "last.pt").is_file() else []
        self.pointbert(command, *argv, "--data", self.args.data, "--out", str(out), "--quiet", *resume,
                       *self.smoke())

    def smoke(self) -> list[str]:
        return ["--epochs", "1"] if self.args.smoke else []


def run(args: argparse.Namespace) -> dict:
    p = Protocol(args)
    out, data = p.out, args.data
    pretrained = str(out / "pretrain" / "last.pt")
    folds = "0" if args.smoke else args.folds
    settings = SETTINGS[:1] if args.smoke else SETTINGS
    seeds = range(1 if args.smoke else args.probe_seeds)

    p.stage("tokenizer", lambda: p.train("train-tokenizer", "tokenizer", "--preset", "small-tokenizer"))
    p.stage("pretrain", lambda: p.train("pretrain", "pretrain", "--preset", "small-pretrain",
                                        "--tokenizer", str(out / "tokenizer" / "last.pt")))

    def probe() -> None:
        p.pointbert("probe", "--init", pretrained, "--data", data, "--out", str(out / "probe" / "pretrained.json"))
        for s in seeds:
            p.pointbert("probe", "--random", "--preset", "small-pretrain", "--seed", str(s), "--data", data,
                        "--out", str(out / "probe" / f"random_{s}.json"))
    p.stage("probe", probe)

    for way, shot in settings:
        for arm in ARMS:
            init = ["--init", pretrained] if arm == "pretrained" else ["--scratch"]
            p.stage(f"fewshot {way}w{shot}s {arm}", lambda init=init, way=way, shot=shot, arm=arm: p.train(
                "fewshot", f"fewshot/{arm}_{way}way_{shot}shot", "--preset", "small-fewshot", *init,
                "--way", str(way), "--shot", str(shot), "--folds", folds))

    for arm in ARMS:
        init = ["--init", pretrained] if arm == "pretrained" else ["--scratch"]
        p.stage(f"finetune {arm}", lambda init=init, arm=arm: p.train(
            "finetune", f"finetune/{arm}", "--preset", "small-classifier", *init))
        p.stage(f"evaluate {arm}", lambda arm=arm: p.pointbert(
            "evaluate", str(out / "finetune" / arm / "last.pt"), "--vote",
            "--out", str(out / "finetune" / f"{arm}_eval.json")))

    def pictures() -> None:
        for cls in ("airplane", "chair", "guitar", "lamp"):
            for ckpt in ("tokenizer", "pretrain"):
                p.pointbert("render", str(out / ckpt / "last.pt"), str(Path(data) / cls / "test"),
                            "--max-clouds", "2", "--out", str(out / "pictures" / f"{ckpt}_{cls}.png"))
    p.stage("pictures", pictures)
    return report(p, settings, seeds)


def _ms(values: list[float]) -> str:
    return f"{np.mean(values):.1f} ± {np.std(values):.1f}" if len(values) > 1 else f"{values[0]:.1f}"


def machine() -> str:
    """The CPU and library versions, as benchmarks/run.py reads them (this script's neighbour)."""
    import torch
    from run import machine as machine_info

    m = machine_info(torch.device("cpu"))
    return (f"{m['cpu']}, {m['logical_cpus']} logical CPUs, {m['torch_threads']} torch threads; "
            f"Python {m['python']}, torch {m['torch']}")


def report(p: Protocol, settings: list[tuple[int, int]], seeds) -> dict:
    out = p.out
    load = lambda path: json.loads(Path(path).read_text())  # noqa: E731
    res: dict = {"probe": {"pretrained": load(out / "probe" / "pretrained.json")["svm_acc"],
                           "random": [load(out / "probe" / f"random_{s}.json")["svm_acc"] for s in seeds]}}
    rows = ["| task | metric | pre-trained | from scratch | gain |", "| --- | --- | ---: | ---: | ---: |"]

    def row(task: str, metric: str, a: list[float], b: list[float]) -> None:
        rows.append(f"| {task} | {metric} | {_ms(a)} | {_ms(b)} | {np.mean(a) - np.mean(b):+.1f} |")

    row("linear SVM on frozen features", "test OA", [res["probe"]["pretrained"]], res["probe"]["random"])
    for way, shot in settings:
        arms = {arm: load(out / "fewshot" / f"{arm}_{way}way_{shot}shot" / "fewshot.json")["folds"] for arm in ARMS}
        res[f"fewshot_{way}way_{shot}shot"] = arms
        for key, metric in (("best_acc", "best epoch (official)"), ("last_acc", "last epoch")):
            row(f"few-shot {way}-way {shot}-shot ({len(arms['pretrained'])} folds)", metric,
                *[[f[key] for f in arms[arm]] for arm in ARMS])
    ev = {arm: load(out / "finetune" / f"{arm}_eval.json") for arm in ARMS}
    res["finetune"] = ev
    row("fine-tune, all labels", "test OA", *[[ev[arm]["acc"]] for arm in ARMS])
    row("fine-tune, all labels", "test OA, voting", *[[ev[arm]["vote_acc"]] for arm in ARMS])
    row("fine-tune, all labels", "mean class acc", *[[ev[arm]["mean_class_acc"]] for arm in ARMS])

    tok = [json.loads(line) for line in (out / "tokenizer" / "metrics.jsonl").read_text().splitlines()]
    tok_eval = [m for m in tok if "CDL1" in m]
    times = [f"| {name} | {v['seconds'] / 60:.1f} |" for name, v in p.stages.items()]
    total = sum(v["seconds"] for v in p.stages.values())
    lines = ["# ModelNet40, CPU scale: what pre-training buys", "",
             "Test accuracy (%) on the ModelNet40 test split (2,468 shapes); mean ± std (population) over "
             "few-shot folds and random-backbone seeds. Pre-training used the 9,843 training shapes without "
             "labels.", "", *rows, "",
             f"Tokenizer reconstruction of the test shapes (hard tokens): CD-L1 x 1000 = "
             f"{tok_eval[-1]['CDL1']:.1f}, F-Score = {tok_eval[-1]['F-Score']:.3f}." if tok_eval else "", "",
             f"Machine: {machine()}.", "", "| stage | wall time (min) |", "| --- | ---: |", *times,
             f"| total | {total / 60:.1f} |", "", "Commands:", "", "```",
             *[c for v in p.stages.values() for c in v.get("commands", [])], "```", ""]
    text = "\n".join(lines)
    (out / "report.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"results": res, "stages": p.stages}, indent=2) + "\n")
    print("\n" + text, flush=True)
    return res


if __name__ == "__main__":
    run(parse_args())
