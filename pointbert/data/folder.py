"""Users' own data: a folder with one subfolder per class, files in any format :mod:`.io` reads.

Three ways to split it, picked by what is there::

    root/<class>/train/*.ply  root/<class>/test/*.ply   # split subfolders (the shared ModelNet40 layout)
    root/<class>/*.ply        + split_file              # a text file naming the *test* files
    root/<class>/*.ply                                  # a seeded random split, stratified per class

Class ids are the positions of the class folder names in sorted order. Hidden files and folders
(``.name``) are ignored. Construction only lists folders (fast for tens of thousands of files) and
refuses a bad layout: no class folders, an empty class, a file of unknown type, a split file naming
files that are not there. File contents are checked when an item is read (or all at once by
:meth:`FolderDataset.check`); a bad file raises :class:`DataError` naming it, or with
``skip_bad=True`` is replaced by the next good item and recorded in ``bad_files``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .io import SUPPORTED_EXTENSIONS, fit_points, normalize, read_points

log = logging.getLogger(__name__)
SPLITS = ("train", "test", "all")


@dataclass
class FolderLayout:
    """What :func:`scan_folder` found: every file with its label and split, and any layout problems."""

    root: Path
    classes: list[str]
    kind: str  # "split subfolders" | "split file" | "random split"
    files: list[Path] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    splits: list[str] = field(default_factory=list)  # "train" | "test", one per file
    problems: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    def counts(self) -> dict[str, dict[str, int]]:
        """{class name: {"train": n, "test": n}}."""
        out = {c: {"train": 0, "test": 0} for c in self.classes}
        for label, split in zip(self.labels, self.splits):
            out[self.classes[label]][split] += 1
        return out


def _entries(folder: Path) -> tuple[list[Path], list[Path]]:
    """(non-hidden files, non-hidden subfolders) of ``folder``, sorted by name."""
    files, dirs = [], []
    with os.scandir(folder) as it:
        for e in it:
            if not e.name.startswith("."):
                (dirs if e.is_dir() else files).append(Path(e.path))
    return sorted(files), sorted(dirs)


def scan_folder(root: str | Path, *, split_file: str | Path | None = None, test_fraction: float = 0.2,
                seed: int = 0) -> FolderLayout:
    """List a class-per-folder dataset without reading any file.

    Raises DataError when ``root`` is not a folder or has no class subfolders; every other layout
    problem (empty class, unknown file type, bad split file line) is collected in ``problems``.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: {'is a file, not a folder' if root.exists() else 'no such folder'}")
    if not 0 <= test_fraction < 1:
        raise DataError(f"test_fraction must be in [0, 1), got {test_fraction}")
    class_dirs = _entries(root)[1]
    if not class_dirs:
        raise DataError(f"{root}: no class subfolders; expected one folder per class, "
                        f"e.g. {root / 'chair' / 'chair_0001.ply'}")
    classes = [d.name for d in class_dirs]
    has_split_dirs = {d.name: [s for s in ("train", "test") if (d / s).is_dir()] for d in class_dirs}
    subfolders = any(has_split_dirs.values())
    if subfolders and split_file is not None:
        raise DataError(f"{root}: has train/ and test/ subfolders and a split file {split_file} was given; "
                        "use one or the other")
    layout = FolderLayout(root, classes, "split subfolders" if subfolders else
                          "split file" if split_file is not None else "random split")
    for label, d in enumerate(class_dirs):
        if subfolders and not has_split_dirs[d.name]:
            layout.problems.append((str(d), "has no train/ or test/ subfolder, unlike the other classes"))
            continue
        before = len(layout.files)
        for split, folder in ([(s, d / s) for s in has_split_dirs[d.name]] if subfolders else [("train", d)]):
            for f in _entries(folder)[0]:
                if f.suffix.lower() not in SUPPORTED_EXTENSIONS:
                    layout.problems.append((str(f), f"unsupported file type {f.suffix or '(no extension)'!r}"
                                                    f"; supported: {' '.join(SUPPORTED_EXTENSIONS)}"))
                    continue
                layout.files.append(f)
                layout.labels.append(label)
                layout.splits.append(split)
        if len(layout.files) == before:
            layout.problems.append((str(d), "no point-cloud files in this class folder"))
    if split_file is not None:
        _apply_split_file(layout, Path(split_file))
    elif not subfolders:
        _random_split(layout, test_fraction, seed)
    return layout


def _apply_split_file(layout: FolderLayout, split_file: Path) -> None:
    """Files named in ``split_file`` (paths relative to the root, one per line) form the test split."""
    if not split_file.is_file():
        raise DataError(f"{split_file}: no such split file")
    try:
        lines = split_file.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{split_file}: cannot read the split file ({e.__class__.__name__})") from None
    index = {f.relative_to(layout.root).as_posix(): i for i, f in enumerate(layout.files)}
    layout.splits = ["train"] * len(layout.files)
    for n, line in enumerate(lines, 1):
        entry = line.split("#", 1)[0].strip().replace("\\", "/").removeprefix("./")
        if not entry:
            continue
        if entry not in index:
            layout.problems.append((f"{split_file}:{n}", f"{entry} is not a file of {layout.root}"))
            continue
        layout.splits[index[entry]] = "test"


def _random_split(layout: FolderLayout, test_fraction: float, seed: int) -> None:
    """Per class, a ``test_fraction`` share (rounded; at least one file when a class has two or more)
    goes to test; each class draws from its own stream seeded by (seed, label)."""
    labels = np.asarray(layout.labels, dtype=np.int64)
    splits = np.array(["train"] * len(labels), dtype=object)
    for label in range(len(layout.classes)):
        idx = np.flatnonzero(labels == label)
        n_test = min(max(round(test_fraction * len(idx)), int(test_fraction > 0 and len(idx) > 1)),
                     max(len(idx) - 1, 0))
        chosen = np.random.default_rng([seed, label]).permutation(idx)[:n_test]
        splits[chosen] = "test"
    layout.splits = list(splits)


class FolderDataset(torch.utils.data.Dataset):
    """A class-per-folder dataset of point-cloud or mesh files (see the module docstring for layouts).

    Items: ``{"points": float32 (num_points, 3), "label": int64}``. Each cloud is read
    (:func:`~pointbert.data.io.read_points`), normalised into the unit sphere (``normalize=True``, the
    official ``pc_norm``) and fitted to ``num_points`` (FPS from point 0 when larger, repeats when
    smaller; ``num_points=None`` keeps every point). Attributes: ``classes`` (names, index = label),
    ``files`` (paths), ``labels`` (int64 array), ``bad_files`` ((path, reason) skipped so far in this
    process; DataLoader workers keep their own lists, :meth:`check` gives the full one).
    """

    def __init__(self, root: str | Path, split: str = "train", num_points: int | None = 1024, *,
                 normalize: bool = True, skip_bad: bool = False, split_file: str | Path | None = None,
                 test_fraction: float = 0.2, seed: int = 0, mesh_points: int = 8192):
        if split not in SPLITS:
            raise DataError(f"{root}: split must be one of {', '.join(SPLITS)}, got {split!r}")
        layout = scan_folder(root, split_file=split_file, test_fraction=test_fraction, seed=seed)
        if layout.problems:
            (where, reason), more = layout.problems[0], len(layout.problems) - 1
            tail = (f" (and {more} more problem{'s' * (more > 1)}; "
                    f"see `pointbert data inspect {layout.root}`)") if more else ""
            raise DataError(f"{where}: {reason}{tail}")
        keep = [i for i, s in enumerate(layout.splits) if split == "all" or s == split]
        if not keep:
            raise DataError(f"{layout.root}: no {split} files ({layout.kind})")
        self.root, self.split, self.kind = layout.root, split, layout.kind
        self.classes = layout.classes
        self.files = [layout.files[i] for i in keep]
        self.labels = np.asarray([layout.labels[i] for i in keep], dtype=np.int64)
        self.num_points, self.normalize, self.skip_bad = num_points, normalize, skip_bad
        self.seed, self.mesh_points = seed, mesh_points
        self.bad_files: list[tuple[str, str]] = []
        self._bad: set[int] = set()
        self._warned_fit = False

    def __len__(self) -> int:
        return len(self.files)

    def __repr__(self) -> str:
        return (f"FolderDataset({str(self.root)!r}, split={self.split!r}, {len(self)} files, "
                f"{len(self.classes)} classes, {self.kind})")

    def load(self, index: int) -> np.ndarray:
        """The points of file ``index``: read, normalised, fitted. Raises DataError naming the file."""
        path = self.files[index]
        points = read_points(path, mesh_points=self.mesh_points, seed=self.seed)
        if self.normalize:
            points = normalize(points, source=path)
        if self.num_points is not None and len(points) != self.num_points:
            rng = np.random.default_rng([self.seed, index]) if len(points) < self.num_points else None
            points, warning = fit_points(points, self.num_points, rng=rng)
            if warning and not self._warned_fit:
                self._warned_fit = True
                log.warning("%s: %s (further such files are not reported)", path, warning)
        return points

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        n = len(self.files)
        for k in range(n):
            i = (index + k) % n
            if i in self._bad:
                continue
            try:
                return {"points": self.load(i), "label": self.labels[i]}
            except DataError as e:
                if not self.skip_bad:
                    raise
                self._bad.add(i)
                self.bad_files.append((str(self.files[i]), _reason(e, self.files[i])))
                if len(self.bad_files) == 1:
                    log.warning("skipping unreadable files (skip_bad=True); first: %s; "
                                "all are listed in dataset.bad_files", e)
        raise DataError(f"{self.root}: none of the {n} {self.split} files is readable")

    def check(self, progress: bool = True) -> list[tuple[str, str]]:
        """Read every file (a progress bar on stderr) and return the problems as (path, reason)."""
        from tqdm import tqdm

        problems = []
        for path in tqdm(self.files, desc=f"checking {self.root.name}", unit="file", leave=False,
                         disable=None if progress else True):
            try:
                points = read_points(path, mesh_points=self.mesh_points, seed=self.seed)
                if self.normalize:
                    normalize(points, source=path)
            except DataError as e:
                problems.append((str(path), _reason(e, path)))
        return problems


def _reason(e: DataError, path: Path | str) -> str:
    """The message of ``e`` without its leading ``"<path>: "``."""
    return str(e).removeprefix(f"{path}: ")
