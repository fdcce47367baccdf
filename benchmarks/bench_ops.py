"""Micro-benchmark of pointbert.ops (not a test): median wall time over repeats, after warm-up.

    PYTHONPATH=. python benchmarks/bench_ops.py [--device cpu|cuda] [--repeats 5] [--threads N]

(no PYTHONPATH needed after `pip install -e .`).

Prints one line per case with the median time and the throughput in samples (clouds or point sets)/s.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pointbert.ops import chamfer_l1, fps, knn


def bench(fn, device: str, warmup: int, repeats: int) -> float:
    """Median seconds per call of fn()."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    g = torch.Generator().manual_seed(0)
    cloud = lambda b, n: torch.randn(b, n, 3, generator=g).to(dev)

    x1k, x8k = cloud(32, 1024), cloud(32, 8192)
    centers = x1k[:, :64].contiguous()
    pred, gt = cloud(2048, 32), cloud(2048, 32)
    cases = [
        ("fps      B=32 N=1024 num=64", 32, lambda: fps(x1k, 64)),
        ("fps      B=32 N=1024 num=128", 32, lambda: fps(x1k, 128)),
        ("fps      B=32 N=1024 num=512", 32, lambda: fps(x1k, 512)),
        ("fps      B=32 N=8192 num=512", 32, lambda: fps(x8k, 512)),
        ("knn      B=32 S=64 N=1024 k=32", 32, lambda: knn(centers, x1k, 32)),
        ("chamfer  2048 sets x 32 pts (L1 fwd)", 2048, lambda: chamfer_l1(pred, gt)),
    ]
    print(f"device={dev} torch={torch.__version__} threads={torch.get_num_threads()} repeats={args.repeats}")
    for name, samples, fn in cases:
        t = bench(fn, dev, args.warmup, args.repeats)
        print(f"{name:40s} {t * 1e3:9.2f} ms  {samples / t:12.1f} samples/s")


if __name__ == "__main__":
    main()
