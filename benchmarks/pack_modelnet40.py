"""Pack the 1024-point ModelNet40 folder into one small file for a machine that gets only a few tens of MB
(the lent GPU machine takes a 64 MiB working tree), and unpack it there:

    python benchmarks/pack_modelnet40.py pack ../shared/data/ModelNet40 data/modelnet40-1k.f16.npz.xz
    python benchmarks/pack_modelnet40.py unpack data/modelnet40-1k.f16.npz.xz data/ModelNet40

The packed file holds every cloud of the ``<class>/{train,test}/<class>_NNNN.npy`` layout in float16
(rounding error below 5e-4 on the unit sphere) with the points of each cloud reordered along a Morton
(Z-order) curve, which xz compresses far better than the stored order; point 0 stays first, so the
farthest point sampling of evaluation (which starts at point 0) picks the same points. Unpacking writes
the same layout back as float32 ``.npy`` files that ``--data`` reads like the original.
"""

from __future__ import annotations

import argparse
import io
import lzma
import sys
import time
from pathlib import Path

import numpy as np


def morton_order(points: np.ndarray, bits: int = 10) -> np.ndarray:
    """Indices that sort (N, 3) points along a Z-order curve on a 2^bits grid over their bounding box."""
    lo, hi = points.min(0), points.max(0)
    q = ((points - lo) / np.maximum(hi - lo, 1e-9) * (2**bits - 1)).astype(np.uint64)
    code = np.zeros(len(points), dtype=np.uint64)
    for b in range(bits):
        for axis in range(3):
            code |= ((q[:, axis] >> np.uint64(b)) & np.uint64(1)) << np.uint64(3 * b + axis)
    return np.argsort(code, kind="stable")


def pack(src: Path, dst: Path, reorder: bool = True) -> None:
    files = sorted(src.glob("*/*/*.npy"))
    if not files:
        sys.exit(f"{src}: no <class>/<split>/*.npy files")
    clouds, names = [], []
    for f in files:
        pts = np.load(f).astype(np.float32)
        if reorder:
            rest = 1 + morton_order(pts[1:])
            pts = pts[np.concatenate([[0], rest])]
        clouds.append(pts.astype(np.float16))
        names.append(f.relative_to(src).as_posix())
    sizes = {len(c) for c in clouds}
    if len(sizes) != 1:
        sys.exit(f"{src}: clouds of different sizes {sorted(sizes)}; only equal sizes are packed")
    buf = io.BytesIO()
    np.savez(buf, points=np.stack(clouds), names=np.array(names))
    t = time.perf_counter()
    data = lzma.compress(buf.getvalue(), preset=9 | lzma.PRESET_EXTREME)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(dst)
    print(f"{dst}: {len(files)} clouds, {len(buf.getvalue()) / 2**20:.1f} MiB -> {len(data) / 2**20:.1f} MiB "
          f"(xz, {time.perf_counter() - t:.0f} s)")


def unpack(src: Path, dst: Path) -> None:
    with np.load(io.BytesIO(lzma.decompress(src.read_bytes()))) as z:
        points, names = z["points"], z["names"]
    for pts, name in zip(points, names, strict=True):
        out = dst / str(name)
        out.parent.mkdir(parents=True, exist_ok=True)
        np.save(out, pts.astype(np.float32))
    print(f"{dst}: {len(names)} clouds written")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=["pack", "unpack"])
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("--keep-order", action="store_true", help="pack: keep the stored point order")
    args = ap.parse_args(argv)
    if args.action == "pack":
        pack(args.src, args.dst, reorder=not args.keep_order)
    else:
        unpack(args.src, args.dst)


if __name__ == "__main__":
    main()
