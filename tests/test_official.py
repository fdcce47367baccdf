"""Import of official Point-BERT checkpoints (spec 7): key tables, layouts, numerics, safety, the CLI.

No official files exist here: :func:`official_state` emits exactly the official keys and shapes of
spec 7.2-7.6 (random values, non-trivial BatchNorm statistics), and small reference modules written
in the OFFICIAL channel-first Conv1d/Conv2d layout load those tensors directly, so every numeric
check compares our converted model against the official computation on the official tensors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pointbert import ops
from pointbert.checkpoint import load_checkpoint, load_model, load_safetensors
from pointbert.cli import main
from pointbert.errors import CheckpointError
from pointbert.official import KEY_MAP, MODELNET40_CLASSES, convert_official, rename
from pointbert.patches import group

# --------------------------------------------------------------------------------------------------
# Fake official state dicts, key for key and shape for shape as spec 7.2-7.6
# --------------------------------------------------------------------------------------------------

FULL = dict(depth=12, dim=384, embed=256, vocab=8192, token_dim=256, decoder_dim=256, patch_size=32,
            proj=512, queue=16384, num_classes=40, num_parts=50)
SMALL = dict(depth=4, dim=128, embed=64, vocab=512, token_dim=64, decoder_dim=64, patch_size=16,
             proj=32, queue=64, num_classes=40, num_parts=50)


class Maker:
    """Random tensors (weights ~ N(0, 1/fan_in), affine/BN near 1/0) or free zero views (shapes only)."""

    def __init__(self, seed: int | None = 0):
        self.gen = None if seed is None else torch.Generator().manual_seed(seed)

    def w(self, *shape: int) -> Tensor:
        if self.gen is None:
            return torch.zeros(()).expand(shape)
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        return torch.randn(shape, generator=self.gen) / fan_in**0.5

    def near(self, n: int, center: float, spread: float = 0.1) -> Tensor:
        if self.gen is None:
            return torch.zeros(()).expand(n)
        return center + spread * torch.randn(n, generator=self.gen)

    def bn(self, out: dict, p: str, c: int) -> None:
        out[p + "weight"], out[p + "bias"] = self.near(c, 1.0), self.near(c, 0.0)
        out[p + "running_mean"] = self.near(c, 0.0, 0.2)
        out[p + "running_var"] = self.near(c, 1.0, 0.0) + (0 if self.gen is None else
                                                          torch.rand(c, generator=self.gen))
        out[p + "num_batches_tracked"] = torch.tensor(1000)

    def affine(self, out: dict, p: str, c: int) -> None:  # LayerNorm / GroupNorm
        out[p + "weight"], out[p + "bias"] = self.near(c, 1.0), self.near(c, 0.0)

    def linear(self, out: dict, p: str, o: int, i: int, *unit: int, bias: bool = True) -> None:
        out[p + "weight"] = self.w(o, i, *unit)
        if bias:
            out[p + "bias"] = self.near(o, 0.0)


def encoder_keys(m: Maker, out: dict, p: str, embed: int) -> None:
    m.linear(out, p + "first_conv.0.", 128, 3, 1)
    m.bn(out, p + "first_conv.1.", 128)
    m.linear(out, p + "first_conv.3.", 256, 128, 1)
    m.linear(out, p + "second_conv.0.", 512, 512, 1)
    m.bn(out, p + "second_conv.1.", 512)
    m.linear(out, p + "second_conv.3.", embed, 512, 1)


def trunk_keys(m: Maker, out: dict, p: str, s: dict, mask_token: bool = False) -> None:
    dim = s["dim"]
    out[p + "cls_token"] = m.w(1, 1, dim) * 0.5
    if mask_token:
        out[p + "mask_token"] = m.w(1, 1, dim) * 0.5
    out[p + "cls_pos"] = m.w(1, 1, dim) * 0.5
    encoder_keys(m, out, p + "encoder.", s["embed"])
    m.linear(out, p + "reduce_dim.", dim, s["embed"])
    m.linear(out, p + "pos_embed.0.", 128, 3)
    m.linear(out, p + "pos_embed.2.", dim, 128)
    for i in range(s["depth"]):
        b = f"{p}blocks.blocks.{i}."
        m.affine(out, b + "norm1.", dim)
        m.linear(out, b + "attn.qkv.", 3 * dim, dim, bias=False)
        m.linear(out, b + "attn.proj.", dim, dim)
        m.affine(out, b + "norm2.", dim)
        m.linear(out, b + "mlp.fc1.", 4 * dim, dim)
        m.linear(out, b + "mlp.fc2.", dim, 4 * dim)
    m.affine(out, p + "norm.", dim)


def dgcnn_keys(m: Maker, out: dict, p: str, cin: int, cout: int) -> None:
    m.linear(out, p + "input_trans.", 128, cin, 1)
    for i, (o, c) in enumerate([(256, 256), (512, 512), (512, 1024), (1024, 1024)], start=1):
        m.linear(out, f"{p}layer{i}.0.", o, c, 1, 1, bias=False)
        m.affine(out, f"{p}layer{i}.1.", o)
    m.linear(out, p + "layer5.0.", cout, 2304, 1, bias=False)
    m.affine(out, p + "layer5.1.", cout)


def dvae_keys(m: Maker, out: dict, p: str, s: dict) -> None:
    out[p + "codebook"] = m.w(s["vocab"], s["token_dim"]) * s["token_dim"] ** 0.5
    encoder_keys(m, out, p + "encoder.", s["embed"])
    dgcnn_keys(m, out, p + "dgcnn_1.", s["embed"], s["vocab"])
    dgcnn_keys(m, out, p + "dgcnn_2.", s["token_dim"], s["decoder_dim"])
    d, c = p + "decoder.", s["decoder_dim"]
    m.linear(out, d + "mlp.0.", 1024, c)
    m.linear(out, d + "mlp.2.", 1024, 1024)
    m.linear(out, d + "mlp.4.", 3 * s["patch_size"] // 4, 1024)
    m.linear(out, d + "final_conv.0.", 512, c + 5, 1)
    m.bn(out, d + "final_conv.1.", 512)
    m.linear(out, d + "final_conv.3.", 512, 512, 1)
    m.bn(out, d + "final_conv.4.", 512)
    m.linear(out, d + "final_conv.6.", 3, 512, 1)


def mpm_keys(m: Maker, out: dict, p: str, s: dict) -> None:
    trunk_keys(m, out, p, s, mask_token=True)
    m.linear(out, p + "lm_head.", s["vocab"], s["dim"])
    m.linear(out, p + "cls_head.0.", s["proj"], s["dim"])
    m.linear(out, p + "cls_head.2.", s["proj"], s["proj"])


def official_state(kind: str, s: dict, seed: int | None = 0) -> dict[str, Tensor]:
    """The official state dict of ``kind`` (spec 7.3-7.6) for sizes ``s``; seed None = zero views."""
    m, out = Maker(seed), {}
    if kind == "tokenizer":
        dvae_keys(m, out, "", s)
    elif kind == "pretrain":
        mpm_keys(m, out, "transformer_q.", s)
        mpm_keys(m, out, "transformer_k.", s)
        dvae_keys(m, out, "dvae.", s)
        out["queue"] = F.normalize(m.w(s["proj"], s["queue"]), dim=0) if seed is not None else m.w(
            s["proj"], s["queue"])
        out["queue_ptr"] = torch.tensor([s["queue"] // 2])
    elif kind == "classifier":
        trunk_keys(m, out, "", s)
        m.linear(out, "cls_head_finetune.0.", 256, 2 * s["dim"])
        m.linear(out, "cls_head_finetune.3.", s["num_classes"], 256)
    elif kind == "partseg":
        trunk_keys(m, out, "", s)
        dim = s["dim"]
        for i, skip in ((2, 3), (1, 3), (0, 19)):
            p = f"propagation_{i}."
            m.linear(out, p + "mlp_convs.0.", 1536, skip + dim, 1)
            m.linear(out, p + "mlp_convs.1.", dim, 1536, 1)
            m.bn(out, p + "mlp_bns.0.", 1536)
            m.bn(out, p + "mlp_bns.1.", dim)
        for i in (1, 2):
            p = f"dgcnn_pro_{i}."
            m.linear(out, p + "layer1.0.", 512, 2 * dim, 1, 1, bias=False)
            m.affine(out, p + "layer1.1.", 512)
            m.linear(out, p + "layer2.0.", dim, 1024, 1, 1, bias=False)
            m.affine(out, p + "layer2.1.", dim)
        m.linear(out, "conv1.", 128, dim, 1)
        m.bn(out, "bn1.", 128)
        m.linear(out, "conv2.", s["num_parts"], 128, 1)
    return out


def n_params(state: dict[str, Tensor]) -> int:
    return sum(v.numel() for k, v in state.items()
               if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))


# --------------------------------------------------------------------------------------------------
# Reference modules in the official layout (channel-first, Conv1d/Conv2d kernel 1)
# --------------------------------------------------------------------------------------------------


class RefEncoder(nn.Module):
    def __init__(self, embed: int):
        super().__init__()
        self.first_conv = nn.Sequential(nn.Conv1d(3, 128, 1), nn.BatchNorm1d(128), nn.ReLU(),
                                        nn.Conv1d(128, 256, 1))
        self.second_conv = nn.Sequential(nn.Conv1d(512, 512, 1), nn.BatchNorm1d(512), nn.ReLU(),
                                         nn.Conv1d(512, embed, 1))

    def forward(self, nb: Tensor) -> Tensor:  # (B, G, M, 3) -> (B, G, C)
        B, G, M, _ = nb.shape
        f = self.first_conv(nb.reshape(B * G, M, 3).transpose(2, 1))  # (BG, 256, M)
        f = torch.cat([f.max(dim=2, keepdim=True)[0].expand(-1, -1, M), f], dim=1)
        return self.second_conv(f).max(dim=2)[0].reshape(B, G, -1)


class RefAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * (C // self.heads) ** -0.5).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class RefMlp(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class RefBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), RefAttention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), RefMlp(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class RefBlocks(nn.Module):  # official TransformerEncoder: `blocks.blocks.{i}`
    def __init__(self, dim: int, depth: int, heads: int):
        super().__init__()
        self.blocks = nn.ModuleList(RefBlock(dim, heads) for _ in range(depth))


class RefTrunk(nn.Module):
    """Official PointTransformer trunk; ``features`` also returns the given blocks' outputs after ``norm``."""

    def __init__(self, s: dict, heads: int):
        super().__init__()
        dim = s["dim"]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, dim))
        self.encoder = RefEncoder(s["embed"])
        self.reduce_dim = nn.Linear(s["embed"], dim)
        self.pos_embed = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, dim))
        self.blocks = RefBlocks(dim, s["depth"], heads)
        self.norm = nn.LayerNorm(dim)

    def features(self, nb: Tensor, center: Tensor, fetch: tuple[int, ...] = (), mask: Tensor | None = None):
        x = self.reduce_dim(self.encoder(nb))
        if mask is not None:
            x = torch.where(mask[..., None], self.mask_token.expand_as(x), x)
        B = x.shape[0]
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)
        pos = torch.cat([self.cls_pos.expand(B, -1, -1), self.pos_embed(center)], dim=1)
        found = []
        for i, blk in enumerate(self.blocks.blocks):
            x = blk(x + pos)
            if i in fetch:
                found.append(self.norm(x)[:, 1:])
        return self.norm(x), found


class RefClassifier(RefTrunk):
    def __init__(self, s: dict, heads: int):
        super().__init__(s, heads)
        self.cls_head_finetune = nn.Sequential(nn.Linear(2 * s["dim"], 256), nn.ReLU(), nn.Dropout(0.5),
                                               nn.Linear(256, s["num_classes"]))

    def forward(self, nb: Tensor, center: Tensor) -> Tensor:
        x, _ = self.features(nb, center)
        return self.cls_head_finetune(torch.cat([x[:, 0], x[:, 1:].max(dim=1)[0]], dim=-1))


class RefMaskTransformer(RefTrunk):
    def __init__(self, s: dict, heads: int):
        super().__init__(s, heads)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, s["dim"]))
        self.lm_head = nn.Linear(s["dim"], s["vocab"])
        self.cls_head = nn.Sequential(nn.Linear(s["dim"], s["proj"]), nn.GELU(),
                                      nn.Linear(s["proj"], s["proj"]))

    def forward(self, nb: Tensor, center: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        x, _ = self.features(nb, center, mask=mask)
        return self.cls_head(x[:, 0]), self.lm_head(x[:, 1:])


def ref_knn(query: Tensor, points: Tensor, k: int) -> Tensor:
    """(B, S, 3), (B, N, 3) -> (B, S, k) by exact distances (no ties in random data)."""
    return torch.cdist(query, points).topk(k, dim=-1, largest=False)[1]


def graph_feature(x_q: Tensor, x_k: Tensor, idx: Tensor) -> Tensor:
    """Official get_graph_feature: x_q (B, C, S), x_k (B, C, N), idx (B, S, k) -> (B, 2C, S, k)."""
    B, C, S = x_q.shape
    k = idx.shape[-1]
    nb = torch.gather(x_k.unsqueeze(2).expand(B, C, S, x_k.shape[-1]), 3,
                      idx.unsqueeze(1).expand(B, C, S, k))  # (B, C, S, k)
    centre = x_q.unsqueeze(-1).expand(-1, -1, -1, k)
    return torch.cat([nb - centre, centre], dim=1)


def gn_block(cin: int, cout: int, conv=nn.Conv2d) -> nn.Sequential:
    return nn.Sequential(conv(cin, cout, 1, bias=False), nn.GroupNorm(4, cout), nn.LeakyReLU(0.2))


class RefDGCNN(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.input_trans = nn.Conv1d(cin, 128, 1)
        self.layer1, self.layer2 = gn_block(256, 256), gn_block(512, 512)
        self.layer3, self.layer4 = gn_block(1024, 512), gn_block(1024, 1024)
        self.layer5 = gn_block(2304, cout, nn.Conv1d)

    def forward(self, f: Tensor, center: Tensor) -> Tensor:  # (B, G, C), (B, G, 3) -> (B, G, C_out)
        idx = ref_knn(center, center, 4)
        x = self.input_trans(f.transpose(1, 2))
        feats = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(graph_feature(x, x, idx)).max(dim=-1)[0]
            feats.append(x)
        return self.layer5(torch.cat(feats, dim=1)).transpose(1, 2)


class RefDecoder(nn.Module):
    def __init__(self, c: int, num_fine: int):
        super().__init__()
        self.num_fine, self.num_coarse = num_fine, num_fine // 4
        self.mlp = nn.Sequential(nn.Linear(c, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                                 nn.Linear(1024, 3 * self.num_coarse))
        self.final_conv = nn.Sequential(nn.Conv1d(c + 5, 512, 1), nn.BatchNorm1d(512), nn.ReLU(),
                                        nn.Conv1d(512, 512, 1), nn.BatchNorm1d(512), nn.ReLU(),
                                        nn.Conv1d(512, 3, 1))
        a = torch.linspace(-0.05, 0.05, steps=2).view(1, 2).expand(2, 2).reshape(1, -1)
        b = torch.linspace(-0.05, 0.05, steps=2).view(2, 1).expand(2, 2).reshape(1, -1)
        self.folding_seed = torch.cat([a, b], dim=0).view(1, 2, 4)

    def forward(self, feature: Tensor) -> Tensor:  # (BG, C) -> fine (BG, num_fine, 3)
        bs = feature.shape[0]
        coarse = self.mlp(feature).reshape(bs, self.num_coarse, 3)
        point_feat = coarse.unsqueeze(2).expand(-1, -1, 4, -1).reshape(bs, self.num_fine, 3).transpose(2, 1)
        seed = self.folding_seed.unsqueeze(2).expand(bs, -1, self.num_coarse, -1)
        seed = seed.reshape(bs, -1, self.num_fine)
        feat = torch.cat([feature.unsqueeze(2).expand(-1, -1, self.num_fine), seed, point_feat], dim=1)
        return (self.final_conv(feat) + point_feat).transpose(2, 1)


class RefDVAE(nn.Module):
    def __init__(self, s: dict):
        super().__init__()
        self.encoder = RefEncoder(s["embed"])
        self.dgcnn_1 = RefDGCNN(s["embed"], s["vocab"])
        self.codebook = nn.Parameter(torch.zeros(s["vocab"], s["token_dim"]))
        self.dgcnn_2 = RefDGCNN(s["token_dim"], s["decoder_dim"])
        self.decoder = RefDecoder(s["decoder_dim"], s["patch_size"])

    def logits(self, nb: Tensor, center: Tensor) -> Tensor:
        return self.dgcnn_1(self.encoder(nb), center)

    def decode(self, ids: Tensor, center: Tensor) -> Tensor:  # -> fine (B, G, M, 3)
        B, G = ids.shape
        f = self.dgcnn_2(self.codebook[ids], center)
        return self.decoder(f.reshape(B * G, -1)).reshape(B, G, -1, 3)


def ref_interpolate(xyz: Tensor, xyz_src: Tensor, feats_q: Tensor | None, feats_src: Tensor) -> Tensor:
    """Official PointNetFeaturePropagation interpolation; channel-last in, (B, C, N) out (before the MLP)."""
    d = torch.cdist(xyz, xyz_src) ** 2
    d, idx = d.sort(dim=-1)
    d, idx = d[:, :, :3], idx[:, :, :3]
    w = 1.0 / (d + 1e-8)
    w = w / w.sum(dim=2, keepdim=True)
    interp = (ops.gather(feats_src, idx) * w[..., None]).sum(dim=2)
    return torch.cat([feats_q, interp], dim=-1).transpose(1, 2)


class RefPropagation(nn.Module):
    def __init__(self, cin: int, dim: int):
        super().__init__()
        self.mlp_convs = nn.ModuleList([nn.Conv1d(cin, 1536, 1), nn.Conv1d(1536, dim, 1)])
        self.mlp_bns = nn.ModuleList([nn.BatchNorm1d(1536), nn.BatchNorm1d(dim)])

    def forward(self, xyz, xyz_src, feats_q, feats_src):  # channel-last in and out
        x = ref_interpolate(xyz, xyz_src, feats_q, feats_src)
        for conv, bn in zip(self.mlp_convs, self.mlp_bns):
            x = F.relu(bn(conv(x)))
        return x.transpose(1, 2)


class RefDGCNNPropagation(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.layer1, self.layer2 = gn_block(2 * dim, 512), gn_block(1024, dim)

    def forward(self, xyz, f, xyz_q, f_q):  # coarse (xyz, f) -> fine (xyz_q, f_q); channel-last
        x = self.layer1(graph_feature(f_q.transpose(1, 2), f.transpose(1, 2), ref_knn(xyz_q, xyz, 4)))
        x = x.max(dim=-1)[0]
        x = self.layer2(graph_feature(x, x, ref_knn(xyz_q, xyz_q, 4))).max(dim=-1)[0]
        return x.transpose(1, 2)


class RefPartSeg(RefTrunk):
    def __init__(self, s: dict, heads: int):
        super().__init__(s, heads)
        dim = s["dim"]
        self.propagation_2, self.propagation_1 = RefPropagation(3 + dim, dim), RefPropagation(3 + dim, dim)
        self.propagation_0 = RefPropagation(19 + dim, dim)
        self.dgcnn_pro_1, self.dgcnn_pro_2 = RefDGCNNPropagation(dim), RefDGCNNPropagation(dim)
        self.conv1, self.bn1 = nn.Conv1d(dim, 128, 1), nn.BatchNorm1d(128)
        self.conv2 = nn.Conv1d(128, s["num_parts"], 1)

    def forward(self, pts: Tensor, cls: Tensor, num_patches: int, patch_size: int) -> Tensor:
        nb, center = group(pts, num_patches, patch_size)
        _, (h4, h8, h12) = self.features(nb, center, fetch=(3, 7, 11))
        l1 = ops.gather(pts, ops.fps(pts, 512))
        l2 = ops.gather(pts, ops.fps(pts, 256))
        f0 = torch.cat([F.one_hot(cls, 16).float()[:, None].expand(-1, pts.shape[1], -1), pts], dim=-1)
        f2 = self.propagation_2(l2, center, l2, h8)
        f1 = self.propagation_1(l1, center, l1, h4)
        f2 = self.dgcnn_pro_2(center, h12, l2, f2)
        f1 = self.dgcnn_pro_1(l2, f2, l1, f1)
        f0 = self.propagation_0(pts, l1, f0, f1).transpose(1, 2)
        return self.conv2(F.relu(self.bn1(self.conv1(f0)))).transpose(1, 2)


def ref_from(module: nn.Module, state: dict[str, Tensor]) -> nn.Module:
    module.load_state_dict(state, strict=True)
    return module.eval()


def cloud(B: int, N: int, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, N, 3, generator=g) * torch.tensor([1.0, 0.7, 0.5])


def close(a: Tensor, b: Tensor, rel: float = 1e-4) -> bool:
    """Equal up to ``rel`` of the largest magnitude."""
    return (a - b).abs().max().item() <= rel * b.abs().max().item()


# --------------------------------------------------------------------------------------------------
# Key tables at full size
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, entries, params", [
    ("tokenizer", 75, 27_620_891), ("classifier", 164, 22_065_960), ("partseg", 223, 27_085_874)])
def test_full_size_key_tables(kind, entries, params):
    state = official_state(kind, FULL, seed=None)
    assert len(state) == entries and n_params(state) == params  # spec 7.3, 7.5, 7.6
    cfg, model, report = convert_official({"base_model": state})
    assert report.kind == kind and report.tensors == entries and report.parameters == params
    b = cfg.backbone
    assert (b.depth, b.dim, b.num_heads) == (12, 384, 6) or kind == "tokenizer"
    if kind == "partseg":
        assert cfg.data.num_points == 2048 and cfg.patches.num_patches == 128
        assert cfg.partseg.feature_blocks == (3, 7, 11)
    else:
        assert cfg.data.num_points == 1024 and cfg.patches.num_patches == 64 and cfg.patches.patch_size == 32


def test_full_size_pretrain_key_table():
    state = official_state("pretrain", FULL, seed=None)
    q = {k: v for k, v in state.items() if k.startswith("transformer_q.")}
    assert len(q) == 167 and n_params(q) == 25_472_896  # spec 7.4
    assert len([k for k in state if k.startswith("transformer_k.")]) == 167
    assert len([k for k in state if k.startswith("dvae.")]) == 75
    cfg, model, report = convert_official(state, keep_momentum=True)
    assert report.tensors == len(state) == 411
    assert (cfg.tokenizer.vocab_size, cfg.mpm.proj_dim, cfg.mpm.queue_size) == (8192, 512, 16384)
    assert report.layout == "bare"


def test_every_key_map_rule_is_used():
    for kind, rules in KEY_MAP.items():
        keys = official_state(kind, SMALL, seed=None)
        used = {src for src, _ in rules for k in keys if rename(k, ((src, ""),)) is not None}
        assert used == {src for src, _ in rules}, kind


# --------------------------------------------------------------------------------------------------
# Numerics against the official layout, per kind
# --------------------------------------------------------------------------------------------------


def test_classifier_logits_match_official():
    state = official_state("classifier", SMALL)
    file = {"model": {"module." + k: v for k, v in state.items()}, "metrics": {"acc": torch.tensor(93.2)}}
    cfg, model, report = convert_official(file, num_points=256)
    assert report.layout == "model" and report.module_prefix == len(state) == 76
    assert report.metrics == {"metrics": {"acc": pytest.approx(93.2)}}
    assert cfg.backbone.num_heads == 2 and cfg.patches.num_patches == 16 and cfg.head.num_classes == 40
    ref = ref_from(RefClassifier(SMALL, heads=2), state)
    pts = cloud(3, 256)
    with torch.no_grad():
        ours = model(pts)
        nb, center = group(pts, 16, 32)
        assert close(ours, ref(nb, center))
        tokens, _ = ref.features(nb, center)
        assert close(model.forward_features(pts), torch.cat([tokens[:, 0], tokens[:, 1:].amax(1)], -1))


def test_tokenizer_ids_and_reconstruction_match_official():
    state = official_state("tokenizer", SMALL)
    file = {"base_model": {"module." + k: v for k, v in state.items()},
            "metrics": {"F-Score": np.float64(0.5), "CDL1": np.float32(9.5)}, "epoch": np.int64(7)}
    cfg, model, report = convert_official(file, num_points=256)
    assert report.kind == "tokenizer" and report.module_prefix == 75
    assert (cfg.tokenizer.vocab_size, cfg.patches.patch_size, cfg.patches.embed_dim) == (512, 16, 64)
    assert report.metrics["epoch"] == 7 and report.metrics["metrics"]["F-Score"] == 0.5
    ref = ref_from(RefDVAE(SMALL), state)
    pts = cloud(2, 256, seed=1)
    nb, center = group(pts, 16, 16)
    with torch.no_grad():
        assert close(model.patch_embed(nb), ref.encoder(nb), 1e-5)  # patch-embed features
        logits = ref.logits(nb, center)
        assert close(model.logits(nb, center), logits, 1e-4)
        ids = model.tokenize(pts)
        assert torch.equal(ids, logits.argmax(-1))
        assert ids.unique().numel() > 3  # non-trivial token ids
        assert close(model.decode(ids, center)[1], ref.decode(ids, center), 1e-4)


def test_import_keeps_the_official_options_and_refuses_mismatched_logit_norm():
    """The importer builds the official behaviour (spec 11.6, 11.7, 11.9); the GroupNorm on the logits is part
    of the official weights, so a model without it refuses them, and a file without it is incomplete."""
    from pointbert.tokenizer import DiscreteVAE

    state = official_state("tokenizer", SMALL, seed=None)
    cfg, model, _ = convert_official(state, num_points=256)
    t = cfg.tokenizer
    assert (t.logit_norm, t.kl_direction, t.chamfer_half) == (True, "uniform_q", True)
    assert (cfg.backbone.ffn_act, cfg.backbone.pos_every_block) == ("gelu", True) and model.dgcnn_1.out_norm
    cfg.tokenizer.logit_norm = False
    with pytest.raises(CheckpointError, match="tokenizer.logit_norm=true"):
        DiscreteVAE(cfg).load_state_dict(model.state_dict())
    lacking = {k: v for k, v in state.items() if not k.startswith("dgcnn_1.layer5.1.")}
    with pytest.raises(CheckpointError, match=r"not a complete official tokenizer checkpoint: 2 tensor\(s\) missing"):
        convert_official(lacking)
    cfg, model, _ = convert_official(official_state("classifier", SMALL, seed=None))
    assert (cfg.backbone.ffn_act, cfg.backbone.pos_every_block) == ("gelu", True)
    assert all(isinstance(b.mlp.act, nn.GELU) for b in model.backbone.blocks)


def test_pretrain_matches_official_and_drops_momentum(capsys):
    state = official_state("pretrain", SMALL)
    cfg, model, report = convert_official({"base_model": state, "metrics": {"acc": np.float64(0.87)}},
                                          num_points=256)
    n_k = 35 + 11 * SMALL["depth"]  # 167 at depth 12
    assert report.dropped == {"transformer_k.* (momentum encoder)": n_k, "queue, queue_ptr": 2}
    assert report.tensors == len(state) - n_k - 2
    q_ref = ref_from(RefMaskTransformer(SMALL, heads=2), {k[14:]: v for k, v in state.items()
                                                          if k.startswith("transformer_q.")})
    d_ref = ref_from(RefDVAE(SMALL), {k[5:]: v for k, v in state.items() if k.startswith("dvae.")})
    pts = cloud(2, 256, seed=2)
    nb, center = group(pts, 16, 16)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, :5] = True
    with torch.no_grad():
        cls, tokens, _ = model.query(nb, center, mask)
        ref_cls, ref_logits = q_ref(nb, center, mask)
        assert close(cls, ref_cls) and close(model.query.lm_head(tokens), ref_logits)
        assert torch.equal(model.targets(nb, center), d_ref.logits(nb, center).argmax(-1))
    for (name, pk), pq in zip(model.key.state_dict().items(), model.query.state_dict().values()):
        assert torch.equal(pk, pq), name
    assert not torch.equal(model.queue, state["queue"]) and int(model.queue_ptr) == 0
    # reproducible: the re-drawn queue does not depend on the global RNG
    assert torch.equal(convert_official(state, num_points=256)[1].queue, model.queue)

    _, kept, report = convert_official(state, num_points=256, keep_momentum=True)
    assert report.dropped == {} and report.tensors == len(state)
    assert torch.equal(kept.queue, state["queue"]) and int(kept.queue_ptr) == SMALL["queue"] // 2
    assert torch.equal(kept.key.backbone.blocks[1].mlp.fc1.weight,
                       state["transformer_k.blocks.blocks.1.mlp.fc1.weight"])


def test_partseg_matches_official():
    s = dict(SMALL, depth=12, dim=64)
    state = official_state("partseg", s)
    file = {"epoch": 99, "test_acc": np.float64(0.93), "inctance_avg_iou": np.float64(0.85),
            "model_state_dict": state, "optimizer_state_dict": {"state": {}, "param_groups": []}}
    cfg, model, report = convert_official(file, num_points=512)
    assert report.layout == "model_state_dict" and report.kind == "partseg"
    assert report.metrics == {"epoch": 99, "test_acc": 0.93, "inctance_avg_iou": 0.85}
    assert cfg.backbone.num_heads == 1 and cfg.partseg.num_parts == 50 and cfg.partseg.num_categories == 16
    ref = ref_from(RefPartSeg(s, heads=1), state)
    pts, cls = cloud(2, 512, seed=3), torch.tensor([3, 11])
    with torch.no_grad():
        assert close(model(pts, cls), ref(pts, cls, cfg.patches.num_patches, 32), 1e-4)


# --------------------------------------------------------------------------------------------------
# Files, safety, errors, the command line
# --------------------------------------------------------------------------------------------------


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_refuses_code_and_unrecognised_files(tmp_path):
    evil = tmp_path / "evil.pth"
    torch.save({"base_model": official_state("classifier", SMALL), "extra": Evil()}, evil)
    with pytest.raises(CheckpointError, match=r"refuses to unpickle builtins.print: loading it would"):
        convert_official(evil)
    arr = tmp_path / "array.pth"  # numpy arrays need more than the scalar globals
    torch.save({"base_model": official_state("classifier", SMALL), "metrics": {"acc": np.ones(2)}}, arr)
    with pytest.raises(CheckpointError, match="refuses to unpickle numpy"):
        convert_official(arr)
    odd = tmp_path / "odd.pth"
    torch.save({"base_model": {"module.foo.weight": torch.ones(2), "bar": torch.ones(1)}}, odd)
    with pytest.raises(CheckpointError, match=r"odd.pth: not a recognised .*bar \(1\), foo \(1\).*--kind"):
        convert_official(odd)
    with pytest.raises(CheckpointError, match="missing 'cls_token'"):
        convert_official(odd, kind="classifier")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth: not a PyTorch checkpoint"):
        convert_official(junk)
    with pytest.raises(CheckpointError, match="no such file"):
        convert_official(tmp_path / "missing.pth")
    incomplete = {k: v for k, v in official_state("classifier", SMALL).items() if "norm.bias" != k}
    with pytest.raises(CheckpointError, match="missing, e.g. 'backbone.norm.bias'"):
        convert_official(incomplete)
    extra = dict(official_state("classifier", SMALL), lm_head_extra=torch.ones(1))
    with pytest.raises(CheckpointError, match="no place in a classifier model, e.g. 'lm_head_extra'"):
        convert_official(extra)


def test_numpy_1_scalar_names_load(tmp_path):
    """Files written under numpy 1.x name the scalar constructor numpy.core.multiarray.scalar."""
    import io
    import zipfile

    src = tmp_path / "new.pth"
    torch.save({"base_model": official_state("classifier", SMALL), "metrics": {"acc": np.float64(0.5)}}, src)
    buf = io.BytesIO()
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray\nscalar" in data
                data = data.replace(b"numpy._core.multiarray\nscalar", b"numpy.core.multiarray\nscalar")
            zout.writestr(item, data)
    old = tmp_path / "old.pth"
    old.write_bytes(buf.getvalue())
    assert "numpy.core.multiarray.scalar" in torch.serialization.get_unsafe_globals_in_checkpoint(old)
    assert convert_official(old)[2].metrics == {"metrics": {"acc": 0.5}}


def test_import_command(tmp_path, capsys):
    src = tmp_path / "ModelNet_1k.pth"
    state = official_state("classifier", SMALL)
    torch.save({"base_model": {"module." + k: v for k, v in state.items()},
                "metrics": {"acc": np.float64(92.7)}, "epoch": 250}, src)
    out, st = tmp_path / "mn40.pt", tmp_path / "mn40.safetensors"
    assert main(["import", str(src), "--out", str(out), "--num-points", "256", "--safetensors", str(st)]) == 0
    text = capsys.readouterr().out
    assert "kind: classifier (recognised from its keys)" in text and "converted: 76 tensors" in text
    assert "40 ModelNet40 classes" in text and "num_heads 2 assumed" in text
    model, ckpt = load_model(out)
    assert ckpt["class_names"] == list(MODELNET40_CLASSES) and ckpt["class_names"][-1] == "xbox"
    assert ckpt["official_metrics"] == {"metrics": {"acc": 92.7}, "epoch": 250}
    assert ckpt["source"] == "ModelNet_1k.pth"
    ref = ref_from(RefClassifier(SMALL, heads=2), state)
    pts = cloud(2, 256)
    with torch.no_grad():
        assert close(model(pts), ref(*group(pts, 16, 32)))
        st_model, _ = load_safetensors(st)
        assert torch.equal(st_model(pts), model(pts))

    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"c{i}" for i in range(40)) + "\n")
    assert main(["import", str(src), "--out", str(out), "--num-points", "256", "--num-heads", "4",
                 "--class-names", str(names)]) == 0
    ckpt = load_checkpoint(out)
    assert ckpt["class_names"][3] == "c3" and ckpt["config"]["backbone"]["num_heads"] == 4
    capsys.readouterr()
    names.write_text("a\nb\n")
    assert main(["import", str(src), "--out", str(out), "--class-names", str(names)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "names.txt: 2 class names for a classifier with 40 outputs" in err


def test_import_command_pretrain_report_and_errors(tmp_path, capsys):
    src = tmp_path / "Point-BERT.pth"
    torch.save({"base_model": official_state("pretrain", SMALL), "metrics": {"acc": np.float64(0.87)}}, src)
    out = tmp_path / "pretrain.pt"
    assert main(["import", str(src), "--out", str(out), "--num-points", "256"]) == 0
    text = capsys.readouterr().out
    assert "dropped: 79 tensors transformer_k.* (momentum encoder), 2 tensors queue, queue_ptr" in text
    model, ckpt = load_model(out, kinds=("pretrain",))
    assert ckpt["official_metrics"] == {"metrics": {"acc": 0.87}}

    assert main(["import", str(out), "--out", str(tmp_path / "again.pt")]) == 2
    err = capsys.readouterr().err
    assert "already a pointbert checkpoint" in err and err.count("\n") == 1
    assert main(["import", str(src), "--out", str(tmp_path / "x.pt"), "--kind", "classifier"]) == 2
    assert "missing 'cls_token'" in capsys.readouterr().err
    assert main(["import", str(src), "--out", str(tmp_path / "x.pt"), "--num-points", "8"]) == 2
    assert "num_points" in capsys.readouterr().err


def test_official_files_are_accepted_wherever_a_checkpoint_is(tmp_path, capsys):
    """Commands, --init and --tokenizer read the released .pth files as they are (converted in memory)."""
    from pointbert.checkpoint import build_model
    from pointbert.config import Config
    from pointbert.tasks.finetune import load_init
    from pointbert.tasks.pretrain import load_tokenizer_checkpoint

    src = tmp_path / "ModelNet_1k.pth"
    state = official_state("classifier", SMALL)
    torch.save({"base_model": {"module." + k: v for k, v in state.items()}, "epoch": 250}, src)
    model, ckpt = load_model(src, ("classifier",))
    assert "ModelNet_1k.pth is an official Point-BERT classifier file, converted in memory" in capsys.readouterr().err
    assert ckpt["source"] == "ModelNet_1k.pth" and ckpt["class_names"][0] == "airplane"
    pts = cloud(2, 1024)
    ref = ref_from(RefClassifier(SMALL, heads=2), state)
    with torch.no_grad():
        assert close(model(pts), ref(*group(pts, 64, 32)))
    # the same as `pointbert import` with its defaults
    out = tmp_path / "mn40.pt"
    assert main(["import", str(src), "--out", str(out)]) == 0
    imported, _ = load_model(out)
    with torch.no_grad():
        assert torch.equal(imported(pts), model(pts))
    np.save(tmp_path / "x.npy", pts.numpy())
    for ckpt_path, logits in ((src, "direct.npy"), (out, "imported.npy")):
        assert main(["predict", str(ckpt_path), str(tmp_path / "x.npy"), "--out", str(tmp_path / logits)]) == 0
    assert np.array_equal(np.load(tmp_path / "direct.npy"), np.load(tmp_path / "imported.npy"))

    # a pre-trained file as --init of fine-tuning, a dVAE as the tokenizer of pre-training
    pre = tmp_path / "Point-BERT.pth"
    torch.save({"base_model": official_state("pretrain", SMALL)}, pre)
    fresh = build_model(Config.from_dict(load_checkpoint(out)["config"]))
    report = load_init(fresh, pre)
    assert report.loaded and all(k.startswith("head.") for k in report.new)
    dvae = tmp_path / "dVAE.pth"
    torch.save({"base_model": official_state("tokenizer", SMALL)}, dvae)
    tokenizer_state, tokenizer_cfg = load_tokenizer_checkpoint(dvae)
    assert tokenizer_cfg.tokenizer.vocab_size == SMALL["vocab"] and len(tokenizer_state) > 50
    assert "official Point-BERT tokenizer file" in capsys.readouterr().err
