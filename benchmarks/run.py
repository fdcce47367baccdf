"""Speed benchmark: pointbert against a plain, official-style implementation, measured in one run.

    python benchmarks/run.py [--quick] [--device cpu|cuda] [--precision fp32|bf16] [--batch 32]
                             [--threads N] [--out results.json] [--sections ops,steps,isolated,fastpaths,scaling]
                             [--no-plain] [--compile [--compile-mode M]] [--allocator default|keep|thp]
                             [--peak-tflops X]

Sections (benchmarks/README.md explains every number):

1. the machine, library versions and threads; a plain matmul as the throughput reference (2048^3 on CPU;
   on CUDA 8192^3, ten per timed call, in the run's precision);
2. ``ops``: FPS, kNN and Chamfer alone, pointbert.ops vs the plain stand-ins;
3. ``steps``: tokenizer (dVAE) step, pre-training step, fine-tuning step and classification inference
   for the full-size presets: samples/s (median, min, max over repeats run alternately for both
   implementations), model GFLOP/s and its share of the matmul (and of a GPU's stated peak), peak memory,
   the share of grouping (FPS + kNN) in the step (for fine-tuning also of the input FPS the training loop
   runs before the model), and ours / plain;
4. ``isolated``: the same steps with each implementation in processes of its own, as each is used (pointbert
   as a training loop of one's own, which applies its memory policy itself, the plain twin with glibc's default);
5. ``fastpaths``: the tokenizer and fine-tuning steps and inference with each of pointbert's fast paths
   switched off (the fine-tuning step also with the official per-tensor AdamW loop instead of the fused
   kernel), plus ``torch.compile`` with ``--compile``;
6. ``scaling``: fine-tuning step and inference at 1k/2k/4k/8k points with 64/128/256/512 patches.

``--quick`` (under 2 minutes on 2 cores): batch 8 unless ``--batch`` is given, 1 warm-up and 2 repeats,
no isolated section, no 4k/8k cases, no tokenizer fast-path variants, step memory only for fine-tuning and
inference. The whole output also goes to ``--out`` as JSON, rewritten after each case (so a run cut short
leaves what it measured).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import importlib.metadata
import json
import mmap
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"finetune": 1.4, "inference": 1.3, "tokenizer": 2.0, "pretrain": 1.5}  # ours / plain, issue 6
MATMUL_SHARE_TARGET = 0.75  # fine-tuning step model GFLOP/s / matmul GFLOP/s
#: stated dense peak TFLOP/s (fp32 without tensor cores, bf16 tensor cores, no sparsity) of the cards
#: the benchmark has met, from NVIDIA's data sheets, by a substring of torch.cuda.get_device_name, the
#: longest matching one first ("H200 NVL" before "H200"; see stated_peak); others: --peak-tflops
PEAK_TFLOPS = {"H100 PCIe": {"fp32": 51.2, "bf16": 756.0}, "H100 NVL": {"fp32": 60.0, "bf16": 835.5},
               "H100": {"fp32": 66.9, "bf16": 989.4}, "H200 NVL": {"fp32": 60.0, "bf16": 835.5},
               "H200": {"fp32": 66.9, "bf16": 989.4}, "A100": {"fp32": 19.5, "bf16": 312.0}}
#: points of a stored ModelNet cloud (the official caches), the input of the fine-tuning step's sampling
STORED_POINTS = 8192
CASE_PRESET = {"tokenizer": "tokenizer", "pretrain": "pretrain", "finetune": "modelnet40-1k",
               "inference": "modelnet40-1k"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="batch 8, 1 warm-up, 2 repeats, no 4k/8k cases, no tokenizer fast-path variants")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16 = autocast")
    ap.add_argument("--batch", type=int, default=None, help="clouds per step (default 32; 8 with --quick)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed steps per case (default 3, 1 with --quick; with --allocator keep the heap "
                         "stops growing, and so taking page faults, after about 3 steps)")
    ap.add_argument("--repeats", type=int, default=None, help="timed steps per case (default 5; 2 with --quick)")
    ap.add_argument("--sections", default=None,
                    help="ops,steps,isolated,fastpaths,scaling (default all; --quick: all but isolated)")
    ap.add_argument("--steps", default="tokenizer,pretrain,finetune,inference",
                    help="cases of the steps section (and of the fastpaths section: tokenizer, finetune, inference)")
    ap.add_argument("--scaling-batch", type=int, default=None, help="batch of the scaling table (default --batch)")
    ap.add_argument("--no-plain", action="store_true", help="time pointbert only")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the device's stated peak TFLOP/s at --precision, for the 'of peak' column "
                         "(known NVIDIA cards are looked up by name)")
    ap.add_argument("--compile", action="store_true",
                    help="also time pointbert with train.compile (`compiled`) in the steps section, and a "
                         "torch.compile variant in the fastpaths section")
    ap.add_argument("--compile-mode", default="default",
                    help="torch.compile mode of --compile, as train.compile_mode: default, reduce-overhead "
                         "(CUDA graphs), max-autotune, max-autotune-no-cudagraphs")
    ap.add_argument("--allocator", default="default", choices=["default", "keep", "thp"],
                    help="CPU memory of the process, for both implementations: default = glibc's (pointbert's "
                         "own policy switched off); keep = glibc keeps freed memory (pointbert.memory, as "
                         "pointbert's training runs); thp = torch's THP_MEM_ALLOC_ENABLE (huge pages for large "
                         "tensors)")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # CASE:IMPL, one process of `isolated`
    args = ap.parse_args(argv)
    args.batch = args.batch or (8 if args.quick else 32)
    args.scaling_batch = args.scaling_batch or args.batch
    args.warmup = (1 if args.quick else 3) if args.warmup is None else args.warmup
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.sections = args.sections or "ops,steps," + ("" if args.quick else "isolated,") + "fastpaths,scaling"
    return args


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.allocator == "thp":
    os.environ["THP_MEM_ALLOC_ENABLE"] = "1"  # read by torch's CPU allocator at its first allocation

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(ROOT))
from benchmarks import flops, plain  # noqa: E402
from pointbert import kernels, memory, ops  # noqa: E402
from pointbert.config import COMPILE_MODES, Config, preset  # noqa: E402
from pointbert.data.transforms import fps_subsample  # noqa: E402
from pointbert.engine import build_optimizer  # noqa: E402
from pointbert.heads import Classifier  # noqa: E402
from pointbert.mpm import PointBERT  # noqa: E402
from pointbert.patches import group  # noqa: E402
from pointbert.tokenizer import DiscreteVAE  # noqa: E402
from pointbert.transformer import compile_blocks  # noqa: E402

# --------------------------------------------------------------------------------------------------
# Machine, timing, memory
# --------------------------------------------------------------------------------------------------


def machine(dev: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError, StopIteration):
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    info = {"cpu": cpu, "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "platform": f"{platform.system()} {platform.release()}", "device": str(dev)}
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dev)
        info["cuda"] = torch.version.cuda
    info["fps_backend"] = ops.FPS_BACKEND
    info["triton"] = importlib.metadata.version("triton") if kernels.available() else None
    return info


def synchronizer(dev: torch.device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)


def interleaved(runs: dict[str, Callable[[], Any]], repeats: int, sync: Callable[[], None]) -> dict[str, list[float]]:
    """Seconds per call of each run; the runs alternate within every repeat, in reversed order every
    other repeat, so drift in the machine's load and order effects hit all of them alike."""
    times: dict[str, list[float]] = {k: [] for k in runs}
    order = list(runs)
    for r in range(repeats):
        for name in order if r % 2 == 0 else order[::-1]:
            sync()
            t0 = time.perf_counter()
            runs[name]()
            sync()
            times[name].append(time.perf_counter() - t0)
    return times


def rate_stats(seconds: list[float], samples: int) -> dict[str, float]:
    """samples/s: median, min, max over the repeats, and the median seconds per call."""
    rates = [samples / s for s in seconds]
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates),
            "seconds": statistics.median(seconds), "repeats": len(seconds)}


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


class PeakMemory:
    """Peak memory of what runs inside the block, over what was held when it started, in MiB.

    CPU: peak resident set size (VmHWM after resetting it through /proc/self/clear_refs) minus the
    resident size at the start, after returning freed heap memory to the OS (malloc_trim). CUDA:
    ``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` at the start. ``mib`` is None where
    the platform offers neither.
    """

    def __init__(self, dev: torch.device):
        self.dev, self.mib = dev, None

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
            torch.cuda.reset_peak_memory_stats(self.dev)
            self.base = torch.cuda.memory_allocated(self.dev)
            return self
        self.base = None
        with contextlib.suppress(OSError, AttributeError, StopIteration):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak RSS to the current RSS (Linux >= 4.0)
            self.base = _proc_status_kib("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
            self.mib = (torch.cuda.max_memory_allocated(self.dev) - self.base) / 2**20
        elif self.base is not None:
            self.mib = (_proc_status_kib("VmHWM") - self.base) / 1024


def page_fault_us(mib: int = 128) -> float:
    """Microseconds to fault in one 4 KiB page of freshly mapped memory (median of 3 x ``mib`` MiB): what
    glibc's default costs a large tensor on its first touch. Varies across machines and over time on VMs,
    and the plain twin maps its large activations afresh every step, so the runs record it."""
    times = []
    for _ in range(3):
        with mmap.mmap(-1, mib << 20) as m:
            a = np.frombuffer(m, dtype=np.uint8)
            t0 = time.perf_counter()
            a[::4096] = 1  # one write per page
            times.append((time.perf_counter() - t0) / (mib * 256) * 1e6)
            del a
    return statistics.median(times)


def matmul_gflops(dev: torch.device, dtype: torch.dtype, repeats: int, n: int = 2048, products: int = 1) -> float:
    """Median GFLOP/s of an n x n x n matrix product, ``products`` of them per timed call (one sync each call)."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(dev, dtype) for _ in range(2))

    def run() -> None:
        for _ in range(products):
            a @ b
    t = interleaved({"mm": run}, repeats + 1, synchronizer(dev))["mm"][1:]
    return products * 2 * n**3 / statistics.median(t) / 1e9


# --------------------------------------------------------------------------------------------------
# Model steps
# --------------------------------------------------------------------------------------------------

OURS = {"tokenizer": DiscreteVAE, "pretrain": PointBERT, "finetune": Classifier, "inference": Classifier}
PLAIN_KIND = {"tokenizer": "tokenizer", "pretrain": "pretrain", "finetune": "classifier", "inference": "classifier"}


def autocast(dev: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(dev.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def random_clouds(cfg: Config, batch: int, dev: torch.device, g: torch.Generator) -> torch.Tensor:
    """The benchmark's input: (batch, num_points, 3) uniform in [-1, 1]^3, drawn from ``g``."""
    return (torch.rand(batch, cfg.data.num_points, 3, generator=g) * 2 - 1).to(dev)


def make_step(case: str, model: nn.Module, cfg: Config, batch: int, dev: torch.device, precision: str,
              optimizer: torch.optim.Optimizer | None = None) -> Callable[[], None]:
    """One benchmark step of ``case`` on fixed random clouds (B, N, 3) in [-1, 1]^3."""
    g = torch.Generator().manual_seed(1)
    pts = random_clouds(cfg, batch, dev, g)
    if case == "inference":
        model.eval()

        def infer() -> None:
            with torch.no_grad(), autocast(dev, precision):
                model(pts)
        return infer

    model.train()
    labels = torch.randint(cfg.head.num_classes, (batch,), generator=g).to(dev)
    opt = optimizer or build_optimizer(model, cfg.optim)
    params = [p for p in model.parameters() if p.requires_grad]

    def loss() -> torch.Tensor:
        if case == "finetune":
            return F.cross_entropy(model(pts), labels)
        if case == "tokenizer":
            recon, kl = model.loss(model(pts, temperature=1.0))
            return recon + 0.1 * kl
        out = model(pts)  # pretrain: pointbert returns a PretrainOutput, plain the loss
        return getattr(out, "loss", out)

    def train() -> None:
        with autocast(dev, precision):
            value = loss()
        value.backward()
        if case == "finetune":
            nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return train


def build_warm(case: str, impl: str, cfg: Config, batch: int, args: argparse.Namespace, dev: torch.device,
               source: nn.Module | None = None) -> tuple[nn.Module, Callable[[], None]]:
    """One implementation of ``case``, built and warmed up: ``ours`` (seed 0), ``compiled`` (the same with
    train.compile) or ``plain`` (the weights of ``source``, else of a fresh seed-0 ours), with the optimiser
    each uses (fused AdamW for pointbert, the per-tensor loop for plain). Returns the model and its step."""
    if impl == "plain":
        if source is None:
            torch.manual_seed(0)
            source = OURS[case](cfg)
        model = plain.load_ours(plain.build(PLAIN_KIND[case], cfg), source).to(dev)
    else:
        torch.manual_seed(0)
        model = OURS[case](cfg).to(dev)
        if impl == "compiled":  # train.compile; the warm-up steps include the compilation
            compile_blocks(model, mode=args.compile_mode)
    opt = build_optimizer(model, replace(cfg.optim, fused=False) if impl == "plain" else cfg.optim)
    run = make_step(case, model, cfg, batch, dev, args.precision, opt)
    for _ in range(max(1, args.warmup)):
        run()
    synchronizer(dev)()
    return model, run


def build_pair(case: str, cfg: Config, batch: int, args: argparse.Namespace, dev: torch.device, with_plain: bool,
               step_memory: bool = True) -> tuple[dict[str, nn.Module], dict[str, Callable[[], None]], dict]:
    """Build ours (seed 0) and its plain twin with the same weights and warm both up.

    Memory (MiB, per implementation): ``footprint`` = building the model and optimiser plus the
    warm-up steps (weights, gradients, AdamW state, activations); ``step`` = one more step once both
    are warm (activations, temporaries and gradients over the steady state: one-time allocations of
    the libraries do not count against whichever implementation happens to run first)."""
    models, runs, memory = {}, {}, {"footprint": {}, "step": {}}
    impls = ["ours"] + (["compiled"] if args.compile else []) + (["plain"] if with_plain else [])
    for impl in impls:
        with PeakMemory(dev) as mem:
            models[impl], runs[impl] = build_warm(case, impl, cfg, batch, args, dev, models.get("ours"))
        memory["footprint"][impl] = mem.mib
    for impl, run in runs.items() if step_memory else ():
        with PeakMemory(dev) as mem:
            run()
            synchronizer(dev)()
        memory["step"][impl] = mem.mib
    return models, runs, memory


def step_row(case: str, cfg: Config, times: list[float], batch: int, matmul: float,
             peak_tflops: float | None = None) -> dict[str, Any]:
    st = rate_stats(times, batch)
    gflop = flops.step(cfg, case) / 1e9
    st.update(model_gflop_per_cloud=gflop, gflops=gflop * st["median"], matmul_share=gflop * st["median"] / matmul)
    if peak_tflops:
        st["peak_share"] = gflop * st["median"] / (peak_tflops * 1e3)  # model FLOP utilisation
    return st


def peak_tflops(info: dict[str, Any], args: argparse.Namespace) -> float | None:
    """--peak-tflops, else the stated peak of a known card at --precision, else None (CPUs)."""
    return args.peak_tflops or stated_peak(info.get("gpu", ""), args.precision)


def stated_peak(device_name: str, precision: str) -> float | None:
    """The PEAK_TFLOPS entry at ``precision`` of the longest key found in ``device_name`` (so "H100 PCIe"
    and "H200 NVL" win over "H100" and "H200"), else None."""
    keys = [k for k in PEAK_TFLOPS if k in device_name]
    return PEAK_TFLOPS[max(keys, key=len)][precision] if keys else None


def grouping_seconds(cfg: Config, batch: int, dev: torch.device, repeats: int) -> float:
    """Median seconds of one grouping (FPS of the centers + kNN) of a batch, as every model does per forward."""
    pts = random_clouds(cfg, batch, dev, torch.Generator().manual_seed(1))  # the steps' clouds
    run = torch.no_grad()(lambda: group(pts, cfg.patches.num_patches, cfg.patches.patch_size))
    run()
    return statistics.median(interleaved({"group": run}, repeats, synchronizer(dev))["group"])


def input_fps_seconds(cfg: Config, batch: int, dev: torch.device, repeats: int) -> float:
    """Median seconds of the fine-tuning step's input sampling of a batch, as the training loop runs it before
    the model (tasks/finetune.py): ``fps_subsample`` of stored clouds of STORED_POINTS points, FPS of
    ``data.point_pool`` of them, one random subset of ``data.num_points``. The steps' model step starts after it."""
    g = torch.Generator().manual_seed(1)
    stored = (torch.rand(batch, STORED_POINTS, 3, generator=g) * 2 - 1).to(dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    run = lambda: fps_subsample(stored, cfg.data.num_points, cfg.data.point_pool, gen)
    run()
    return statistics.median(interleaved({"fps": run}, repeats, synchronizer(dev))["fps"])


def grouping_shares(case: str, cfg: Config, batch: int, dev: torch.device, repeats: int,
                    step_s: float) -> dict[str, float]:
    """Seconds of the grouping (FPS + kNN) and its share of pointbert's step of ``step_s`` seconds; for the
    fine-tuning step also of its input FPS, whose share, and that of both (``fps_knn_share``), are of the
    training loop's step: the model step plus the input sampling."""
    group_s = grouping_seconds(cfg, batch, dev, repeats)
    out = {"grouping_seconds": group_s, "grouping_share": group_s / step_s}
    if case == "finetune":
        fps_s = input_fps_seconds(cfg, batch, dev, repeats)
        out.update(input_fps_seconds=fps_s, input_fps_share=fps_s / (step_s + fps_s),
                   fps_knn_share=(group_s + fps_s) / (step_s + fps_s))
    return out


def run_steps(args: argparse.Namespace, dev: torch.device, matmul: float) -> Iterator[tuple[str, dict[str, Any]]]:
    """Each case of the steps section, ours against plain in one process; yields (case, result) as each completes."""
    for case in args.steps.split(","):
        cfg = preset(CASE_PRESET[case])
        t0 = time.perf_counter()
        step_memory = not args.quick or case in ("finetune", "inference")  # --quick: the memory target's cases
        models, runs, memory = build_pair(case, cfg, args.batch, args, dev, not args.no_plain, step_memory)
        times = interleaved(runs, args.repeats, synchronizer(dev))
        res = {impl: dict(step_row(case, cfg, times[impl], args.batch, matmul, args.peak_tflops),
                          step_mib=memory["step"].get(impl), footprint_mib=memory["footprint"][impl]) for impl in runs}
        res["ours"].update(grouping_shares(case, cfg, args.batch, dev, args.repeats, res["ours"]["seconds"]))
        if "plain" in res:
            res["ratio"] = res["ours"]["median"] / res["plain"]["median"]
            res["ratio_min_max"] = [min(tp / to for tp, to in zip(times["plain"], times["ours"])),
                                    max(tp / to for tp, to in zip(times["plain"], times["ours"]))]
            if "compiled" in res:
                res["ratio_compiled"] = res["compiled"]["median"] / res["plain"]["median"]
        res["wall_s"] = time.perf_counter() - t0
        print_step(case, res)
        del models, runs
        gc.collect()
        yield case, res


# --------------------------------------------------------------------------------------------------
# Each implementation in its own process
# --------------------------------------------------------------------------------------------------


def run_worker(args: argparse.Namespace, dev: torch.device) -> None:
    """One implementation of one case in this process, as it is used: pointbert as in a loop of one's own
    (its training cases apply its memory policy at their first training forward on CPU, its inference
    none); the plain twin as the official code runs, with glibc's default. Prints JSON."""
    case, impl = args.worker.split(":")
    memory.automatic = impl != "plain"
    cfg = preset(CASE_PRESET[case])
    with PeakMemory(dev) as footprint:
        _, run = build_warm(case, impl, cfg, args.batch, args, dev)
    with PeakMemory(dev) as step:
        run()
        synchronizer(dev)()
    times = interleaved({impl: run}, args.repeats, synchronizer(dev))[impl]
    print(json.dumps({"times": times, "step_mib": step.mib, "footprint_mib": footprint.mib}))


def run_isolated(args: argparse.Namespace, dev: torch.device, matmul: float) -> Iterator[tuple[str, dict[str, Any]]]:
    """The steps of each case with ours and plain each in processes of their own (two rounds, ours,
    plain, plain, ours, half the repeats each), so neither shapes the other's heap. Yields (case, result)."""
    half = max(1, (args.repeats + 1) // 2)
    for case in args.steps.split(","):
        cfg = preset(CASE_PRESET[case])
        t0 = time.perf_counter()
        times: dict[str, list[float]] = {"ours": [], "plain": []}
        rounds: dict[str, list[float]] = {"ours": [], "plain": []}
        mem: dict[str, dict[str, Any]] = {}
        for impl in ("ours", "plain", "plain", "ours"):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", f"{case}:{impl}", "--device",
                   args.device, "--precision", args.precision, "--batch", str(args.batch), "--warmup",
                   str(args.warmup), "--repeats", str(half)]
            cmd += ["--threads", str(args.threads)] if args.threads else []
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"isolated {case} {impl} failed:\n{done.stderr[-2000:]}")
            res = json.loads(done.stdout.strip().splitlines()[-1])
            times[impl] += res["times"]
            rounds[impl].append(statistics.median(res["times"]))
            mem[impl] = res
        res = {impl: dict(step_row(case, cfg, times[impl], args.batch, matmul, args.peak_tflops),
                          step_mib=mem[impl]["step_mib"], footprint_mib=mem[impl]["footprint_mib"]) for impl in times}
        res["ours"].update(grouping_shares(case, cfg, args.batch, dev, args.repeats, res["ours"]["seconds"]))
        res["ratio"] = res["ours"]["median"] / res["plain"]["median"]
        per_round = [tp / to for tp, to in zip(rounds["plain"], rounds["ours"])]  # medians of round 1, of round 2
        res["ratio_min_max"] = [min(per_round), max(per_round)]
        res["wall_s"] = time.perf_counter() - t0
        print_step(f"{case} (each in its own process)", res, spread="per round")
        yield case, res


# --------------------------------------------------------------------------------------------------
# Ops alone
# --------------------------------------------------------------------------------------------------


def patched(owner: Any, name: str, value: Any, fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` run with ``owner.name`` set to ``value`` (e.g. ``pointbert.ops.FPS_BACKEND``), restored after."""
    def run() -> Any:
        saved = getattr(owner, name)
        setattr(owner, name, value)
        try:
            return fn()
        finally:
            setattr(owner, name, saved)
    return run


def run_ops(args: argparse.Namespace, dev: torch.device, matmul: float) -> Iterator[tuple[str, dict[str, Any]]]:
    """FPS, kNN and Chamfer alone, ours against the plain stand-ins; yields (op, result) as each completes."""
    g = torch.Generator().manual_seed(0)
    B = args.batch
    x1k = (torch.rand(B, 1024, 3, generator=g) * 2 - 1).to(dev)
    x8k = (torch.rand(B, 8192, 3, generator=g) * 2 - 1).to(dev)
    centers = ops.gather(x1k, ops.fps(x1k, 64))
    pred = (torch.rand(2048, 32, 3, generator=g) * 0.2 - 0.1).to(dev).requires_grad_()
    gt = (torch.rand(2048, 32, 3, generator=g) * 0.2 - 0.1).to(dev)

    def chamfer(fn: Callable) -> Callable[[], None]:
        def run() -> None:
            pred.grad = None
            fn(pred, gt).backward()
        return run

    cases = [(f"fps {m} of 1024", B, lambda m=m: ops.fps(x1k, m), lambda m=m: plain.fps(x1k, m))
             for m in (64, 128, 512)]
    if not args.quick:
        cases.append(("fps 512 of 8192", B, lambda: ops.fps(x8k, 512), lambda: plain.fps(x8k, 512)))
        pool = 1200  # the fine-tuning input pool (data.point_pool)
        cases.append((f"fps {pool} of 8192", B, lambda: ops.fps(x8k, pool), lambda: plain.fps(x8k, pool)))
        if dev.type == "cuda":  # the Triton kernel's gain: ours with the tensor loop against the same plain run
            cases.append((f"fps {pool} of 8192, tensor loop", B,
                          patched(ops, "FPS_BACKEND", "torch", lambda: ops.fps(x8k, pool)),
                          lambda: plain.fps(x8k, pool)))
            for warps in (4, 8, 16):  # the kernel's warps per cloud
                cases.append((f"fps {pool} of 8192, {warps} warps", B,
                              patched(kernels, "NUM_WARPS", warps, lambda: ops.fps(x8k, pool)),
                              lambda: plain.fps(x8k, pool)))
    cases += [("knn 64x32 of 1024", B, lambda: ops.knn(centers, x1k, 32), lambda: plain.knn_point(32, x1k, centers)),
              ("chamfer-L1 2048x32 fwd+bwd", 2048, chamfer(ops.chamfer_l1), chamfer(plain.chamfer_l1))]
    out = {}
    repeats = 3 if args.quick else 10
    for name, samples, ours, base in cases:
        runs = {"ours": ours} if args.no_plain else {"ours": ours, "plain": base}
        interleaved(runs, 1, synchronizer(dev))  # warm-up
        times = interleaved(runs, repeats, synchronizer(dev))
        res = {impl: rate_stats(t, samples) for impl, t in times.items()}
        if "plain" in res:
            res["ratio"] = res["ours"]["median"] / res["plain"]["median"]
        out[name] = res
        yield name, res
    print_table("ops alone (samples/s: clouds, or patches for Chamfer)", ["op", "ours ms", "ours/s", "plain ms",
                                                                             "plain/s", "ours/plain"],
                [[n, r["ours"]["seconds"] * 1e3, r["ours"]["median"], _get(r, "plain", "seconds", 1e3),
                  _get(r, "plain", "median"), r.get("ratio")] for n, r in out.items()])


# --------------------------------------------------------------------------------------------------
# Fast paths on and off
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def fast_path_flags(model: nn.Module, **flags: Any):
    """Set fast-path attributes (class-level defaults of PatchEmbed, DGCNN, FoldingDecoder, DiscreteVAE) on every
    submodule whose class defines them, for the duration of the block."""
    touched = [(m, k) for m in model.modules() for k in flags if hasattr(type(m), k)]
    for m, k in touched:
        setattr(m, k, flags[k])
    try:
        yield
    finally:
        for m, k in touched:
            delattr(m, k)  # back to the class default


def run_fastpaths(args: argparse.Namespace, dev: torch.device, matmul: float) -> Iterator[tuple[str, dict[str, Any]]]:
    """Each case with each fast path switched off (and torch.compile with --compile); yields (case, result)."""
    variants = {
        "tokenizer": {"split_edges off": dict(split_edges=False), "split_first off": dict(split_first=False),
                      "compose_local off": dict(compose_local=False), "split_global off": dict(split_global=False),
                      "uniform_noise off": dict(uniform_noise=False),
                      "all fast paths off": dict(split_edges=False, split_first=False, split_global=False,
                                                 uniform_noise=False)},
        "finetune": {"compose_local off": dict(compose_local=False),
                     "split_global off": dict(split_global=False)},  # fold_bn / chunk_patches: eval only
        "inference": {"compose_local off": dict(compose_local=False), "split_global off": dict(split_global=False),
                      "fold_bn off": dict(fold_bn=False),
                      "chunk_patches off": dict(chunk_patches=0),
                      "all fast paths off": dict(split_global=False, fold_bn=False, chunk_patches=0)},
    }
    for case, flag_sets in variants.items():
        if case not in args.steps.split(",") or (args.quick and case == "tokenizer"):
            continue
        cfg = preset(CASE_PRESET[case])
        t0 = time.perf_counter()
        models, built, _ = build_pair(case, cfg, args.batch, args, dev, with_plain=False, step_memory=False)
        if args.compile:  # build_pair built and warmed up the train.compile twin too (grouping stays eager)
            print(f"  ours and torch.compile built and warmed up ({case}): {time.perf_counter() - t0:.0f} s")
        model, default = models["ours"], built["ours"]
        runs = {"ours (defaults)": default}
        for name, flags in flag_sets.items():
            runs[name] = lambda flags=flags, model=model, default=default: _with_flags(model, flags, default)
        if case == "finetune":
            loop = build_optimizer(model, replace(cfg.optim, fused=False))
            runs["AdamW per-tensor loop"] = make_step(case, model, cfg, args.batch, dev, args.precision, loop)
        if "compiled" in built:
            runs["torch.compile (option)"] = built["compiled"]
        interleaved({k: v for k, v in runs.items() if k != "ours (defaults)"}, 1, synchronizer(dev))  # warm-up
        times = interleaved(runs, args.repeats, synchronizer(dev))
        base = statistics.median(times["ours (defaults)"])
        res = {name: dict(rate_stats(t, args.batch), vs_defaults=base / statistics.median(t))
               for name, t in times.items()}
        print_table(f"fast paths: {case} (batch {args.batch})", ["variant", "samples/s", "min", "max", "vs defaults"],
                    [[n, r["median"], r["min"], r["max"], r["vs_defaults"]] for n, r in res.items()])
        del models, built, runs
        gc.collect()
        yield case, res


def _with_flags(model: nn.Module, flags: dict[str, Any], run: Callable[[], None]) -> None:
    with fast_path_flags(model, **flags):
        run()


# --------------------------------------------------------------------------------------------------
# Scaling with the number of points
# --------------------------------------------------------------------------------------------------


def run_scaling(args: argparse.Namespace, dev: torch.device, matmul: float) -> Iterator[tuple[str, dict[str, Any]]]:
    """Fine-tuning step and inference of ours (eager) at 1k-8k points; yields (preset case, result)."""
    out, rows = {}, []
    eager = argparse.Namespace(**{**vars(args), "compile": False})  # no compiled twin to build for the table
    names = ["modelnet40-1k", "modelnet40-2k"] + ([] if args.quick else ["modelnet40-4k", "modelnet40-8k"])
    repeats = 1 if args.quick else max(2, args.repeats // 2)
    for name in names:
        cfg = preset(name)
        for case in ("finetune", "inference"):
            _, runs, memory = build_pair(case, cfg, args.scaling_batch, eager, dev, with_plain=False, step_memory=False)
            res = step_row(case, cfg, interleaved(runs, repeats, synchronizer(dev))["ours"], args.scaling_batch,
                           matmul, args.peak_tflops)
            res["footprint_mib"] = memory["footprint"]["ours"]
            out[f"{name} {case}"] = res
            first = out[f"modelnet40-1k {case}"]
            rows.append([f"{cfg.data.num_points} pts / {cfg.patches.num_patches} patches", case, res["median"],
                         res["gflops"], f"{res['matmul_share']:.0%}",
                         res["model_gflop_per_cloud"] / first["model_gflop_per_cloud"],
                         res["seconds"] / first["seconds"], res["footprint_mib"]])
            del runs
            gc.collect()
            yield f"{name} {case}", res
    print_table(f"scaling (pointbert, batch {args.scaling_batch})",
                ["points / patches", "case", "samples/s", "GFLOP/s", "of matmul", "work x", "time x", "footprint MiB"],
                rows)


# --------------------------------------------------------------------------------------------------
# Printing
# --------------------------------------------------------------------------------------------------


def _get(res: dict, impl: str, key: str, scale: float = 1.0) -> float | None:
    return res[impl][key] * scale if impl in res else None


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def print_table(title: str, headers: list[str], rows: list[list[Any]]) -> None:
    cells = [headers] + [[_fmt(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    print(f"\n{title}")
    for j, r in enumerate(cells):
        print("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            print("  " + "  ".join("-" * w for w in widths))


def print_step(case: str, res: dict[str, Any], spread: str = "per repeat") -> None:
    rows = []
    for impl in ("ours", "compiled", "plain"):
        if impl in res:
            r = res[impl]
            rows.append([impl, r["median"], r["min"], r["max"], r["gflops"], f"{r['matmul_share']:.0%}"]
                        + ([f"{r['peak_share']:.1%}"] if "peak_share" in r else [])
                        + [r["step_mib"], r["footprint_mib"]])
    ratio = ""
    if "ratio" in res:
        lo, hi = res["ratio_min_max"]
        ratio = f"; ours/plain {res['ratio']:.2f}x ({spread} {lo:.2f}-{hi:.2f})"
        if "ratio_compiled" in res:
            ratio += f", compiled/plain {res['ratio_compiled']:.2f}x"
    peak = ["of peak"] if "peak_share" in res["ours"] else []
    ours = res["ours"]
    fps = (f"; input FPS {ours['input_fps_share']:.1%}, FPS + kNN {ours['fps_knn_share']:.1%} of the step with it"
           if "input_fps_share" in ours else "")
    print_table(f"{case} step: {ours['model_gflop_per_cloud']:.2f} model GFLOP per cloud{ratio}; "
                f"grouping (FPS + kNN) {ours['grouping_share']:.1%} of ours{fps}",
                ["impl", "samples/s", "min", "max", "GFLOP/s", "of matmul", *peak, "step MiB", "footprint MiB"], rows)


def print_targets(results: dict[str, Any]) -> None:
    steps = results.get("steps", {})
    rows = []
    for case, target in TARGETS.items():
        if "ratio" in steps.get(case, {}):
            r = steps[case]["ratio"]
            rows.append([f"{case}: ours / plain >= {target}x", f"{r:.2f}x", "met" if r >= target else "not met"])
    for case, target in TARGETS.items():
        if case in results.get("isolated", {}):
            r = results["isolated"][case]["ratio"]
            rows.append([f"{case}, own processes: ours / plain >= {target}x", f"{r:.2f}x",
                         "met" if r >= target else "not met"])
    if "finetune" in steps:
        share = steps["finetune"]["ours"]["matmul_share"]
        rows.append([f"finetune: >= {MATMUL_SHARE_TARGET:.0%} of matmul", f"{share:.0%}",
                     "met" if share >= MATMUL_SHARE_TARGET else "not met"])
        ours, base = steps["finetune"]["ours"]["step_mib"], steps["finetune"].get("plain", {}).get("step_mib")
        if ours is not None and base is not None:
            rows.append(["finetune: step peak memory <= plain", f"{ours:.0f} vs {base:.0f} MiB",
                         "met" if ours <= base else "not met"])
    if rows:
        print_table("targets (issue 6; only a quiet machine's full run counts)", ["target", "measured", ""], rows)


def save_json(path: Path | None, results: dict[str, Any]) -> None:
    """Write ``results`` to ``path`` (if any) atomically: a temporary file in the same folder, then os.replace."""
    if path is not None:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(results, indent=1))
        os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> dict[str, Any]:
    sys.stdout.reconfigure(line_buffering=True)  # progress shows when piped to a file
    if args.compile_mode not in COMPILE_MODES:
        sys.exit(f"--compile-mode must be one of {', '.join(COMPILE_MODES)}, got {args.compile_mode!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.allocator == "keep":
        memory.keep_freed_memory()
    else:  # both implementations under the same policy: not pointbert's at its first training forward either
        memory.automatic = False
    dev = torch.device(args.device)
    if args.worker:
        run_worker(args, dev)
        return {}
    t_start = time.perf_counter()
    info = machine(dev)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    if dev.type == "cuda":  # large enough to fill the card, several per sync
        n, products = 8192, 10
    else:  # CPUs without bf16 units: ~1 GFLOP/s
        n, products = 512 if dtype == torch.bfloat16 else 2048, 1
    matmul = matmul_gflops(dev, dtype, 3 if args.quick else 5, n, products)
    info.update(matmul_gflops=matmul, matmul_dtype=str(dtype).removeprefix("torch."), matmul_n=n,
                matmul_products=products)
    if dev.type == "cpu":
        info["page_fault_us"] = page_fault_us()
    args.peak_tflops = info["peak_tflops"] = peak_tflops(info, args)  # given, or the card's stated peak
    settings = {k: (v.name if isinstance(v, Path) else v) for k, v in vars(args).items()}  # no paths of the machine
    print(f"{info['cpu']} ({info['logical_cpus']} logical CPUs, {info['torch_threads']} torch threads)"
          + (f", {info['gpu']}" if "gpu" in info else "")
          + f"; torch {info['torch']}, numpy {info['numpy']}, python {info['python']}")
    mm = f"{n}^3" + (f" x {products} per call" if products > 1 else "")
    print(f"settings: batch {args.batch}, {args.precision}, warm-up {args.warmup}, repeats {args.repeats}, "
          f"allocator {args.allocator}; matmul {mm} {info['matmul_dtype']}: {matmul:.1f} GFLOP/s"
          + (f"; stated peak {args.peak_tflops:.1f} TFLOP/s" if args.peak_tflops else "")
          + (f"; page fault {info['page_fault_us']:.1f} us" if "page_fault_us" in info else ""))
    results: dict[str, Any] = {"machine": info, "settings": settings}
    save_json(args.out, results)
    sections = {"ops": run_ops, "steps": run_steps, "isolated": run_isolated, "fastpaths": run_fastpaths,
                "scaling": run_scaling}
    for name, run in sections.items():
        if name in args.sections.split(","):
            results[name] = {}
            for key, res in run(args, dev, matmul):
                results[name][key] = res
                save_json(args.out, results)  # after each case: a run cut short leaves what it measured
    print_targets(results)
    if dev.type == "cpu":
        info["page_fault_us_end"] = page_fault_us()
        print(f"\npage fault at the end: {info['page_fault_us_end']:.1f} us (start {info['page_fault_us']:.1f})")
    results["wall_s"] = time.perf_counter() - t_start
    print(f"\ntotal {results['wall_s']:.0f} s")
    if args.out:
        save_json(args.out, results)
        print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main(ARGS)
