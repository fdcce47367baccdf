"""Datasets: official formats, a folder of files, procedural shapes; batch transforms; prepared caches.

Every dataset returns the sample contract ``{"points": float32 (N, 3), "label": int64}`` (part
segmentation adds ``"parts"`` (N,) int64 and ``"category"`` int64) and has ``classes`` and
``labels``. :func:`build_dataset` turns a :class:`~pointbert.config.DataConfig` into one.

Importing this package is cheap (no torch, no numpy): the modules load when first used.
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import DataError

if TYPE_CHECKING:
    from ..config import DataConfig

DATASETS = ("synthetic", "shapenet55", "modelnet40", "modelnet10", "scanobjectnn", "fewshot", "shapenetpart",
            "folder")

_MODULES = {
    "synthetic": "SyntheticShapes SYNTHETIC_CLASSES SYNTHETIC_PARTS render_samples",
    "official": "ShapeNet55 ModelNet ModelNetFewShot ScanObjectNN ShapeNetPart make_fewshot_episode Episode "
                "EpisodeDataset MODELNET40_CLASSES SCANOBJECTNN_CLASSES SHAPENETPART_CATEGORIES "
                "SHAPENETPART_PARTS load_numpy_pickle",
    "cache": "CachedDataset prepare_cache find_cache",
    "folder": "FolderDataset",
}
_EXPORTS = {name: module for module, names in _MODULES.items() for name in names.split()}

__all__ = ["DATASETS", "build_dataset", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class ConcatDataset:
    """Items of several datasets one after the other (``labels`` concatenated, ``classes`` of the first)."""

    def __init__(self, parts: list[Any]):
        import numpy as np

        self.parts = parts
        self.classes = getattr(parts[0], "classes", None)
        self.labels = np.concatenate([p.labels for p in parts])
        self._ends = np.cumsum([len(p) for p in parts])

    def __len__(self) -> int:
        return int(self._ends[-1])

    def __getitem__(self, index: int) -> dict:
        import numpy as np

        if not 0 <= index < len(self):
            raise IndexError(index)
        k = int(np.searchsorted(self._ends, index, side="right"))
        return self.parts[k][index - (int(self._ends[k - 1]) if k else 0)]


def build_dataset(data_cfg: DataConfig, split: str, *, seed: int = 0) -> Any:
    """The dataset named by ``data_cfg.dataset`` for ``split`` (``train``, ``test``; ``val`` where it exists).

    * ``synthetic``: :class:`SyntheticShapes` (``data_cfg.num_points`` points; ``whole`` adds test to train).
    * ``shapenet55``: random ``num_points`` subsets; ``whole`` = test + train for pre-training.
    * ``modelnet40`` / ``modelnet10`` / ``scanobjectnn``: full stored clouds (8192 points for the
      official ModelNet caches, 2048 for ScanObjectNN); the training loop takes ``num_points`` of the
      ``point_pool`` FPS points per batch (:func:`~pointbert.data.transforms.fps_subsample`).
    * ``fewshot``: the official ``{way}way_{shot}shot/{fold}.pkl`` under ``path``; otherwise a new
      episode (seeded by ``fold``) drawn from the labelled dataset at ``path`` (synthetic when empty).
    * ``shapenetpart``: ``train`` means the official ``trainval``.
    * ``folder``: :class:`~pointbert.data.folder.FolderDataset` fitted to ``num_points``.

    A cache written by ``pointbert data prepare`` (``path`` itself, or ``path/.pointbert-cache``) is
    used when present; a stale one is an error naming the fix. ``seed`` seeds per-item sampling.
    """
    name, path = data_cfg.dataset, data_cfg.path
    if name not in DATASETS:
        raise DataError(f"data.dataset must be one of {', '.join(DATASETS)}, got {name!r}")
    if name == "synthetic":
        from .synthetic import SyntheticShapes

        ds = SyntheticShapes(split, num_points=data_cfg.num_points)
        if data_cfg.whole and split == "train":
            return ConcatDataset([SyntheticShapes("test", num_points=data_cfg.num_points), ds])
        return ds
    if name == "fewshot":
        return _fewshot(data_cfg, split, seed)
    if not path:
        raise DataError(f"data.path is empty: the {name} dataset needs the folder that holds it")
    from .cache import CachedDataset, find_cache

    tag = f"scanobjectnn-{data_cfg.variant}" if name == "scanobjectnn" else name
    cache = find_cache(path, tag)
    if name == "shapenetpart" and split == "train":
        split = "trainval"
    if cache is not None:
        if name == "shapenet55" and data_cfg.whole and split == "train":
            return ConcatDataset([CachedDataset(cache, s, data_cfg.num_points, seed=seed)
                                  for s in ("test", "train")])
        sampled = name in ("shapenet55", "shapenetpart")  # the others return the stored clouds
        return CachedDataset(cache, split, data_cfg.num_points if sampled else None, seed=seed)
    from . import official

    if name == "shapenet55":
        whole = data_cfg.whole and split == "train"
        return official.ShapeNet55(path, split, data_cfg.num_points, whole=whole, seed=seed)
    if name in ("modelnet40", "modelnet10"):
        return official.ModelNet(path, split, num_classes=int(name[8:]), seed=seed)
    if name == "scanobjectnn":
        return official.ScanObjectNN(path, split, variant=data_cfg.variant, seed=seed)
    if name == "shapenetpart":
        return official.ShapeNetPart(path, split, data_cfg.num_points, seed=seed)
    from .folder import FolderDataset

    return FolderDataset(path, split, data_cfg.num_points, seed=seed)


def _fewshot(data_cfg: DataConfig, split: str, seed: int) -> Any:
    from . import official

    path, way, shot, fold = data_cfg.path, data_cfg.way, data_cfg.shot, data_cfg.fold
    if path and official.fewshot_dir(path, way, shot):
        return official.ModelNetFewShot(path, split, way, shot, fold, seed=seed)
    if not path:
        base = "synthetic"
    else:
        from .inspect import detect_format

        base = detect_format(Path(path))
        if base not in ("modelnet40", "modelnet10", "folder"):
            raise DataError(f"{path}: no {way}way_{shot}shot/ episodes here, and a {base} dataset cannot be "
                            "the source of new episodes (use a labelled ModelNet or folder dataset)")
    sub = dataclasses.replace(data_cfg, dataset=base, whole=False)
    train, test = build_dataset(sub, "train", seed=seed), build_dataset(sub, "test", seed=seed)
    import numpy as np

    labels = np.concatenate([train.labels, test.labels])
    ep = official.make_fewshot_episode(labels, way, shot, fold, train_indices=np.arange(len(train)),
                                       test_indices=len(train) + np.arange(len(test)))
    if split == "train":
        return official.EpisodeDataset(train, ep.support, ep.classes)
    return official.EpisodeDataset(test, ep.query - len(train), ep.classes)
