"""``pointbert data inspect PATH``: what a dataset folder or file holds, and what is wrong with it.

Detects the format (one file; a class-per-folder dataset with or without train/test subfolders; a
plain folder of files; the official ModelNet40/10, ShapeNet-55, ScanObjectNN, ShapeNetPart and
few-shot layouts), prints the classes with counts per split, reads the files (or ``--max-files`` of
them, evenly spread) for points per sample, coordinate ranges and whether the clouds look
normalised, and lists every unreadable or degenerate file with the reason, one line each.
Exit status 0 when nothing is wrong, 1 when problems were found.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import DataError
from .folder import _entries, scan_folder
from .io import MESH_EXTENSIONS, SUPPORTED_EXTENSIONS, read_clouds, read_points
from .official import shapenet55_root

FORMATS = ("auto", "folder", "file", "modelnet40", "modelnet10", "shapenet55", "scanobjectnn", "fewshot",
           "shapenetpart")
SCANOBJECTNN_VARIANTS = {"main_split": "objectbg (OBJ_BG)", "main_split_nobg": "objectonly (OBJ_ONLY)"}


class Report:
    """Prints aligned sections as it goes; collects problems for the closing summary."""

    def __init__(self, root: Path):
        self.root = root
        self.problems: list[tuple[str, str]] = []

    def title(self, text: str) -> None:
        print(text)

    def row(self, key: str, value: str) -> None:
        print(f"  {key:<20}{value}")

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        """Columns of numbers right-aligned, the others left-aligned; a rule under the header."""
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        numeric = [i > 0 and all(re.fullmatch(r"[-\d,. x]*", str(r[i])) for r in rows)
                   for i in range(len(header))]
        for k, r in enumerate([header, *rows]):
            cells = [f"{c:>{w}}" if num else f"{c:<{w}}" for c, w, num in zip(r, widths, numeric)]
            print("  " + "   ".join(cells).rstrip())
            if k == 0:
                print("  " + "   ".join("-" * w for w in widths))

    def problem(self, path: str | Path, reason: str) -> None:
        self.problems.append((self.rel(path), reason))

    def rel(self, path: str | Path) -> str:
        p = Path(path)
        try:
            return p.relative_to(self.root).as_posix() if p != self.root else p.name
        except ValueError:
            return str(p)

    def finish(self, summary: str) -> int:
        print()
        if self.problems:
            print(f"Problems ({len(self.problems)}):")
            width = min(max(len(p) for p, _ in self.problems), 60)
            for path, reason in self.problems:
                print(f"  {path:<{width}}  {reason}")
            print()
            n = len(self.problems)
            print(f"Summary: {summary}; {n} problem{'s' * (n > 1)}.")
            return 1
        print(f"Summary: {summary}; no problems.")
        return 0


def _n(x: int) -> str:
    return f"{x:,}"


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}" + ("" if n == 1 else "es" if word.endswith("s") else "s")


# --------------------------------------------------------------------------------------------------
# reading files: points per sample, ranges, normalisation, problems
# --------------------------------------------------------------------------------------------------


def _spread(files: list[Path], max_files: int | None) -> list[Path]:
    """All files, or ``max_files`` of them evenly spread over the (sorted) list."""
    if max_files is None or max_files >= len(files):
        return files
    idx = np.unique(np.linspace(0, len(files) - 1, max(max_files, 1)).round().astype(int))
    return [files[i] for i in idx]


#: the fewest points the smallest official model (1,024 points, 64 patches of 32) can group
OFFICIAL_MIN_POINTS = 64


def read_and_summarise(files: list[Path], report: Report, *, max_files: int | None = None,
                       mesh_points: int = 8192, batches: bool = False) -> int:
    """Read ``files`` (or a spread of ``max_files``), print their statistics; return how many were read.

    ``batches``: the files are inference inputs, where a (B, N, 3) ``.npy`` holds B clouds
    (:func:`~pointbert.data.io.read_clouds`); otherwise every file must hold one cloud (training data).
    """
    from tqdm import tqdm

    chosen = _spread(files, max_files)
    counts, lo, hi, centre, radius, meshes, readable = [], [], [], [], [], 0, 0
    bar = tqdm(chosen, desc="reading", unit="file", leave=False, disable=True if len(chosen) < 50 else None)
    for path in bar:
        try:
            clouds = read_clouds(path, mesh_points=mesh_points) if batches else \
                [(path.name, str(path), read_points(path, mesh_points=mesh_points))]
        except DataError as e:
            report.problem(path, str(e).removeprefix(f"{path}: "))
            continue
        readable += 1
        for name, _, pts in clouds:
            c = pts.mean(axis=0)
            spread = float(np.sqrt(((pts - c) ** 2).sum(axis=1).max()))
            if not spread > 0:
                report.problem(path.with_name(name), f"degenerate cloud: all {len(pts)} points are identical")
                continue
            counts.append(len(pts))
            meshes += path.suffix.lower() in MESH_EXTENSIONS
            lo.append(pts.min(axis=0))
            hi.append(pts.max(axis=0))
            centre.append(float(np.linalg.norm(c)))
            radius.append(float(np.sqrt((pts ** 2).sum(axis=1).max())))
    one = len(counts) == 1
    if len(files) > 1:
        sample = f"all {_n(len(files))}" if len(chosen) == len(files) else \
            f"{_n(len(chosen))} of {_n(len(files))}, evenly spread (--max-files)"
        report.row("files read", f"{sample}; {_n(readable)} readable")
    if len(counts) > readable:
        report.row("clouds", f"{_n(len(counts))} (a (B, N, 3) .npy holds B clouds)")
    if not counts:
        return len(chosen)
    k = np.asarray(counts)
    report.row("points" if one else "points per sample",
               f"{_n(int(k[0]))}" + ("" if one else " (every cloud)") if k.min() == k.max() else
               f"min {_n(int(k.min()))}   median {_n(int(np.median(k)))}   max {_n(int(k.max()))}")
    if meshes:
        report.row("", f"({'the mesh' if one else _plural(meshes, 'mesh file')} sampled at "
                       f"{_n(mesh_points)} surface points)")
    lo_, hi_ = np.min(lo, axis=0), np.max(hi, axis=0)
    report.row("coordinates", "   ".join(f"{a} {lo_[i]:.3f} .. {hi_[i]:.3f}" for i, a in enumerate("xyz")))
    cen, rad = np.asarray(centre), np.asarray(radius)
    normalised = cen.max() <= 0.1 and rad.max() <= 1.05 and rad.min() >= 0.5
    shape = f"centroid {cen[0]:.3f} from the origin, radius {rad[0]:.3f}" if one else \
        f"centroids within {cen.max():.3f} of the origin, radius {rad.min():.3f} .. {rad.max():.3f}"
    report.row("normalised", f"{'yes' if normalised else 'no'}: {shape}")
    if not normalised:
        report.row("", "(FolderDataset(normalize=True), the default, centres and scales each cloud)"
                   if not batches else "(predict/embed/... --normalize centres and scales each cloud)")
    few = int((k < OFFICIAL_MIN_POINTS).sum())
    if few:
        report.row("note", f"{_plural(few, 'cloud')} under {OFFICIAL_MIN_POINTS} points: too few for the official "
                           f"1k-point models (64 patches of 32 points)")
    return len(chosen)


def _type_counts(files: list[Path]) -> str:
    kinds: dict[str, int] = {}
    for f in files:
        kinds[f.suffix.lower()] = kinds.get(f.suffix.lower(), 0) + 1
    return "   ".join(f"{k} {_n(v)}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))


# --------------------------------------------------------------------------------------------------
# one inspector per format; each prints and returns the summary phrase
# --------------------------------------------------------------------------------------------------


def _inspect_file(path: Path, report: Report, args) -> str:
    ext = path.suffix.lower()
    kind = "mesh" if ext in MESH_EXTENSIONS else "point cloud (a mesh if it has faces)" if ext == ".ply" \
        else "point cloud"
    report.title(f"{path.name}: {ext[1:].upper() or 'unknown'} {kind}")
    read_and_summarise([path], report, mesh_points=getattr(args, "mesh_points", 8192), batches=True)
    return "1 file"


def _inspect_folder(path: Path, report: Report, args) -> str:
    layout = scan_folder(path)
    for where, reason in layout.problems:
        report.problem(where, reason)
    counts = layout.counts()
    ntr, nte = sum(c["train"] for c in counts.values()), sum(c["test"] for c in counts.values())
    how = {"split subfolders": "with train/ and test/ subfolders",
           "random split": "no train/test subfolders"}
    report.title(f"{path.name}/: class-per-folder dataset, {how[layout.kind]}")
    report.row("classes", _n(len(layout.classes)))
    report.row("files", f"{_n(len(layout.files))} ({_n(ntr)} train, {_n(nte)} test"
                        + (")" if layout.kind == "split subfolders" else
                           " in FolderDataset's seeded split: test_fraction 0.2, seed 0)"))
    report.row("file types", _type_counts(layout.files) or "none")
    print()
    rows = [[c, _n(v["train"]), _n(v["test"]), _n(v["train"] + v["test"])] for c, v in counts.items()]
    report.table(["class", "train", "test", "total"], rows + [["total", _n(ntr), _n(nte), _n(ntr + nte)]])
    if layout.kind == "split subfolders":
        for split in ("train", "test"):
            lacking = [c for c, v in counts.items() if v[split] == 0 and v["train"] + v["test"] > 0]
            if lacking:
                report.row("note", f"no {split} files for: {', '.join(lacking)}")
    print()
    read_and_summarise(layout.files, report, max_files=getattr(args, "max_files", None))
    return f"{_plural(len(layout.files), 'file')} in {_plural(len(layout.classes), 'class')}"


def _inspect_files(path: Path, report: Report, args) -> str:
    files = [f for f in _entries(path)[0] if f.suffix.lower() in SUPPORTED_EXTENSIONS]
    report.title(f"{path.name}/: a folder of {_plural(len(files), 'point-cloud file')}, no class subfolders")
    report.row("file types", _type_counts(files))
    report.row("note", "fine for predict/embed; training needs one subfolder per class")
    print()
    read_and_summarise(files, report, max_files=getattr(args, "max_files", None), batches=True)
    return _plural(len(files), "file")


def _read_list(p: Path) -> list[str]:
    return [s.strip() for s in p.read_text().splitlines() if s.strip()]


def _inspect_modelnet(path: Path, report: Report, args, ten: bool = False) -> str:
    name = "modelnet10" if ten else "modelnet40"
    if modelnet_folder_layout(path) == name:  # <class>/{train,test}/<class>_NNNN.npy: read as a class folder
        return _inspect_folder(path, report, args)
    caches = sorted(path.glob("modelnet*_*pts_fps.dat"))
    names_file = path / f"{name}_shape_names.txt"
    report.title(f"{path.name}/: official {'ModelNet10' if ten else 'ModelNet40'} "
                 f"(modelnet40_normal_resampled{', .dat caches' if caches else ''})")
    if not names_file.is_file():
        if not caches:
            raise DataError(f"{path}: not a ModelNet folder (no {names_file.name} and no .dat caches)")
        report.row("classes", f"? ({names_file.name} missing)")
        report.problem(names_file, "missing: the class names (label order) come from this file")
    else:
        report.row("classes", f"{_n(len(_read_list(names_file)))} ({names_file.name})")
    present: list[Path] = []
    rows = []
    for split in ("train", "test"):
        lst = path / f"{name}_{split}.txt"
        cache = [c for c in caches if c.name.startswith(f"{name}_{split}_")]
        if not lst.is_file():
            rows.append([split, "-", "-", ", ".join(c.name for c in cache) or "-"])
            if not cache:
                report.problem(lst, "missing list file and no .dat cache for this split")
            continue
        ids = _read_list(lst)
        files = [path / i.rsplit("_", 1)[0] / f"{i}.txt" for i in ids]
        here = [f for f in files if f.is_file()]
        present += here
        rows.append([split, _n(len(ids)), _n(len(here)), ", ".join(c.name for c in cache) or "-"])
        if len(here) < len(ids) and not cache:
            missing = next(f for f in files if not f.is_file())
            report.problem(lst, f"{_n(len(ids) - len(here))} of {_n(len(ids))} listed shapes have no .txt "
                                f"file and there is no .dat cache (first missing: {report.rel(missing)})")
    print()
    report.table(["split", "listed", ".txt present", "cache"], rows)
    for c in caches:
        report.row(c.name, f"{c.stat().st_size / 2**20:,.1f} MiB (pickle; not opened here)")
    if present:
        print()
        read_and_summarise(present, report, max_files=getattr(args, "max_files", None))
    return f"{name}, {_plural(len(present), 'shape file')} present"


def _inspect_shapenet55(path: Path, report: Report, args) -> str:
    root = shapenet55_root(path)
    lists, pc = root / "ShapeNet-55", root / "shapenet_pc"
    if not (lists / "train.txt").is_file() and not pc.is_dir():
        raise DataError(f"{path}: not a ShapeNet-55 folder (no ShapeNet-55/train.txt, no shapenet_pc/)")
    report.title(f"{path.name}/: official ShapeNet-55 (shapenet_pc/ + ShapeNet-55/ split lists)")
    have = set(os.listdir(pc)) if pc.is_dir() else set()
    if not pc.is_dir():
        report.problem(pc, "missing: the point clouds (<synset>-<model>.npy, 8192 points each)")
    rows, present = [], []
    for split in ("train", "test"):
        lst = lists / f"{split}.txt"
        if not lst.is_file():
            report.problem(lst, "missing split list")
            continue
        ids = _read_list(lst)
        here = [pc / i for i in ids if i in have]
        present += here
        rows.append([split, _n(len(ids)), _n(len(here))])
        if pc.is_dir() and len(here) < len(ids):
            report.problem(lst, f"{_n(len(ids) - len(here))} of {_n(len(ids))} listed files are not "
                                "in shapenet_pc/")
    synsets = sorted({i.split("-", 1)[0] for i in (_read_list(lists / "train.txt") if rows else [])})
    report.row("categories", f"{len(synsets)} synsets in the train list")
    print()
    report.table(["split", "listed", "present"], rows)
    if present:
        print()
        read_and_summarise(present, report, max_files=getattr(args, "max_files", None))
    return f"shapenet55, {_plural(len(present), 'file')} present"


def _inspect_scanobjectnn(path: Path, report: Report, args) -> str:
    import h5py

    files = sorted(path.glob("*objectdataset*.h5")) + sorted(path.glob("*/*objectdataset*.h5"))
    if not files:
        raise DataError(f"{path}: not a ScanObjectNN folder (no *objectdataset*.h5 files)")
    report.title(f"{path.name}/: official ScanObjectNN (h5)")
    rows = []
    for f in files:
        variant = "hardest (PB_T50_RS)" if "augmentedrot_scale75" in f.name else \
            SCANOBJECTNN_VARIANTS.get(f.parent.name, "objectbg or objectonly")
        split = "train" if f.name.startswith("training") else "test" if f.name.startswith("test") else "?"
        row = [report.rel(f), variant, split, "-", "-"]
        rows.append(row)
        try:
            with h5py.File(f, "r") as h:
                missing = [k for k in ("data", "label") if k not in h]
                if missing:
                    report.problem(f, f"no {' or '.join(missing)} dataset in the h5 file "
                                      f"(keys: {', '.join(h)})")
                    continue
                data, label = h["data"].shape, h["label"].shape
                labels = np.asarray(h["label"]).reshape(-1)
        except OSError as e:
            report.problem(f, f"unreadable h5 file ({str(e).splitlines()[0]})")
            continue
        row[3:] = [" x ".join(map(str, data)), str(len(np.unique(labels)))]
        if len(data) != 3 or data[-1] < 3:
            report.problem(f, f"data has shape {data}; expected (n, points, 3)")
        elif data[0] != labels.shape[0]:
            report.problem(f, f"{data[0]} clouds but {label[0]} labels")
        elif labels.size and (labels.min() < 0 or labels.max() > 14):
            report.problem(f, f"labels range {labels.min()}..{labels.max()}; expected 0..14")
    print()
    report.table(["file", "variant", "split", "data", "classes"], rows)
    return f"scanobjectnn, {_plural(len(files), 'h5 file')}"


def _inspect_shapenetpart(path: Path, report: Report, args) -> str:
    cats_file = path / "synsetoffset2category.txt"
    if not cats_file.is_file():
        raise DataError(f"{path}: not a ShapeNetPart folder (no synsetoffset2category.txt)")
    cats = [ln.split() for ln in _read_list(cats_file)]
    report.title(f"{path.name}/: official ShapeNetPart "
                 "(shapenetcore_partanno_segmentation_benchmark_v0_normal)")
    report.row("categories", f"{len(cats)} ({', '.join(c[0] for c in cats[:16])})")
    rows, present = [], []
    for split in ("train", "val", "test"):
        lst = path / "train_test_split" / f"shuffled_{split}_file_list.json"
        if not lst.is_file():
            report.problem(lst, "missing split list")
            continue
        try:
            entries = json.loads(lst.read_text())
        except (ValueError, UnicodeDecodeError):
            report.problem(lst, "not valid JSON")
            continue
        files = [path / "/".join(e.split("/")[-2:]) for e in entries]
        files = [f.with_name(f.name + ".txt") for f in files]
        here = [f for f in files if f.is_file()]
        present += here
        rows.append([split, _n(len(entries)), _n(len(here))])
        if len(here) < len(files):
            report.problem(lst, f"{_n(len(files) - len(here))} of {_n(len(files))} listed shapes have "
                                "no .txt file")
    print()
    report.table(["split", "listed", "present"], rows)
    if present:
        print()
        read_and_summarise(present, report, max_files=getattr(args, "max_files", None))
    return f"shapenetpart, {_plural(len(present), 'shape file')} present"


def _inspect_fewshot(path: Path, report: Report, args) -> str:
    settings = sorted(d for d in path.iterdir() if d.is_dir() and re.fullmatch(r"\d+way_?\d+shot", d.name))
    if not settings:
        raise DataError(f"{path}: not a few-shot folder (no <way>way_<shot>shot/ subfolders)")
    report.title(f"{path.name}/: official ModelNet40 few-shot (pickled folds; not opened here)")
    rows = []
    for d in settings:
        folds = sorted(int(f.stem) for f in d.glob("*.pkl") if f.stem.isdigit())
        rows.append([d.name, str(len(folds)), ", ".join(map(str, folds)) or "-"])
        missing = sorted(set(range(10)) - set(folds))
        if missing:
            report.problem(d, f"fold files missing: {', '.join(f'{m}.pkl' for m in missing)}")
    print()
    report.table(["setting", "folds", "present"], rows)
    return f"fewshot, {_plural(len(settings), 'setting')}"


INSPECTORS: dict[str, Callable[[Path, Report, object], str]] = {
    "file": _inspect_file, "folder": _inspect_folder, "files": _inspect_files,
    "modelnet40": _inspect_modelnet, "modelnet10": lambda p, r, a: _inspect_modelnet(p, r, a, ten=True),
    "shapenet55": _inspect_shapenet55, "scanobjectnn": _inspect_scanobjectnn,
    "shapenetpart": _inspect_shapenetpart, "fewshot": _inspect_fewshot,
}


def modelnet_folder_layout(path: Path) -> str | None:
    """``modelnet40`` / ``modelnet10`` when ``path`` holds exactly the ModelNet40 (ModelNet10) class folders,
    each with ``train/`` and ``test/`` (the ``<class>/{train,test}/<class>_NNNN.npy`` layout), else None."""
    from .official import MODELNET10_CLASSES, MODELNET40_CLASSES

    _, dirs = _entries(path)
    names = {d.name for d in dirs}
    for fmt, classes in (("modelnet40", MODELNET40_CLASSES), ("modelnet10", MODELNET10_CLASSES)):
        if names == set(classes) and all((path / c / "train").is_dir() and (path / c / "test").is_dir()
                                         for c in classes):
            return fmt
    return None


def detect_format(path: Path) -> str:
    """The dataset format at ``path`` (one of :data:`INSPECTORS`), or DataError when none fits."""
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_file():
        return "file"
    if (path / "modelnet40_shape_names.txt").is_file() or any(path.glob("modelnet40_*pts_fps.dat")):
        return "modelnet40"
    if (path / "modelnet10_shape_names.txt").is_file() or any(path.glob("modelnet10_*pts_fps.dat")):
        return "modelnet10"
    layout = modelnet_folder_layout(path)
    if layout:
        return layout
    root = shapenet55_root(path)
    if (root / "ShapeNet-55" / "train.txt").is_file() or (root / "shapenet_pc").is_dir():
        return "shapenet55"
    if any(path.glob("*objectdataset*.h5")) or any(path.glob("*/*objectdataset*.h5")):
        return "scanobjectnn"
    if (path / "synsetoffset2category.txt").is_file():
        return "shapenetpart"
    if any(path.glob("*way*shot/*.pkl")):
        return "fewshot"
    files, dirs = _entries(path)
    if dirs:
        return "folder"
    if any(f.suffix.lower() in SUPPORTED_EXTENSIONS for f in files):
        return "files"
    raise DataError(f"{path}: cannot tell the format: no class subfolders, no point-cloud files "
                    f"({' '.join(SUPPORTED_EXTENSIONS)}) and no official dataset files; "
                    "force one with --dataset (data inspect/prepare) or data.dataset=NAME (training)")


def inspect_command(args) -> int:
    """Entry point of ``pointbert data inspect``: 0 when all is well, 1 when problems were found."""
    path = Path(args.path).expanduser()
    fmt = getattr(args, "dataset", "auto") or "auto"
    if getattr(args, "max_files", None) is not None and args.max_files < 1:
        raise DataError(f"--max-files must be positive, got {args.max_files}")
    if fmt not in FORMATS:
        raise DataError(f"--dataset {fmt!r}: choose one of {', '.join(FORMATS)}")
    detected = detect_format(path)
    if fmt == "auto":
        fmt = detected
    elif fmt == "folder" and detected == "files":
        fmt = "files"
    elif (fmt == "file") != (detected == "file"):
        raise DataError(f"{path}: is a {'file' if detected == 'file' else 'folder'}; --dataset {fmt} expects "
                        f"a {'file' if fmt == 'file' else 'folder'}")
    report = Report(path if path.is_dir() else path.parent)
    try:
        summary = INSPECTORS[fmt](path, report, args)
        status = report.finish(summary)
        sys.stdout.flush()
    except BrokenPipeError:  # the report was piped into `head` or similar: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return status
