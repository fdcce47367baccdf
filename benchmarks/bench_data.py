"""Data-serving throughput (not a test): epochs of batches of 32 from the shared ModelNet40.

    PYTHONPATH=. python benchmarks/bench_data.py [--root ../shared/data/ModelNet40] [--workers 0 2] [--large]
                                                 [--epochs 2] [--cache DIR]

Compares three ways of serving the 9,843 training clouds (1024 points each) through a
``torch.utils.data.DataLoader`` (shuffled, drop_last, default collate):

* ``FolderDataset``: the generic folder-of-files loader (one ``.npy`` read per item);
* ``ModelNet``: the official loader on the same folder layout (one ``.npy`` read per item);
* ``CachedDataset``: the cache written once by ``pointbert data prepare`` (one memory-mapped array).

Also times the one-off ``prepare`` and the synthetic dataset. Prints samples/s per epoch (the
first epoch of each reader is reported separately: it may pay for the OS file cache) and the machine.

``--large`` measures instead what feeding a GPU at a large batch asks of the loader: a cache of 2,048 clouds of 8192
points (the official ModelNet40 fine-tuning input), served in batches of 256 through the training
loader of ``pointbert.engine`` (each cloud reseeded and shuffled per item, as in a run), per worker count.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from pointbert.data.cache import CachedDataset, prepare_cache
from pointbert.data.folder import FolderDataset
from pointbert.data.official import ModelNet
from pointbert.data.synthetic import SyntheticShapes

DEFAULT_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "ModelNet40"


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{platform.system()} {platform.release()}, {cpu}, {os.cpu_count()} logical CPUs, "
            f"python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, "
            f"torch threads {torch.get_num_threads()}")


def epoch(ds, workers: int, seed: int) -> float:
    """Samples per second of one shuffled epoch of batches of 32."""
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(ds, batch_size=32, shuffle=True, drop_last=True, num_workers=workers, generator=g)
    n, t0 = 0, time.perf_counter()
    for batch in loader:
        n += batch["points"].shape[0]
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=DEFAULT_ROOT,
                    help="the shared ModelNet40 folder (<class>/train/*.npy)")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=None, help="cache root (default: a temporary folder)")
    ap.add_argument("--large", action="store_true",
                    help="only 8192-point clouds in batches of 256, through the training loader")
    args = ap.parse_args()
    if args.large:
        print(machine())
        with tempfile.TemporaryDirectory() as tmp:
            large_clouds(Path(args.cache or tmp) / "large", args.workers, args.epochs)
        return
    if not args.root.is_dir():
        raise SystemExit(f"{args.root}: not found (pass --root)")
    print(machine())
    tmp = tempfile.TemporaryDirectory() if args.cache is None else None
    cache_root = Path(tmp.name) if tmp else args.cache

    t0 = time.perf_counter()
    [cache] = prepare_cache(args.root, "modelnet40", "train", out=cache_root, progress=False,
                            log=lambda s: None)
    prep = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in cache.iterdir()) / 2**20
    print(f"prepare (once): {prep:.1f} s for 9,843 files -> {size:.0f} MiB in {cache}")

    readers = {
        "FolderDataset (npy files)": lambda: FolderDataset(args.root, "train", num_points=1024),
        "ModelNet (npy files)": lambda: ModelNet(args.root, "train"),
        "CachedDataset (mmap)": lambda: CachedDataset(cache, "train"),
        "SyntheticShapes (generated)": lambda: SyntheticShapes("train", 1024, size=2000),
    }
    print(f"{'reader':30s} {'workers':>7s} {'open s':>7s} {'epoch 1':>10s} {'later epochs':>14s}"
          "  (samples/s)")
    for name, make in readers.items():
        for w in args.workers:
            t0 = time.perf_counter()
            ds = make()
            opened = time.perf_counter() - t0
            rates = [epoch(ds, w, seed=e) for e in range(args.epochs)]
            later = f"{np.mean(rates[1:]):14,.0f}" if len(rates) > 1 else f"{'-':>14s}"
            print(f"{name:30s} {w:7d} {opened:7.2f} {rates[0]:10,.0f} {later}")
    fixture = args.root.parent / "fixtures" / "modelnet40_normal_resampled"
    if fixture.is_dir():  # the official text format: what the cache saves there
        src = ModelNet(fixture, "train", num_points=8192, present_only=True)
        t0 = time.perf_counter()
        for i in range(4):
            src[i]
        per = (time.perf_counter() - t0) / 4
        [c] = prepare_cache(fixture, "modelnet40", "train", skip_bad=True, out=cache_root / "txt",
                            progress=False, log=lambda s: None)
        cached = CachedDataset(c, "train")
        rate = np.mean([epoch(cached, 0, e) for e in range(20)])  # one batch of 32 per epoch
        print(f"official 10,000-line .txt + FPS 8192 per item: {1 / per:,.1f} samples/s; "
              f"from its prepared cache: {rate:,.0f} samples/s (40 fixture shapes)")
    if tmp:
        tmp.cleanup()


def large_clouds(root: Path, workers: list[int], epochs: int, n: int = 2048, points: int = 8192,
                 batch: int = 256) -> None:
    """Loader throughput on ``n`` clouds of ``points`` points in batches of ``batch`` (see the module doc)."""
    from pointbert.engine import EpochSampler, SeededItems

    rng = np.random.default_rng(0)
    for i in range(n):  # a folder dataset of two classes, prepared like any other
        d = root / "src" / f"class{i % 2}" / "train"
        d.mkdir(parents=True, exist_ok=True)
        np.save(d / f"{i}.npy", rng.standard_normal((points, 3)).astype(np.float32))
    [cache] = prepare_cache(root / "src", "folder", "train", out=root / "cache", progress=False, log=lambda s: None)
    ds = SeededItems(CachedDataset(cache, "train"), 0)
    for w in workers:
        sampler = EpochSampler(len(ds), batch, seed=0)
        loader = DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=w, drop_last=True,
                            persistent_workers=w > 0)  # as engine._build_loader builds it
        rates = []
        for e in range(epochs):
            sampler.set_epoch(e)
            count, t0 = 0, time.perf_counter()
            for b in loader:
                count += b["points"].shape[0]
            rates.append(count / (time.perf_counter() - t0))
        print(f"{n} clouds of {points} points, batch {batch}, {w} workers: "
              f"{', '.join(f'{r:,.0f}' for r in rates)} samples/s per epoch")


if __name__ == "__main__":
    main()
