"""pointbert.ops against brute-force references written with plain Python / numpy loops.

The FPS reference literally emulates pointnet2_ops' ``furthest_point_sampling_kernel``: per-thread
strided scans, the shared-memory tree reduction and the ``|p|^2 <= 1e-3`` skip rule.
"""

import functools
import math
import os

import numpy as np
import pytest
import torch

from pointbert import ops
from pointbert.errors import PointBERTError
from pointbert.ops import chamfer, chamfer_l1, chamfer_l2, fps, gather, interpolate_3nn, knn, square_distance


def rand_cloud(seed, *shape, dtype=torch.float32):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape)).to(dtype)


# ----------------------------------------------------------------------------------------------- FPS


@pytest.fixture(params=["torch", "triton"])
def fps_backend(request, monkeypatch):
    """Every FPS test runs on the tensor loop and on the Triton kernel (through Triton's CPU interpreter)."""
    if request.param == "triton":
        if os.environ.get("TRITON_INTERPRET") != "1":  # see conftest.py
            pytest.skip("Triton's CPU interpreter is set up only on machines without CUDA")
        pytest.importorskip("triton", reason="Triton is not installed")
        if not interpreter_runs_loops():
            import triton

            pytest.skip(f"Triton {triton.__version__}'s interpreter cannot run a loop with a run-time bound under "
                        f"numpy {np.__version__} (Triton 3.9 can)")
    monkeypatch.setattr(ops, "FPS_BACKEND", request.param)
    return request.param


@functools.cache
def interpreter_runs_loops() -> bool:
    """Whether this Triton's interpreter runs ``for i in range(1, n)`` with ``n`` an argument (3.6 under
    numpy >= 2.4 does not: it hands the loop a 1-element array), as the FPS kernel's step loop does."""
    import triton
    import triton.language as tl

    @triton.jit
    def count(out_ptr, n):
        acc = tl.zeros((), dtype=tl.int32)
        for _ in range(1, n):
            acc += 1
        tl.store(out_ptr, acc)

    out = torch.zeros(1, dtype=torch.int32)
    try:
        count[(1,)](out, 4)
    except Exception:
        return False
    return out.item() == 3


def kernel_fps(pts, m):
    """Python emulation of the CUDA kernel for one cloud: pts (N, 3) numpy float32 (or float64)."""
    n = len(pts)
    threads = max(min(1 << int(math.log(n) / math.log(2.0)), 512), 1)  # opt_n_threads
    rows = [tuple(p) for p in pts]  # numpy scalars: arithmetic stays in the array dtype
    temp = [pts.dtype.type(1e10)] * n
    idxs, old = [0], 0
    for _ in range(1, m):
        x1, y1, z1 = rows[old]
        dists, dists_i = [None] * threads, [None] * threads
        for tid in range(threads):
            best, besti = pts.dtype.type(-1), 0
            for k in range(tid, n, threads):
                x2, y2, z2 = rows[k]
                mag = x2 * x2 + y2 * y2 + z2 * z2
                if float(mag) <= 1e-3:  # C promotes the float to double for the comparison
                    continue
                d = (x2 - x1) * (x2 - x1) + (y2 - y1) * (y2 - y1) + (z2 - z1) * (z2 - z1)
                d2 = min(d, temp[k])
                temp[k] = d2
                besti = k if d2 > best else besti
                best = d2 if d2 > best else best
            dists[tid], dists_i[tid] = best, besti
        s = threads // 2
        while s >= 1:  # __update(dists, dists_i, tid, tid + s) for tid < s
            for tid in range(s):
                v1, v2 = dists[tid], dists[tid + s]
                dists_i[tid] = dists_i[tid + s] if v2 > v1 else dists_i[tid]
                dists[tid] = max(v1, v2)
            s //= 2
        old = dists_i[0]
        idxs.append(old)
    return idxs


def check_fps(points, num):
    got = fps(points, num)
    assert got.shape == (points.shape[0], num) and got.dtype == torch.int64
    want = [kernel_fps(c.numpy(), num) for c in points]
    assert got.tolist() == want
    return got


@pytest.mark.usefixtures("fps_backend")
@pytest.mark.parametrize(
    "n, num",
    [(1, 1), (2, 2), (5, 3), (7, 7), (64, 64), (100, 40), (257, 20), (600, 12), (1100, 10)],
)
def test_fps_matches_kernel_on_random_clouds(n, num):
    check_fps(rand_cloud(n, 3, n, 3), num)


@pytest.mark.usefixtures("fps_backend")
def test_fps_matches_kernel_on_exact_ties():
    g = torch.arange(4, dtype=torch.float32)
    grid = torch.stack(torch.meshgrid(g, g, g, indexing="ij"), -1).reshape(1, 64, 3)  # 64 points
    plane = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(16, 2)
    plane = torch.cat([plane, torch.ones(16, 1)], 1)[None] - torch.tensor([1.5, 1.5, 0.0])  # symmetric
    cube = torch.tensor([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], dtype=torch.float32)
    octa = torch.cat([torch.eye(3), -torch.eye(3)])[None] * 2
    angles = torch.arange(24, dtype=torch.float32) * (2 * math.pi / 24)
    circle = torch.stack([angles.cos(), angles.sin(), torch.zeros(24)], -1)[None]
    check_fps(grid, 64)  # num == N: also the tie order among the final all-zero distances
    check_fps(grid - 1.5, 40)
    check_fps(plane, 16)
    check_fps(cube[None], 8)
    check_fps(octa, 6)
    check_fps(circle, 24)
    check_fps(torch.cat([grid[:, 5:59], grid[:, 59:] * 0.5], 1), 30)  # N = 59, not a power of two


@pytest.mark.usefixtures("fps_backend")
def test_fps_float_near_ties_and_initial_distance():
    # points on a unit sphere around point 0: the first step is a tie up to rounding, so the winner
    # depends on evaluating the distance exactly as the kernel does ((dx*dx + dy*dy) + dz*dz in float32)
    v = rand_cloud(9, 2, 63, 3)
    center = torch.tensor([0.3, 0.2, 0.1])
    check_fps(torch.cat([center.expand(2, 1, 3), center + v / v.norm(dim=-1, keepdim=True)], 1), 40)
    # distances above the kernel's initial 1e10 stay at 1e10 and tie: the tie rule decides, not the distance
    check_fps(rand_cloud(10, 2, 40, 3) * 1e6, 12)


@pytest.mark.usefixtures("fps_backend")
def test_fps_tie_goes_to_bit_reversed_thread_order():
    # N = 4 -> 4 threads, one point each. After index 0, points 1 and 2 tie at distance 1. The reduction
    # merges threads (0, 2) and (1, 3) first, then slot 0 (holding point 2) against slot 1 (point 1):
    # the lower slot keeps its point on a tie, so the kernel picks 2, not the lowest index 1.
    pts = torch.tensor([[[0, 0, 1], [1, 0, 1], [-1, 0, 1], [0, 0.5, 1]]], dtype=torch.float32)
    assert kernel_fps(pts[0].numpy(), 4) == [0, 2, 1, 3]
    assert fps(pts, 4).tolist() == [[0, 2, 1, 3]]


@pytest.mark.usefixtures("fps_backend")
def test_fps_duplicates():
    base = rand_cloud(1, 2, 20, 3)
    check_fps(torch.cat([base, base], 1), 40)  # every point twice, num == N
    check_fps(base[:, [0, 0, 0, 3, 3, 7, 1, 1, 2, 2, 2, 2]], 12)


@pytest.mark.usefixtures("fps_backend")
def test_fps_skip_rule_near_origin():
    cloud = rand_cloud(2, 3, 50, 3)
    cloud[:, 3] = 0.0  # exactly at the origin
    cloud[:, 10] = torch.tensor([0.01, 0.01, 0.01])  # |p|^2 = 3e-4: skipped
    cloud[:, 20] = torch.tensor([0.01, 0.030000001, 0.0])  # |p|^2 == float32(1e-3) > 1e-3: NOT skipped
    cloud[:, 30] = torch.tensor([0.0, 0.0316, 0.0])  # just under 1e-3: skipped
    got = check_fps(cloud, 50)
    for i in (3, 10, 30):
        assert not (got == i).any()
    assert (got == 20).any(dim=1).all()
    # index 0 near the origin is still the first pick and is never picked again while others remain
    cloud[:, 0] = 0.0
    got = check_fps(cloud, 40)
    assert (got[:, 1:] != 0).all()


@pytest.mark.usefixtures("fps_backend")
def test_fps_all_points_skipped_picks_index_zero():
    tiny = rand_cloud(3, 2, 30, 3) * 0.005
    assert fps(tiny, 5).tolist() == [[0] * 5, [0] * 5]
    check_fps(tiny, 5)


@pytest.mark.usefixtures("fps_backend")
def test_fps_batch_rows_are_independent():
    clouds = torch.cat([rand_cloud(4, 1, 80, 3), rand_cloud(5, 1, 80, 3) * 10, torch.zeros(1, 80, 3)])
    got = check_fps(clouds, 32)
    for b in range(3):
        assert torch.equal(got[b], fps(clouds[b : b + 1], 32)[0])


@pytest.mark.usefixtures("fps_backend")
def test_fps_float64_and_prefix():
    x64 = rand_cloud(6, 2, 90, 3, dtype=torch.float64)
    got = check_fps(x64, 50)
    assert got.dtype == torch.int64
    x = rand_cloud(7, 3, 200, 3)
    assert torch.equal(fps(x, 16), fps(x, 64)[:, :16])


@pytest.mark.usefixtures("fps_backend")
def test_fps_arguments():
    x = rand_cloud(8, 2, 50, 3, dtype=torch.float32).requires_grad_()
    with pytest.raises(ValueError, match="cannot sample 100 centers from a cloud of 50 points"):
        fps(x, 100)
    assert fps(x, 0).shape == (2, 0)
    out = fps(x, 50)
    assert not out.requires_grad
    assert sorted(out[0].tolist()) == list(range(50))  # num == N: a permutation for distinct points


def test_fps_kernel_chosen_only_where_it_pays(monkeypatch):
    from pointbert import kernels

    cpu = torch.zeros(3, 2, 10)
    monkeypatch.setattr(kernels, "available", lambda: True)
    for backend, dtype, n, want in [("auto", torch.float32, 10, False),  # the CPU keeps the loop
                                    ("triton", torch.float32, 10, True),
                                    ("triton", torch.float64, 10, False),  # the kernel is float32
                                    ("triton", torch.float32, kernels.MAX_POINTS + 1, False),
                                    ("torch", torch.float32, 10, False)]:
        monkeypatch.setattr(ops, "FPS_BACKEND", backend)
        assert ops._fps_kernel_wanted(cpu.to(dtype), n) is want, (backend, dtype, n)
    monkeypatch.setattr(ops, "FPS_BACKEND", "fast")
    with pytest.raises(PointBERTError, match="POINTBERT_FPS must be auto, triton or torch, not 'fast'"):
        fps(rand_cloud(0, 1, 10, 3), 3)


def test_fps_kernel_that_fails_to_build_falls_back_once_with_a_warning(monkeypatch):
    from pointbert import kernels

    def broken(*args):
        raise RuntimeError("no compiler")

    x = rand_cloud(11, 2, 60, 3)
    want = fps(x, 20)
    monkeypatch.setattr(ops, "FPS_BACKEND", "auto")
    monkeypatch.setattr(ops, "_fps_kernel_wanted", lambda xyz, n: ops.FPS_BACKEND != "torch")
    monkeypatch.setattr(kernels, "fps_scan", broken)
    monkeypatch.setattr(kernels, "_ran", False)
    with pytest.warns(UserWarning, match="Triton FPS kernel failed to build .RuntimeError: no compiler."):
        assert torch.equal(fps(x, 20), want)
    assert ops.FPS_BACKEND == "torch"
    monkeypatch.setattr(ops, "FPS_BACKEND", "triton")  # asked for explicitly: the error is raised
    with pytest.raises(RuntimeError, match="no compiler"):
        fps(x, 20)


@pytest.mark.gpu
@pytest.mark.parametrize("n, num", [(1024, 64), (1024, 1024), (8192, 1200), (10000, 512)])
def test_fps_kernel_on_cuda_matches_the_loop(n, num, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    pytest.importorskip("triton", reason="Triton is not installed")
    x = rand_cloud(n, 6, n, 3)
    x[:, 7] = 0.0  # skipped by the |p|^2 rule
    x[:, 100:200] = x[:, 300:400]  # duplicates: exact ties once their twins are taken
    monkeypatch.setattr(ops, "FPS_BACKEND", "torch")
    want = fps(x, num)
    assert torch.equal(fps(x.cuda(), num).cpu(), want)
    monkeypatch.setattr(ops, "FPS_BACKEND", "triton")
    assert torch.equal(fps(x.cuda(), num).cpu(), want)
    assert torch.equal(fps(x.cuda().bfloat16(), num).cpu(), fps(x.bfloat16(), num))


# ------------------------------------------------------------------------------------ distances / kNN


def brute_sqdist(a, b):
    """(S, C), (N, C) numpy -> (S, N) float64 exact squared distances, by loops."""
    out = np.zeros((len(a), len(b)))
    for i, u in enumerate(a.astype(np.float64)):
        for j, v in enumerate(b.astype(np.float64)):
            out[i, j] = sum((u[c] - v[c]) ** 2 for c in range(len(u)))
    return out


def test_square_distance_values_and_formula():
    src, dst = rand_cloud(10, 2, 7, 3), rand_cloud(11, 2, 9, 3)
    d = square_distance(src, dst)
    assert d.shape == (2, 7, 9) and d.dtype == torch.float32
    for b in range(2):
        np.testing.assert_allclose(d[b].numpy(), brute_sqdist(src[b].numpy(), dst[b].numpy()), atol=1e-5)
    ref = -2 * torch.matmul(src, dst.transpose(1, 2))  # the official op order, bit for bit
    ref += (src**2).sum(-1)[:, :, None]
    ref += (dst**2).sum(-1)[:, None, :]
    assert torch.equal(d, ref)
    assert square_distance(src.double(), dst.double()).dtype == torch.float64


def test_square_distance_and_neighbours_stay_float32_under_autocast():
    # bf16 autocast would run the matmul in bf16 and lose the small distances that rank neighbours
    src, dst = rand_cloud(40, 2, 16, 3) + 5.0, rand_cloud(41, 2, 64, 3) + 5.0
    feats = rand_cloud(42, 2, 64, 8)
    want = square_distance(src, dst), knn(src, dst, 8), interpolate_3nn(src, dst, feats)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = square_distance(src, dst), knn(src, dst, 8), interpolate_3nn(src, dst, feats)
    assert got[0].dtype == torch.float32 and torch.equal(got[0], want[0])
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    d16 = square_distance(src.half(), dst.half())  # half inputs: distances in float32, no fp16 underflow
    assert d16.dtype == torch.float32
    assert interpolate_3nn(src.half(), dst.half(), feats.half()).dtype == torch.float16


def test_knn_matches_brute_force():
    q, p = rand_cloud(12, 3, 10, 3), rand_cloud(13, 3, 50, 3)
    idx = knn(q, p, 8)
    assert idx.shape == (3, 10, 8) and idx.dtype == torch.int64
    for b in range(3):
        want = np.argsort(brute_sqdist(q[b].numpy(), p[b].numpy()), axis=1, kind="stable")[:, :8]
        assert idx[b].tolist() == want.tolist()


def test_knn_k_equals_n_and_centers_first():
    p = rand_cloud(14, 2, 32, 3)
    centers = gather(p, fps(p, 4))  # centers are input points: each is its own nearest neighbour
    idx = knn(centers, p, 32)
    assert (idx.sort(-1).values == torch.arange(32)).all()
    assert torch.equal(idx[..., 0], fps(p, 4))


def test_knn_exact_ties_on_grid():
    g = torch.arange(5, dtype=torch.float32)
    grid = torch.stack(torch.meshgrid(g, g, g, indexing="ij"), -1).reshape(1, 125, 3)
    q = torch.tensor([[[2.0, 2.0, 2.0], [0.0, 0.0, 0.0], [2.5, 2.5, 2.5]]])
    for k in (1, 7, 10, 27, 30):
        idx = knn(q, grid, k)
        full = brute_sqdist(q[0].numpy(), grid[0].numpy())
        for s in range(3):
            assert len(set(idx[0, s].tolist())) == k
            got = full[s, idx[0, s].numpy()]
            np.testing.assert_array_equal(got, np.sort(full[s])[:k])  # a valid k-nearest set, ascending


def test_knn_ranks_by_the_expanded_form():
    # far from the origin the expanded form rounds coarsely; knn must follow it, not exact distances
    q = torch.full((1, 4, 3), 300.0) + rand_cloud(15, 1, 4, 3) * 1e-2
    p = torch.full((1, 200, 3), 300.0) + rand_cloud(16, 1, 200, 3) * 1e-2
    idx = knn(q, p, 16)
    d = square_distance(q, p)
    np.testing.assert_array_equal(d.gather(2, idx).numpy(), d.sort(-1).values[..., :16].numpy())


def test_knn_chunking_gives_identical_results(monkeypatch):
    q, p = rand_cloud(17, 2, 37, 3), rand_cloud(18, 2, 1024, 3)
    whole = knn(q, p, 16)
    monkeypatch.setattr(ops, "_CHUNK_ELEMENTS", 1)  # smallest chunks allowed: 12 + 12 + 13 query rows
    assert [r.stop - r.start for r in ops._row_slices(37, 2, 1024)] == [12, 12, 13]
    assert torch.equal(knn(q, p, 16), whole)
    monkeypatch.setattr(ops, "_CHUNK_ELEMENTS", 2 * 1024 * 20)
    assert len(ops._row_slices(37, 2, 1024)) == 2
    assert torch.equal(knn(q, p, 16), whole)


def test_knn_errors():
    with pytest.raises(ValueError, match="a patch of 32 points needs at least 32 points per cloud, got 20"):
        knn(rand_cloud(19, 1, 4, 3), rand_cloud(20, 1, 20, 3), 32)


# ------------------------------------------------------------------------------------------- gather


@pytest.mark.parametrize("dim, keepdim", [(1, False), (2, True), (-1, False)])
def test_max_pool_values_and_official_gradient_with_ties(dim, keepdim):
    """The official ``x.max(dim)[0]``: with gradients each output's gradient goes to one arg-max even among
    exact ties (``amax`` would split it); without gradients the same values."""
    x = torch.randint(0, 3, (2, 4, 5, 3), generator=torch.Generator().manual_seed(0)).double()  # many ties
    with torch.no_grad():
        out = ops.max_pool(x, dim, keepdim)
    assert torch.equal(out, x.amax(dim, keepdim=keepdim))
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.rand(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out_a = ops.max_pool(a, dim, keepdim)
    out_a.backward(g)
    b.max(dim=dim, keepdim=keepdim)[0].backward(g)
    assert torch.equal(out_a, out) and torch.equal(a.grad, b.grad)
    assert torch.equal((a.grad != 0).sum(dim), (g != 0).sum(dim) if keepdim else (g != 0).long())


def test_gather_shapes_values_and_gradient():
    x = rand_cloud(21, 2, 10, 3, dtype=torch.float64).requires_grad_()
    idx2 = torch.tensor([[0, 9, 9], [4, 4, 1]])
    idx3 = torch.randint(0, 10, (2, 4, 5), generator=torch.Generator().manual_seed(0))
    out2, out3 = gather(x, idx2), gather(x, idx3)
    assert out2.shape == (2, 3, 3) and out3.shape == (2, 4, 5, 3)
    for b in range(2):
        for i in range(3):
            assert torch.equal(out2[b, i], x[b, idx2[b, i]])
        for i in range(4):
            for j in range(5):
                assert torch.equal(out3[b, i, j], x[b, idx3[b, i, j]])
    out3.sum().backward()
    counts = np.stack([np.bincount(idx3[b].flatten().numpy(), minlength=10) for b in range(2)])
    np.testing.assert_array_equal(x.grad.numpy(), np.repeat(counts[..., None], 3, axis=2))
    feats = torch.arange(2 * 6 * 4 * 5).reshape(2, 6, 4, 5)  # x with two feature dims, integer dtype
    assert torch.equal(gather(feats, idx2 % 6)[1, 2], feats[1, 1])
    assert gather(feats, idx3 % 6).shape == (2, 4, 5, 4, 5)


# -------------------------------------------------------------------------------------- interpolation


def brute_interpolate(query, points, feats):
    out = np.zeros((len(query), feats.shape[1]))
    for s, d in enumerate(brute_sqdist(query, points)):
        near = np.argsort(d, kind="stable")[:3]
        w = np.array([1.0 / (d[j] + 1e-8) for j in near])
        out[s] = sum(wj * feats[j] for wj, j in zip(w / w.sum(), near))
    return out


def test_interpolate_3nn_matches_brute_force():
    q, p, f = rand_cloud(22, 2, 20, 3), rand_cloud(23, 2, 12, 3), rand_cloud(24, 2, 12, 5)
    out = interpolate_3nn(q, p, f)
    assert out.shape == (2, 20, 5)
    for b in range(2):
        np.testing.assert_allclose(
            out[b].numpy(), brute_interpolate(q[b].numpy(), p[b].numpy(), f[b].numpy()), rtol=1e-4, atol=1e-5
        )


def test_interpolate_3nn_coincident_query_and_small_n():
    p, f = rand_cloud(25, 2, 12, 3), rand_cloud(26, 2, 12, 4)
    out = interpolate_3nn(p, p, f)  # every query coincides with a point: its feature comes back
    np.testing.assert_allclose(out.numpy(), f.numpy(), rtol=1e-4, atol=1e-4)
    q = rand_cloud(27, 2, 6, 3)
    const = torch.full((2, 12, 4), 3.5)
    np.testing.assert_allclose(interpolate_3nn(q, p, const).numpy(), 3.5, rtol=1e-6)  # weights sum to 1
    one = interpolate_3nn(q, p[:, :1], f[:, :1])  # N == 1: repeated
    assert torch.equal(one, f[:, :1].expand(2, 6, 4))
    two = interpolate_3nn(q, p[:, :2], f[:, :2])  # N == 2: both points, inverse squared distance
    for b in range(2):
        d = brute_sqdist(q[b].numpy(), p[b, :2].numpy())
        w = 1 / (d + 1e-8)
        w /= w.sum(1, keepdims=True)
        np.testing.assert_allclose(two[b].numpy(), w @ f[b, :2].numpy(), rtol=1e-4, atol=1e-5)


# -------------------------------------------------------------------------------------------- Chamfer


def brute_chamfer(p, q):
    d = brute_sqdist(p, q)
    return d.min(1), d.min(0)


def test_chamfer_matches_brute_force():
    p, q = rand_cloud(28, 3, 40, 3), rand_cloud(29, 3, 25, 3)
    d1, d2 = chamfer(p, q)
    assert d1.shape == (3, 40) and d2.shape == (3, 25)
    for b in range(3):
        w1, w2 = brute_chamfer(p[b].numpy(), q[b].numpy())
        np.testing.assert_allclose(d1[b].numpy(), w1, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(d2[b].numpy(), w2, rtol=1e-5, atol=1e-7)


def test_chamfer_chunking_gives_identical_results(monkeypatch):
    half = rand_cloud(30, 2, 25, 3)
    p, q = torch.cat([half, half], 1), rand_cloud(31, 2, 33, 3)  # every p point twice, in two chunks
    whole, whole_idx = chamfer(p, q), ops._nearest_both_ways(p, q)
    monkeypatch.setattr(ops, "_CHUNK_ELEMENTS", 1)  # 4 chunks of 12 or 13 rows of p
    for a, b in zip(chamfer(p, q), whole):
        assert torch.equal(a, b)
    for a, b in zip(ops._nearest_both_ways(p, q), whole_idx):  # ties go to the first p point
        assert torch.equal(a, b)
    assert (whole_idx[1] < 25).all()


def test_chamfer_identical_sets_zero_with_finite_gradients():
    base = rand_cloud(32, 2, 16, 3)
    p = torch.cat([base, base[:, :4]], 1).requires_grad_()  # with duplicate points
    q = base.clone().requires_grad_()
    d1, d2 = chamfer(p, q)
    assert (d1 == 0).all() and (d2 == 0).all()
    for loss_fn in (chamfer_l1, chamfer_l2):
        loss = loss_fn(p, q)
        assert loss.item() == 0
        gp, gq = torch.autograd.grad(loss, (p, q))
        assert torch.isfinite(gp).all() and torch.isfinite(gq).all()


def test_chamfer_gradcheck():
    p = rand_cloud(33, 2, 6, 3, dtype=torch.float64).requires_grad_()
    q = rand_cloud(34, 2, 5, 3, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: torch.cat(chamfer(a, b), 1), (p, q))
    assert torch.autograd.gradcheck(chamfer_l1, (p, q))
    assert torch.autograd.gradcheck(chamfer_l2, (p, q))


def test_chamfer_l1_l2_hand_computed():
    # cloud 0: p = {(0,0,0), (2,0,0)}, q = {(0,0,1), (0,0,1)}: d1 = [1, 5], d2 = [1, 1]
    # cloud 1: p = {(0,0,0), (0,0,0)}, q = {(3,0,0), (0,4,0)}: d1 = [9, 9], d2 = [9, 16]
    p = torch.tensor([[[0.0, 0, 0], [2, 0, 0]], [[0, 0, 0], [0, 0, 0]]])
    q = torch.tensor([[[0.0, 0, 1], [0, 0, 1]], [[3, 0, 0], [0, 4, 0]]])
    d1, d2 = chamfer(p, q)
    assert d1.tolist() == [[1, 5], [9, 9]] and d2.tolist() == [[1, 1], [9, 16]]
    assert chamfer_l2(p, q).item() == pytest.approx((1 + 5 + 9 + 9) / 4 + (1 + 1 + 9 + 16) / 4)
    l1 = ((1 + math.sqrt(5) + 3 + 3) / 4 + (1 + 1 + 3 + 4) / 4) / 2
    assert chamfer_l1(p, q).item() == pytest.approx(l1)
    assert chamfer_l1(p[:1, :1], q[:1, :1]).item() == pytest.approx(1.0)  # the 1/2 of the official loss
