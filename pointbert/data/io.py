"""Reading one point-cloud or mesh file into an ``(N, 3)`` float32 array, and fitting it to a size.

:func:`read_points` is the single entry point; the file's extension picks the reader:

============================  =========================================================================
``.npy``                      ``(N, C>=3)`` or ``(1, N, C>=3)``; columns after x, y, z (normals...) dropped
``.npz``                      the array named ``points``, ``xyz``, ``data`` or ``pos``, or the only array
``.txt .xyz .pts .csv``       rows of numbers, comma or whitespace separated; text lines at the top
                              (headers) and a lone point-count line are skipped; extra columns dropped
``.ply``                      ASCII or binary (either byte order); the vertices are the cloud, unless the
                              file has faces and fewer than ``mesh_points`` vertices: then it is a mesh
``.pcd``                      PCL point cloud: ``DATA ascii``, ``binary`` or ``binary_compressed`` (LZF)
``.off .obj .stl``            meshes (STL ASCII or binary; OFF with ModelNet's ``OFF<nv> <nf> 0`` quirk)
============================  =========================================================================

Meshes become clouds by area-weighted surface sampling of ``mesh_points`` points, deterministic from
``seed`` (:func:`sample_surface`). Mesh files are parsed by trimesh (imported only when needed).

Every problem raises :class:`~pointbert.errors.DataError` with one line that names the file and what
is wrong with it (missing, empty, unknown type, truncated, fewer than 3 columns, NaN/inf values,
no faces, zero area...), never a raw numpy or trimesh traceback.
"""

from __future__ import annotations

import re
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import DataError

MESH_EXTENSIONS = (".off", ".obj", ".stl")
SUPPORTED_EXTENSIONS = (".npy", ".npz", ".txt", ".xyz", ".pts", ".csv", ".ply", ".pcd") + MESH_EXTENSIONS
NPZ_KEYS = ("points", "xyz", "data", "pos")


class _Bad(Exception):
    """A problem found by a reader; :func:`read_points` prefixes the file name."""


def read_points(path: str | Path, *, mesh_points: int = 8192, seed: int = 0) -> np.ndarray:
    """Read one file into an ``(N, 3)`` float32 array of finite x, y, z coordinates.

    Meshes (``.off .obj .stl``, and ``.ply`` files with faces and fewer than ``mesh_points`` vertices)
    are sampled on their surface: ``mesh_points`` points, the same ones for the same ``seed``.
    Raises :class:`DataError` naming the file for any problem.
    """
    p = Path(path)
    ext = p.suffix.lower()
    reader = _READERS.get(ext)
    if reader is None:
        raise DataError(f"{p}: unsupported file type {ext or '(no extension)'!r}; "
                        f"supported: {' '.join(SUPPORTED_EXTENSIONS)}")
    try:
        points = reader(p, mesh_points, seed)
    except Exception as e:  # diagnose the common causes first, then the reader's own reason
        if not p.exists():
            raise DataError(f"{p}: no such file") from None
        if p.is_dir():
            raise DataError(f"{p}: is a folder, not a file") from None
        if p.stat().st_size == 0:
            raise DataError(f"{p}: empty file (0 bytes)") from None
        if isinstance(e, _Bad):
            raise DataError(f"{p}: {e}") from None
        if isinstance(e, (MemoryError, OSError)):
            raise DataError(f"{p}: cannot read: {_one_line(e)}") from None
        raise DataError(f"{p}: not a readable {ext[1:].upper()} file ({_one_line(e)})") from None
    return _checked(p, points)


def read_clouds(path: str | Path, *, mesh_points: int = 8192) -> list[tuple[str, str, np.ndarray]]:
    """The clouds of one inference input file: ``[(name, source, (N, 3) float32)]``.

    A ``.npy`` of shape (B, N, C>=3) with B > 1 gives B clouds named ``file[i]`` (sources name the cloud);
    any other file one cloud read by :func:`read_points`. Raises :class:`DataError` naming the file.
    """
    p = Path(path)
    if p.suffix.lower() == ".npy":
        try:
            a = np.load(p, mmap_mode="r", allow_pickle=False)
        except Exception:  # noqa: BLE001 - read_points below names the problem
            a = None
        if isinstance(a, np.ndarray) and a.ndim == 3 and a.shape[0] > 1:
            if a.dtype.kind not in "fiu":
                raise DataError(f"{p}: array of dtype {a.dtype} is not numeric")
            if a.shape[2] < 3:
                raise DataError(f"{p}: has {a.shape[2]} columns (shape {a.shape}); need at least 3 (x, y, z)")
            if a.shape[1] == 0:
                raise DataError(f"{p}: no points (shape {a.shape})")
            with np.errstate(over="ignore", invalid="ignore"):
                clouds = np.ascontiguousarray(a[:, :, :3], dtype=np.float32)
            bad = ~np.isfinite(clouds).all(axis=(1, 2))
            if bad.any():
                raise DataError(f"{p}: {int(bad.sum())} of {len(clouds)} clouds contain non-finite values "
                                f"(NaN or inf), the first is cloud {int(bad.argmax())}")
            check_coordinates(clouds, p)
            return [(f"{p.name}[{i}]", f"{p} (cloud {i})", c) for i, c in enumerate(clouds)]
    return [(p.name, str(p), read_points(p, mesh_points=mesh_points))]


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    msg = text[0] if text else type(e).__name__
    return msg if len(msg) <= 200 else msg[:197] + "..."


def _checked(p: Path, a: np.ndarray) -> np.ndarray:
    """(N, 3) float32, N > 0, all finite and below :data:`MAX_COORDINATE`; else DataError naming ``p``."""
    with np.errstate(over="ignore", invalid="ignore"):  # values beyond float32 become inf: reported below
        a = np.ascontiguousarray(a, dtype=np.float32)
    if len(a) == 0:
        raise DataError(f"{p}: no points")
    return check_coordinates(a, p)


#: larger coordinates overflow float32 in squared distances (FPS, kNN, normalisation)
MAX_COORDINATE = 1e15


def check_coordinates(a: np.ndarray, where: str | Path) -> np.ndarray:
    """``a`` if all its values are finite and below :data:`MAX_COORDINATE` in magnitude; else DataError."""
    if not np.isfinite(a).all():
        bad = a.size - int(np.isfinite(a).sum())
        raise DataError(f"{where}: {bad} non-finite value{'s' * (bad > 1)} (NaN or inf) among {len(a)} points")
    top = float(np.abs(a).max()) if a.size else 0.0
    if top > MAX_COORDINATE:
        raise DataError(f"{where}: coordinates up to {top:.3g}, too large for float32 distances "
                        f"(at most {MAX_COORDINATE:.0e}); rescale the cloud")
    return a


def _as_cloud(a: np.ndarray) -> np.ndarray:
    """An array from .npy/.npz as (N, 3): (N, C>=3) or (1, N, C>=3); extra columns dropped."""
    if a.dtype.kind not in "fiub":
        raise _Bad(f"array of dtype {a.dtype} is not numeric")
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim == 3:
        raise _Bad(f"holds {a.shape[0]} clouds (shape {a.shape}); expected one cloud (N, 3) per file")
    if a.ndim != 2:
        raise _Bad(f"array of shape {a.shape}; expected (N, 3) or (N, C) with x, y, z first")
    if a.shape[1] < 3:
        raise _Bad(f"has {a.shape[1]} column{'s' * (a.shape[1] != 1)} (shape {a.shape}); "
                   "need at least 3 (x, y, z)")
    if a.shape[0] in (3, 6) and a.shape[1] > 16:
        raise _Bad(f"shape {a.shape} looks transposed; save the cloud as (N, 3)")
    return a[:, :3]


# --------------------------------------------------------------------------------------------------
# numpy files
# --------------------------------------------------------------------------------------------------


# the header numpy writes for a plain C-order numeric array, e.g. {'descr': '<f4', 'fortran_order': False,
# 'shape': (1024, 3), }: read without np.load's literal_eval (the fast path for big folders of .npy)
_NPY_HEADER = re.compile(r"\{'descr': '([<>|]?[fiub]\d{1,2})', 'fortran_order': False, "
                         r"'shape': \((\d+),(?: (\d+))?(?:, (\d+))?\), \}")


def _read_npy(p: Path, mesh_points: int, seed: int) -> np.ndarray:
    with open(p, "rb") as f:
        head = f.read(10)
        if head[:8] == b"\x93NUMPY\x01\x00" and len(head) == 10:
            m = _NPY_HEADER.fullmatch(f.read(struct.unpack_from("<H", head, 8)[0]).decode("latin1").strip())
            if m:
                a = np.empty(tuple(int(g) for g in m.groups()[1:] if g is not None), np.dtype(m[1]))
                got = f.readinto(memoryview(a).cast("B")) if a.nbytes else 0
                if got < a.nbytes:
                    raise _Bad(f"truncated .npy: shape {a.shape} {a.dtype} needs {a.nbytes} bytes of data, "
                               f"the file has {got}")
                return _as_cloud(a)
    try:
        a = np.load(p, allow_pickle=False)
    except ValueError as e:
        if "pickle" in str(e):
            raise _Bad("holds Python objects (a pickle), not a numeric array") from None
        raise _Bad(f"not a valid .npy array (truncated or corrupt: {_one_line(e)})") from None
    except (EOFError, OSError) as e:
        raise _Bad(f"not a valid .npy array (truncated or corrupt: {_one_line(e)})") from None
    if not isinstance(a, np.ndarray):  # np.load sniffs the content: a zip here is really an .npz
        raise _Bad("is an .npz archive, not an .npy array; rename it to .npz")
    return _as_cloud(a)


def _read_npz(p: Path, mesh_points: int, seed: int) -> np.ndarray:
    with open(p, "rb") as f:
        if f.read(6) == b"\x93NUMPY":
            raise _Bad("is an .npy array, not an .npz archive; rename it to .npy")
    try:
        with np.load(p, allow_pickle=False) as z:
            names = list(z.files)
            key = next((k for k in NPZ_KEYS if k in names), names[0] if len(names) == 1 else None)
            if key is None:
                raise _Bad(f"no array named {', '.join(NPZ_KEYS)} and {len(names)} arrays to choose from "
                           f"({', '.join(names[:6])}{', ...' if len(names) > 6 else ''})")
            try:
                a = z[key]
            except ValueError:
                raise _Bad(f"array {key!r} holds Python objects (a pickle), not numbers") from None
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as e:
        raise _Bad(f"unreadable .npz archive (truncated or not a zip file: {_one_line(e)})") from None
    try:
        return _as_cloud(a)
    except _Bad as e:
        raise _Bad(f"array {key!r}: {e}") from None


# --------------------------------------------------------------------------------------------------
# text clouds: .txt .xyz .pts .csv
# --------------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^[-+]?(nan|inf|infinity)$", re.IGNORECASE)


def _split(line: str, delim: str | None) -> list[str]:
    return line.split(delim) if delim else line.split()


def _numeric_row(tokens: list[str]) -> bool:
    return bool(tokens) and all(_NUMBER.match(t.strip()) for t in tokens)


def _read_text(p: Path, mesh_points: int, seed: int) -> np.ndarray:
    try:
        lines = p.read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise _Bad("not a text file (binary content)") from None
    return _parse_rows(lines, 0, None)


def _parse_rows(lines: list[str], first: int, usecols: tuple[int, int, int] | None,
                count: int | None = None) -> np.ndarray:
    """Rows of numbers from ``lines[first:]`` (at most ``count`` lines of them): text lines at the top
    skipped, x, y, z in columns ``usecols`` (default: the first three). Errors name 1-based lines."""
    start, delim = None, None
    for i in range(first, len(lines)):
        s = lines[i].split("#", 1)[0].strip()
        if not s:
            continue
        delim = "," if "," in s else ";" if ";" in s else None
        if _numeric_row(_split(s, delim)):
            start = i
            break
    if start is None:
        raise _Bad("no rows of numbers found")
    ncols = len(_split(lines[start].split("#", 1)[0].strip(), delim))
    if ncols < 3 and usecols is None:  # a count line above the rows ("10000" in .pts, "10000 3")
        nxt = next((j for j in range(start + 1, len(lines)) if lines[j].strip()), None)
        if nxt is not None and len(_split(lines[nxt].strip(), delim)) >= 3 \
                and all(t.strip().isdigit() for t in _split(lines[start].strip(), delim)):
            start, ncols = nxt, len(_split(lines[nxt].strip(), delim))
    cols = usecols or (0, 1, 2)
    if ncols <= max(cols):
        raise _Bad(f"line {start + 1} has {ncols} column{'s' * (ncols != 1)}; need at least 3 (x, y, z)")
    try:
        rows = lines[start:] if count is None else lines[start:start + count]
        a = np.loadtxt(rows, delimiter=delim, usecols=cols, comments="#", dtype=np.float64, ndmin=2)
    except ValueError:
        end = len(lines) if count is None else start + count
        raise _Bad(_first_bad_row(lines[:end], start, delim, cols)) from None
    return a


def _first_bad_row(lines: list[str], start: int, delim: str | None, cols: tuple[int, ...]) -> str:
    """Explain why ``np.loadtxt`` failed: the first line whose x, y, z cannot be read."""
    for i in range(start, len(lines)):
        s = lines[i].split("#", 1)[0].strip()
        if not s:
            continue
        t = _split(s, delim)
        if len(t) <= max(cols) or not _numeric_row([t[c] for c in cols]):
            return f"line {i + 1}: cannot read x, y, z from {s[:60]!r}"
    return "cannot parse the rows of numbers"  # pragma: no cover


# --------------------------------------------------------------------------------------------------
# PCD (PCL)
# --------------------------------------------------------------------------------------------------

_PCD_TYPES = {("F", 2): "f2", ("F", 4): "f4", ("F", 8): "f8", ("I", 1): "i1", ("I", 2): "i2", ("I", 4): "i4",
              ("I", 8): "i8", ("U", 1): "u1", ("U", 2): "u2", ("U", 4): "u4", ("U", 8): "u8"}


def _read_pcd(p: Path, mesh_points: int, seed: int) -> np.ndarray:
    raw = p.read_bytes()
    h: dict[str, list[str]] = {}
    pos = 0
    while "DATA" not in h:
        end = raw.find(b"\n", pos)
        if end < 0 or len(h) > 32:
            raise _Bad("not a PCD file (no DATA line in the header)")
        line = raw[pos:end].decode("ascii", "replace").split("#", 1)[0].split()
        pos = end + 1
        if line:
            h[line[0].upper()] = line[1:]
    fields = h.get("FIELDS", [])
    if not all(c in fields for c in "xyz"):
        raise _Bad(f"PCD has no x, y, z fields (fields: {' '.join(fields) or 'none'})")
    n = len(fields)
    try:
        sizes = [int(s) for s in h.get("SIZE", ["4"] * n)]
        types = [t.upper() for t in h.get("TYPE", ["F"] * n)]
        counts = [int(c) for c in h.get("COUNT", ["1"] * n)]
        npts = int(h["POINTS"][0]) if "POINTS" in h else int(h["WIDTH"][0]) * int(h.get("HEIGHT", ["1"])[0])
        kind = h["DATA"][0].lower()
        dtypes = [np.dtype(_PCD_TYPES[(t, s)]).newbyteorder("<") for t, s in zip(types, sizes)]
    except (KeyError, IndexError, ValueError):
        raise _Bad("malformed PCD header (FIELDS, SIZE, TYPE, COUNT, POINTS must agree)") from None
    if not len(sizes) == len(types) == len(counts) == n:
        raise _Bad("malformed PCD header (FIELDS, SIZE, TYPE, COUNT must have one entry per field)")
    xyz = [fields.index(c) for c in "xyz"]
    if kind == "ascii":
        offsets = np.cumsum([0] + counts)
        lines = raw.decode("ascii", "replace").splitlines()
        first = raw[:pos].count(b"\n")
        rows = sum(1 for s in lines[first:] if s.strip())
        if rows < npts:
            raise _Bad(f"truncated PCD: the header says {npts} points, the file has {rows} rows")
        return _parse_rows(lines, first, tuple(int(offsets[i]) for i in xyz), npts)
    if kind == "binary":
        row = np.dtype([(f"f{i}", d, (c,)) for i, (d, c) in enumerate(zip(dtypes, counts))])
        body = len(raw) - pos
        if body < npts * row.itemsize:
            raise _Bad(f"truncated binary PCD: {npts} points need {npts * row.itemsize} bytes, "
                       f"the file has {body}")
        rec = np.frombuffer(raw, row, count=npts, offset=pos)
        return np.stack([rec[f"f{i}"][:, 0].astype(np.float64) for i in xyz], axis=1)
    if kind == "binary_compressed":
        if len(raw) - pos < 8:
            raise _Bad("truncated binary_compressed PCD (no size header)")
        csize, usize = struct.unpack_from("<II", raw, pos)
        if len(raw) - pos - 8 < csize:
            raise _Bad(f"truncated binary_compressed PCD: {csize} compressed bytes promised, "
                       f"{len(raw) - pos - 8} present")
        data = lzf_decompress(raw[pos + 8:pos + 8 + csize], usize)
        starts = np.cumsum([0] + [npts * d.itemsize * c for d, c in zip(dtypes, counts)])
        if usize < starts[-1]:
            raise _Bad(f"binary_compressed PCD holds {usize} bytes, {npts} points need {starts[-1]}")
        # column-major: all values of field 0, then all of field 1, ...; first element of each x/y/z
        cols = [np.frombuffer(data, dtypes[i], count=npts * counts[i], offset=int(starts[i]))[::counts[i]]
                for i in xyz]
        return np.stack(cols, axis=1).astype(np.float64)
    raise _Bad(f"unknown PCD DATA kind {kind!r} (expected ascii, binary or binary_compressed)")


def lzf_decompress(src: bytes, size: int) -> bytes:
    """Decompress LZF data (liblzf's format, used by PCD ``binary_compressed``) to ``size`` bytes."""
    out = bytearray()
    i, n = 0, len(src)
    try:
        while i < n:
            ctrl = src[i]
            i += 1
            if ctrl < 32:  # literal run of ctrl + 1 bytes
                out += src[i:i + ctrl + 1]
                i += ctrl + 1
                continue
            length = ctrl >> 5  # back reference: length + 2 bytes from `distance` back
            if length == 7:
                length += src[i]
                i += 1
            ref = len(out) - ((ctrl & 0x1F) << 8) - src[i] - 1
            i += 1
            if ref < 0:
                raise IndexError
            length += 2
            if ref + length <= len(out):
                out += out[ref:ref + length]
            else:  # overlapping copy repeats the pattern
                for k in range(length):
                    out.append(out[ref + k])
    except IndexError:
        raise _Bad("corrupt LZF data in binary_compressed PCD") from None
    if len(out) != size:
        raise _Bad(f"corrupt binary_compressed PCD: decompressed {len(out)} bytes, expected {size}")
    return bytes(out)


# --------------------------------------------------------------------------------------------------
# PLY: own reader for the vertices, trimesh for meshes
# --------------------------------------------------------------------------------------------------

_PLY_TYPES = {"char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
              "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
              "float": "f4", "float32": "f4", "double": "f8", "float64": "f8"}


def _ply_header(raw: bytes) -> tuple[str, list[tuple[str, int, list[tuple[str, str | None]]]], int]:
    """(format, [(element, count, [(property, type or None for lists)])], byte offset of the body)."""
    if not raw.startswith(b"ply"):
        raise _Bad("not a PLY file (it does not start with 'ply')")
    end = raw.find(b"end_header")
    if end < 0:
        raise _Bad("PLY header has no end_header line")
    body = raw.find(b"\n", end) + 1 or len(raw)
    fmt, elements = "", []
    try:
        for line in raw[:end].decode("ascii", "replace").splitlines()[1:]:
            t = line.split()
            if not t:
                continue
            if t[0] == "format":
                fmt = t[1]
            elif t[0] == "element":
                elements.append((t[1], int(t[2]), []))
            elif t[0] == "property":
                elements[-1][2].append((t[4], None) if t[1] == "list" else (t[2], _PLY_TYPES[t[1]]))
    except (IndexError, ValueError, KeyError):
        raise _Bad(f"malformed PLY header line {line.strip()!r}") from None
    if fmt not in ("ascii", "binary_little_endian", "binary_big_endian"):
        raise _Bad(f"unknown PLY format {fmt!r}")
    return fmt, elements, body


def _read_ply(p: Path, mesh_points: int, seed: int) -> np.ndarray:
    raw = p.read_bytes()
    fmt, elements, body = _ply_header(raw)
    names = [e[0] for e in elements]
    if "vertex" not in names:
        raise _Bad("PLY has no vertex element")
    k = names.index("vertex")
    nv, props = elements[k][1], elements[k][2]
    if nv == 0:
        raise _Bad("PLY has 0 vertices")
    pnames = [q[0] for q in props]
    if not all(c in pnames for c in "xyz"):
        raise _Bad(f"PLY vertices have no x, y, z properties ({' '.join(pnames)})")
    nf = dict((e[0], e[1]) for e in elements).get("face", 0)
    if nf > 0 and nv < mesh_points:
        try:
            return _mesh_to_points(p, "ply", mesh_points, seed)
        except _Bad:
            raise
        except Exception as e:
            raise _Bad(f"truncated or corrupt PLY: the data do not match the header's {nv} vertices and "
                       f"{nf} faces ({_one_line(e)})") from None
    fixed = all(all(t is not None for _, t in e[2]) for e in elements[:k + 1])
    if not fixed:  # list properties before/in the vertices: let trimesh walk the file
        return _load_mesh(p, "ply")[0]
    if fmt == "ascii":
        lines = raw.decode("ascii", "replace").splitlines()
        first = raw[:body].count(b"\n") + sum(e[1] for e in elements[:k])  # vertex rows start here
        if len(lines) - first < nv:
            raise _Bad(f"truncated PLY: the header says {nv} vertices, "
                       f"the file has {max(len(lines) - first, 0)}")
        return _parse_rows(lines, first, tuple(pnames.index(c) for c in "xyz"), nv)
    order = "<" if fmt == "binary_little_endian" else ">"
    dts = [np.dtype([(f"p{i}", order + t) for i, (_, t) in enumerate(e[2])]) for e in elements[:k + 1]]
    offset = body + sum(d.itemsize * e[1] for d, e in zip(dts[:k], elements[:k]))
    need = offset + dts[k].itemsize * nv
    if len(raw) < need:
        raise _Bad(f"truncated binary PLY: {nv} vertices need {need - body} bytes after the header, "
                   f"the file has {len(raw) - body}")
    rec = np.frombuffer(raw, dts[k], count=nv, offset=offset)
    return np.stack([rec[f"p{pnames.index(c)}"].astype(np.float64) for c in "xyz"], axis=1)


# --------------------------------------------------------------------------------------------------
# meshes: .off .obj .stl (and .ply with faces)
# --------------------------------------------------------------------------------------------------


def _off_precheck(p: Path) -> None:
    """Counts from the OFF header (also ``OFF<nv> <nf> <ne>`` on one line) against the data lines."""
    lines = [s for s in (ln.split("#", 1)[0].strip() for ln in p.read_bytes().decode("ascii", "replace")
                         .splitlines()) if s]
    m = re.match(r"^(ST)?C?N?4?n?OFF\s*(.*)$", lines[0] if lines else "")
    if not m:
        raise _Bad("not an OFF file (the first line does not start with OFF)")
    counts, used = (m.group(2), 1) if m.group(2) else ((lines[1], 2) if len(lines) > 1 else ("", 2))
    try:
        nv, nf = (int(x) for x in counts.split()[:2])
    except ValueError:
        raise _Bad(f"malformed OFF header: expected 'vertices faces edges', got {counts!r}") from None
    if nf == 0:
        raise _Bad(f"mesh with no faces ({nv} vertices); store a point cloud as .ply, .xyz or .npy")
    if len(lines) - used < nv + nf:
        raise _Bad(f"truncated OFF: the header says {nv} vertices and {nf} faces, "
                   f"the file has {len(lines) - used} data lines")


def _stl_precheck(p: Path) -> None:
    """Binary STL: 84 + 50 * triangles bytes; anything else must be ASCII text."""
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(512)
    if size >= 84 and size == 84 + 50 * struct.unpack_from("<I", head, 80)[0]:
        return
    if head.lstrip().lower().startswith(b"solid") and all(32 <= b < 127 or b in b"\t\r\n" for b in head):
        return
    if size < 84:
        raise _Bad(f"not an STL file ({size} bytes: too short for binary, not ASCII 'solid ...')")
    n = struct.unpack_from("<I", head, 80)[0]
    raise _Bad(f"truncated binary STL: the header says {n} triangles ({84 + 50 * n} bytes), "
               f"the file has {size} bytes")


def _load_mesh(p: Path, ftype: str) -> tuple[np.ndarray, np.ndarray]:
    """(vertices (V, 3) float64, faces (F, 3) int) of a mesh file, via trimesh."""
    import trimesh

    geom = trimesh.load(str(p), file_type=ftype, process=False)
    parts = list(geom.geometry.values()) if isinstance(geom, trimesh.Scene) else [geom]
    verts, faces, offset = [], [], 0
    for g in parts:
        v = np.asarray(getattr(g, "vertices", np.zeros((0, 3))), dtype=np.float64).reshape(-1, 3)
        f = np.asarray(getattr(g, "faces", np.zeros((0, 3))), dtype=np.int64).reshape(-1, 3)
        verts.append(v)
        faces.append(f + offset)
        offset += len(v)
    v = np.concatenate(verts) if verts else np.zeros((0, 3))
    f = np.concatenate(faces) if faces else np.zeros((0, 3), np.int64)
    return v, f


def _mesh_to_points(p: Path, ftype: str, mesh_points: int, seed: int) -> np.ndarray:
    if ftype == "off":
        _off_precheck(p)
    elif ftype == "stl":
        _stl_precheck(p)
    v, f = _load_mesh(p, ftype)
    if len(v) == 0:
        raise _Bad(f"no vertices found in this {ftype.upper()} file")
    if len(f) == 0:
        raise _Bad(f"mesh with no faces ({len(v)} vertices); store a point cloud as .ply, .xyz or .npy")
    bad = v.size - int(np.isfinite(v).sum())
    if bad:
        raise _Bad(f"{bad} non-finite vertex coordinate{'s' * (bad > 1)} (NaN or inf) "
                   f"among {len(v)} vertices")
    if f.min() < 0 or f.max() >= len(v):
        raise _Bad(f"a face refers to vertex {int(f.max())}, but there are only {len(v)} vertices")
    return sample_surface(v, f, mesh_points, seed)


def sample_surface(vertices: np.ndarray, faces: np.ndarray, num: int, seed: int = 0) -> np.ndarray:
    """``num`` points uniformly on a triangle mesh's surface (faces drawn by area), deterministic in ``seed``.

    vertices (V, 3), faces (F, 3) int -> (num, 3) float64. Raises ``_Bad`` for a zero-area mesh.
    """
    a, b, c = (vertices[faces[:, i]] for i in range(3))  # (F, 3) each
    area = 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1)  # (F,)
    total = float(area.sum())
    if not total > 0 or not np.isfinite(total):
        raise _Bad(f"mesh has zero surface area (all {len(faces)} faces are degenerate)")
    rng = np.random.default_rng(seed)
    face = rng.choice(len(faces), size=num, p=area / total)  # (num,)
    u, v = rng.random((2, num, 1))
    flip = (u + v) > 1  # reflect into the triangle
    u, v = np.where(flip, 1 - u, u), np.where(flip, 1 - v, v)
    return a[face] + u * (b[face] - a[face]) + v * (c[face] - a[face])


_READERS: dict[str, Callable[[Path, int, int], np.ndarray]] = {
    ".npy": _read_npy, ".npz": _read_npz, ".txt": _read_text, ".xyz": _read_text, ".pts": _read_text,
    ".csv": _read_text, ".pcd": _read_pcd, ".ply": _read_ply,
    ".off": lambda p, n, s: _mesh_to_points(p, "off", n, s),
    ".obj": lambda p, n, s: _mesh_to_points(p, "obj", n, s),
    ".stl": lambda p, n, s: _mesh_to_points(p, "stl", n, s),
}


# --------------------------------------------------------------------------------------------------
# fitting to a fixed size, normalising
# --------------------------------------------------------------------------------------------------


def fit_points(points: np.ndarray, num_points: int, *,
               rng: np.random.Generator | None = None) -> tuple[np.ndarray, str | None]:
    """Exactly ``num_points`` points: (points (num_points, 3), warning or None).

    More points than needed: farthest point sampling from point 0 (deterministic; run on a centred,
    unit-scaled copy, since :func:`pointbert.ops.fps` ignores points within 0.0316 of the origin as
    the official kernel does). Fewer: all the original points first, then random repeats drawn with
    replacement from ``rng``, and a warning.
    """
    n = len(points)
    if n == 0:
        raise DataError("cannot fit an empty cloud")
    if n == num_points:
        return points, None
    if n > num_points:
        import torch

        from ..ops import fps

        x = points - points.mean(axis=0)
        x = x / (float(np.abs(x).max()) or 1.0)
        idx = fps(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None], num_points)[0]
        return points[idx.numpy()], None
    rng = rng if rng is not None else np.random.default_rng(0)
    extra = rng.choice(n, size=num_points - n, replace=True)
    return (np.concatenate([points, points[extra]]),
            f"only {n} points, {num_points - n} repeated to reach {num_points}")


def normalize(points: np.ndarray, *, source: str | Path | None = None) -> np.ndarray:
    """``pc_norm``: subtract the centroid, divide by the largest distance to it (fits the unit sphere).

    A cloud whose points are all identical cannot be scaled: DataError (naming ``source`` if given).
    """
    points = np.asarray(points, dtype=np.float32)
    centred = points - (np.ones(len(points), np.float32) @ points) / len(points)  # (N, 3); @: fast mean
    scale = float(np.einsum("ij,ij->i", centred, centred).max()) ** 0.5
    if not scale > 0:
        where = f"{source}: " if source is not None else ""
        raise DataError(f"{where}degenerate cloud: all {len(points)} points are identical")
    centred *= np.float32(1 / scale)
    return centred
