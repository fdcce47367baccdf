"""Metrics (accuracy, mean class accuracy, linear-SVM probe, feature extraction) and the small pure
helpers of the stage recipes (BN momentum schedule, few-shot folds and summary)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pointbert import ops
from pointbert.metrics import accuracy, extract_features, mean_class_accuracy, svm_probe


def test_accuracy_takes_logits_or_ids():
    target = torch.tensor([0, 1, 2, 1])
    logits = torch.tensor([[5.0, 0, 0], [0, 3, 1], [1, 0, 0], [0, 2, 1]])  # third wrong
    assert accuracy(logits, target) == 0.75
    assert accuracy(np.array([0, 1, 0, 1]), target.numpy()) == 0.75
    with pytest.raises(ValueError):
        accuracy(torch.tensor([0, 1]), torch.tensor([0, 1, 2]))


def test_mean_class_accuracy_averages_per_class_recall():
    target = np.array([0, 0, 0, 1])
    pred = np.array([0, 0, 0, 0])
    assert accuracy(pred, target) == 0.75
    assert mean_class_accuracy(pred, target) == 0.5  # class 0: 1.0, class 1: 0.0
    # classes predicted but absent from the target do not count
    assert mean_class_accuracy(np.array([0, 2, 1]), np.array([0, 0, 1])) == pytest.approx(0.75)


def _blobs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 4
    centres = np.eye(4, 16) * 10
    return (centres[labels] + rng.normal(0, 0.5, (n, 16))).astype(np.float32), labels


@pytest.mark.parametrize("standardize", [False, True])
def test_svm_probe_separates_separable_features(standardize):
    x_train, y_train = _blobs(80, 0)
    x_test, y_test = _blobs(40, 1)
    assert svm_probe(x_train, y_train, x_test, y_test, standardize=standardize) == 1.0
    # and is not trivially 1: shuffled training labels give chance-level accuracy
    shuffled = np.random.default_rng(2).permutation(y_train)
    assert svm_probe(x_train, shuffled, x_test, y_test) < 0.6


def test_svm_probe_checks_shapes():
    with pytest.raises(ValueError, match="features"):
        svm_probe(np.zeros((4, 3)), np.zeros(4), np.zeros((2, 5)), np.zeros(2))


class _Clouds:
    def __init__(self, n: int, points: int):
        g = torch.Generator().manual_seed(0)
        self.points = torch.randn(n, points, 3, generator=g).numpy()
        self.labels = np.arange(n) % 3

    def __len__(self) -> int:
        return len(self.points)

    def __getitem__(self, i: int) -> dict:
        return {"points": self.points[i], "label": np.int64(self.labels[i])}


def test_extract_features_uses_fps_from_point_zero_in_dataset_order():
    ds = _Clouds(7, 300)
    seen = []

    def fn(points: torch.Tensor) -> torch.Tensor:
        seen.append(points)
        return points.mean(dim=1)  # (B, 3)

    feats, labels = extract_features(fn, ds, batch_size=3, device="cpu", num_points=64, progress=False)
    assert feats.shape == (7, 3) and feats.dtype == np.float32
    assert labels.tolist() == ds.labels.tolist()
    assert [len(p) for p in seen] == [3, 3, 1]
    pts = torch.from_numpy(ds.points)
    expected = ops.gather(pts, ops.fps(pts, 64))  # deterministic FPS, first point = point 0
    assert torch.allclose(torch.cat(seen), expected)
    assert torch.equal(torch.cat(seen)[:, 0], pts[:, 0])
    # clouds of exactly num_points are used as they are; fewer is an error
    feats2, _ = extract_features(lambda p: p[:, 0], ds, 4, "cpu", 300, progress=False)
    assert np.allclose(feats2, ds.points[:, 0])
    with pytest.raises(ValueError, match="fewer"):
        extract_features(lambda p: p[:, 0], ds, 4, "cpu", 301, progress=False)


def test_bn_momentum_schedule_of_partseg():
    from pointbert.tasks.partseg import bn_momentum

    assert [bn_momentum(e) for e in (0, 19, 20, 40, 60, 80, 299)] == pytest.approx(
        [0.1, 0.1, 0.05, 0.025, 0.0125, 0.01, 0.01])


def test_fewshot_folds_and_summary():
    from pointbert.config import ConfigError
    from pointbert.tasks.fewshot import markdown, parse_folds, summarise

    assert parse_folds("0-9") == list(range(10))
    assert parse_folds("0,3,5") == [0, 3, 5]
    assert parse_folds("0-2,7") == [0, 1, 2, 7]
    for bad in ("a", "1,1", "-1", "", "1-"):
        with pytest.raises(ConfigError):
            parse_folds(bad)
    rows = [{"fold": 0, "best_acc": 90.0, "best_epoch": 3, "last_acc": 80.0},
            {"fold": 1, "best_acc": 100.0, "best_epoch": 5, "last_acc": 90.0}]
    s = summarise(rows)
    assert s == {"best_acc_mean": 95.0, "best_acc_std": 5.0, "last_acc_mean": 85.0, "last_acc_std": 5.0}
    md = markdown({"way": 5, "shot": 10, "init": "x.pt", "episodes": "e", "protocol": "p", "folds": rows,
                   "summary": s})
    assert "| 1 | 100.00 | 5 | 90.00 |" in md and "95.00 +- 5.00" in md and "85.00 +- 5.00" in md
