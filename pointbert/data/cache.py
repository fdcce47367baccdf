"""``pointbert data prepare``: convert a dataset once into a memory-mapped cache that training reads.

A cache folder (default ``<dataset>/.pointbert-cache/<tag>``, tag = dataset name, plus the variant
for ScanObjectNN) holds, per split::

    <split>-<key12>-points.npy   float32 (n, N, 3)  (ShapeNetPart, whose shapes differ in size: (total, 3)
                                                     plus <split>-<key12>-offsets.npy int64 (n+1,))
    <split>-<key12>-labels.npy   int64 (n,)
    <split>-<key12>-parts.npy    int64, like the points (ShapeNetPart only)
    manifest.json                dataset, source folder, classes, item recipe, and per split its key

    <split>-<key12>-sources.txt  the source files read (relative to the source folder)

The key hashes the settings, the split's source files (relative path, size, mtime) and the mtimes of
the folders holding them (so an added file shows). Opening a cache recomputes it from the recorded
files: a changed source or setting is never used silently (DataError naming the fix);
``prepare`` rebuilds a split whose key changed and skips one that is up to date. Every file is
written to a temporary name and moved into place with ``os.replace``; the manifest goes last, so an
interrupted run leaves the previous cache intact.

What is stored: ModelNet from the 10,000-point text files gets the official FPS pre-sampling to 8192
points (from point 0, like the GPU kernel; the official ``.dat`` files used a random start);
otherwise the clouds as stored. ``--num-points`` reduces every cloud by FPS. Clouds are stored
normalised where the official loader normalises the whole cloud (ModelNet, folder), after any FPS
reduction, as the official loader normalises what it reads from its FPS cache; ShapeNet-55 keeps raw
points (its recipe normalises each random subset).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError

__all__ = ["prepare_command", "prepare_cache", "CachedDataset", "find_cache", "MANIFEST", "DEFAULT_DIR"]

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
DEFAULT_DIR = ".pointbert-cache"
VERSION = 1
#: how a cached cloud becomes a sample: permute (train only), random subset + pc_norm, or resample
RECIPES = {"modelnet40": "permute", "modelnet10": "permute", "folder": "permute", "scanobjectnn": "permute",
           "shapenet55": "subset", "shapenetpart": "resample"}
SPLITS = {"shapenetpart": ("train", "val", "test")}


# --------------------------------------------------------------------------------------------------
# sources: the dataset classes, read without random sampling
# --------------------------------------------------------------------------------------------------


class _FolderSource:
    """:class:`~pointbert.data.folder.FolderDataset` seen as a source: all points, normalised."""

    def __init__(self, path: Path, split: str):
        from .folder import FolderDataset

        self.ds = FolderDataset(path, split, num_points=None)
        self.root, self.classes, self.labels = self.ds.root, self.ds.classes, self.ds.labels
        self.files = self.ds.files

    def __len__(self) -> int:
        return len(self.ds)

    def raw(self, i: int) -> np.ndarray:
        return self.ds.load(i)

    def source_files(self) -> list[Path]:
        return list(self.files)


def _source(dataset: str, path: Path, split: str, variant: str = "", present_only: bool = False) -> Any:
    """The dataset object whose ``raw(i)`` gives the full deterministic cloud of item i.

    ``present_only`` (``--skip-bad``): listed files that do not exist are left out, not an error.
    """
    from . import official

    if dataset in ("modelnet40", "modelnet10"):
        return official.ModelNet(path, split, num_classes=int(dataset[8:]), present_only=present_only)
    if dataset == "shapenet55":
        return official.ShapeNet55(path, split, present_only=present_only)
    if dataset == "scanobjectnn":
        return official.ScanObjectNN(path, split, variant)
    if dataset == "shapenetpart":
        return official.ShapeNetPart(path, split)
    if dataset == "folder":
        return _FolderSource(path, split)
    if dataset in ("fewshot", "synthetic"):
        raise DataError(f"{path}: nothing to prepare for {dataset}: it is read directly")
    raise DataError(f"{path}: cannot prepare a {dataset!r} dataset")


def _key(sources: list[str], root: Path, settings: dict) -> str:
    """Hash of the settings, of every source file's (path, size, mtime) and of the mtime of every folder
    holding one (other than ``root``, where the cache itself may live): a file added next to them shows."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for rel in sources + sorted({os.path.dirname(r) for r in sources} - {""}):
        try:
            st = os.stat(root / rel)
        except OSError:
            raise DataError(f"{root / rel}: source file is gone") from None
        h.update(f"{rel}\0{st.st_size if os.path.isfile(root / rel) else '-'}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _sources(src: Any, root: Path) -> list[str]:
    return sorted({os.path.relpath(f, root) for f in src.source_files()})


def _renormalize(dataset: str, src: Any) -> bool:
    """Whether a cloud reduced by FPS is normalised again: the datasets stored normalised (spec 2.2), but
    not the official ModelNet ``.dat`` caches (normalised before the training-time FPS, as official)."""
    return (dataset.startswith("modelnet") and getattr(src, "_dat", None) is None) or dataset == "folder"


def _settings(dataset: str, split: str, num_points: int | None, fps: bool, skip_bad: bool,
              variant: str, renormalize: bool = False) -> dict:
    out = {"version": VERSION, "dataset": dataset, "split": split, "num_points": num_points, "fps": fps,
           "skip_bad": skip_bad, "variant": variant}
    if fps and renormalize:
        out["renormalized"] = True  # earlier caches normalised before FPS: their key differs
    return out


# --------------------------------------------------------------------------------------------------
# atomic writing
# --------------------------------------------------------------------------------------------------


def _npy_header(dtype: np.dtype, shape: tuple[int, ...], size: int | None = None) -> bytes:
    """A version 1.0 .npy header, padded to ``size`` bytes (default: the next multiple of 64)."""
    d = f"{{'descr': {np.dtype(dtype).str!r}, 'fortran_order': False, 'shape': {tuple(shape)!r}, }}"
    size = size or -(-(10 + len(d) + 1) // 64) * 64
    pad = size - 10 - len(d) - 1
    if pad < 0:
        raise ValueError("npy header does not fit")
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", size - 10) + (d + " " * pad + "\n").encode("latin1")


class _NpyWriter:
    """Append rows to a temporary .npy, then fix its shape in the header and move it into place."""

    def __init__(self, path: Path, dtype: Any, row_shape: tuple[int, ...], max_rows: int):
        self.path, self.dtype, self.row_shape, self.rows = path, np.dtype(dtype), tuple(row_shape), 0
        self.tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        self.header_size = len(_npy_header(self.dtype, (max_rows, *row_shape)))
        self.f = open(self.tmp, "wb")
        self.f.write(b"\0" * self.header_size)

    def write(self, a: np.ndarray) -> None:
        a = np.ascontiguousarray(a, dtype=self.dtype)
        if a.shape[1:] != self.row_shape:
            raise ValueError(f"rows of shape {a.shape[1:]} written to an array of rows {self.row_shape}")
        self.f.write(a.tobytes())
        self.rows += len(a)

    def finish(self) -> Path:
        self.f.seek(0)
        self.f.write(_npy_header(self.dtype, (self.rows, *self.row_shape), self.header_size))
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)


def _save_atomic(path: Path, data: Any) -> None:
    """Write an array (.npy), a text or a JSON document to a temporary file, then move it into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if isinstance(data, np.ndarray):
        with open(tmp, "wb") as f:
            np.save(f, data)
    else:
        tmp.write_text(data if isinstance(data, str) else json.dumps(data, indent=1))
    os.replace(tmp, path)


def _read_manifest(cache: Path) -> dict:
    p = cache / MANIFEST
    try:
        m = json.loads(p.read_text())
    except FileNotFoundError:
        raise DataError(f"{cache}: not a pointbert cache (no {MANIFEST}); "
                        "create one with `pointbert data prepare`") from None
    except ValueError as e:
        raise DataError(f"{p}: corrupt manifest ({e}); delete the folder and prepare again") from None
    if m.get("format") != "pointbert-cache" or m.get("version") != VERSION:
        raise DataError(f"{p}: not a version {VERSION} pointbert cache; prepare it again")
    return m


# --------------------------------------------------------------------------------------------------
# prepare
# --------------------------------------------------------------------------------------------------


class _Raw:
    """Map-style view giving (index, cloud, parts, error), the cloud FPS'ed to ``fps`` points when given:
    a DataLoader over it reads and samples in parallel worker processes."""

    def __init__(self, src: Any, fps: int | None, renormalize: bool = False):
        self.src, self.fps, self.renormalize = src, fps, renormalize

    def __len__(self) -> int:
        return len(self.src)

    def __getitem__(self, i: int) -> tuple:
        try:
            out = self.src.raw(i)
        except DataError as e:
            return i, None, None, str(e)
        pts, parts = out if isinstance(out, tuple) else (out, None)
        pts = np.ascontiguousarray(pts, np.float32)
        if self.fps is not None:
            if len(pts) < self.fps:
                err = f"{self.src.files[i]}: has {len(pts)} points, fewer than --num-points {self.fps}"
                return i, None, None, err
            from .official import _fps

            pts = _fps(pts, self.fps, self.renormalize)
        return i, pts, parts, None


def _identity(x: Any) -> Any:
    return x


def _prepare_split(src: Any, dataset: str, split: str, cache: Path, key: str, num_points: int | None,
                   fps: bool, skip_bad: bool, progress: bool) -> dict:
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    n = len(src)
    stem = f"{split}-{key[:12]}"
    ragged = dataset == "shapenetpart"
    writers: dict[str, _NpyWriter] = {}
    labels, offsets, skipped = [], [0], []
    width: list[int] = []  # the stored point count, fixed by the first cloud

    def write(name: str, a: np.ndarray) -> None:
        if name not in writers:  # ragged: rows of points; otherwise: one row per cloud
            rows, row = (10**12, a.shape[1:]) if ragged else (n, a.shape)
            writers[name] = _NpyWriter(cache / f"{stem}-{name}.npy", a.dtype, row, rows)
        writers[name].write(a if ragged else a[None])

    workers = min(4, os.cpu_count() or 1) if n > 64 else 0
    loader = DataLoader(_Raw(src, num_points if fps else None, _renormalize(dataset, src)), batch_size=None,
                        num_workers=workers, collate_fn=_identity)
    try:
        for i, pts, parts, err in tqdm(loader, total=n, desc=f"preparing {dataset} {split}", unit="shape",
                                       disable=None if progress else True, leave=False):
            if err is None and not fps and not ragged and width and len(pts) != width[0]:
                err = (f"{src.files[i]}: has {len(pts)} points, the others {width[0]}; "
                       "pass --num-points to reduce every cloud by FPS")
            if err is not None:
                if not skip_bad:
                    raise DataError(err)
                skipped.append(err)
                continue
            width[:1] = width[:1] or [len(pts)]
            write("points", pts)
            if ragged:
                write("parts", np.asarray(parts, dtype=np.int64))
                offsets.append(offsets[-1] + len(pts))
            labels.append(int(src.labels[i]))
        if not labels:
            raise DataError(f"{src.root}: no readable {split} shapes to prepare")
        files = {name: w.finish().name for name, w in writers.items()}
    except BaseException:
        for w in writers.values():
            if not w.f.closed:
                w.abort()
        raise
    for name, arr in [("labels", np.array(labels, dtype=np.int64))] + (
            [("offsets", np.array(offsets, dtype=np.int64))] if ragged else []):
        _save_atomic(cache / f"{stem}-{name}.npy", arr)
        files[name] = f"{stem}-{name}.npy"
    return {"key": key, "count": len(labels), "num_points": None if ragged else (num_points or width[0]),
            "files": files, "skipped": skipped}


def _datasets_at(path: Path, dataset: str) -> list[tuple[str, str]]:
    """(dataset, variant) pairs to prepare for ``--dataset`` (``auto``: detected)."""
    from .official import SCANOBJECTNN_FILES

    if dataset == "auto":
        from .inspect import detect_format

        dataset = detect_format(path)
        if dataset == "files":
            raise DataError(f"{path}: loose files without class folders cannot be prepared; "
                            "put them in one folder per class")
    if dataset == "scanobjectnn":
        found = [v for v, (sub, stem) in SCANOBJECTNN_FILES.items()
                 if any((path / sub / f"{s}_{stem}.h5").is_file() for s in ("training", "test"))]
        if not found:
            raise DataError(f"{path}: no ScanObjectNN h5 files under main_split/ or main_split_nobg/")
        return [("scanobjectnn", v) for v in found]
    return [(dataset, "")]


def prepare_cache(path: str | Path, dataset: str = "auto", split: str = "all", num_points: int | None = None,
                  out: str | Path | None = None, skip_bad: bool = False, *, force: bool = False,
                  progress: bool = True, log: Any = print) -> list[Path]:
    """Prepare (or refresh) the caches of the dataset at ``path``; returns the cache folders.

    ``split``: ``train``, ``test``, ``val`` or ``all``. ``num_points``: FPS every cloud to this many
    points (default: 8192 for the official ModelNet text files, otherwise as stored). Splits whose
    key is unchanged are skipped unless ``force``.
    """
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise DataError(f"{path}: no such dataset folder")
    caches = []
    for name, variant in _datasets_at(path, dataset):
        tag = f"{name}-{variant}" if variant else name
        cache = (Path(out).expanduser() if out else path / DEFAULT_DIR) / tag
        try:
            cache.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DataError(f"{cache}: cannot create the cache folder ({e.strerror}); choose another with "
                            "--out") from None
        try:
            manifest = _read_manifest(cache)
            if manifest["dataset"] != name or manifest["source"] != str(path):
                log(f"{cache}: held {manifest['dataset']} from {manifest['source']}; replacing it")
                manifest = None
        except DataError:
            manifest = None
        splits = SPLITS.get(name, ("train", "test")) if split == "all" else (split,)
        for s in splits:
            try:
                src = _source(name, path, s, variant, present_only=skip_bad)
            except DataError as e:
                if not skip_bad or "none of the" not in str(e):
                    raise
                log(f"{tag} {s}: skipped, no files present ({e})")
                continue
            if name == "shapenetpart" and num_points:
                raise DataError(f"{path}: --num-points does not apply to ShapeNetPart (its recipe resamples "
                                "from all the points of each shape)")
            official_fps = (name.startswith("modelnet") and getattr(src, "layout", "") == "official"
                            and getattr(src, "_dat", None) is None)
            target = num_points or (8192 if official_fps else None)
            settings = _settings(name, s, target, target is not None, skip_bad, variant, _renormalize(name, src))
            sources = _sources(src, path)
            key = _key(sources, path, settings)
            old = (manifest or {}).get("splits", {}).get(s)
            intact = old and all((cache / f).is_file() for f in old["files"].values())
            if intact and old["key"] == key and not force:
                log(f"{tag} {s}: up to date ({old['count']} shapes)")
                continue
            t0 = time.time()
            entry = _prepare_split(src, name, s, cache, key, target, target is not None, skip_bad, progress)
            entry["settings"] = settings
            entry["files"]["sources"] = f"{s}-{key[:12]}-sources.txt"
            _save_atomic(cache / entry["files"]["sources"], "\n".join(sources) + "\n")
            manifest = manifest or {"format": "pointbert-cache", "version": VERSION, "dataset": name,
                                    "variant": variant, "source": str(path), "recipe": RECIPES[name],
                                    "classes": list(src.classes), "splits": {}}
            manifest["splits"][s] = entry
            _save_atomic(cache / MANIFEST, manifest)
            if old:
                for f in set(old["files"].values()) - set(entry["files"].values()):
                    (cache / f).unlink(missing_ok=True)
            pts = "ragged" if entry["num_points"] is None else entry["num_points"]
            missing = getattr(src, "missing", 0)
            log(f"{tag} {s}: {entry['count']} shapes x {pts} points in {time.time() - t0:.1f}s"
                + (f", {missing} listed files missing" if missing else "")
                + (f", {len(entry['skipped'])} unreadable skipped (first: {entry['skipped'][0]})"
                   if entry["skipped"] else ""))
        caches.append(cache)
    return caches


def prepare_command(args) -> int:
    """``pointbert data prepare PATH [--dataset] [--split] [--num-points] [--out] [--skip-bad]``."""
    if args.split not in ("all", "train", "test", "val"):
        raise DataError(f"--split must be train, test, val or all, got {args.split!r}")
    if args.num_points is not None and args.num_points <= 0:
        raise DataError(f"--num-points must be positive, got {args.num_points}")
    if args.out:
        root, out = Path(args.path).resolve(), Path(args.out).resolve()
        inside = out == root or root in out.parents
        if inside and not any(part.startswith(".") for part in out.relative_to(root).parts):
            raise DataError(f"--out {args.out}: inside the dataset {args.path}, where it would be read as data; "
                            f"use a folder outside it or a hidden one such as {Path(args.path) / DEFAULT_DIR}")
    caches = prepare_cache(args.path, args.dataset, args.split, args.num_points, args.out, args.skip_bad)
    for c in caches:
        print(f"cache ready: {c}")
    return 0


# --------------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------------


def find_cache(path: str | Path, tag: str | None = None) -> Path | None:
    """The cache folder for ``path``: ``path`` itself if it is one, else ``path/.pointbert-cache/<tag>``."""
    p = Path(path).expanduser()
    if (p / MANIFEST).is_file():
        return p
    if tag and (p / DEFAULT_DIR / tag / MANIFEST).is_file():
        return p / DEFAULT_DIR / tag
    return None


class CachedDataset:
    """A prepared cache, memory-mapped; items follow the sample contract of the source dataset.

    Args:
        cache_dir: a cache folder (holding ``manifest.json``), or a dataset folder with exactly one
            cache under ``.pointbert-cache/``.
        split: a prepared split; ``trainval`` combines train and val when not prepared as such.
        num_points: for ShapeNet-55 (random subset, default 1024) and ShapeNetPart (resampling with
            replacement, default 2048); other datasets return the stored clouds.
        verify: recompute the key from the recorded source files and refuse a stale cache (when the
            source folder is gone altogether, the cache is used with a warning).
    """

    def __init__(self, cache_dir: str | Path, split: str = "train", num_points: int | None = None, *,
                 seed: int = 0, verify: bool = True):
        cache = Path(cache_dir).expanduser()
        if not (cache / MANIFEST).is_file() and (cache / DEFAULT_DIR).is_dir():
            found = sorted(p.parent for p in (cache / DEFAULT_DIR).glob(f"*/{MANIFEST}"))
            if len(found) != 1:
                raise DataError(f"{cache / DEFAULT_DIR}: {len(found)} caches here; name one of them")
            cache = found[0]
        m = _read_manifest(cache)
        self.cache, self.split, self.manifest = cache, split, m
        self.dataset, self.recipe, self.classes = m["dataset"], m["recipe"], list(m["classes"])
        names = ["train", "val"] if split == "trainval" and "trainval" not in m["splits"] else [split]
        self._parts = []
        for s in names:
            entry = m["splits"].get(s)
            if entry is None:
                raise DataError(f"{cache}: no {s} split in this cache (prepared: "
                                f"{', '.join(m['splits']) or 'none'}); "
                                f"run `pointbert data prepare {m['source']} --split {s}`")
            if verify:
                self._verify(m, s, entry)
            arrays = {}
            for name, f in entry["files"].items():
                if not f.endswith(".npy"):
                    continue
                try:
                    arrays[name] = np.load(cache / f, mmap_mode="r")
                except (OSError, ValueError) as e:
                    raise DataError(f"{cache / f}: unreadable cache file ({e}); prepare again") from None
            if len(arrays["labels"]) != entry["count"]:
                raise DataError(f"{cache}: {s} holds {len(arrays['labels'])} labels, "
                                f"the manifest says {entry['count']}")
            self._parts.append(arrays)
        self.labels = np.concatenate([np.asarray(a["labels"]) for a in self._parts])
        self._ends = np.cumsum([len(a["labels"]) for a in self._parts])
        default = {"subset": 1024, "resample": 2048}.get(self.recipe)
        self.num_points = num_points or default
        self.train = split in ("train", "trainval")
        from .official import _Random

        self._rng = _Random(seed, self.train)

    def _verify(self, m: dict, split: str, entry: dict) -> None:
        """Recompute the key from the recorded source files (cheap: one stat per file and folder)."""
        src_root = Path(m["source"])
        fix = f"run `pointbert data prepare {src_root}` again"
        if not src_root.is_dir():  # a cache copied to another machine: usable, but say so
            log.warning("%s: source folder %s not found; using the cache without checking it", self.cache,
                        src_root)
            return
        sources = (self.cache / entry["files"]["sources"]).read_text().split("\n")[:-1]
        try:
            key = _key(sources, src_root, entry["settings"])
        except DataError as e:
            raise DataError(f"{self.cache}: stale cache: {e}; {fix}") from None
        if key != entry["key"]:
            raise DataError(f"{self.cache}: stale cache: the {split} source files of {src_root} changed "
                            f"since it was prepared; {fix}")

    def __len__(self) -> int:
        return int(self._ends[-1])

    def __repr__(self) -> str:
        return f"CachedDataset({str(self.cache)!r}, split={self.split!r}, {len(self)} items, {self.dataset})"

    def __getitems__(self, indices: list[int]) -> list[dict]:
        """A whole batch at once (used by DataLoader): one gather from the memory map, vectorised shuffles."""
        arrays = self._parts[0]
        if self.recipe != "permute" or len(self._parts) != 1 or "offsets" in arrays:
            return [self[i] for i in indices]
        idx = np.asarray(indices, dtype=np.int64)
        if len(idx) and not (0 <= idx.min() and idx.max() < len(self)):
            raise IndexError(f"indices out of range for {len(self)} items")
        points = np.asarray(arrays["points"][idx])  # (B, N, 3), a copy
        if self.train:
            rng = self._rng(int(idx[0]) if len(idx) else 0)
            B, N, _ = points.shape
            order = rng.permuted(np.broadcast_to(np.arange(N), (B, N)), axis=1) + N * np.arange(B)[:, None]
            points = np.take(points.reshape(B * N, 3), order.ravel(), axis=0).reshape(B, N, 3)
        return [{"points": p, "label": lab} for p, lab in zip(points, self.labels[idx])]

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        k = int(np.searchsorted(self._ends, index, side="right"))
        arrays, j = self._parts[k], index - (int(self._ends[k - 1]) if k else 0)
        label = self.labels[index]
        if "offsets" in arrays:
            a, b = int(arrays["offsets"][j]), int(arrays["offsets"][j + 1])
            points, parts = np.asarray(arrays["points"][a:b]), np.asarray(arrays["parts"][a:b])
        else:
            points, parts = np.asarray(arrays["points"][j]), None
        # points are a view of the map: each recipe copies what it returns (np.take, several times faster
        # than fancy indexing for rows of 3 floats)
        rng = self._rng(index)
        if self.recipe == "permute":
            if self.train:
                return {"points": np.take(points, rng.permutation(len(points)), axis=0), "label": label}
            return {"points": points.copy(), "label": label}
        if self.recipe == "subset":
            from .io import normalize

            points = np.take(points, rng.permutation(len(points))[: self.num_points], axis=0)
            return {"points": normalize(points, source=self.cache), "label": label}
        choice = rng.choice(len(points), self.num_points, replace=True)
        return {"points": np.take(points, choice, axis=0), "label": label, "parts": np.take(parts, choice),
                "category": label}

