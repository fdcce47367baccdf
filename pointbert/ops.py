"""Point operations in plain PyTorch: FPS, kNN, gather, max-pool, 3-NN interpolation, Chamfer distances.

These replace the CUDA extensions of the official code (pointnet2_ops, KNN_CUDA, chamfer_dist) and
run on any device, batched over the first dimension with no per-sample Python loops.

* :func:`fps` reproduces the pointnet2_ops ``furthest_point_sampling_kernel`` bit for bit (start
  index, float32 arithmetic, the ``|p|^2 <= 1e-3`` skip rule and the kernel's tie-breaking), so
  imported checkpoints see the same patch centers.
* :func:`square_distance` / :func:`knn` rank neighbours with the expanded ``-2ab + a^2 + b^2`` form of
  the official grouping code, so near-ties at the k-th neighbour are decided the same way.
* :func:`chamfer` uses exact coordinate differences (like the chamfer_dist extension) and keeps
  memory bounded by chunking the nearest-neighbour search.

Shapes: B batch, N / M / S numbers of points, C channels. Index tensors are int64.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch
from torch import Tensor

__all__ = [
    "fps",
    "square_distance",
    "knn",
    "gather",
    "max_pool",
    "interpolate_3nn",
    "chamfer",
    "chamfer_l1",
    "chamfer_l2",
]

# Largest number of elements of one pairwise-distance block (B x rows x N) built by knn / chamfer:
# 2**24 float32 elements = 64 MiB. Results do not depend on it (tests shrink it to force chunking).
_CHUNK_ELEMENTS = 2**24
# A chunk keeps at least this many rows: CPU BLAS computes a (B, 1 or 2, 3) x (B, 3, N) product with
# another kernel than the full matrix, whose float32 rounding differs in the last bit.
_MIN_CHUNK_ROWS = 16

_FPS_MAX_THREADS = 512  # MAX_THREADS in pointnet2_ops cuda_utils.h


@functools.lru_cache(maxsize=64)
def _fps_scan_order(n: int, device: torch.device) -> Tensor:
    """Order in which the FPS kernel prefers exactly tied points: a permutation (n,) of ``arange(n)``.

    The kernel runs ``T = min(2**floor(log2 n), 512)`` threads; thread ``t`` scans ``k = t, t+T, ...``
    keeping the first strict maximum, then a shared-memory tree reduction merges slot ``i`` with
    slot ``i + s`` for ``s = T/2, T/4, ..., 1``, keeping the lower slot unless the upper is strictly
    greater. Two tied threads therefore first meet at the level of their lowest differing bit, where
    the one with a 0 in that bit wins: threads are ranked by their *bit-reversed* id. Listing the
    points thread by thread in that rank, each thread's points in increasing ``k``, makes "first
    maximum" (``torch.argmax``) pick exactly the kernel's winner. Index 0 comes first.

    Built on the CPU (its boolean selection would wait for a GPU) and kept per (n, device): read-only.
    """
    threads = min(1 << (max(n, 1).bit_length() - 1), _FPS_MAX_THREADS)
    bits = threads.bit_length() - 1
    t = torch.arange(threads)
    rev = torch.zeros_like(t)  # rev[r] = bit-reversal of r = the thread ranked r-th
    for b in range(bits):
        rev |= ((t >> b) & 1) << (bits - 1 - b)
    k = rev[:, None] + threads * torch.arange(-(-n // threads))[None, :]  # (T, ceil(n/T))
    return k[k < n].to(device)  # (n,), row-major: rank first, then k


#: Which implementation :func:`fps` runs: "auto" (the Triton kernel for float32 on CUDA when Triton is
#: installed, else the tensor loop), "triton" (always the kernel, also on the CPU through Triton's
#: interpreter, for tests) or "torch" (always the loop). Set by the POINTBERT_FPS environment variable.
FPS_BACKEND = os.environ.get("POINTBERT_FPS", "auto")


def _fps_kernel_wanted(xyz: Tensor, n: int) -> bool:
    from . import kernels

    if FPS_BACKEND not in ("auto", "triton", "torch"):
        from .errors import PointBERTError

        raise PointBERTError(f"POINTBERT_FPS must be auto, triton or torch, not {FPS_BACKEND!r}")
    if FPS_BACKEND == "torch" or xyz.dtype != torch.float32 or n > kernels.MAX_POINTS:
        return False
    return FPS_BACKEND == "triton" or (xyz.is_cuda and kernels.available())


@torch.no_grad()
def fps(points: Tensor, num: int) -> Tensor:
    """Farthest point sampling exactly as pointnet2_ops ``furthest_point_sample``.

    Args:
        points: (B, N, 3) float coordinates.
        num: number of points to select, ``0 <= num <= N``.

    Returns:
        (B, num) int64 indices into N, in selection order. The first index is always 0, and
        ``fps(x, a)`` is a prefix of ``fps(x, b)`` for ``a < b``.

    Semantics of the CUDA kernel, reproduced exactly:

    * a running min squared distance per point starts at 1e10; each step computes
      ``(x2-x1)*(x2-x1) + (y2-y1)*(y2-y1) + (z2-z1)*(z2-z1)`` to the last selected point, takes the
      running minimum and selects its argmax;
    * points with ``x*x + y*y + z*z <= 1e-3`` (the square norm compared in double precision, as in C)
      are skipped: never updated and never selectable; only when every point is skipped is index 0
      selected again;
    * exact ties go to the kernel's winner (see :func:`_fps_scan_order`), *not* simply to the lowest
      index. After all distinct points are taken, the remaining picks repeat such tied points.

    Arithmetic is float32 (the kernel's type) for float32/16/bfloat16 input and float64 for float64
    input. Not differentiable. On the CPU (and without Triton) each of the ``num - 1`` steps is a few
    batched tensor ops with no host synchronisation; float32 on CUDA runs all steps in one Triton kernel
    (:mod:`pointbert.kernels`) that gives the same picks (``FPS_BACKEND`` chooses). nvcc may contract
    the distance into FMAs, so a float tie that exists only in the last bit could in principle resolve
    differently from a given build of the official kernel.
    """
    if points.dim() != 3 or points.shape[-1] != 3:
        raise ValueError(f"fps expects points of shape (B, N, 3), got {tuple(points.shape)}")
    bsz, n, _ = points.shape
    if num < 0 or num > n:
        raise ValueError(f"cannot sample {num} centers from a cloud of {n} points")
    dev = points.device
    if num == 0:
        return torch.empty(bsz, 0, dtype=torch.long, device=dev)

    work = torch.float64 if points.dtype == torch.float64 else torch.float32
    order = _fps_scan_order(n, dev)  # (N,) scan position -> original index
    xyz = points.detach().to(work)[:, order].permute(2, 0, 1).contiguous()  # (3, B, N) in scan order

    # Skip rule `mag <= 1e-3` with a float mag promoted to double: compare against the largest
    # value of the work dtype that is <= 1e-3 (float32(1e-3) itself is slightly above 1e-3).
    thr = torch.tensor(1e-3, dtype=work)
    if thr.item() > 1e-3:
        thr = torch.nextafter(thr, torch.zeros_like(thr))
    mag = xyz[0] * xyz[0] + xyz[1] * xyz[1] + xyz[2] * xyz[2]  # (B, N)
    temp = torch.full((bsz, n), 1e10, dtype=work, device=dev)
    temp.masked_fill_(mag <= thr.item(), -1.0)  # skipped: below any real distance, min() keeps it

    if _fps_kernel_wanted(xyz, n):
        from . import kernels

        global FPS_BACKEND
        try:
            return order[kernels.fps_scan(xyz, temp, num)]  # (B, num)
        except Exception as e:  # a Triton that cannot build it: say so once, keep the exact tensor loop
            if FPS_BACKEND != "auto" or kernels.built():
                raise
            warnings.warn(f"the Triton FPS kernel failed to build ({type(e).__name__}: {e}); "
                          "using the tensor loop (set POINTBERT_FPS=torch to skip the attempt)", stacklevel=2)
            FPS_BACKEND = "torch"

    diff = torch.empty_like(xyz)  # (3, B, N)
    dist = torch.empty_like(temp)  # (B, N)
    last = torch.zeros(bsz, 1, dtype=torch.long, device=dev)  # scan position of original index 0
    picks = [last]
    for _ in range(num - 1):
        cur = xyz.gather(2, last.expand(3, bsz, 1))  # (3, B, 1) last selected point
        torch.sub(xyz, cur, out=diff)
        diff.mul_(diff)
        torch.add(diff[0], diff[1], out=dist)
        dist.add_(diff[2])  # ((dx*dx + dy*dy) + dz*dz), the kernel's order
        torch.minimum(temp, dist, out=temp)
        last = temp.argmax(dim=1, keepdim=True)  # first maximum in scan order = kernel's winner
        picks.append(last)
    return order[torch.cat(picks, dim=1)]  # (B, num) original indices


def square_distance(src: Tensor, dst: Tensor) -> Tensor:
    """Pairwise squared Euclidean distances in the expanded form of the official grouping code.

    Args:
        src: (B, S, C) float.
        dst: (B, N, C) float, same dtype.

    Returns:
        (B, S, N) float32 (float64 for float64 inputs): ``-2 src.dst^T + |src|^2 + |dst|^2``, evaluated in
        exactly that order. Rounding can make it slightly negative for coincident points. Always computed
        outside autocast and at least in float32: in bf16 the expansion loses the small distances that
        rank neighbours (and in fp16 the 1e-8 of :func:`interpolate_3nn` underflows).
    """
    with torch.autocast(src.device.type, enabled=False):
        if src.dtype != torch.float64:
            src, dst = src.float(), dst.float()
        d = -2 * torch.matmul(src, dst.transpose(1, 2))
        d += (src**2).sum(-1)[:, :, None]
        d += (dst**2).sum(-1)[:, None, :]
    return d


def _row_slices(total: int, bsz: int, cols: int) -> list[slice]:
    """Split ``range(total)`` into near-equal slices whose (B, rows, cols) blocks fit ``_CHUNK_ELEMENTS``.

    Every slice has at least ``_MIN_CHUNK_ROWS // 2`` rows unless ``total`` itself is smaller.
    """
    rows = max(_MIN_CHUNK_ROWS, _CHUNK_ELEMENTS // max(1, bsz * cols))
    num = max(1, -(-total // rows))
    bounds = [total * i // num for i in range(num + 1)]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def knn(query: Tensor, points: Tensor, k: int) -> Tensor:
    """Indices of the k nearest points to each query point, ranked by :func:`square_distance`.

    Args:
        query: (B, S, 3) float (e.g. patch centers).
        points: (B, N, 3) float.
        k: neighbours per query, ``1 <= k <= N``.

    Returns:
        (B, S, k) int64 indices into N, sorted by increasing distance. Among exactly tied distances
        the choice is torch.topk's. Queries are processed in chunks for large B*S*N; the result does
        not depend on the chunking.
    """
    bsz, s, _ = query.shape
    n = points.shape[1]
    if k < 1 or k > n:
        raise ValueError(f"a patch of {k} points needs at least {k} points per cloud, got {n}")
    out = [
        square_distance(query[:, rows], points).topk(k, dim=-1, largest=False, sorted=True).indices
        for rows in _row_slices(s, bsz, n)
    ]
    return out[0] if len(out) == 1 else torch.cat(out, dim=1)


def gather(x: Tensor, idx: Tensor) -> Tensor:
    """Batched index select along dim 1.

    Args:
        x: (B, N, *F) any dtype.
        idx: (B, *I) int64 indices into N (any number of trailing dims, e.g. (B, G) or (B, G, K)).

    Returns:
        (B, *I, *F) with ``out[b, i...] = x[b, idx[b, i...]]``; differentiable w.r.t. x (repeated
        indices accumulate their gradients).
    """
    if idx.shape[0] != x.shape[0]:
        raise ValueError(f"gather: batch sizes differ, x {tuple(x.shape)} vs idx {tuple(idx.shape)}")
    bsz = x.shape[0]
    batch = torch.arange(bsz, device=x.device)[:, None]  # (B, 1)
    out = x[batch, idx.reshape(bsz, -1)]  # (B, prod(I), *F)
    return out.reshape(*idx.shape, *x.shape[2:])


def max_pool(x: Tensor, dim: int, keepdim: bool = False) -> Tensor:
    """Max over ``dim`` as the official code pools (``x.max(dim)[0]``): while gradients flow, ``Tensor.max``,
    whose backward routes each gradient to one arg-max and keeps only the indices (``amax`` would split it
    among ties, and its backward builds several full-size tensors); without, ``amax`` (the same values, no
    indices)."""
    if x.requires_grad:
        return x.max(dim=dim, keepdim=keepdim)[0]
    return x.amax(dim=dim, keepdim=keepdim)


def interpolate_3nn(query: Tensor, points: Tensor, feats: Tensor) -> Tensor:
    """PointNet++ feature propagation: inverse squared-distance interpolation from the 3 nearest points.

    Args:
        query: (B, S, 3) float, where features are wanted.
        points: (B, N, 3) float, where features are known.
        feats: (B, N, C) float features of ``points``.

    Returns:
        (B, S, C): ``sum_j w_j feats[j]`` over the 3 nearest points (by :func:`square_distance`) with
        ``w_j = 1 / (d2_j + 1e-8)`` normalised to sum 1, d2 the squared distance. With N == 2 both
        points are used, with N == 1 its feature is repeated (the official code only handles N == 1
        and N >= 3). d2 is clamped at 0 first: the expanded form can round a coincident point to a
        tiny negative value, which would otherwise give a huge or negative weight.
    """
    bsz, s, _ = query.shape
    n = points.shape[1]
    if n == 1:
        return feats.repeat(1, s, 1)
    d2, idx = square_distance(query, points).topk(min(3, n), dim=-1, largest=False, sorted=True)  # (B,S,k)
    w = 1.0 / (d2.clamp(min=0) + 1e-8)
    w = (w / w.sum(dim=-1, keepdim=True)).to(feats.dtype)
    return (gather(feats, idx) * w[..., None]).sum(dim=2)  # (B, S, k, C) -> (B, S, C)


def _exact_sqdist(a: Tensor, b: Tensor) -> Tensor:
    """Squared distance from exact differences, (..., C) x (..., C) broadcast -> (...)."""
    d = None
    for ac, bc in zip(a.unbind(-1), b.unbind(-1)):  # per coordinate: no (..., C) difference tensor
        t = ac - bc
        d = t * t if d is None else d + t * t  # ((dx*dx + dy*dy) + dz*dz)
    return d


@torch.no_grad()
def _nearest_both_ways(p: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
    """Index of the nearest q point for each p point (B, N) and of the nearest p for each q (B, M)."""
    bsz, m = q.shape[:2]
    best_q, best_d2, best_p = [], None, None
    for rows in _row_slices(p.shape[1], bsz, m):
        d = _exact_sqdist(p[:, rows, None, :], q[:, None, :, :])  # (B, rows, M)
        best_q.append(d.argmin(dim=2))
        val, arg = d.min(dim=1)  # (B, M) nearest p within this chunk
        if best_d2 is None:
            best_d2, best_p = val, arg
        else:
            better = val < best_d2
            best_d2 = torch.where(better, val, best_d2)
            best_p = torch.where(better, arg + rows.start, best_p)
    return torch.cat(best_q, dim=1), best_p


def chamfer(p: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
    """Per-point squared nearest-neighbour distances between two batches of point sets.

    Args:
        p: (B, N, 3) float (the prediction in the official loss).
        q: (B, M, 3) float (the ground truth).

    Returns:
        d1 (B, N): squared distance of each p point to its nearest q point; d2 (B, M): the reverse.
        Computed from exact coordinate differences. The nearest-neighbour search runs without
        autograd in chunks of at most ``_CHUNK_ELEMENTS`` elements; the distances are then recomputed
        from the matched pairs, so memory stays O(B*(N+M)) plus one chunk, and gradients flow to
        both p and q (to one of the matches when several are tied).
    """
    i1, i2 = _nearest_both_ways(p, q)
    d1 = _exact_sqdist(p, gather(q, i1))
    d2 = _exact_sqdist(q, gather(p, i2))
    return d1, d2


def _safe_sqrt(d: Tensor) -> Tensor:
    """sqrt with value 0 and gradient 0 at d == 0 (plain sqrt has an infinite gradient there)."""
    pos = d > 0
    return torch.where(pos, torch.where(pos, d, torch.ones_like(d)).sqrt(), torch.zeros_like(d))


def chamfer_l1(p: Tensor, q: Tensor, half: bool = True) -> Tensor:
    """Chamfer-L1 as the official ``ChamferDistanceL1``: (mean(sqrt d1) + mean(sqrt d2)) / 2.

    Args: p (B, N, 3), q (B, M, 3); ``half=False``: the paper's formula, the sum without the 1/2
    (spec 11.7). Returns a scalar; the means run over all B*N (resp. B*M) points of the batch jointly.
    Identical or duplicate points give finite (zero) gradients.
    """
    d1, d2 = chamfer(p, q)
    total = _safe_sqrt(d1).mean() + _safe_sqrt(d2).mean()
    return total / 2 if half else total


def chamfer_l2(p: Tensor, q: Tensor) -> Tensor:
    """Chamfer-L2 as the official ``ChamferDistanceL2``: mean(d1) + mean(d2) (squared, no 1/2).

    Args: p (B, N, 3), q (B, M, 3). Returns a scalar; means over all points of the batch jointly.
    """
    d1, d2 = chamfer(p, q)
    return d1.mean() + d2.mean()
