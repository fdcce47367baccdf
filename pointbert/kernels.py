"""Optional Triton kernel for farthest point sampling on CUDA.

:func:`pointbert.ops.fps` is a loop of ``num - 1`` steps of a few batched tensor ops: exact and fine on
the CPU, but on a GPU each step is a handful of tiny kernel launches, and the fine-tuning input FPS
(1200 of 8192 points) costs thousands of them per training step. Here one Triton program per cloud
keeps the whole cloud in registers and runs every step itself, as the pointnet2_ops CUDA kernel does.

The arithmetic and the tie rule are those of the tensor loop, so the picks are the same bit for bit:
inputs in the kernel's scan order (see ``pointbert.ops._fps_scan_order``), float32, the distance as
``(dx*dx + dy*dy) + dz*dz`` with FMA contraction disabled, a running minimum, and the first maximum in
scan order. Triton is not a requirement: it ships with the CUDA builds of PyTorch on Linux, and
without it :func:`pointbert.ops.fps` keeps its tensor loop. Tests run this kernel on the CPU through
Triton's interpreter (``TRITON_INTERPRET=1``), which checks the arithmetic; the interpreter's argmax always
takes the first maximum, so the compiled tie rule is checked by the ``gpu`` tests on a card (exact ties
among duplicated points and, with as many picks as points, among the final zero distances).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os

import torch
from torch import Tensor

__all__ = ["available", "built", "fps_scan"]

#: The largest cloud one program holds (its registers spill to local memory well before); larger ones use the loop.
MAX_POINTS = 16384
#: Warps per program; None: 4 to 16 by the cloud's size (the benchmark tries others).
NUM_WARPS: int | None = None
_ran = False  # set once a launch has succeeded


def built() -> bool:
    """Whether the kernel has run once in this process (so a later failure is not a build problem)."""
    return _ran


def available() -> bool:
    """Whether Triton can be imported (it need not be: the tensor loop is the fallback)."""
    return importlib.util.find_spec("triton") is not None


@functools.cache
def _kernel(interpret: bool):
    """The jitted kernel. Triton picks its interpreter when the function is decorated, so each mode
    gets its own build (``interpret`` is ``TRITON_INTERPRET`` at the time of the call)."""
    import triton
    import triton.language as tl

    @triton.jit
    def fps_kernel(xyz_ptr, temp_ptr, out_ptr, n, num, plane, BLOCK: tl.constexpr):
        # xyz: (3, B, n) float32 in scan order, plane = B * n; temp: (B, n) float32, 1e10 or -1 for skipped
        # points; out: (B, num) int64 scan positions, out[:, 0] = 0 written by the caller.
        b = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        inside = offs < n
        base = xyz_ptr + b * n
        x = tl.load(base + offs, mask=inside, other=0.0)
        y = tl.load(base + plane + offs, mask=inside, other=0.0)
        z = tl.load(base + 2 * plane + offs, mask=inside, other=0.0)
        temp = tl.load(temp_ptr + b * n + offs, mask=inside, other=float("-inf"))  # padding never wins
        last = tl.zeros((), dtype=tl.int64)
        for i in range(1, num):
            cx = tl.load(base + last)
            cy = tl.load(base + plane + last)
            cz = tl.load(base + 2 * plane + last)
            dx = x - cx
            dy = y - cy
            dz = z - cz
            dist = dx * dx + dy * dy
            dist = dist + dz * dz
            temp = tl.minimum(temp, dist, propagate_nan=tl.PropagateNan.ALL)  # as torch.minimum
            last = tl.argmax(temp, 0, tie_break_left=True).to(tl.int64)
            tl.store(out_ptr + b * num + i, last)

    return fps_kernel


def fps_scan(xyz: Tensor, temp: Tensor, num: int) -> Tensor:
    """Run the FPS steps on clouds already in scan order.

    Args:
        xyz: (3, B, N) float32, contiguous, N <= MAX_POINTS (the tensor loop's layout).
        temp: (B, N) float32: 1e10, or -1 for points the skip rule excludes.
        num: picks per cloud, 1 <= num <= N.

    Returns:
        (B, num) int64 scan positions, the first 0.
    """
    import triton

    _, bsz, n = xyz.shape
    block = triton.next_power_of_2(n)
    out = torch.zeros(bsz, num, dtype=torch.long, device=xyz.device)
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    kernel = _kernel(interpret)
    warps = NUM_WARPS or min(16, max(4, block // 512))  # 512 threads at 8192 points, 16 points each
    options = {} if interpret else {"num_warps": warps, "enable_fp_fusion": False}
    with torch.cuda.device(xyz.device) if xyz.is_cuda else contextlib.nullcontext():  # Triton's current device
        kernel[(bsz,)](xyz, temp, out, n, num, bsz * n, BLOCK=block, **options)
    global _ran
    _ran = True
    return out
