"""pointbert.data.io: every supported format written in miniature, every bad input a one-line DataError."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from pointbert.data.io import (
    SUPPORTED_EXTENSIONS,
    fit_points,
    lzf_decompress,
    normalize,
    read_points,
)
from pointbert.errors import DataError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
OFF_FIXTURES = SHARED / "fixtures" / "off"

RNG = np.random.default_rng(0)
CLOUD = RNG.normal(size=(40, 3)).astype(np.float32)  # the points every cloud writer stores
EXTRA = RNG.normal(size=(40, 3)).astype(np.float32)  # normals or other columns to be ignored

# a unit cube: 8 vertices, 12 triangles (the mesh writers' content)
CUBE_V = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], np.float32)
CUBE_F = np.array([[0, 1, 3], [0, 3, 2], [4, 6, 7], [4, 7, 5], [0, 4, 5], [0, 5, 1],
                   [2, 3, 7], [2, 7, 6], [0, 2, 6], [0, 6, 4], [1, 5, 7], [1, 7, 3]])


def on_cube_surface(p: np.ndarray) -> bool:
    return bool(np.all(np.abs(p) <= 1 + 1e-5) and np.allclose(np.abs(p).max(axis=1), 1, atol=1e-5))


# --------------------------------------------------------------------------------------------------
# writers in the documented formats
# --------------------------------------------------------------------------------------------------


def write_ply(path: Path, fmt: str, verts: np.ndarray, faces: np.ndarray | None = None,
              normals: np.ndarray | None = None) -> Path:
    props = ["x", "y", "z"] + (["nx", "ny", "nz"] if normals is not None else [])
    head = ["ply", f"format {fmt} 1.0", "comment written by the tests", f"element vertex {len(verts)}"]
    head += [f"property float {p}" for p in props] + ["property uchar red"]
    if faces is not None:
        head += [f"element face {len(faces)}", "property list uchar int vertex_indices"]
    head.append("end_header")
    cols = np.hstack([verts] + ([normals] if normals is not None else [])).astype(np.float32)
    red = np.arange(len(verts), dtype=np.uint8)
    if fmt == "ascii":
        body = "".join(" ".join(f"{v:.9g}" for v in row) + f" {r}\n" for row, r in zip(cols, red))
        if faces is not None:
            body += "".join(f"{len(f)} " + " ".join(map(str, f)) + "\n" for f in faces)
        path.write_text("\n".join(head) + "\n" + body)
        return path
    o = "<" if fmt == "binary_little_endian" else ">"
    rec = np.zeros(len(verts), [(p, o + "f4") for p in props] + [("red", "u1")])
    for i, p in enumerate(props):
        rec[p] = cols[:, i]
    rec["red"] = red
    body = rec.tobytes()
    if faces is not None:
        body += b"".join(struct.pack(f"{o}B3i", 3, *map(int, f)) for f in faces)
    path.write_bytes(("\n".join(head) + "\n").encode() + body)
    return path


def lzf_compress(data: bytes) -> bytes:
    """A small greedy LZF compressor (liblzf's format) to write binary_compressed PCD files."""
    out, lit, table, i = bytearray(), bytearray(), {}, 0

    def flush():
        for k in range(0, len(lit), 32):
            out.append(len(lit[k:k + 32]) - 1)
            out.extend(lit[k:k + 32])
        lit.clear()

    while i < len(data):
        key = data[i:i + 3]
        j = table.get(key) if len(key) == 3 else None
        table[key] = i
        if j is not None and 0 < i - j <= 8192:
            n = 3
            while i + n < len(data) and n < 264 and data[j + n] == data[i + n]:
                n += 1
            flush()
            off, ln = i - j - 1, n - 2
            out += bytes([(min(ln, 7) << 5) | (off >> 8)]) + (bytes([ln - 7]) if ln >= 7 else b"")
            out.append(off & 0xFF)
            i += n
        else:
            lit.append(data[i])
            i += 1
    flush()
    return bytes(out)


def write_pcd(path: Path, kind: str, points: np.ndarray, extra: np.ndarray) -> Path:
    """Fields: intensity (float, before x), x y z (float), normal (float x3, COUNT 3), label (uint16)."""
    n = len(points)
    label = np.arange(n, dtype=np.uint16)
    head = ("# .PCD v0.7 - Point Cloud Data file format\nVERSION 0.7\nFIELDS intensity x y z normal label\n"
            "SIZE 4 4 4 4 4 2\nTYPE F F F F F U\nCOUNT 1 1 1 1 3 1\n"
            f"WIDTH {n}\nHEIGHT 1\nVIEWPOINT 0 0 0 1 0 0 0\nPOINTS {n}\nDATA {kind}\n")
    intensity = np.linspace(0, 1, n, dtype=np.float32)
    if kind == "ascii":
        body = "".join(f"{t:.9g} {p[0]:.9g} {p[1]:.9g} {p[2]:.9g} {e[0]:.9g} {e[1]:.9g} {e[2]:.9g} {lb}\n"
                       for t, p, e, lb in zip(intensity, points, extra, label)).encode()
    else:
        dt = np.dtype([("i", "<f4"), ("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("n", "<f4", (3,)),
                       ("l", "<u2")])
        rec = np.zeros(n, dt)
        rec["i"], rec["n"], rec["l"] = intensity, extra, label
        rec["x"], rec["y"], rec["z"] = points.T
        if kind == "binary":
            body = rec.tobytes()
        else:  # column-major, then LZF
            raw = b"".join(np.ascontiguousarray(rec[f]).tobytes() for f in ("i", "x", "y", "z", "n", "l"))
            comp = lzf_compress(raw)
            body = struct.pack("<II", len(comp), len(raw)) + comp
    path.write_bytes(head.encode() + body)
    return path


def write_stl(path: Path, verts: np.ndarray, faces: np.ndarray, binary: bool) -> Path:
    tri = verts[faces]
    if binary:
        body = b"".join(struct.pack("<12fH", 0, 0, 0, *t.reshape(-1), 0) for t in tri)
        head = b"binary stl written by the tests".ljust(80, b" ") + struct.pack("<I", len(tri))
        path.write_bytes(head + body)
    else:
        lines = ["solid cube"]
        for t in tri:
            lines += ["  facet normal 0 0 0", "    outer loop"]
            lines += [f"      vertex {a} {b} {c}" for a, b, c in t]
            lines += ["    endloop", "  endfacet"]
        path.write_text("\n".join(lines + ["endsolid cube"]) + "\n")
    return path


def write_off(path: Path, quirk: bool) -> Path:
    head = f"OFF{len(CUBE_V)} {len(CUBE_F)} 0\n" if quirk else f"OFF\n{len(CUBE_V)} {len(CUBE_F)} 0\n"
    body = "".join(f"{x} {y} {z}\n" for x, y, z in CUBE_V) + "".join(f"3 {a} {b} {c}\n" for a, b, c in CUBE_F)
    path.write_text(head + body)
    return path


def write_obj(path: Path) -> Path:
    """The cube as quads, with texture/normal indices in the face lines."""
    quads = [[0, 1, 3, 2], [4, 6, 7, 5], [0, 4, 5, 1], [2, 3, 7, 6], [0, 2, 6, 4], [1, 5, 7, 3]]
    lines = ["# cube", "o cube"] + [f"v {x} {y} {z}" for x, y, z in CUBE_V] + ["vt 0 0", "vn 0 0 1"]
    lines += ["f " + " ".join(f"{i + 1}/1/1" for i in q) for q in quads]
    path.write_text("\n".join(lines) + "\n")
    return path


# --------------------------------------------------------------------------------------------------
# clouds: the points come back exactly
# --------------------------------------------------------------------------------------------------


def test_npy_extra_columns_and_single_cloud_batch(tmp_path):
    np.save(tmp_path / "a.npy", np.hstack([CLOUD, EXTRA]))
    np.save(tmp_path / "b.npy", CLOUD[None].astype(np.float64))
    np.save(tmp_path / "c.npy", np.asfortranarray(np.hstack([CLOUD, EXTRA])).astype(">f8"))
    np.save(tmp_path / "d.npy", np.arange(12, dtype=np.int16).reshape(4, 3))
    for name in "abc":
        out = read_points(tmp_path / f"{name}.npy")
        assert out.dtype == np.float32 and out.flags.c_contiguous and out.flags.writeable
        np.testing.assert_array_equal(out, CLOUD)
    np.testing.assert_array_equal(read_points(tmp_path / "d.npy"), np.arange(12).reshape(4, 3))


@pytest.mark.parametrize("key", ["points", "xyz", "data", "pos", "whatever"])
def test_npz_keys(tmp_path, key):
    arrays = {key: np.hstack([CLOUD, EXTRA])}
    if key != "whatever":
        arrays["labels"] = np.zeros(40)  # a second array: the key must decide
    np.savez(tmp_path / "a.npz", **arrays)
    np.testing.assert_array_equal(read_points(tmp_path / "a.npz"), CLOUD)


@pytest.mark.parametrize("ext,sep,header", [(".txt", ",", ""), (".txt", " ", ""), (".xyz", "\t", ""),
                                            (".csv", ",", "x,y,z,nx,ny,nz\n"), (".pts", " ", "40\n"),
                                            (".txt", " ", "40 6\n"),
                                            (".txt", ", ", "# scanned\nsome title line\n\n")])
def test_text_clouds(tmp_path, ext, sep, header):
    rows = np.hstack([CLOUD, EXTRA])
    body = "".join(sep.join(f"{v:.9g}" for v in r) + "\n" for r in rows)
    path = tmp_path / f"cloud{ext}"
    path.write_text(header + body + "\n")
    np.testing.assert_array_equal(read_points(path), CLOUD)


@pytest.mark.parametrize("fmt", ["ascii", "binary_little_endian", "binary_big_endian"])
def test_ply_clouds(tmp_path, fmt):
    path = write_ply(tmp_path / "c.ply", fmt, CLOUD, normals=EXTRA)
    np.testing.assert_array_equal(read_points(path), CLOUD)


@pytest.mark.parametrize("fmt", ["ascii", "binary_little_endian", "binary_big_endian"])
def test_ply_with_faces(tmp_path, fmt):
    mesh = write_ply(tmp_path / "mesh.ply", fmt, CUBE_V, CUBE_F)
    pts = read_points(mesh, mesh_points=500)  # 8 vertices < 500: a mesh, sampled on its surface
    assert pts.shape == (500, 3) and on_cube_surface(pts)
    many = read_points(mesh, mesh_points=8)  # as many vertices as asked: the vertices are the cloud
    np.testing.assert_array_equal(many, CUBE_V)


@pytest.mark.parametrize("kind", ["ascii", "binary", "binary_compressed"])
def test_pcd(tmp_path, kind):
    path = write_pcd(tmp_path / "c.pcd", kind, CLOUD, EXTRA)
    np.testing.assert_array_equal(read_points(path), CLOUD)


def test_lzf_roundtrip_uses_back_references():
    data = (b"abcabcabcabc" * 50) + bytes(range(256)) + b"\x00" * 1000
    comp = lzf_compress(data)
    assert len(comp) < len(data) / 3
    assert lzf_decompress(comp, len(data)) == data


# --------------------------------------------------------------------------------------------------
# meshes: surface sampling
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["quirk.off", "plain.off", "cube.obj", "ascii.stl", "binary.stl"])
def test_meshes_are_sampled_on_the_surface(tmp_path, name):
    path = tmp_path / name
    if name.endswith(".off"):
        write_off(path, quirk=name.startswith("quirk"))
    elif name.endswith(".obj"):
        write_obj(path)
    else:
        write_stl(path, CUBE_V, CUBE_F, binary=name.startswith("binary"))
    pts = read_points(path, mesh_points=2000, seed=3)
    assert pts.shape == (2000, 3) and pts.dtype == np.float32
    assert on_cube_surface(pts)
    for axis in range(3):  # every face of the cube is hit
        assert (pts[:, axis] > 1 - 1e-5).any() and (pts[:, axis] < -1 + 1e-5).any()
    np.testing.assert_array_equal(pts, read_points(path, mesh_points=2000, seed=3))
    assert not np.array_equal(pts, read_points(path, mesh_points=2000, seed=4))


def test_sampling_is_area_weighted(tmp_path):
    # two separate triangles in z=0 (area 0.5) and z=1 (area 4.5): 1 point in 10 on the small one
    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [3, 0, 1], [0, 3, 1]], float)
    path = tmp_path / "two.off"
    path.write_text("OFF\n6 2 0\n" + "".join(f"{a} {b} {c}\n" for a, b, c in v) + "3 0 1 2\n3 3 4 5\n")
    pts = read_points(path, mesh_points=20000)
    assert abs((pts[:, 2] == 0).mean() - 0.1) < 0.01
    small = pts[pts[:, 2] == 0]
    assert (small[:, :2].sum(axis=1) <= 1 + 1e-6).all()  # inside the triangle


def test_genuine_modelnet_off_files():
    if not OFF_FIXTURES.is_dir():
        pytest.skip(f"shared fixtures not found at {OFF_FIXTURES}")
    files = sorted(OFF_FIXTURES.glob("*.off"))
    assert len(files) == 12
    quirky = [f for f in files if not f.read_text().startswith("OFF\n")]
    assert quirky, "expected some files with the OFF<nv> <nf> 0 header"
    for f in files:
        pts = read_points(f, mesh_points=1024)
        assert pts.shape == (1024, 3) and np.isfinite(pts).all()
    # the same model with and without the quirk samples to the same points
    a, b = OFF_FIXTURES / "mn40_bathtub_0001.off", OFF_FIXTURES / "mn10_bathtub_0001.off"
    assert a.read_text().split(None, 3)[-1] == b.read_text().split(None, 4)[-1]
    np.testing.assert_array_equal(read_points(a), read_points(b))


# --------------------------------------------------------------------------------------------------
# bad input: one DataError line naming the file
# --------------------------------------------------------------------------------------------------


# case -> (file name, words its message must contain); the files are written by `bad_dir`
BAD = {
    "missing": ("missing.npy", "no such file"), "unknown": ("cloud.las", ".npy .npz .txt"),
    "folder": ("folder.npy", "folder"), "nan": ("nan.npy", "2 non-finite"),
    "two_cols": ("two_cols.npy", "at least 3"), "many": ("many.npy", "2 clouds"),
    "objects": ("objects.npy", "pickle"), "cut_npy": ("cut.npy", "truncated"), "bad_npz": ("bad.npz", "npz"),
    "ambiguous_npz": ("ambiguous.npz", "points"), "two_txt": ("two.txt", "at least 3"),
    "nan_csv": ("nan.csv", "1 non-finite"), "midway": ("midway.xyz", "line 3"),
    "words": ("words.txt", "no rows of numbers"), "binary_txt": ("binary.txt", "not a text file"),
    "empty": ("empty.ply", "empty"), "garbage_ply": ("garbage.ply", "not a PLY"),
    "cut_cloud_ply": ("cut_cloud.ply", "truncated"), "cut_mesh_ply": ("cut_mesh.ply", "truncated"),
    "cut_pcd": ("cut.pcd", "truncated"), "cut_ascii_pcd": ("cut_ascii.pcd", "truncated"),
    "noxyz_pcd": ("noxyz.pcd", "x, y, z"), "corrupt_pcd": ("corrupt.pcd", "corrupt"),
    "cut_stl": ("cut.stl", "truncated binary STL"), "nofaces_off": ("nofaces.off", "no faces"),
    "flat_off": ("flat.off", "zero surface area"), "cut_off": ("cut.off", "truncated"),
    "nanvert_off": ("nanvert.off", "non-finite"), "points_obj": ("points.obj", "no faces"),
    "pcd_bad_row": ("bad_row.pcd", "line 13: cannot read x, y, z"),
    "npy_as_npz": ("array.npz", "rename it to .npy"), "npz_as_npy": ("archive.npy", "rename it to .npz"),
    "ply_bad_row": ("bad_row.ply", "line 13: cannot read"),
}


def _truncate(path: Path, drop: int) -> None:
    path.write_bytes(path.read_bytes()[:-drop])


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bad")
    nan = np.hstack([CLOUD, EXTRA])
    nan[3, 0], nan[5, 2] = np.nan, np.inf
    np.save(d / "nan.npy", nan)
    np.save(d / "two_cols.npy", CLOUD[:, :2])
    np.save(d / "many.npy", np.stack([CLOUD, CLOUD]))
    np.save(d / "objects.npy", np.array([CLOUD, None], dtype=object), allow_pickle=True)
    np.save(d / "cut.npy", CLOUD)
    (d / "bad.npz").write_bytes(b"PK\x03\x04 this is not really a zip")
    np.savez(d / "ambiguous.npz", a=CLOUD, b=CLOUD)
    (d / "two.txt").write_text("1 2\n3 4\n")
    (d / "nan.csv").write_text("x,y,z\n1,2,3\nnan,1,2\n")
    (d / "midway.xyz").write_text("1 2 3\n4 5 6\noops here\n7 8 9\n")
    (d / "words.txt").write_text("no numbers\nat all\n")
    (d / "binary.txt").write_bytes(b"\xff\xfe\x00\x01" * 10)
    (d / "empty.ply").write_bytes(b"")
    (d / "garbage.ply").write_text("hello\n")
    write_ply(d / "cut_cloud.ply", "binary_little_endian", CLOUD)
    write_ply(d / "cut_mesh.ply", "binary_little_endian", CUBE_V, CUBE_F)
    write_pcd(d / "cut.pcd", "binary", CLOUD, EXTRA)
    write_pcd(d / "cut_ascii.pcd", "ascii", CLOUD, EXTRA)
    (d / "noxyz.pcd").write_text("FIELDS a b c\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1\nPOINTS 1\n"
                                 "DATA ascii\n1 2 3\n")
    write_pcd(d / "corrupt.pcd", "binary_compressed", CLOUD, EXTRA)
    write_stl(d / "cut.stl", CUBE_V, CUBE_F, binary=True)
    (d / "nofaces.off").write_text("OFF\n3 0 0\n0 0 0\n1 0 0\n0 1 0\n")
    (d / "flat.off").write_text("OFF3 1 0\n0 0 0\n1 0 0\n2 0 0\n3 0 1 2\n")
    (d / "cut.off").write_text("OFF\n8 12 0\n0 0 0\n1 0 0\n")
    (d / "nanvert.off").write_text("OFF\n3 1 0\n0 0 0\nnan 0 0\n0 1 0\n3 0 1 2\n")
    (d / "points.obj").write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\n")
    for name, drop in [("cut.npy", 7), ("cut_cloud.ply", 5), ("cut_mesh.ply", 9), ("cut.pcd", 11),
                       ("cut.stl", 20)]:
        _truncate(d / name, drop)
    lines = (d / "cut_ascii.pcd").read_text().splitlines(keepends=True)
    (d / "cut_ascii.pcd").write_text("".join(lines[:-2]))  # two rows short
    raw = bytearray((d / "corrupt.pcd").read_bytes())
    raw[-40:] = b"\xff" * 40
    (d / "corrupt.pcd").write_bytes(bytes(raw))
    (d / "folder.npy").mkdir()
    np.save(d / "array.npy", CLOUD)
    (d / "array.npy").rename(d / "array.npz")
    np.savez(d / "archive.npz", points=CLOUD)
    (d / "archive.npz").rename(d / "archive.npy")
    lines = write_pcd(d / "bad_row.pcd", "ascii", CLOUD, EXTRA).read_text().splitlines(keepends=True)
    (d / "bad_row.pcd").write_text("".join(lines[:12] + ["0.5 1 2 oops 0 0 0 1\n"] + lines[13:]))
    lines = write_ply(d / "bad_row.ply", "ascii", CLOUD).read_text().splitlines(keepends=True)
    (d / "bad_row.ply").write_text("".join(lines[:12] + ["1 2\n"] + lines[13:]))
    return d


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_naming_the_file(bad_dir, case):
    name, words = BAD[case]
    path = bad_dir / name
    with pytest.raises(DataError) as info:
        read_points(path)
    msg = str(info.value)
    assert msg.startswith(str(path)) and path.name in msg
    assert words in msg, msg
    assert "\n" not in msg
    e = info.value  # no chained numpy/trimesh traceback behind it
    assert e.__cause__ is None and (e.__context__ is None or e.__suppress_context__)


def test_unknown_extension_lists_the_supported_ones(tmp_path):
    with pytest.raises(DataError, match="supported: " + " ".join(SUPPORTED_EXTENSIONS).replace(".", r"\.")):
        read_points(tmp_path / "x.las")


def test_garbage_and_truncations_never_escape_as_raw_errors(tmp_path):
    """Random bytes and every-length truncations of valid files: a cloud or a DataError, nothing else."""
    rng = np.random.default_rng(1)
    valid = [np.save(tmp_path / "v.npy", CLOUD) or tmp_path / "v.npy",
             write_ply(tmp_path / "v.ply", "binary_little_endian", CUBE_V, CUBE_F),
             write_ply(tmp_path / "w.ply", "ascii", CLOUD),
             write_pcd(tmp_path / "v.pcd", "binary_compressed", CLOUD, EXTRA),
             write_stl(tmp_path / "v.stl", CUBE_V, CUBE_F, binary=True),
             write_off(tmp_path / "v.off", quirk=True), write_obj(tmp_path / "v.obj")]
    cases = []
    for src in valid:
        data = src.read_bytes()
        for k, cut in enumerate(np.unique(np.linspace(1, len(data) - 1, 12).astype(int))):
            cases.append((tmp_path / f"cut{k}_{src.name}", data[:cut]))
    for ext in SUPPORTED_EXTENSIONS:
        cases.append((tmp_path / f"noise{ext}", rng.integers(0, 256, 300, dtype=np.uint8).tobytes()))
    for path, data in cases:
        path.write_bytes(data)
        try:
            pts = read_points(path, mesh_points=64)
        except DataError as e:
            assert path.name in str(e) and "\n" not in str(e)
        else:
            assert pts.ndim == 2 and pts.shape[1] == 3 and np.isfinite(pts).all()


# --------------------------------------------------------------------------------------------------
# fit_points, normalize
# --------------------------------------------------------------------------------------------------


def test_fit_points_fewer_more_equal():
    pts = RNG.normal(size=(100, 3)).astype(np.float32)
    same, warn = fit_points(pts, 100)
    assert same is pts and warn is None
    up, warn = fit_points(pts, 150, rng=np.random.default_rng(0))
    assert up.shape == (150, 3) and "100 points" in warn
    np.testing.assert_array_equal(up[:100], pts)  # the originals first
    assert {tuple(p) for p in up[100:]} <= {tuple(p) for p in pts}
    down, warn = fit_points(pts, 32)
    assert down.shape == (32, 3) and warn is None
    np.testing.assert_array_equal(down[0], pts[0])  # FPS starts at point 0
    assert len({tuple(p) for p in down}) == 32 and {tuple(p) for p in down} <= {tuple(p) for p in pts}


def test_fit_points_fps_is_far_apart():
    # two tight clusters: FPS picks from both, a prefix never repeats a point
    a = RNG.normal(scale=0.01, size=(500, 3)) + [10, 0, 0]
    b = RNG.normal(scale=0.01, size=(500, 3)) - [10, 0, 0]
    out, _ = fit_points(np.vstack([a, b]).astype(np.float32), 2)
    assert out[0, 0] > 9 and out[1, 0] < -9


def test_fit_points_ignores_scale_and_offset():
    """FPS runs on a centred, scaled copy: tiny or far-away clouds pick the same points."""
    pts = RNG.normal(size=(300, 3)).astype(np.float32)
    ref, _ = fit_points(pts, 64)
    tiny, _ = fit_points(pts.astype(np.float64) * 1e-3 + 100, 64)
    np.testing.assert_allclose((tiny - 100) * 1e3, ref, atol=1e-4)


def test_normalize():
    pts = RNG.normal(size=(500, 3)).astype(np.float32) * 7 + 3
    out = normalize(pts)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.mean(axis=0), 0, atol=1e-6)
    assert np.linalg.norm(out, axis=1).max() == pytest.approx(1, abs=1e-6)
    c = pts - pts.mean(axis=0)
    np.testing.assert_allclose(out, c / np.linalg.norm(c, axis=1).max(), atol=1e-6)
    with pytest.raises(DataError, match=r"^same\.npy: degenerate cloud: all 4 points are identical$"):
        normalize(np.ones((4, 3), np.float32), source="same.npy")
