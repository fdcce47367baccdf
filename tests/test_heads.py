"""Classification and part segmentation heads (spec 6.1, 6.5, 7.5, 7.6)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pointbert import ops
from pointbert.config import Config, preset
from pointbert.data.official import SHAPENETPART_CATEGORIES, SHAPENETPART_PARTS
from pointbert.heads import (
    ClassificationHead,
    Classifier,
    DGCNNPropagation,
    FeaturePropagation,
    PartSegmenter,
    PartSegMetrics,
    part_seg_metrics,
)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def full_classifier() -> Classifier:
    torch.manual_seed(0)
    return Classifier(Config(kind="classifier"))


@pytest.fixture(scope="module")
def full_segmenter() -> PartSegmenter:
    torch.manual_seed(0)
    return PartSegmenter(preset("partseg"))


# --------------------------------------------------------------------------------------------------
# Parameter counts and official key tables
# --------------------------------------------------------------------------------------------------


def test_classifier_parameter_count(full_classifier):
    assert n_params(full_classifier) == 22_065_960
    assert n_params(full_classifier.backbone.patch_embed) == 428_800
    assert n_params(full_classifier.backbone.blocks) == 21_279_744
    assert n_params(full_classifier.head) == 207_144


def test_partseg_parameter_count(full_segmenter):
    assert n_params(full_segmenter) == 27_085_874
    assert full_segmenter.backbone.num_patches == 128


def _bn(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
            f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}


def official_backbone_keys(dim: int = 384, depth: int = 12) -> dict[str, tuple[int, ...]]:
    """Spec 7.2 / 7.5: the PointTransformer trunk as the official state dict names it."""
    k: dict[str, tuple[int, ...]] = {"cls_token": (1, 1, dim), "cls_pos": (1, 1, dim)}
    k |= {"encoder.first_conv.0.weight": (128, 3, 1), "encoder.first_conv.0.bias": (128,)}
    k |= _bn("encoder.first_conv.1", 128)
    k |= {"encoder.first_conv.3.weight": (256, 128, 1), "encoder.first_conv.3.bias": (256,)}
    k |= {"encoder.second_conv.0.weight": (512, 512, 1), "encoder.second_conv.0.bias": (512,)}
    k |= _bn("encoder.second_conv.1", 512)
    k |= {"encoder.second_conv.3.weight": (256, 512, 1), "encoder.second_conv.3.bias": (256,)}
    k |= {"reduce_dim.weight": (dim, 256), "reduce_dim.bias": (dim,),
          "pos_embed.0.weight": (128, 3), "pos_embed.0.bias": (128,),
          "pos_embed.2.weight": (dim, 128), "pos_embed.2.bias": (dim,)}
    for i in range(depth):
        p = f"blocks.blocks.{i}."
        k |= {p + "norm1.weight": (dim,), p + "norm1.bias": (dim,),
              p + "attn.qkv.weight": (3 * dim, dim),
              p + "attn.proj.weight": (dim, dim), p + "attn.proj.bias": (dim,),
              p + "norm2.weight": (dim,), p + "norm2.bias": (dim,),
              p + "mlp.fc1.weight": (4 * dim, dim), p + "mlp.fc1.bias": (4 * dim,),
              p + "mlp.fc2.weight": (dim, 4 * dim), p + "mlp.fc2.bias": (dim,)}
    k |= {"norm.weight": (dim,), "norm.bias": (dim,)}
    return k


def official_partseg_keys() -> dict[str, tuple[int, ...]]:
    """Spec 7.6: the 223 entries of the segmentation model."""
    k = official_backbone_keys()
    for name, c_in in [("propagation_2", 387), ("propagation_1", 387), ("propagation_0", 403)]:
        k |= {f"{name}.mlp_convs.0.weight": (1536, c_in, 1), f"{name}.mlp_convs.0.bias": (1536,),
              f"{name}.mlp_convs.1.weight": (384, 1536, 1), f"{name}.mlp_convs.1.bias": (384,)}
        k |= _bn(f"{name}.mlp_bns.0", 1536) | _bn(f"{name}.mlp_bns.1", 384)
    for name in ("dgcnn_pro_1", "dgcnn_pro_2"):
        k |= {f"{name}.layer1.0.weight": (512, 768, 1, 1), f"{name}.layer1.1.weight": (512,),
              f"{name}.layer1.1.bias": (512,), f"{name}.layer2.0.weight": (384, 1024, 1, 1),
              f"{name}.layer2.1.weight": (384,), f"{name}.layer2.1.bias": (384,)}
    k |= {"conv1.weight": (128, 384, 1), "conv1.bias": (128,)} | _bn("bn1", 128)
    k |= {"conv2.weight": (50, 128, 1), "conv2.bias": (50,)}
    return k


BACKBONE_ROOTS = ("cls_token", "cls_pos", "encoder.", "reduce_dim.", "pos_embed.", "blocks.", "norm.")


def official_to_ours(key: str, shape: tuple[int, ...]) -> tuple[str, tuple[int, ...]]:
    """The mechanical map: rename the few differing modules, prefix the trunk, squeeze 1x1 conv dims."""
    if key.startswith(BACKBONE_ROOTS):
        key = "backbone." + key.replace("encoder.", "patch_embed.", 1).replace("blocks.blocks.", "blocks.", 1)
    key = key.replace("cls_head_finetune.", "head.", 1)
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    return key, shape


def _check_keys(model: nn.Module, official: dict[str, tuple[int, ...]]) -> None:
    mapped = dict(official_to_ours(k, s) for k, s in official.items())
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert set(ours) - set(mapped) == set(), "keys without an official counterpart"
    assert set(mapped) - set(ours) == set(), "official keys we lack"
    assert {k: s for k, s in ours.items() if mapped[k] != s} == {}


def test_classifier_official_keys(full_classifier):
    official = official_backbone_keys() | {
        "cls_head_finetune.0.weight": (256, 768), "cls_head_finetune.0.bias": (256,),
        "cls_head_finetune.3.weight": (40, 256), "cls_head_finetune.3.bias": (40,)}
    assert len(official) == 164  # spec 7.5
    _check_keys(full_classifier, official)


def test_partseg_official_keys(full_segmenter):
    official = official_partseg_keys()
    assert len(official) == 223  # spec 7.6
    _check_keys(full_segmenter, official)


# --------------------------------------------------------------------------------------------------
# Classifier
# --------------------------------------------------------------------------------------------------


def test_classifier_shapes_and_api():
    torch.manual_seed(0)
    cfg = preset("tiny-classifier")
    model = Classifier(cfg).eval()
    points = torch.randn(3, 256, 3)
    dim = cfg.backbone.dim
    feats = model.forward_features(points)
    assert feats.shape == (3, 2 * dim)
    tokens = model.backbone.forward_features(points)  # (B, 1+G, dim) after the final LayerNorm
    torch.testing.assert_close(feats, torch.cat([tokens[:, 0], tokens[:, 1:].amax(1)], -1))
    logits = model(points)
    assert logits.shape == (3, cfg.head.num_classes)
    torch.testing.assert_close(logits, model.head(feats))
    assert isinstance(model.head, ClassificationHead)
    assert [type(m) for m in model.head] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert model.head[2].p == 0.5
    assert model.no_weight_decay() == {"backbone.cls_token"}
    assert "backbone.cls_token" in dict(model.named_parameters())

    model.reset_classifier(7)
    assert model(points).shape == (3, 7) and model.num_classes == 7
    model.reset_classifier(0)
    torch.testing.assert_close(model(points), feats)


# --------------------------------------------------------------------------------------------------
# Part segmentation components vs references in the official (B, C, N[, k]) layout
# --------------------------------------------------------------------------------------------------


def ref_knn(query: torch.Tensor, points: torch.Tensor, k: int) -> torch.Tensor:
    """(B, S, 3), (B, N, 3) -> (B, S, k) by brute-force exact distances."""
    d = ((query[:, :, None] - points[:, None]) ** 2).sum(-1)
    return d.argsort(dim=-1)[..., :k]


def ref_feature_propagation(fp: FeaturePropagation, xyz1, xyz2, points1, points2):
    """Official PointNetFeaturePropagation with a per-point Python loop, Conv1d + BatchNorm1d on (B, C, N).

    xyz1 (B, 3, S) queries, xyz2 (B, 3, N) sources, points1 (B, C1, S), points2 (B, C2, N) -> (B, out, S).
    """
    B, _, S = xyz1.shape
    interp = torch.zeros(B, points2.shape[1], S, dtype=points2.dtype)
    for b in range(B):
        for s in range(S):
            d2 = ((xyz2[b] - xyz1[b, :, s : s + 1]) ** 2).sum(0)  # (N,)
            d2, idx = d2.sort()
            w = 1.0 / (d2[:3] + 1e-8)
            w = w / w.sum()
            interp[b, :, s] = (points2[b][:, idx[:3]] * w).sum(1)
    x = torch.cat([points1, interp], dim=1)
    for lin, bn in zip(fp.mlp_convs, fp.mlp_bns):
        conv = nn.Conv1d(lin.in_features, lin.out_features, 1).to(x.dtype)
        conv.weight.data.copy_(lin.weight[..., None])
        conv.bias.data.copy_(lin.bias)
        x = F.relu(bn(conv(x)))  # the same BatchNorm1d module, on (B, C, N)
    return x


def ref_dgcnn_propagation(mod: DGCNNPropagation, coor, f, coor_q, f_q):
    """Official DGCNN_Propagation: Conv2d + GroupNorm on (B, C, N, k) edge tensors.

    coor (B, 3, G), f (B, C, G) the coarse level; coor_q (B, 3, N), f_q (B, C, N) the queries.
    """
    k = mod.k

    def conv_gn(seq: nn.Sequential) -> nn.Sequential:
        lin, gn = seq[0], seq[1]
        conv = nn.Conv2d(lin.in_features, lin.out_features, 1, bias=False).to(f.dtype)
        conv.weight.data.copy_(lin.weight[..., None, None])
        norm = nn.GroupNorm(gn.num_groups, gn.num_channels).to(f.dtype)
        norm.load_state_dict(gn.state_dict())
        return nn.Sequential(conv, norm, nn.LeakyReLU(0.2))

    def graph_feature(coor_q, x_q, coor_k, x_k):
        B, C, Nk = x_k.shape
        Nq = x_q.shape[2]
        idx = ref_knn(coor_q.transpose(1, 2), coor_k.transpose(1, 2), k).transpose(1, 2)  # (B, k, Nq)
        idx = (idx + torch.arange(B)[:, None, None] * Nk).reshape(-1)
        feature = x_k.transpose(2, 1).reshape(B * Nk, C)[idx, :]
        feature = feature.view(B, k, Nq, C).permute(0, 3, 2, 1)  # (B, C, Nq, k)
        x_q = x_q.view(B, C, Nq, 1).expand(-1, -1, -1, k)
        return torch.cat([feature - x_q, x_q], dim=1)

    x = conv_gn(mod.layer1)(graph_feature(coor_q, f_q, coor, f)).max(dim=-1)[0]
    return conv_gn(mod.layer2)(graph_feature(coor_q, x, coor_q, x)).max(dim=-1)[0]


def _randomise(module: nn.Module) -> None:
    """Non-trivial norm affine parameters and running statistics, so the references test them."""
    g = torch.Generator().manual_seed(1)
    for m in module.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.GroupNorm)):
            m.weight.data = 1 + 0.3 * torch.randn(m.weight.shape, generator=g).to(m.weight)
            m.bias.data = 0.3 * torch.randn(m.bias.shape, generator=g).to(m.bias)
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean = 0.2 * torch.randn(m.running_mean.shape, generator=g).to(m.running_mean)
            m.running_var = 0.5 + torch.rand(m.running_var.shape, generator=g).to(m.running_var)


@pytest.mark.parametrize("train", [False, True])
def test_feature_propagation_matches_loop_reference(train):
    torch.manual_seed(0)
    fp = FeaturePropagation(5 + 7, [16, 8]).double()
    _randomise(fp)
    fp.train(train)
    xyz1, xyz2 = torch.rand(2, 20, 3, dtype=torch.float64), torch.rand(2, 9, 3, dtype=torch.float64)
    f1, f2 = torch.randn(2, 20, 5, dtype=torch.float64), torch.randn(2, 9, 7, dtype=torch.float64)
    ours = fp(xyz1, f1, xyz2, f2)
    assert ours.shape == (2, 20, 8)
    ref = ref_feature_propagation(fp, xyz1.transpose(1, 2), xyz2.transpose(1, 2),
                                  f1.transpose(1, 2), f2.transpose(1, 2))
    torch.testing.assert_close(ours, ref.transpose(1, 2))


def test_dgcnn_propagation_matches_conv2d_groupnorm_reference():
    torch.manual_seed(0)
    mod = DGCNNPropagation(dim=12, hidden=16).double()
    _randomise(mod)
    coor, coor_q = torch.rand(2, 10, 3, dtype=torch.float64), torch.rand(2, 25, 3, dtype=torch.float64)
    f, f_q = torch.randn(2, 10, 12, dtype=torch.float64), torch.randn(2, 25, 12, dtype=torch.float64)
    ours = mod(coor_q, f_q, coor, f)
    assert ours.shape == (2, 25, 12)
    ref = ref_dgcnn_propagation(mod, coor.transpose(1, 2), f.transpose(1, 2),
                                coor_q.transpose(1, 2), f_q.transpose(1, 2))
    torch.testing.assert_close(ours, ref.transpose(1, 2))


def test_dgcnn_groupnorm_is_per_sample():
    """GroupNorm statistics never mix samples: rescaling one sample's features leaves the others unchanged.
    (That they span all query points and neighbours is checked against nn.GroupNorm above.)"""
    torch.manual_seed(0)
    mod = DGCNNPropagation(dim=8, hidden=8).double()
    coor, coor_q = torch.rand(2, 6, 3, dtype=torch.float64), torch.rand(2, 12, 3, dtype=torch.float64)
    f, f_q = torch.randn(2, 6, 8, dtype=torch.float64), torch.randn(2, 12, 8, dtype=torch.float64)
    out = mod(coor_q, f_q, coor, f)
    f2 = f.clone()
    f2[1] *= 100.0  # changes sample 1 only
    torch.testing.assert_close(mod(coor_q, f_q, coor, f2)[0], out[0])


def ref_partseg(model: PartSegmenter, pts: torch.Tensor, cls_label: torch.Tensor) -> torch.Tensor:
    """The official get_model.forward (spec 6.5) in its (B, C, N) layout, built from the references above.

    pts (B, 3, N), cls_label one-hot (B, 16) -> log-probabilities (B, N, parts).
    """
    B, C, N = pts.shape
    bb = model.backbone
    neighborhood, center = bb.group(pts.transpose(1, 2))
    x, pos = bb.embed(neighborhood, center)
    feature_list = []
    for blk in bb.blocks:
        x = blk(x + pos)
        feature_list.append(x)
    feature_list = [bb.norm(feature_list[i])[:, 1:].transpose(1, 2) for i in model.feature_blocks]
    xyz = pts.transpose(1, 2)
    center_level_0 = pts
    f_level_0 = torch.cat([cls_label.view(B, 16, 1).repeat(1, 1, N), center_level_0], 1)
    center_level_1 = ops.gather(xyz, ops.fps(xyz, model.num_level1)).transpose(1, 2)
    f_level_1 = center_level_1
    center_level_2 = ops.gather(xyz, ops.fps(xyz, model.num_level2)).transpose(1, 2)
    f_level_2 = center_level_2
    center_level_3 = center.transpose(1, 2)
    f_level_3 = feature_list[2]
    f_level_2 = ref_feature_propagation(model.propagation_2, center_level_2, center_level_3, f_level_2,
                                        feature_list[1])
    f_level_1 = ref_feature_propagation(model.propagation_1, center_level_1, center_level_3, f_level_1,
                                        feature_list[0])
    f_level_2 = ref_dgcnn_propagation(model.dgcnn_pro_2, center_level_3, f_level_3, center_level_2, f_level_2)
    f_level_1 = ref_dgcnn_propagation(model.dgcnn_pro_1, center_level_2, f_level_2, center_level_1, f_level_1)
    f_level_0 = ref_feature_propagation(model.propagation_0, center_level_0, center_level_1, f_level_0,
                                        f_level_1)
    conv1 = nn.Conv1d(model.conv1.in_features, model.conv1.out_features, 1).to(pts.dtype)
    conv1.weight.data.copy_(model.conv1.weight[..., None])
    conv1.bias.data.copy_(model.conv1.bias)
    conv2 = nn.Conv1d(model.conv2.in_features, model.conv2.out_features, 1).to(pts.dtype)
    conv2.weight.data.copy_(model.conv2.weight[..., None])
    conv2.bias.data.copy_(model.conv2.bias)
    x = conv2(model.drop1(F.relu(model.bn1(conv1(f_level_0)))))
    return F.log_softmax(x, dim=1).permute(0, 2, 1)


@pytest.fixture(scope="module")
def tiny_segmenter() -> PartSegmenter:
    torch.manual_seed(0)
    return PartSegmenter(preset("tiny-partseg"))


def test_partseg_matches_official_forward(tiny_segmenter):
    model = PartSegmenter(preset("tiny-partseg")).double()
    model.load_state_dict(tiny_segmenter.state_dict())
    _randomise(model)
    model.eval()
    torch.manual_seed(1)
    points = torch.rand(2, 96, 3, dtype=torch.float64) * 2 - 1
    category = torch.tensor([3, 15])
    logits = model(points, category)
    assert logits.shape == (2, 96, 50)
    ref = ref_partseg(model, points.transpose(1, 2), F.one_hot(category, 16).double())
    torch.testing.assert_close(F.log_softmax(logits, dim=-1), ref)


def test_partseg_shapes_determinism_and_gradients(tiny_segmenter):
    model = tiny_segmenter
    torch.manual_seed(2)
    points = torch.rand(3, 256, 3) * 2 - 1
    category = torch.tensor([0, 4, 15])
    model.eval()
    with torch.no_grad():
        a, b = model(points, category), model(points, category)
    assert a.shape == (3, 256, 50)
    assert torch.equal(a, b)
    assert model.no_weight_decay() == {"backbone.cls_token"}

    model.train()
    parts = torch.randint(0, 50, (3, 256))
    loss = F.cross_entropy(model(points, category).reshape(-1, 50), parts.reshape(-1))
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    assert all(torch.isfinite(g).all() for g in grads.values())
    model.zero_grad(set_to_none=True)


def test_classifier_determinism_and_gradients():
    torch.manual_seed(0)
    model = Classifier(preset("tiny-classifier"))
    points = torch.randn(4, 256, 3)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(points), model(points))
    model.train()
    F.cross_entropy(model(points), torch.tensor([0, 1, 2, 3])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------

TOY_PARTS = {0: [0, 1], 1: [2, 3, 4]}


def _toy_batch():
    """Three shapes of 4 points; expected values worked out by hand in the test below."""
    logits = torch.zeros(3, 4, 5)
    # shape A (category 0): the best raw score of point 0 is part 3, outside category 0.
    logits[0, 0] = torch.tensor([2.0, 1, 0, 9, 0])
    logits[0, 1, 1] = logits[0, 2, 1] = logits[0, 3, 1] = 3.0  # pred [0, 1, 1, 1], gt [0, 0, 1, 1]
    # shape B (category 1): raw argmax part 0 (category 0) must be ignored; pred [2, 2, 3, 3] == gt.
    logits[1, :, 0] = 9.0
    logits[1, :2, 2] = 1.0
    logits[1, 2:, 3] = 1.0
    # shape C (category 1): pred [2, 2, 2, 4], gt [2, 2, 2, 2]; part 3 absent from both.
    logits[2, :3, 2] = 1.0
    logits[2, 3, 4] = 1.0
    parts = torch.tensor([[0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 2, 2]])
    category = torch.tensor([0, 1, 1])
    return logits, parts, category


def test_part_seg_metrics_hand_example():
    logits, parts, category = _toy_batch()
    m = part_seg_metrics(logits, parts, category, TOY_PARTS)
    # A: part 0 IoU 1/2, part 1 IoU 2/3 -> 7/12. B: 1, 1, and part 4 absent in both -> 1.
    # C: part 2 3/4, part 3 absent -> 1, part 4 0/1 -> 7/12.
    assert m["accuracy"] == pytest.approx(10 / 12)
    assert m["category_miou"] == pytest.approx({0: 7 / 12, 1: (1 + 7 / 12) / 2})
    assert m["instance_miou"] == pytest.approx((7 / 12 + 1 + 7 / 12) / 3)
    assert m["class_miou"] == pytest.approx((7 / 12 + (1 + 7 / 12) / 2) / 2)


def test_part_seg_metrics_accumulate():
    logits, parts, category = _toy_batch()
    acc = PartSegMetrics(TOY_PARTS)
    acc.update(logits[:1], parts[:1], category[:1])
    acc.update(logits[1:], parts[1:], category[1:])
    got, want = acc.compute(), part_seg_metrics(logits, parts, category, TOY_PARTS)
    assert got.pop("category_miou") == pytest.approx(want.pop("category_miou"))
    assert got == pytest.approx(want)
    acc.reset()
    with pytest.raises(ValueError):
        acc.compute()


def test_part_seg_metrics_table_by_name():
    """A table keyed by category name gives index i to its i-th entry."""
    logits, parts, category = _toy_batch()
    by_name = part_seg_metrics(logits, parts, category, {"mug": (0, 1), "lamp": (2, 3, 4)})
    assert by_name == part_seg_metrics(logits, parts, category, TOY_PARTS)


def test_shapenetpart_table():
    assert len(SHAPENETPART_CATEGORIES) == len(SHAPENETPART_PARTS) == 16
    assert [p for parts in SHAPENETPART_PARTS.values() for p in parts] == list(range(50))
    named = dict(zip(SHAPENETPART_CATEGORIES, SHAPENETPART_PARTS.values()))
    assert list(named["Airplane"]) == [0, 1, 2, 3] and list(named["Motorbike"]) == [30, 31, 32, 33, 34, 35]
    assert list(named["Table"]) == [47, 48, 49]
    # Default table: a Table shape whose raw argmax is an airplane part is predicted as a table part.
    logits = torch.zeros(1, 2, 50)
    logits[0, :, 0] = 5.0
    logits[0, :, 48] = 1.0
    m = part_seg_metrics(logits, torch.tensor([[48, 48]]), torch.tensor([15]))
    assert m["accuracy"] == 1.0 and m["instance_miou"] == 1.0
