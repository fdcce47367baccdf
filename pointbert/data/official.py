"""The official datasets, read in their published formats with the official sampling (spec 2).

* :class:`ShapeNet55`: ``shapenet_pc/<synset>-<model>.npy`` (8192, 3) and ``ShapeNet-55/{train,test}.txt``;
  item = random ``num_points`` subset, pc_norm.
* :class:`ModelNet` (40 or 10 classes): ``modelnet40_normal_resampled`` list files with the 10,000-line
  ``x,y,z,nx,ny,nz`` text files or the ``modelnet40_{split}_{N}pts_fps.dat`` pickles; or the folder
  layout ``<class>/{train,test}/<class>_NNNN.npy``; item = pc_norm'ed xyz, train permuted.
* :class:`ModelNetFewShot`: ``{way}way_{shot}shot/{fold}.pkl``; item = pc_norm'ed xyz, train permuted.
  :func:`make_fewshot_episode` draws new episodes from any labelled dataset.
* :class:`ScanObjectNN`: ``main_split[_nobg]/{training,test}_objectdataset[_augmentedrot_scale75].h5``;
  item = points as stored, train permuted.
* :class:`ShapeNetPart`: ``synsetoffset2category.txt``, ``<synset>/<id>.txt`` rows
  ``x y z nx ny nz part``, ``train_test_split/shuffled_{split}_file_list.json``; item = pc_norm,
  resampled with replacement.

Every dataset returns the sample contract ``{"points": float32 (N, 3), "label": int64}`` (ShapeNetPart
adds ``"parts"`` (N,) int64 and ``"category"`` int64) and has ``classes``, ``labels`` (int64, one per
item) and ``files``. Problems raise :class:`~pointbert.errors.DataError` naming the file. Pickles are
read with an unpickler that only rebuilds numpy arrays: loading one never runs code from it.

Randomness: training splits draw from a numpy Generator per process, seeded from ``seed`` and, inside
a DataLoader worker, the worker's torch seed (so workers differ and a seeded run repeats); other
splits draw from a Generator seeded by ``(seed, index)``, so evaluation sees the same points every
time (the official code uses unseeded global numpy there).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import sys
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ..errors import DataError
from .io import normalize as pc_normalize

log = logging.getLogger(__name__)

__all__ = ["MODELNET40_CLASSES", "MODELNET10_CLASSES", "SCANOBJECTNN_CLASSES", "SCANOBJECTNN_FILES",
           "SHAPENETPART_CATEGORIES", "SHAPENETPART_PARTS", "ShapeNet55", "ModelNet", "ModelNetFewShot",
           "ScanObjectNN", "ShapeNetPart", "Episode", "make_fewshot_episode", "EpisodeDataset",
           "load_numpy_pickle", "pc_normalize"]

MODELNET40_CLASSES = (
    "airplane bathtub bed bench bookshelf bottle bowl car chair cone cup curtain desk door dresser "
    "flower_pot glass_box guitar keyboard lamp laptop mantel monitor night_stand person piano plant radio "
    "range_hood sink sofa stairs stool table tent toilet tv_stand vase wardrobe xbox").split()
MODELNET10_CLASSES = "bathtub bed chair desk dresser monitor night_stand sofa table toilet".split()
SCANOBJECTNN_CLASSES = ("bag bin box cabinet chair desk display door shelf table bed pillow sink sofa "
                        "toilet").split()
#: variant -> (sub-folder, file stem); files are ``<sub>/{training,test}_<stem>.h5`` (spec 2.4)
SCANOBJECTNN_FILES = {"objectbg": ("main_split", "objectdataset"),
                      "objectonly": ("main_split_nobg", "objectdataset"),
                      "hardest": ("main_split", "objectdataset_augmentedrot_scale75")}
SHAPENETPART_CATEGORIES = ("Airplane Bag Cap Car Chair Earphone Guitar Knife Lamp Laptop Motorbike Mug "
                           "Pistol Rocket Skateboard Table").split()
_PART_COUNTS = (4, 2, 2, 4, 4, 3, 3, 2, 4, 2, 6, 2, 3, 3, 3, 3)
#: ShapeNetPart category -> its global part ids (50 in all; spec 2.5)
SHAPENETPART_PARTS: dict[str, tuple[int, ...]] = {
    c: tuple(range(sum(_PART_COUNTS[:i]), sum(_PART_COUNTS[:i + 1])))
    for i, c in enumerate(SHAPENETPART_CATEGORIES)}


# --------------------------------------------------------------------------------------------------
# shared helpers: randomness, safe pickles, list files
# --------------------------------------------------------------------------------------------------


def _worker_seed() -> int | None:
    torch = sys.modules.get("torch")  # no torch imported -> certainly not inside a DataLoader worker
    if torch is None:
        return None
    info = torch.utils.data.get_worker_info()
    return None if info is None else int(info.seed)


class _Random:
    """Reproducible numpy randomness for item sampling (see the module docstring)."""

    def __init__(self, seed: int, train: bool):
        self.seed, self.train = int(seed), train
        self._key: tuple | None = None
        self._gen: np.random.Generator | None = None

    def __call__(self, index: int) -> np.random.Generator:
        if not self.train:
            return np.random.default_rng([self.seed, int(index)])
        key = (os.getpid(), _worker_seed())
        if key != self._key:
            self._key = key
            self._gen = np.random.default_rng([self.seed] + ([] if key[1] is None else [key[1]]))
        return self._gen

    def __getstate__(self) -> dict:  # a pickled copy (spawned worker) starts its own stream
        return {**self.__dict__, "_key": None, "_gen": None}


_SAFE_GLOBALS = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy._core.multiarray", "_reconstruct"),
                 ("numpy._core.multiarray", "scalar"), ("numpy._core.numeric", "_frombuffer"),
                 ("_codecs", "encode")}  # protocol 2 stores bytes as _codecs.encode(str, "latin1")


class _Refused(pickle.UnpicklingError):
    pass


class _NumpyUnpickler(pickle.Unpickler):
    """Rebuilds only numpy arrays, dtypes and scalars (plus plain lists, tuples, dicts, numbers)."""

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("numpy.core"):  # pickles written by numpy 1.x
            module = "numpy._core" + module[len("numpy.core"):]
        if (module, name) not in _SAFE_GLOBALS:
            raise _Refused(f"it refers to {module}.{name}")
        if not hasattr(np, "_core"):  # numpy 1.x
            module = module.replace("numpy._core", "numpy.core")
        return super().find_class(module, name)


def load_numpy_pickle(path: str | Path) -> Any:
    """Load a pickle that may only contain numpy arrays and plain containers; never runs code from it."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return _NumpyUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except _Refused as e:
        raise DataError(f"{path}: refusing to load: not a plain pickle of numpy arrays ({e})") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, MemoryError,
            OSError) as e:
        raise DataError(f"{path}: truncated or not a pickle ({type(e).__name__}: {e})") from None


def _read_list(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"{path}: list file not found")
    return [s.strip() for s in path.read_text().splitlines() if s.strip()]


def _check_present(files: list[Path], present_only: bool, where: Path, what: str) -> list[int]:
    """Indices of files that exist; DataError naming the missing ones unless ``present_only``."""
    exists: dict[Path, set[str]] = {}
    keep = []
    for i, f in enumerate(files):
        if f.parent not in exists:
            exists[f.parent] = set(os.listdir(f.parent)) if f.parent.is_dir() else set()
        if f.name in exists[f.parent]:
            keep.append(i)
    if len(keep) < len(files) and not present_only:
        kept = set(keep)
        missing = [str(f.relative_to(where)) for i, f in enumerate(files) if i not in kept]
        raise DataError(f"{where}: {len(missing)} of {len(files)} files listed in {what} are missing "
                        f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); "
                        f"`pointbert data prepare --skip-bad` (present_only=True in Python) uses the {len(keep)} "
                        "present ones")
    if not keep:
        raise DataError(f"{where}: none of the {len(files)} files listed in {what} is present")
    return keep


def _check_split(split: str, allowed: tuple[str, ...], where: Path) -> None:
    if split not in allowed:
        raise DataError(f"{where}: split must be one of {', '.join(allowed)}, got {split!r}")


def _too_few(path: Path, n: int, need: int) -> DataError:
    return DataError(f"{path}: has {n} points, fewer than num_points={need}")


def _permuted(points: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.take(points, rng.permutation(len(points)), axis=0)  # np.take: 4x faster than fancy indexing


class _Official:
    """Common attributes and the ``raw`` access used by ``pointbert data prepare``."""

    root: Path
    split: str
    classes: list[str]
    labels: np.ndarray
    files: list[Path]

    def __len__(self) -> int:
        return len(self.labels)

    def source_files(self) -> list[Path]:
        """Every file this split reads (data and list files): the cache key is computed from them."""
        return list(self.files)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r}, split={self.split!r}, {len(self)} items)"


# --------------------------------------------------------------------------------------------------
# ShapeNet-55 (spec 2.1)
# --------------------------------------------------------------------------------------------------

_SHAPENET_NAME = re.compile(r"^(\d{8})-([^/\\]*)\.npy$")  # the official train list has two "<synset>-.npy"


def shapenet55_root(path: Path) -> Path:
    """The folder holding ``ShapeNet-55/`` and ``shapenet_pc/``: ``path`` itself, its ``ShapeNet55-34/``, or
    ``data/ShapeNet55-34/`` as in a checkout of the official code."""
    for root in (path / "ShapeNet55-34", path / "data" / "ShapeNet55-34"):
        if root.is_dir():
            return root
    return path


class ShapeNet55(_Official):
    """ShapeNet-55 clouds for the tokenizer and pre-training (no labels used; ``label`` = synset index).

    Args:
        root: the ``ShapeNet55-34`` folder (``shapenet_pc/`` and ``ShapeNet-55/{train,test}.txt``), or
            the folder holding it; ``shapenet_synset_dict.json`` (synset -> name, for ``classes``) is
            looked for in it and its parent.
        split: ``train`` or ``test``.
        num_points: points per item, a random subset without replacement, then pc_norm.
        whole: train split only: the test list prepended to the train list (52,470 models).
        present_only: use only the listed files that exist (otherwise missing files are an error).
    """

    def __init__(self, root: str | Path, split: str = "train", num_points: int = 1024, whole: bool = False,
                 *, seed: int = 0, present_only: bool = False):
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"{root}: ShapeNet-55 folder not found")
        root = shapenet55_root(root)
        _check_split(split, ("train", "test"), root)
        self.root, self.split, self.num_points, self.whole = root, split, int(num_points), whole
        lists = [root / "ShapeNet-55" / "test.txt"] if whole or split == "test" else []
        lists += [root / "ShapeNet-55" / "train.txt"] if split == "train" else []
        names = []
        for lst in lists:
            for line in _read_list(lst):
                if not _SHAPENET_NAME.match(line):
                    raise DataError(f"{lst}: bad entry {line!r}, expected '<synsetId>-<modelId>.npy'")
                names.append(line)
        self.list_files, self.missing = lists, 0
        pc = root / "shapenet_pc"
        if not pc.is_dir():
            raise DataError(f"{pc}: folder of point clouds not found")
        files = [pc / n for n in names]
        keep = _check_present(files, present_only, root, " and ".join(f"ShapeNet-55/{p.name}" for p in lists))
        self.files = [files[i] for i in keep]
        self.missing = len(files) - len(keep)
        synsets = [f.name[:8] for f in self.files]
        table = self._synset_table(root, synsets)
        ids = list(table)
        self.classes = list(table.values())
        self.labels = np.array([ids.index(s) for s in synsets], dtype=np.int64)
        self._rng = _Random(seed, split == "train")

    @staticmethod
    def _synset_table(root: Path, synsets: list[str]) -> dict[str, str]:
        for d in (root, root.parent):
            p = d / "shapenet_synset_dict.json"
            if p.is_file():
                try:
                    table = json.loads(p.read_text())
                except ValueError as e:
                    raise DataError(f"{p}: not valid JSON ({e})") from None
                if not isinstance(table, dict):
                    raise DataError(f"{p}: expected a JSON object synsetId -> name")
                unknown = sorted(set(synsets) - set(table))
                if unknown:
                    raise DataError(f"{p}: synset {unknown[0]} used in the split lists is not in it")
                return dict(sorted(table.items()))
        return {s: s for s in sorted(set(synsets))}

    def source_files(self) -> list[Path]:
        return self.list_files + self.files

    def raw(self, index: int) -> np.ndarray:
        """The stored cloud (8192, 3) float32, as in the file."""
        path = self.files[index]
        try:
            a = np.load(path, allow_pickle=False)
        except Exception as e:
            raise DataError(f"{path}: not a readable .npy array ({e})") from None
        if a.ndim != 2 or a.shape[1] < 3 or not np.issubdtype(a.dtype, np.number):
            raise DataError(f"{path}: expected a numeric array of shape (N, 3), got {a.dtype} {a.shape}")
        return np.ascontiguousarray(a[:, :3], dtype=np.float32)

    def __getitem__(self, index: int) -> dict:
        points = self.raw(index)
        if len(points) < self.num_points:
            raise _too_few(self.files[index], len(points), self.num_points)
        points = points[self._rng(index).permutation(len(points))[: self.num_points]]
        return {"points": pc_normalize(points, source=self.files[index]), "label": self.labels[index]}


# --------------------------------------------------------------------------------------------------
# ModelNet40 / ModelNet10 (spec 2.2)
# --------------------------------------------------------------------------------------------------


class ModelNet(_Official):
    """ModelNet40 or ModelNet10 classification, from any of the three published layouts.

    * official ``modelnet40_normal_resampled``: ``modelnet{C}_shape_names.txt`` (line = label),
      ``modelnet{C}_{split}.txt`` ids (class = id before its last underscore) and either the
      pre-processed ``modelnet{C}_{split}_{N}pts_fps.dat`` pickles (used when present) or the raw
      10,000-point ``<class>/<id>.txt`` files, reduced to ``num_points`` by FPS from point 0 per item
      (slow for 8192 points: run ``pointbert data prepare`` once, it does this in batches);
    * the folder layout ``<class>/{train,test}/<class>_NNNN.npy`` (classes in alphabetical order,
      ModelNet10 = its ten classes of ModelNet40), read as stored.

    Items: pc_norm'ed xyz (normals dropped); the train split permutes the point order.

    Args:
        root: the dataset folder.
        split: ``train`` or ``test``.
        num_classes: 40 or 10.
        num_points: points per item; default: 8192 for the official layout (the ``.dat`` caches),
            all stored points for the folder layout.
        present_only: official layout: use only the listed ``.txt`` files that exist.
    """

    def __init__(self, root: str | Path, split: str = "train", num_classes: int = 40,
                 num_points: int | None = None, *, seed: int = 0, present_only: bool = False):
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"{root}: ModelNet folder not found")
        if num_classes not in (10, 40):
            raise DataError(f"{root}: num_classes must be 40 or 10, got {num_classes}")
        _check_split(split, ("train", "test"), root)
        self.root, self.split, self.num_classes, self.missing = root, split, num_classes, 0
        self._rng = _Random(seed, split == "train")
        self._dat: list[np.ndarray] | None = None
        self._warned = False
        name = f"modelnet{num_classes}"
        names_file = root / f"{name}_shape_names.txt"
        if names_file.is_file() or any(root.glob(f"{name}_*pts_fps.dat")):
            self.layout = "official"
            self.num_points = 8192 if num_points is None else int(num_points)
            self.classes = _read_list(names_file) if names_file.is_file() else list(
                MODELNET40_CLASSES if num_classes == 40 else MODELNET10_CLASSES)
            dat = root / f"{name}_{split}_{self.num_points}pts_fps.dat"
            self.list_files = [names_file] if names_file.is_file() else []
            if dat.is_file():
                self._load_dat(dat)
            else:
                self._list_txt(root / f"{name}_{split}.txt", present_only)
        else:
            self.layout = "folder"
            self.num_points = None if num_points is None else int(num_points)
            self.list_files = []
            self._list_npy(root, num_classes)

    def _load_dat(self, dat: Path) -> None:
        obj = load_numpy_pickle(dat)
        ok = (isinstance(obj, (list, tuple)) and len(obj) == 2 and isinstance(obj[0], (list, tuple))
              and isinstance(obj[1], (list, tuple)) and len(obj[0]) == len(obj[1]))
        if not ok:
            raise DataError(f"{dat}: expected a pickled [list_of_points, list_of_labels] of equal length, "
                            f"got {type(obj).__name__}")
        for i, (p, lab) in enumerate(zip(*obj)):
            if not (isinstance(p, np.ndarray) and p.ndim == 2 and p.shape[1] >= 3):
                raise DataError(f"{dat}: item {i}: points must be an (N, 6) array, "
                                f"got {getattr(p, 'shape', p)!r}")
            if np.size(lab) != 1 or not 0 <= int(np.ravel(lab)[0]) < len(self.classes):
                raise DataError(f"{dat}: item {i}: label {lab!r} is not one of {len(self.classes)} classes")
        self._dat = list(obj[0])
        self.labels = np.array([int(np.ravel(x)[0]) for x in obj[1]], dtype=np.int64)
        self.files = [dat]

    def _list_txt(self, lst: Path, present_only: bool) -> None:
        ids = _read_list(lst)
        index = {c: i for i, c in enumerate(self.classes)}
        files, labels = [], []
        for sid in ids:
            cls = sid.rsplit("_", 1)[0]
            if cls not in index:
                raise DataError(f"{lst}: entry {sid!r}: class {cls!r} is not in {self.classes_file.name}")
            files.append(self.root / cls / f"{sid}.txt")
            labels.append(index[cls])
        keep = _check_present(files, present_only, self.root, lst.name)
        self.files = [files[i] for i in keep]
        self.missing = len(files) - len(keep)
        self.labels = np.array([labels[i] for i in keep], dtype=np.int64)
        self.list_files.append(lst)

    @property
    def classes_file(self) -> Path:
        return self.root / f"modelnet{self.num_classes}_shape_names.txt"

    def _list_npy(self, root: Path, num_classes: int) -> None:
        dirs = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
        if num_classes == 10:
            dirs = [d for d in dirs if d in MODELNET10_CLASSES]
        if not dirs or not (root / dirs[0] / self.split).is_dir():
            raise DataError(f"{root}: not a ModelNet folder: expected modelnet{num_classes}_shape_names.txt "
                            f"(official modelnet40_normal_resampled) or <class>/{self.split}/*.npy")
        self.classes, self.files, labels = dirs, [], []
        for label, c in enumerate(dirs):
            d = root / c / self.split
            if not d.is_dir():
                raise DataError(f"{d}: split folder not found")
            names = sorted(e.name for e in os.scandir(d) if e.name.endswith(".npy"))
            if not names:
                raise DataError(f"{d}: no .npy files")
            self.files += [d / n for n in names]
            labels += [label] * len(names)
        self.labels = np.array(labels, dtype=np.int64)

    def source_files(self) -> list[Path]:
        return self.list_files + self.files

    def raw(self, index: int) -> np.ndarray:
        """The item's full stored cloud, pc_norm'ed xyz (N, 3), in stored order (no sampling)."""
        if self._dat is not None:
            points, source = self._dat[index][:, :3], f"{self.files[0]} item {index}"
        elif self.layout == "official":
            source = self.files[index]
            try:
                a = np.loadtxt(source, delimiter=",", dtype=np.float32, ndmin=2)
            except (ValueError, OSError) as e:
                raise DataError(f"{source}: not a ModelNet text file of 'x,y,z,nx,ny,nz' rows "
                                f"({e})") from None
            if a.shape[1] != 6:
                raise DataError(f"{source}: expected 6 comma-separated columns x,y,z,nx,ny,nz, "
                                f"got {a.shape[1]}")
            points = a[:, :3]
        else:
            from .io import read_points

            source = self.files[index]
            points = read_points(source)
        return pc_normalize(points, source=source)

    def __getitem__(self, index: int) -> dict:
        points = self.raw(index)
        if self.num_points is not None and len(points) != self.num_points:
            if len(points) < self.num_points:
                raise _too_few(self.files[index], len(points), self.num_points)
            if not self._warned:
                self._warned = True
                log.warning("%s: each item is read from its text file and reduced by FPS to %d points (slow: "
                            "about a second per shape on a CPU); run `pointbert data prepare %s` once",
                            self.root, self.num_points, self.root)
            points = _fps(points, self.num_points, renormalize=True)
        if self.split == "train":
            points = _permuted(points, self._rng(index))
        return {"points": points, "label": self.labels[index]}


def _fps(points: np.ndarray, num: int, renormalize: bool = False) -> np.ndarray:
    """Farthest point sampling from point 0 of one cloud (N, 3) -> (num, 3).

    ``renormalize``: pc_normalize the sampled cloud again, as the official ModelNet loader normalises
    the cloud it reads from its FPS cache (spec 2.2), not the full 10,000-point file.
    """
    import torch

    from ..ops import fps

    out = points[fps(torch.from_numpy(points)[None], num)[0].numpy()]
    return pc_normalize(out) if renormalize else out


# --------------------------------------------------------------------------------------------------
# Few-shot (spec 2.3, 6.4)
# --------------------------------------------------------------------------------------------------


def fewshot_dir(root: str | Path, way: int, shot: int) -> Path | None:
    """The episode folder of (way, shot) under ``root``: ``5way_10shot/`` as the official loader reads it,
    or ``5way10shot/`` as its DATASET.md spells it (spec 11.15); None if neither exists."""
    for name in (f"{way}way_{shot}shot", f"{way}way{shot}shot"):
        if (Path(root) / name).is_dir():
            return Path(root) / name
    return None


class ModelNetFewShot(_Official):
    """An official few-shot episode ``{way}way_{shot}shot/{fold}.pkl``: support (train) or query (test) set.

    The pickle holds ``{"train": [...], "test": [...]}`` of ``(points (8192, 6), new_label,
    original_label)``. Items: pc_norm'ed xyz, train permuted; ``label`` = new label in [0, way);
    ``classes[new_label]`` is the ModelNet40 name of the original class.
    """

    def __init__(self, root: str | Path, split: str = "train", way: int = 5, shot: int = 10, fold: int = 0,
                 *, seed: int = 0):
        root = Path(root)
        _check_split(split, ("train", "test"), root)
        self.root, self.split, self.way, self.shot, self.fold = root, split, way, shot, fold
        path = (fewshot_dir(root, way, shot) or root / f"{way}way_{shot}shot") / f"{fold}.pkl"
        if not path.is_file():
            raise DataError(f"{path}: few-shot episode not found (folds 0-9 of {way}way_{shot}shot)")
        obj = load_numpy_pickle(path)
        if not (isinstance(obj, dict) and all(isinstance(obj.get(k), list) for k in ("train", "test"))):
            raise DataError(f"{path}: expected a pickled dict with 'train' and 'test' lists")
        items = obj[split]
        names: dict[int, int] = {}
        for i, it in enumerate(items):
            ok = (isinstance(it, (tuple, list)) and len(it) == 3 and isinstance(it[0], np.ndarray)
                  and it[0].ndim == 2 and it[0].shape[1] >= 3 and np.size(it[1]) == 1 and np.size(it[2]) == 1)
            if not ok:
                raise DataError(f"{path}: {split} item {i}: expected "
                                "(points (N, 6), new_label, original_label)")
            new, orig = int(np.ravel(it[1])[0]), int(np.ravel(it[2])[0])
            if not 0 <= new < way or not 0 <= orig < 40 or names.setdefault(new, orig) != orig:
                raise DataError(f"{path}: {split} item {i}: labels ({new}, {orig}) inconsistent with a "
                                f"{way}-way episode of ModelNet40")
        self._points = [it[0] for it in items]
        self.labels = np.array([int(np.ravel(it[1])[0]) for it in items], dtype=np.int64)
        self.original_labels = np.array([int(np.ravel(it[2])[0]) for it in items], dtype=np.int64)
        self.classes = [MODELNET40_CLASSES[names[k]] if k in names else f"class_{k}" for k in range(way)]
        self.files = [path]
        self._rng = _Random(seed, split == "train")

    def raw(self, index: int) -> np.ndarray:
        return pc_normalize(self._points[index][:, :3], source=f"{self.files[0]} item {index}")

    def __getitem__(self, index: int) -> dict:
        points = self.raw(index)
        if self.split == "train":
            points = _permuted(points, self._rng(index))
        return {"points": points, "label": self.labels[index]}


class Episode(NamedTuple):
    """A few-shot episode: ``support`` (way*shot,) and ``query`` (way*queries,) indices into the
    labelled dataset, and ``classes`` (way,): original label of each new label (new = position)."""

    support: np.ndarray
    query: np.ndarray
    classes: np.ndarray


def make_fewshot_episode(labels: np.ndarray, way: int, shot: int, seed: int = 0, *, queries: int = 20,
                         train_indices: np.ndarray | None = None,
                         test_indices: np.ndarray | None = None) -> Episode:
    """Draw a new few-shot episode from any labelled dataset, as ``generate_few_shot_data.py`` (spec 2.3).

    Shuffle the classes, keep ``way``; per class ``shot`` random shapes from ``train_indices`` and
    ``queries`` random shapes from ``test_indices``; shuffle both lists. Seeded (``seed`` plays the
    role of the fold) and reproducible. Without index lists both pools are the whole dataset, and
    support and query shapes are drawn disjoint.

    Args:
        labels: (n,) integer labels of the whole dataset.

    Returns:
        :class:`Episode` (support, query, classes); the new label of item ``i`` is the position of
        ``labels[i]`` in ``classes``.
    """
    labels = np.asarray(labels).astype(np.int64)
    rng = np.random.default_rng([int(seed), way, shot, queries])
    train = np.arange(len(labels)) if train_indices is None else np.asarray(train_indices, dtype=np.int64)
    test = np.arange(len(labels)) if test_indices is None else np.asarray(test_indices, dtype=np.int64)
    shared = train_indices is None and test_indices is None
    need = shot + queries if shared else None
    ok = [c for c in np.unique(labels[train])
          if (need and (labels[train] == c).sum() >= need)
          or (not need and (labels[train] == c).sum() >= shot and (labels[test] == c).sum() >= queries)]
    if len(ok) < way:
        raise DataError(f"few-shot episode: only {len(ok)} classes have {shot} support and {queries} query "
                        f"shapes, {way} needed")
    classes = rng.permutation(np.array(ok))[:way]
    support, query = [], []
    for c in classes:
        pool = rng.permutation(train[labels[train] == c])
        support.append(pool[:shot])
        if shared:
            query.append(pool[shot:shot + queries])
        else:
            query.append(rng.permutation(test[labels[test] == c])[:queries])
    return Episode(rng.permutation(np.concatenate(support)), rng.permutation(np.concatenate(query)), classes)


class EpisodeDataset:
    """A subset of a labelled dataset with labels renumbered by an :class:`Episode`'s classes."""

    def __init__(self, base: Any, indices: np.ndarray, classes: np.ndarray):
        self.base, self.indices = base, np.asarray(indices, dtype=np.int64)
        remap = {int(c): i for i, c in enumerate(classes)}
        self.labels = np.array([remap[int(base.labels[i])] for i in self.indices], dtype=np.int64)
        names = getattr(base, "classes", None)
        self.classes = [names[int(c)] if names else str(int(c)) for c in classes]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        item = dict(self.base[int(self.indices[index])])
        item["label"] = self.labels[index]
        return item


# --------------------------------------------------------------------------------------------------
# ScanObjectNN (spec 2.4)
# --------------------------------------------------------------------------------------------------


class ScanObjectNN(_Official):
    """ScanObjectNN: ``variant`` objectbg (OBJ_BG), objectonly (OBJ_ONLY) or hardest (PB_T50_RS).

    ``root`` is the ``ScanObjectNN`` folder holding ``main_split/`` and ``main_split_nobg/`` (or the
    sub-folder itself). h5 keys ``data`` (n, 2048, 3) and ``label`` (n,). Points are used as stored (no
    normalisation); the train split permutes the point order.
    """

    def __init__(self, root: str | Path, split: str = "train", variant: str = "objectbg", *, seed: int = 0):
        root = Path(root)
        if variant not in SCANOBJECTNN_FILES:
            raise DataError(f"{root}: ScanObjectNN variant must be one of {', '.join(SCANOBJECTNN_FILES)}, "
                            f"got {variant!r}; add data.variant=objectbg (or objectonly, hardest) to the command")
        _check_split(split, ("train", "test"), root)
        sub, stem = SCANOBJECTNN_FILES[variant]
        name = f"{'training' if split == 'train' else 'test'}_{stem}.h5"
        path = root / sub / name
        if not path.is_file() and (root / name).is_file() and root.name == sub:
            path = root / name
        if not path.is_file():
            raise DataError(f"{path}: ScanObjectNN {variant} {split} file not found")
        self.root, self.split, self.variant, self.files = root, split, variant, [path]
        self.points, self.labels = self._read(path)
        self.classes = list(SCANOBJECTNN_CLASSES)
        self._rng = _Random(seed, split == "train")

    @staticmethod
    def _read(path: Path) -> tuple[np.ndarray, np.ndarray]:
        import h5py

        try:
            with h5py.File(path, "r") as f:
                missing = [k for k in ("data", "label") if k not in f]
                if missing:
                    raise DataError(f"{path}: missing h5 dataset(s) {', '.join(missing)} "
                                    f"(found: {', '.join(f.keys()) or 'none'})")
                data, label = f["data"][:], f["label"][:]
        except OSError as e:
            raise DataError(f"{path}: not a readable HDF5 file ({e})") from None
        if data.ndim != 3 or data.shape[2] < 3:
            raise DataError(f"{path}: 'data' must have shape (n, 2048, 3), got {data.shape}")
        label = label.reshape(-1)
        if len(label) != len(data):
            raise DataError(f"{path}: 'label' has {len(label)} entries for {len(data)} clouds")
        if len(label) and not (0 <= label.min() and label.max() < len(SCANOBJECTNN_CLASSES)):
            raise DataError(f"{path}: labels must be in [0, {len(SCANOBJECTNN_CLASSES)}), got "
                            f"{label.min()}..{label.max()}")
        return np.ascontiguousarray(data[:, :, :3], dtype=np.float32), label.astype(np.int64)

    def raw(self, index: int) -> np.ndarray:
        return self.points[index]

    def __getitem__(self, index: int) -> dict:
        points = self.points[index]
        if self.split == "train":
            points = _permuted(points, self._rng(index))
        return {"points": points, "label": self.labels[index]}


# --------------------------------------------------------------------------------------------------
# ShapeNetPart (spec 2.5)
# --------------------------------------------------------------------------------------------------


class ShapeNetPart(_Official):
    """ShapeNetPart segmentation (``shapenetcore_partanno_segmentation_benchmark_v0_normal``).

    Items: ``points`` (num_points, 3) pc_norm'ed xyz resampled with replacement (also for test, as
    the official code; seeded per item there), ``parts`` (num_points,) int64 global part ids
    (:data:`SHAPENETPART_PARTS`), ``category`` = ``label`` int64 (index in
    :data:`SHAPENETPART_CATEGORIES`). Splits: train, val, test, trainval (= train + val). Parsed files
    are kept in memory (up to ``cache_size`` items, as the official loader).
    """

    SPLITS = ("train", "val", "test", "trainval")

    def __init__(self, root: str | Path, split: str = "trainval", num_points: int = 2048, *, seed: int = 0,
                 cache_size: int = 20000):
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"{root}: ShapeNetPart folder not found")
        _check_split(split, self.SPLITS, root)
        self.root, self.split, self.num_points, self.cache_size = root, split, int(num_points), cache_size
        cat_file = root / "synsetoffset2category.txt"
        synset_to_cat = {}
        for line in _read_list(cat_file):
            fields = line.split()
            if len(fields) != 2 or fields[0] not in SHAPENETPART_CATEGORIES:
                raise DataError(f"{cat_file}: bad line {line!r}, expected '<Category>\\t<synsetId>' "
                                "with one of the 16 ShapeNetPart categories")
            synset_to_cat[fields[1]] = SHAPENETPART_CATEGORIES.index(fields[0])
        self.list_files = [cat_file]
        self.files, labels = [], []
        for part in ("train", "val") if split == "trainval" else (split,):
            lst = root / "train_test_split" / f"shuffled_{part}_file_list.json"
            if not lst.is_file():
                raise DataError(f"{lst}: split list not found")
            try:
                entries = json.loads(lst.read_text())
            except ValueError as e:
                raise DataError(f"{lst}: not valid JSON ({e})") from None
            self.list_files.append(lst)
            for e in entries if isinstance(entries, list) else [None]:
                bits = e.split("/") if isinstance(e, str) else []
                if len(bits) != 3 or bits[1] not in synset_to_cat:
                    raise DataError(f"{lst}: bad entry {e!r}, expected 'shape_data/<synsetId>/<modelId>' "
                                    f"with a synset of {cat_file.name}")
                self.files.append(root / bits[1] / f"{bits[2]}.txt")
                labels.append(synset_to_cat[bits[1]])
        _check_present(self.files, False, root, "the split lists")
        self.labels = np.array(labels, dtype=np.int64)
        self.classes = list(SHAPENETPART_CATEGORIES)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._rng = _Random(seed, split in ("train", "trainval"))

    def source_files(self) -> list[Path]:
        return self.list_files + self.files

    def raw(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """All points of the shape: pc_norm'ed xyz (n, 3) float32 and part ids (n,) int64."""
        if index in self._cache:
            return self._cache[index]
        path = self.files[index]
        try:
            a = np.loadtxt(path, dtype=np.float32, ndmin=2)
        except (ValueError, OSError) as e:
            raise DataError(f"{path}: not a ShapeNetPart text file of 'x y z nx ny nz part' rows "
                            f"({e})") from None
        if a.shape[1] != 7:
            raise DataError(f"{path}: expected 7 columns 'x y z nx ny nz part', got {a.shape[1]}")
        parts = a[:, 6].astype(np.int64)
        allowed = SHAPENETPART_PARTS[self.classes[self.labels[index]]]
        bad = (parts < allowed[0]) | (parts > allowed[-1])
        if bad.any():
            raise DataError(f"{path}: part label {parts[bad][0]} is not a {self.classes[self.labels[index]]} "
                            f"part ({allowed[0]}-{allowed[-1]})")
        out = (pc_normalize(a[:, :3], source=path), parts)
        if len(self._cache) < self.cache_size:
            self._cache[index] = out
        return out

    def __getitem__(self, index: int) -> dict:
        points, parts = self.raw(index)
        choice = self._rng(index).choice(len(points), self.num_points, replace=True)
        label = self.labels[index]
        return {"points": points[choice], "label": label, "parts": parts[choice], "category": label}
