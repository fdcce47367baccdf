"""SIGKILL a real ``pointbert finetune`` process, resume it with ``--resume``: it must end bit-exactly like
an uninterrupted run with the same seed (weights, returned / best metrics, every metrics.jsonl row).

Unlike the in-process resume tests of test_engine.py (which stop the loop with an exception), these kill
an OS process with SIGKILL: nothing gets to clean up, a checkpoint may be half written, a log line cut.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pointbert.checkpoint import load_checkpoint
from pointbert.data.synthetic import SyntheticShapes

pytestmark = pytest.mark.slow  # ~6 CLI processes of a few seconds each (torch import, matplotlib curves)

REPO = Path(__file__).resolve().parents[1]
CLASSES, TRAIN_PER_CLASS, TEST_PER_CLASS = 3, 8, 3
BATCH, EPOCHS = 3, 2
STEPS_PER_EPOCH = CLASSES * TRAIN_PER_CLASS // BATCH  # 8
TOTAL_STEPS = EPOCHS * STEPS_PER_EPOCH
TIMEOUT = 180  # seconds for any one process: a hang fails the test instead of blocking the suite
VOLATILE = ("time", "samples_per_s")  # wall-clock columns of metrics.jsonl


def make_folder_dataset(root: Path) -> Path:
    """A tiny class-per-folder dataset of .npy clouds (synthetic shapes of 3 classes, train/ and test/)."""
    for split, per_class in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        shapes = SyntheticShapes(split, num_points=128)  # generated on request: only the items used
        n = len(shapes.classes)
        for j in range(per_class):
            for c in range(CLASSES):
                folder = root / shapes.classes[c] / split
                folder.mkdir(parents=True, exist_ok=True)
                np.save(folder / f"{j:03d}.npy", shapes[n * j + c]["points"])  # item n*j+c has label c
    return root


def command(data: Path, out: Path, *, resume: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "pointbert", "finetune", "--preset", "tiny-classifier", "--data", str(data),
           "--scratch", "--epochs", str(EPOCHS), "--batch-size", str(BATCH), "--seed", "0", "--device", "cpu",
           "--precision", "fp32", "--out", str(out), "--quiet",
           "train.checkpoint_every=1", "train.log_every=1", "train.eval_every=1", "data.num_workers=0",
           "data.num_points=96", "data.point_pool=128", "optim.warmup_epochs=0"]
    return cmd + ["--resume"] if resume else cmd


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg", CUDA_VISIBLE_DEVICES="")
    return env


def run_to_end(cmd: list[str]) -> str:
    """Run a command to completion; its stdout. A non-zero exit fails with the process's output."""
    done = subprocess.run(cmd, env=environment(), capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def summary(stdout: str) -> str:
    """The command's closing line: ``best acc X % (epoch E), last acc Y %; checkpoints in OUT``."""
    line = next(x for x in stdout.splitlines() if x.startswith("best acc "))
    return line.split("; checkpoints in")[0]


class Killable:
    """``cmd`` as a background process whose output goes to ``log``; a context manager that kills it on exit."""

    def __init__(self, cmd: list[str], log: Path):
        self.log = log
        self._file = open(log, "w")  # closed in kill()
        self.proc = subprocess.Popen(cmd, env=environment(), stdout=self._file, stderr=subprocess.STDOUT)
        self.deadline = time.monotonic() + TIMEOUT

    def __enter__(self) -> Killable:
        return self

    def __exit__(self, *exc) -> None:
        self.kill()  # never leave a run behind, whatever happened in the block

    def alive(self, what: str) -> None:
        """Fail if the process ended or timed out before ``what`` happened."""
        if self.proc.poll() is not None or time.monotonic() > self.deadline:
            ended = self.proc.poll() is not None
            self.kill()
            pytest.fail(f"the run {'ended' if ended else 'timed out'} before {what}:\n{self.log.read_text()}")

    def kill(self) -> int | None:
        """SIGKILL (``Popen.kill`` on POSIX); the exit code (None if it had already ended by itself)."""
        if self._file.closed:
            return self.proc.returncode
        already = self.proc.poll() is not None
        self.proc.kill()
        code = self.proc.wait(timeout=30)
        self._file.close()
        return None if already else code


def checkpoint_position(path: Path, seen: dict) -> tuple[int, int] | None:
    """(step, batch_in_epoch) of ``path`` when it changed since the last call, else None."""
    try:
        mtime = path.stat().st_mtime_ns
    except FileNotFoundError:
        return None
    if seen.get("mtime") == mtime:
        return None
    seen["mtime"] = mtime
    ckpt = load_checkpoint(path)  # never a torn file: checkpoints are replaced atomically
    return int(ckpt["step"]), int(ckpt["batch_in_epoch"])


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def rows(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(x).items() if k not in VOLATILE}
            for x in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(a: Path, b: Path) -> None:
    """Run ``b`` ended exactly like run ``a``: bit-identical weights, identical metrics and logs."""
    last_a, last_b = load_checkpoint(a / "last.pt"), load_checkpoint(b / "last.pt")
    assert last_b["finished"] and last_b["step"] == last_a["step"] == TOTAL_STEPS
    assert last_b["metrics"] == last_a["metrics"] and last_b["best_metrics"] == last_a["best_metrics"]
    for name in ("last.pt", "best.pt"):
        wa, wb = weights(a / name), weights(b / name)
        assert wa.keys() == wb.keys()
        differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
        assert not differ, f"{name}: {len(differ)} tensors differ, e.g. {differ[:3]}"
    opt_a, opt_b = last_a["optimizer"]["state"], last_b["optimizer"]["state"]
    assert opt_a.keys() == opt_b.keys()
    assert all(torch.equal(opt_a[i][k], opt_b[i][k]) for i in opt_a for k in opt_a[i])
    ra, rb = rows(a), rows(b)
    assert rb == ra  # every step's loss/acc/lr and every evaluation; nothing lost, nothing logged twice
    evals = [r for r in rb if r["kind"] == "eval"]
    assert [r["epoch"] for r in evals] == list(range(1, EPOCHS))  # every epoch but epoch 0, as the official loops
    assert {"acc", "mean_class_acc"} <= evals[-1].keys()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_folder_dataset(tmp_path_factory.mktemp("clouds"))


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory) -> tuple[Path, str]:
    """Run A: the same command, never interrupted."""
    out = tmp_path_factory.mktemp("run") / "A"
    stdout = run_to_end(command(data, out))
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["finished"] and ckpt["step"] == TOTAL_STEPS, "the reference run has an unexpected length"
    return out, summary(stdout)


def test_sigkill_mid_epoch_then_resume_matches_the_uninterrupted_run(data, uninterrupted, tmp_path):
    out_a, summary_a = uninterrupted
    out_b = tmp_path / "B"
    seen: dict = {}
    with Killable(command(data, out_b), tmp_path / "B.log") as run:
        while True:  # until last.pt holds a mid-epoch checkpoint with >= 3 steps to go before the epoch ends
            run.alive("a mid-epoch checkpoint")
            pos = checkpoint_position(out_b / "last.pt", seen)
            if pos is not None and 0 < pos[1] <= STEPS_PER_EPOCH - 3:
                break
            time.sleep(0.005)
        code = run.kill()
    if os.name == "posix":
        assert code == -signal.SIGKILL

    killed = load_checkpoint(out_b / "last.pt")
    assert not killed["finished"] and 0 < killed["batch_in_epoch"] < STEPS_PER_EPOCH, "not killed mid-epoch"
    stdout = run_to_end(command(data, out_b, resume=True))
    at = f"step {killed['step']} (batch {killed['batch_in_epoch']}/{STEPS_PER_EPOCH})"
    assert at in stdout, f"expected the resume to start at {at}:\n{stdout}"
    assert summary(stdout) == summary_a  # the returned last / best metrics, as the command prints them
    assert_same_run(out_a, out_b)


def test_sigkill_during_a_checkpoint_write_and_at_a_random_moment_still_resumes_exactly(
        data, uninterrupted, tmp_path):
    """Kill 1 aims at a checkpoint write (a ``.last.pt.*.tmp`` file in the run folder); kill 2 lands at a
    random moment of the resumed process (training, a checkpoint write, evaluation or the end)."""
    out_a, summary_a = uninterrupted
    seed = int(os.environ.get("POINTBERT_KILL_SEED", time.time_ns() % 2**31))
    rng = random.Random(seed)
    out_c = tmp_path / "C"
    last = out_c / "last.pt"

    # kill 1: as soon as a checkpoint write is seen in progress (once there is a last.pt to resume from)
    skip = rng.randrange(0, 4)  # checkpoint writes to let pass first (few: a busy machine may hide some)
    seen_writes, writing = 0, False
    with Killable(command(data, out_c), tmp_path / "C1.log") as run:
        while True:
            run.alive("a checkpoint write")
            now = out_c.is_dir() and any(p.name.startswith(".last.pt.") for p in out_c.iterdir())
            if now and not writing and last.is_file():
                seen_writes += 1
                if seen_writes > skip:
                    break
            writing = now
            time.sleep(0.0005)
        run.kill()
    first = load_checkpoint(last)  # loads: the write in progress left the previous last.pt intact
    assert not first["finished"], f"seed {seed}"

    # kill 2: the resumed process, a random time after it has written its first own checkpoint
    mtime = last.stat().st_mtime_ns
    with Killable(command(data, out_c, resume=True), tmp_path / "C2.log") as run:
        while last.stat().st_mtime_ns == mtime:
            run.alive("the resumed run's first checkpoint")
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 1.0))
        run.kill()
    load_checkpoint(last)

    stdout = run_to_end(command(data, out_c, resume=True))
    assert summary(stdout) == summary_a, f"seed {seed}"
    try:
        assert_same_run(out_a, out_c)
    except AssertionError as e:
        raise AssertionError(f"seed {seed} (rerun with POINTBERT_KILL_SEED={seed}): {e}") from e
