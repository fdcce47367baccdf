"""Evaluation metrics as pure functions: accuracy, mean class accuracy, the linear-SVM probe (spec 5.6).

:func:`extract_features` runs any feature function over a labelled dataset the way the official
evaluations read data: batches in dataset order, each cloud reduced by FPS from its point 0 to
``num_points``, no augmentation. Part-segmentation metrics live beside their model in
:mod:`pointbert.heads` (:class:`~pointbert.heads.PartSegMetrics`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor


def _as_predictions(pred: Tensor | np.ndarray) -> np.ndarray:
    """Logits (B, C) -> argmax (B,); class ids (B,) unchanged."""
    pred = pred.detach().cpu().numpy() if isinstance(pred, Tensor) else np.asarray(pred)
    return pred.argmax(-1) if pred.ndim == 2 else pred


def accuracy(pred: Tensor | np.ndarray, target: Tensor | np.ndarray) -> float:
    """Overall accuracy as a fraction in [0, 1]: ``pred`` logits (B, C) or class ids (B,), ``target`` (B,)."""
    p, t = _as_predictions(pred), _as_predictions(target)
    if p.shape != t.shape or p.size == 0:
        raise ValueError(f"accuracy needs equal, non-empty shapes, got {p.shape} and {t.shape}")
    return float((p == t).mean())


def mean_class_accuracy(pred: Tensor | np.ndarray, target: Tensor | np.ndarray) -> float:
    """Mean over the classes present in ``target`` of the per-class accuracy (recall), in [0, 1]."""
    p, t = _as_predictions(pred), _as_predictions(target)
    if p.shape != t.shape or p.size == 0:
        raise ValueError(f"mean_class_accuracy needs equal, non-empty shapes, got {p.shape} and {t.shape}")
    return float(np.mean([(p[t == c] == c).mean() for c in np.unique(t)]))


def svm_probe(train_feats: np.ndarray, train_labels: np.ndarray, test_feats: np.ndarray,
              test_labels: np.ndarray, C: float = 1.0, standardize: bool = False) -> float:
    """Test accuracy (fraction) of a linear SVM fitted on frozen features (spec 5.6).

    scikit-learn ``LinearSVC(C=C)`` with its other defaults (squared hinge, L2 penalty), as the official
    probe; the features are used raw, as the official. ``standardize=True`` first scales every feature
    to zero mean and unit variance with statistics of the training features (often converges faster).
    Convergence warnings of the solver are silenced (the official probe emits and ignores them).

    Args:
        train_feats: (N, D), train_labels: (N,), test_feats: (M, D), test_labels: (M,).
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    train_feats, test_feats = np.asarray(train_feats), np.asarray(test_feats)
    if train_feats.ndim != 2 or test_feats.ndim != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(f"svm_probe needs (N, D) and (M, D) features, got {train_feats.shape} and "
                         f"{test_feats.shape}")
    svm = LinearSVC(C=C)
    model = make_pipeline(StandardScaler(), svm) if standardize else svm
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(train_feats, np.asarray(train_labels))
    return accuracy(model.predict(test_feats), np.asarray(test_labels))


@torch.no_grad()
def extract_features(fn: Callable[[Tensor], Tensor], dataset, batch_size: int, device: torch.device | str,
                     num_points: int, *, num_workers: int = 0, progress: bool = True,
                     desc: str = "features") -> tuple[np.ndarray, np.ndarray]:
    """Run ``fn`` over a labelled dataset: (features (len, D) float32, labels (len,) int64), dataset order.

    Each cloud is reduced to ``num_points`` by FPS starting at its point 0 (deterministic, the official
    test-time sampling; clouds with exactly ``num_points`` are kept), no augmentation; items are read
    with :func:`pointbert.engine.eval_loader` (in order, reseeded per index). ``fn`` maps points
    (B, num_points, 3) on ``device`` to features (B, D); the caller puts its model in eval mode.
    """
    from tqdm.auto import tqdm

    from .data.transforms import fps_subsample
    from .engine import eval_loader

    feats, labels = [], []
    bar = tqdm(total=len(dataset), desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for batch in eval_loader(dataset, batch_size, num_workers=num_workers, device=device):
        points = batch["points"].float()  # (B, N, 3)
        if points.shape[1] < num_points:
            raise ValueError(f"clouds have {points.shape[1]} points, fewer than the {num_points} asked for")
        if points.shape[1] > num_points:
            points = fps_subsample(points, num_points)  # deterministic FPS from point 0: (B, num_points, 3)
        feats.append(fn(points).float().cpu())
        labels.append(torch.as_tensor(batch["label"]).reshape(-1).cpu())
        bar.update(len(points))
    bar.close()
    return torch.cat(feats).numpy(), torch.cat(labels).numpy().astype(np.int64)
