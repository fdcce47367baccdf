"""Fine-tuning heads on the Point-BERT backbone: classification (spec 6.1) and part segmentation (spec 6.5).

* :class:`Classifier` = backbone -> [cls ; max over patch tokens] (2*dim) -> :class:`ClassificationHead`.
* :class:`PartSegmenter` = backbone features of blocks 4, 8, 12 -> a point pyramid
  (all points, FPS 512, FPS 256, the patch centers) -> PointNet++ 3-NN feature propagation and DGCNN
  propagation back to every input point -> per-point part logits.
* :func:`part_seg_metrics` / :class:`PartSegMetrics`: point accuracy, instance and class mIoU with
  predictions restricted to the parts of the ground-truth category.

Every layer keeps the official attribute name and index, so official state dicts map mechanically:
the official 1x1 ``Conv1d``/``Conv2d`` weights ``(out, in, 1[, 1])`` are our channel-last ``Linear``
weights ``(out, in)`` with the unit dimensions squeezed. BatchNorm over per-point ``Linear`` outputs
flattened to ``(B*N, C)`` uses the same statistics as the official ``BatchNorm1d`` over ``(B, C, N)``.
Initialisation: PyTorch defaults, as the official fine-tuning models (spec 6.1).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from .config import Config, HeadConfig
from .data.official import SHAPENETPART_PARTS  # ShapeNetPart category -> part labels (spec 2.5)
from .tokenizer import GroupNormLast, edge_features
from .transformer import Backbone

# DGCNN propagation (spec 6.5 steps 7-8): hard-coded in the official `DGCNN_Propagation`.
DGCNN_K = 4  # neighbours per query point, in both the cross-level graph and the self-graph
DGCNN_HIDDEN = 512  # width of `layer1` (768 -> 512 for dim 384)
DGCNN_GROUPS = 4  # GroupNorm groups in `layer1` and `layer2`
LEAKY_SLOPE = 0.2


# --------------------------------------------------------------------------------------------------
# Classification (spec 6.1)
# --------------------------------------------------------------------------------------------------


class ClassificationHead(nn.Sequential):
    """The official ``cls_head_finetune``: Linear(in, 256) -> ReLU -> Dropout(0.5) -> Linear(256, classes).

    Indices 0 and 3 carry weights (official keys ``cls_head_finetune.{0,3}.{weight,bias}``). No BatchNorm.
    Input (B, in_dim) -> logits (B, num_classes).
    """

    def __init__(self, in_dim: int, cfg: HeadConfig | None = None):
        cfg = cfg or HeadConfig()
        super().__init__(
            nn.Linear(in_dim, cfg.hidden), nn.ReLU(inplace=True), nn.Dropout(cfg.dropout),
            nn.Linear(cfg.hidden, cfg.num_classes))
        self.num_classes = cfg.num_classes


class Classifier(nn.Module):
    """Point-BERT fine-tuning classifier (official ``PointTransformer``, spec 6.1).

    points (B, N, 3) -> Backbone tokens (B, 1+G, dim) -> pool [cls ; max] (B, 2*dim) -> head -> logits.
    """

    def __init__(self, cfg: Config | None = None):
        super().__init__()
        cfg = cfg or Config(kind="classifier")
        self.backbone = Backbone(cfg.patches, cfg.backbone)
        self.num_features = 2 * cfg.backbone.dim
        self.head_cfg = cfg.head
        self.head: nn.Module = ClassificationHead(self.num_features, cfg.head)
        self.num_classes = cfg.head.num_classes

    def forward_features(self, points: Tensor) -> Tensor:
        """points (B, N, 3) -> (B, 2*dim): [cls ; max over patches] after the final LayerNorm."""
        return self.backbone(points)

    def forward_head(self, features: Tensor) -> Tensor:
        """(B, 2*dim) -> logits (B, num_classes) (the features themselves after ``reset_classifier(0)``)."""
        return self.head(features)

    def forward(self, points: Tensor) -> Tensor:
        """points (B, N, 3) -> logits (B, num_classes)."""
        return self.forward_head(self.forward_features(points))

    def no_weight_decay(self) -> set[str]:
        """Names of parameters kept out of weight decay besides 1-D tensors and biases (spec 1.7)."""
        return {f"backbone.{n}" for n in self.backbone.no_weight_decay()}

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh head (PyTorch default init) for ``num_classes``; 0 makes ``forward`` return features."""
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.num_classes = num_classes
        if num_classes == 0:
            self.head = nn.Identity()
        else:
            cfg = HeadConfig(num_classes, self.head_cfg.hidden, self.head_cfg.dropout)
            self.head = ClassificationHead(self.num_features, cfg)
        device = self.backbone.norm.weight.device
        self.head.to(device)


# --------------------------------------------------------------------------------------------------
# Part segmentation building blocks (spec 6.5)
# --------------------------------------------------------------------------------------------------


class FeaturePropagation(nn.Module):
    """PointNet++ feature propagation (official ``PointNetFeaturePropagation``).

    For every query point, the features of its 3 nearest source points are interpolated with weights
    1/(d^2 + 1e-8) normalised to sum 1 (:func:`pointbert.ops.interpolate_3nn`), concatenated after the
    query point's own (skip) features, then passed through per-point Linear -> BatchNorm -> ReLU layers
    (official ``mlp_convs.{i}`` Conv1d(k=1) and ``mlp_bns.{i}`` BatchNorm1d).
    """

    def __init__(self, in_channels: int, widths: Sequence[int]):
        super().__init__()
        self.mlp_convs = nn.ModuleList()
        self.mlp_bns = nn.ModuleList()
        for width in widths:
            self.mlp_convs.append(nn.Linear(in_channels, width))
            self.mlp_bns.append(nn.BatchNorm1d(width))
            in_channels = width
        self.out_channels = in_channels

    def forward(self, query_xyz: Tensor, query_feats: Tensor, xyz: Tensor, feats: Tensor) -> Tensor:
        """Propagate ``feats`` from ``xyz`` to ``query_xyz``.

        Args:
            query_xyz: (B, S, 3) points where features are wanted.
            query_feats: (B, S, C1) their own (skip) features.
            xyz: (B, N, 3) source points, N >= 3.
            feats: (B, N, C2) source features.

        Returns:
            (B, S, out_channels).
        """
        B, S, _ = query_xyz.shape
        interpolated = ops.interpolate_3nn(query_xyz, xyz, feats)  # (B, S, C2)
        x = torch.cat([query_feats, interpolated], dim=-1).reshape(B * S, -1)  # (B*S, C1+C2)
        for conv, bn in zip(self.mlp_convs, self.mlp_bns):
            x = F.relu(bn(conv(x)))
        return x.view(B, S, self.out_channels)


class DGCNNPropagation(nn.Module):
    """DGCNN propagation from a coarse point set to a finer one (official ``DGCNN_Propagation``).

    1. Cross-level graph: each query point's k nearest source points (by xyz), edges
       concat[f_j - f_i, f_i] (2*dim) -> ``layer1`` (Linear without bias, GroupNorm, LeakyReLU 0.2)
       -> max over k. GroupNorm (:class:`pointbert.tokenizer.GroupNormLast`) has the official
       (B, C, N, k) semantics: statistics per sample over a group of channels and ALL positions
       (every query point and every neighbour).
    2. Self-graph among the query points (k nearest query points by xyz, itself included):
       edges (2*hidden) -> ``layer2`` (-> dim) -> max over k.
    """

    def __init__(self, dim: int = 384, hidden: int = DGCNN_HIDDEN, k: int = DGCNN_K,
                 groups: int = DGCNN_GROUPS):
        super().__init__()
        self.k = k
        self.layer1 = nn.Sequential(nn.Linear(2 * dim, hidden, bias=False),
                                    GroupNormLast(groups, hidden), nn.LeakyReLU(LEAKY_SLOPE))
        self.layer2 = nn.Sequential(nn.Linear(2 * hidden, dim, bias=False),
                                    GroupNormLast(groups, dim), nn.LeakyReLU(LEAKY_SLOPE))

    def forward(self, query_xyz: Tensor, query_feats: Tensor, xyz: Tensor, feats: Tensor) -> Tensor:
        """Refine ``query_feats`` with ``feats`` of the coarser level.

        Args:
            query_xyz: (B, S, 3), query_feats: (B, S, dim) the finer level.
            xyz: (B, N, 3), feats: (B, N, dim) the coarser level, N >= k.

        Returns:
            (B, S, dim).
        """
        with torch.no_grad():
            cross = ops.knn(query_xyz, xyz, self.k)  # (B, S, k) into the coarse level
            self_graph = ops.knn(query_xyz, query_xyz, self.k)  # (B, S, k) into the query level
        f = self.layer1(edge_features(query_feats, cross, feats))  # (B,S,k,2*dim) -> (B,S,k,hidden)
        f = ops.max_pool(f, 2)  # (B, S, hidden)
        f = self.layer2(edge_features(f, self_graph))  # (B, S, k, 2*hidden) -> (B, S, k, dim)
        return ops.max_pool(f, 2)  # (B, S, dim)


# --------------------------------------------------------------------------------------------------
# Part segmentation model (spec 6.5)
# --------------------------------------------------------------------------------------------------


class PartSegmenter(nn.Module):
    """Point-BERT part segmentation (official ``segmentation/models/PointTransformer.py::get_model``).

    points (B, N, 3), category (B,) -> part logits (B, N, num_parts). The official model returns
    ``log_softmax`` of these logits and trains with NLL; we return the logits and train with
    cross-entropy, which is the same loss (cross-entropy = NLL of log_softmax).

    Point pyramid: L0 = all N points, L1 = FPS(points, 512), L2 = FPS(points, 256) (a prefix of L1),
    L3 = the G patch centers. Features: H4, H8, H12 = outputs of blocks ``feature_blocks`` (through the
    final LayerNorm, cls dropped) on L3.
    """

    def __init__(self, cfg: Config | None = None):
        super().__init__()
        cfg = cfg or Config(kind="partseg")
        ps, dim = cfg.partseg, cfg.backbone.dim
        self.num_parts, self.num_categories = ps.num_parts, ps.num_categories
        self.feature_blocks = tuple(ps.feature_blocks)
        self.num_level1, self.num_level2 = ps.num_level1, ps.num_level2
        if cfg.patches.num_patches < DGCNN_K:
            raise ValueError(f"part segmentation needs at least {DGCNN_K} patches, "
                             f"got {cfg.patches.num_patches}")
        if ps.num_level2 < DGCNN_K:
            raise ValueError(f"partseg.num_level2 must be at least {DGCNN_K}, got {ps.num_level2}")

        self.backbone = Backbone(cfg.patches, cfg.backbone)
        self.propagation_2 = FeaturePropagation(3 + dim, [ps.prop_hidden, dim])  # 387 -> 1536 -> 384
        self.propagation_1 = FeaturePropagation(3 + dim, [ps.prop_hidden, dim])
        self.propagation_0 = FeaturePropagation(ps.num_categories + 3 + dim, [ps.prop_hidden, dim])  # 403
        self.dgcnn_pro_1 = DGCNNPropagation(dim)
        self.dgcnn_pro_2 = DGCNNPropagation(dim)
        self.conv1 = nn.Linear(dim, ps.head_hidden)
        self.bn1 = nn.BatchNorm1d(ps.head_hidden)
        self.drop1 = nn.Dropout(ps.dropout)
        self.conv2 = nn.Linear(ps.head_hidden, ps.num_parts)

    def no_weight_decay(self) -> set[str]:
        """Names of parameters kept out of weight decay besides 1-D tensors and biases (spec 1.7)."""
        return {f"backbone.{n}" for n in self.backbone.no_weight_decay()}

    def forward(self, points: Tensor, category: Tensor) -> Tensor:
        """points (B, N, 3), category (B,) int64 in [0, num_categories) -> part logits (B, N, num_parts)."""
        B, N, _ = points.shape
        # Step 1-2: transformer features of three depths on the G patch centers (level L3).
        # h4, h8, h12: (B, G, dim) each; centers (B, G, 3).
        (h4, h8, h12), centers = self.backbone.forward_intermediates(points, self.feature_blocks)

        # Step 3-4: the point pyramid and its initial features.
        xyz1 = ops.gather(points, ops.fps(points, self.num_level1))  # (B, 512, 3)
        xyz2 = xyz1[:, : self.num_level2]  # (B, 256, 3): FPS(256) is a prefix of FPS(512)
        one_hot = F.one_hot(category, self.num_categories).to(points.dtype)  # (B, 16)
        f0 = torch.cat([one_hot.unsqueeze(1).expand(B, N, -1), points], dim=-1)  # (B, N, 16+3)

        # Step 5-6: initialise L2 and L1 by 3-NN interpolation of H8 and H4 from the centers.
        f2 = self.propagation_2(xyz2, xyz2, centers, h8)  # (B, 256, dim)
        f1 = self.propagation_1(xyz1, xyz1, centers, h4)  # (B, 512, dim)

        # Step 7-8: refine bottom-up with DGCNN propagation L3 -> L2 -> L1.
        f2 = self.dgcnn_pro_2(xyz2, f2, centers, h12)
        f1 = self.dgcnn_pro_1(xyz1, f1, xyz2, f2)

        # Step 9: 3-NN interpolation L1 -> all points.
        f0 = self.propagation_0(points, f0, xyz1, f1)  # (B, N, dim)

        # Step 10: per-point head.
        x = self.drop1(F.relu(self.bn1(self.conv1(f0.reshape(B * N, -1)))))  # (B*N, 128)
        return self.conv2(x).view(B, N, self.num_parts)


# --------------------------------------------------------------------------------------------------
# Part segmentation metrics (spec 6.5)
# --------------------------------------------------------------------------------------------------


PartTable = Mapping[int, Sequence[int]] | Mapping[str, Sequence[int]]


def _index_table(category_parts: PartTable) -> dict[int, list[int]]:
    """category index -> part labels. Integer keys are the indices; a table keyed by category name
    (e.g. ``{"Airplane": [0, 1, 2, 3], ...}``) gives index i to its i-th entry."""
    if all(isinstance(c, int) for c in category_parts):
        return {int(c): list(p) for c, p in category_parts.items()}
    return {i: list(p) for i, p in enumerate(category_parts.values())}


def _category_mask(category_parts: dict[int, list[int]], num_parts: int, device: torch.device) -> Tensor:
    """(num_categories, num_parts) bool: True where the part belongs to the category."""
    mask = torch.zeros(max(category_parts) + 1, num_parts, dtype=torch.bool, device=device)
    for cat, parts in category_parts.items():
        mask[cat, parts] = True
    return mask


@torch.no_grad()
def shape_ious(logits: Tensor, parts: Tensor, category: Tensor,
               category_parts: PartTable = SHAPENETPART_PARTS) -> tuple[Tensor, Tensor]:
    """Per-shape IoU and per-point predictions restricted to the ground-truth category's parts.

    Args:
        logits: (B, N, P) part scores (logits or log-probabilities).
        parts: (B, N) int64 ground-truth part labels.
        category: (B,) int64 ground-truth categories (keys of ``category_parts``).
        category_parts: category index (or name, in index order) -> its part labels.

    Returns:
        ious (B,) float64: mean over the category's parts of |pred & gt| / |pred | gt|, a part absent
        from both counting 1; pred (B, N) int64.
    """
    P = logits.shape[-1]
    allowed = _category_mask(_index_table(category_parts), P, logits.device)[category]  # (B, P)
    pred = logits.masked_fill(~allowed.unsqueeze(1), float("-inf")).argmax(dim=-1)  # (B, N)
    pred_1h = F.one_hot(pred, P).bool()  # (B, N, P)
    gt_1h = F.one_hot(parts, P).bool()
    inter = (pred_1h & gt_1h).sum(dim=1).double()  # (B, P)
    union = (pred_1h | gt_1h).sum(dim=1).double()
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    ious = (iou * allowed).sum(dim=1) / allowed.sum(dim=1)
    return ious, pred


class PartSegMetrics:
    """Accumulates ShapeNetPart metrics over batches (spec 6.5, official ``train_partseg.py``).

    * ``accuracy``: correct points / all points, predictions restricted to the category's parts.
    * ``instance_miou``: mean per-shape IoU over all shapes.
    * ``class_miou``: mean over categories (those with at least one shape seen) of the category's
      mean shape IoU.
    * ``category_miou``: {category: mean shape IoU}.
    All values are fractions in [0, 1].
    """

    def __init__(self, category_parts: PartTable = SHAPENETPART_PARTS):
        self.category_parts = _index_table(category_parts)
        self.reset()

    def reset(self) -> None:
        self.correct = 0
        self.total = 0
        self.ious: list[Tensor] = []
        self.categories: list[Tensor] = []

    def update(self, logits: Tensor, parts: Tensor, category: Tensor) -> None:
        """logits (B, N, P), parts (B, N) int64, category (B,) int64."""
        ious, pred = shape_ious(logits, parts, category, self.category_parts)
        self.correct += int((pred == parts).sum())
        self.total += parts.numel()
        self.ious.append(ious.cpu())
        self.categories.append(category.detach().cpu())

    def compute(self) -> dict:
        if not self.ious:
            raise ValueError("PartSegMetrics.compute() called before any update()")
        ious, cats = torch.cat(self.ious), torch.cat(self.categories)
        per_cat = {int(c): float(ious[cats == c].mean()) for c in torch.unique(cats)}
        return {
            "accuracy": self.correct / self.total,
            "instance_miou": float(ious.mean()),
            "class_miou": sum(per_cat.values()) / len(per_cat),
            "category_miou": per_cat,
        }


def part_seg_metrics(logits: Tensor, parts: Tensor, category: Tensor,
                     category_parts: PartTable = SHAPENETPART_PARTS) -> dict:
    """One-shot :class:`PartSegMetrics` on a single batch: logits (B, N, P), parts (B, N), category (B,)."""
    metrics = PartSegMetrics(category_parts)
    metrics.update(logits, parts, category)
    return metrics.compute()
