"""CPU memory policy of the process: keep freed memory for reuse instead of handing it back to the OS.

By default glibc serves every allocation above 32 MiB with a fresh ``mmap`` and unmaps it on ``free``;
the kernel then zero-fills the pages one by one on first touch. A training step allocates gigabytes of
such tensors (the activations of the point-wise MLPs over B*G*K points and their gradients), so on CPU a
large share of the step goes to page faults: on the 2-core development VM the full-size tokenizer step at
batch 32 took about 1.15 million minor faults and 10.0-10.4 s per step, 0-1 faults and 5.8-6.0 s with freed
memory kept (benchmarks/README.md). PyTorch has no caching allocator on CPU; the usual advice is to preload jemalloc
or tcmalloc. :func:`keep_freed_memory` gets the same effect from glibc itself, at run time.

It is applied once per process, at the first training-mode forward of a pointbert model on CPU with
autograd on (:func:`on_cpu_training`, called by the mini-PointNet every model shares), so training loops
of one's own get it as the training commands do. Like PyTorch's CUDA caching allocator it is process-wide
(other code in the process gets it too) and the process's resident memory then stays at its peak instead
of shrinking between steps. To keep glibc's default: ``POINTBERT_KEEP_MEMORY=0`` in the environment,
``pointbert.memory.automatic = False`` before training, or ``train.keep_memory=false`` for the commands.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

import torch

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc mallopt parameters

automatic = os.environ.get("POINTBERT_KEEP_MEMORY", "1").strip().lower() not in ("0", "false", "no", "off")
"""Whether :func:`on_cpu_training` applies the policy (the models' default)."""

_applied: bool | None = None  # None: not tried yet


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 (musl and others lack it, and mallopt's parameters)
        return libc
    except (OSError, AttributeError):
        return None


def keep_freed_memory() -> bool:
    """glibc: serve allocations from the heap and never trim it, so freed pages are reused.

    Process-wide and idempotent. Returns whether the policy is in force (False off Linux/glibc).
    """
    global _applied
    if _applied is None:
        libc = _glibc()
        _applied = libc is not None and bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(
            libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    return _applied


@torch.compiler.disable
def on_cpu_training() -> None:
    """The models' hook, at every training-mode forward on CPU: :func:`keep_freed_memory` once, if
    :data:`automatic`; a few microseconds after the first call."""
    if automatic and _applied is None:
        keep_freed_memory()
