"""CPU memory policy of the process: keep freed memory for reuse instead of handing it back to the OS.

By default glibc serves every allocation above 32 MiB with a fresh ``mmap`` and unmaps it on ``free``;
the kernel then zero-fills the pages one by one on first touch. A training step allocates gigabytes of
such tensors (the activations of the point-wise MLPs over B*G*K points and their gradients), so on CPU a
large share of the step goes to page faults: on the 2-core development VM the full-size tokenizer step at
batch 32 took about 1.15 million minor faults and 10.0-10.4 s per step, 0-1 faults and 5.8-6.0 s with freed
memory kept (benchmarks/README.md). PyTorch has no caching allocator on CPU; the usual advice is to preload jemalloc
or tcmalloc. :func:`keep_freed_memory` gets the same effect from glibc itself, at run time.

:func:`pointbert.engine.fit` applies it on CPU unless ``train.keep_memory=false``; the cost is that the
process's resident memory stays at its peak instead of shrinking between steps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc mallopt parameters
_applied = False


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
    if not _applied:
        libc = _glibc()
        if libc is None:
            return False
        _applied = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    return _applied
