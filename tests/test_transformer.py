"""The backbone: attention, blocks, position re-adding, pooling, intermediates, init, patches."""

import math

import pytest
import torch
from torch import nn

from pointbert.config import BackboneConfig, PatchConfig, preset
from pointbert.patches import PatchEmbed, group
from pointbert.transformer import Attention, Backbone, DropPath, Mlp, init_trunc_normal


def _tiny_backbone(seed=0):
    torch.manual_seed(seed)
    cfg = preset("tiny-classifier")
    return Backbone(cfg.patches, cfg.backbone).eval(), cfg


def test_attention_matches_explicit_softmax():
    torch.manual_seed(0)
    attn = Attention(dim=24, num_heads=3)
    x = torch.randn(2, 7, 24)
    B, L, C = x.shape
    qkv = attn.qkv(x).reshape(B, L, 3, 3, 8).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    w = (q @ k.transpose(-2, -1) * 8 ** -0.5).softmax(-1)
    ref = attn.proj((w @ v).transpose(1, 2).reshape(B, L, C))
    torch.testing.assert_close(attn(x), ref, atol=1e-5, rtol=1e-5)


def test_qkv_rows_are_q_then_k_then_v_heads_contiguous():
    """Official layout (spec 7.2): rows [q(dim); k(dim); v(dim)], 64-wide heads contiguous in each third."""
    attn = Attention(dim=8, num_heads=2)
    with torch.no_grad():
        attn.qkv.weight.zero_()
        attn.qkv.weight[16:24] = torch.eye(8)  # v = x, q = k = 0 -> uniform attention
        attn.proj.weight.copy_(torch.eye(8))
        attn.proj.bias.zero_()
    x = torch.randn(1, 5, 8)
    torch.testing.assert_close(attn(x), x.mean(1, keepdim=True).expand_as(x))


def test_drop_path_identity_in_eval_and_scaled_in_train():
    dp = DropPath(0.5)
    x = torch.ones(1000, 3, 4)
    assert torch.equal(dp.eval()(x), x)
    y = dp.train()(x)
    kept = y[:, 0, 0] != 0
    assert 400 < kept.sum() < 600
    assert torch.all(y[kept] == 2.0) and torch.all(y[~kept] == 0)


def test_stochastic_depth_rates_are_linspace():
    bb = Backbone(PatchConfig(), BackboneConfig(depth=12, drop_path_rate=0.1))
    rates = [b.drop_path.p for b in bb.blocks]
    assert rates[0] == 0 and math.isclose(rates[-1], 0.1, rel_tol=1e-6)
    assert all(math.isclose(a, b) for a, b in zip(rates, torch.linspace(0, 0.1, 12).tolist()))


def test_position_is_readded_before_every_block_and_norm_at_end():
    bb, _ = _tiny_backbone()
    points = torch.randn(2, 256, 3)
    nb, c = bb.group(points)
    x, pos = bb.embed(nb, c)
    ref = x
    for blk in bb.blocks:
        ref = blk(ref + pos)
    ref = bb.norm(ref)
    torch.testing.assert_close(bb.forward_features(points), ref)
    pooled = bb(points)
    torch.testing.assert_close(pooled, torch.cat([ref[:, 0], ref[:, 1:].max(1).values], -1))
    assert pooled.shape == (2, 2 * bb.dim)


def test_forward_intermediates_are_normed_block_outputs_without_cls():
    bb, _ = _tiny_backbone()
    points = torch.randn(2, 256, 3)
    nb, c = bb.group(points)
    x, pos = bb.embed(nb, c)
    outs = []
    for blk in bb.blocks:
        x = blk(x + pos)
        outs.append(bb.norm(x)[:, 1:])
    feats, centers = bb.forward_intermediates(points, indices=(1, 0))
    torch.testing.assert_close(feats[0], outs[1])
    torch.testing.assert_close(feats[1], outs[0])
    torch.testing.assert_close(centers, c)
    with pytest.raises(ValueError, match="out of range"):
        bb.forward_intermediates(points, indices=(5,))


def test_masked_positions_take_the_mask_token():
    bb, _ = _tiny_backbone()
    nb, c = bb.group(torch.randn(2, 256, 3))
    mask = torch.zeros(2, bb.num_patches, dtype=torch.bool)
    mask[0, :3] = True
    token = torch.full((1, 1, bb.dim), 7.0)
    x, _ = bb.embed(nb, c, mask, token)
    assert torch.all(x[0, 1:4] == 7.0) and not torch.any(x[0, 4:] == 7.0) and not torch.any(x[1] == 7.0)


def test_official_finetune_init():
    torch.manual_seed(0)
    bb = Backbone()
    assert torch.all(bb.cls_token == 0)
    assert 0.9 < bb.cls_pos.std() < 1.1  # N(0, 1)
    # PyTorch default Linear init: uniform(+-1/sqrt(fan_in)) for weights and biases
    w = bb.blocks[0].mlp.fc1.weight
    assert w.abs().max() <= 1 / math.sqrt(384) + 1e-6


def test_trunc_normal_init():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(300, 400), nn.LayerNorm(400), nn.Conv1d(3, 300, 1), nn.BatchNorm1d(4))
    with torch.no_grad():
        m[1].weight.fill_(3.0)
    init_trunc_normal(m)
    assert abs(m[0].weight.std().item() - 0.02) < 0.002 and torch.all(m[0].bias == 0)
    assert torch.all(m[1].weight == 1) and torch.all(m[1].bias == 0)
    assert abs(m[2].weight.std().item() - 0.02) < 0.004


def test_backbone_parameter_count_matches_official_trunk():
    """spec 6.1: encoder 428,800; blocks 21,279,744; whole classifier 22,065,960 with the 207,144 head."""
    bb = Backbone()
    n = lambda m: sum(p.numel() for p in m.parameters())
    assert n(bb.patch_embed) == 428_800
    assert n(bb.blocks) == 21_279_744
    assert n(bb) + 207_144 == 22_065_960


def test_group_neighborhoods_are_local_and_contain_their_center():
    torch.manual_seed(0)
    points = torch.randn(3, 200, 3)
    nb, centers = group(points, 16, 8)
    assert nb.shape == (3, 16, 8, 3) and centers.shape == (3, 16, 3)
    assert torch.equal(centers[:, 0], points[:, 0])  # FPS starts at point 0
    assert torch.all(nb.norm(dim=-1).min(dim=-1).values == 0)  # each patch holds its center
    # neighbours are the K nearest input points
    d = torch.cdist(centers, points)
    kth = d.topk(8, dim=-1, largest=False).values[..., -1]
    assert torch.all(nb.norm(dim=-1).max(dim=-1).values <= kth + 1e-5)
    with pytest.raises(ValueError, match="at least 32"):
        group(torch.randn(1, 20, 3), 4, 32)


def test_patch_embed_matches_conv1d_layout():
    """Our Linear-over-points mini-PointNet equals the official Conv1d(k=1) layout with the same weights."""
    torch.manual_seed(0)
    pe = PatchEmbed(64).train()
    nb = torch.randn(2, 5, 16, 3)

    conv1 = nn.Sequential(nn.Conv1d(3, 128, 1), nn.BatchNorm1d(128), nn.ReLU(), nn.Conv1d(128, 256, 1))
    conv2 = nn.Sequential(nn.Conv1d(512, 512, 1), nn.BatchNorm1d(512), nn.ReLU(), nn.Conv1d(512, 64, 1))
    with torch.no_grad():
        for ours, ref in ((pe.first_conv, conv1), (pe.second_conv, conv2)):
            for i in (0, 3):
                ref[i].weight.copy_(ours[i].weight[..., None])
                ref[i].bias.copy_(ours[i].bias)
    x = nb.reshape(10, 16, 3).transpose(2, 1)
    f = conv1(x)
    g = f.max(dim=2, keepdim=True).values
    f = conv2(torch.cat([g.expand(-1, -1, 16), f], 1))
    ref_out = f.max(dim=2).values.reshape(2, 5, 64)
    torch.testing.assert_close(pe(nb), ref_out, atol=1e-5, rtol=1e-4)
    # running statistics were updated identically
    torch.testing.assert_close(pe.first_conv[1].running_var, conv1[1].running_var, atol=1e-5, rtol=1e-4)


def test_drop_path_draws_the_official_mask():
    """floor(keep + U) as timm's drop_path, so a seeded run drops the samples the official code drops."""
    x = torch.randn(64, 5, 8)
    torch.manual_seed(7)
    y = DropPath(0.3).train()(x)
    torch.manual_seed(7)
    keep = 0.7
    ref = x.div(keep) * (keep + torch.rand(64, 1, 1)).floor_()
    torch.testing.assert_close(y, ref)


def test_drop_path_in_bf16_draws_the_float32_mask():
    """A bf16 input gets the mask drawn and floored in float32 (in bf16, keep + U rounds up to 1 too often),
    cast to bf16 at the end; the output stays bf16."""
    x = torch.randn(4096, 1, 8).bfloat16()
    torch.manual_seed(3)
    y = DropPath(0.3).train()(x)
    torch.manual_seed(3)
    mask = (0.7 + torch.rand(4096, 1, 1)).floor_().div_(0.7)
    assert y.dtype == torch.bfloat16 and torch.equal(y, x * mask.bfloat16())


def test_blocks_with_different_drop_path_rates_share_one_compiled_graph():
    """The rates are tensors to torch.compile: no recompilation per block (which hit dynamo's limit of 8)."""
    graphs = []

    def count(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    bb = Backbone(PatchConfig(num_patches=8, patch_size=4, embed_dim=16, hidden_dims=(8, 16, 16)),
                  BackboneConfig(dim=16, depth=4, num_heads=2, pos_hidden=8, drop_path_rate=0.1)).train()
    for blk in bb.blocks:
        blk.compile(backend=count)
    x = torch.randn(2, 9, 16)
    for blk in bb.blocks:
        x = blk(x)
    x.sum().backward()
    assert len(graphs) == 2  # rate 0 (block 0) and rate > 0 (blocks 1-3)
    torch._dynamo.reset()


def test_drop_path_rate_can_be_changed_after_construction():
    dp = DropPath(0.0).train()
    x = torch.ones(4000, 2)
    assert torch.equal(dp(x), x)
    dp.p = 0.5
    kept = dp(x)[:, 0] != 0
    assert 1700 < kept.sum() < 2300 and dp.keep.item() == 0.5


# --------------------------------------------------------------------------------------------------
# The paper's alternatives (spec 11.9): ReLU in the block MLP, positions added once at the input
# --------------------------------------------------------------------------------------------------


def _tiny_backbone_with(**fields):
    torch.manual_seed(0)
    cfg = preset("tiny-classifier")
    for k, v in fields.items():
        setattr(cfg.backbone, k, v)
    return Backbone(cfg.patches, cfg.backbone).eval()


def test_ffn_activation_gelu_by_default_relu_as_the_paper():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    for act, ref_act in (("gelu", torch.nn.functional.gelu), ("relu", torch.relu)):
        torch.manual_seed(1)
        mlp = Mlp(8, 16, act)
        torch.testing.assert_close(mlp(x), mlp.fc2(ref_act(mlp.fc1(x))), rtol=0, atol=0)
    torch.manual_seed(1)
    assert isinstance(Mlp(8, 16).act, nn.GELU)  # default
    with pytest.raises(ValueError, match="FFN activation"):
        Mlp(8, 16, "swish")
    gelu, relu = _tiny_backbone_with(), _tiny_backbone_with(ffn_act="relu")
    assert BackboneConfig().ffn_act == "gelu" and all(isinstance(b.mlp.act, nn.GELU) for b in gelu.blocks)
    assert all(isinstance(b.mlp.act, nn.ReLU) for b in relu.blocks)
    assert all(isinstance(m, nn.GELU) for m in (gelu.pos_embed[1], relu.pos_embed[1]))  # only the block MLP
    sd_g, sd_r = gelu.state_dict(), relu.state_dict()  # no parameters change: same keys, same seeded values
    assert sd_g.keys() == sd_r.keys() and all(torch.equal(sd_g[k], sd_r[k]) for k in sd_g)
    points = torch.randn(2, 256, 3)
    assert not torch.allclose(gelu(points), relu(points))


def test_position_added_once_at_the_input_when_switched_off():
    every, once = _tiny_backbone_with(), _tiny_backbone_with(pos_every_block=False)
    assert BackboneConfig().pos_every_block is True and every.pos_every_block and not once.pos_every_block
    points = torch.randn(2, 256, 3)
    nb, c = once.group(points)
    x, pos = once.embed(nb, c)
    assert pos.abs().amin(-1).gt(0).all()  # every token has a non-trivial position to look for
    seen = {m: [] for m in (every, once)}
    for m in (every, once):
        for blk in m.blocks:
            blk.register_forward_pre_hook(lambda mod, args, s=seen[m]: s.append(args[0].clone()))
        out = m.forward_features(points)
    # block 0 sees x + pos in both; block 1 sees block 0's output, plus pos only in the official order
    for m in (every, once):
        torch.testing.assert_close(seen[m][0], x + pos, rtol=0, atol=0)
    torch.testing.assert_close(seen[once][1], once.blocks[0](x + pos), rtol=0, atol=0)
    torch.testing.assert_close(seen[every][1], every.blocks[0](x + pos) + pos, rtol=0, atol=0)
    ref = once.norm(once.blocks[1](once.blocks[0](x + pos)))
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert not torch.allclose(out, every.forward_features(points))
    feats, _ = once.forward_intermediates(points, indices=(0, 1))
    torch.testing.assert_close(feats[1], ref[:, 1:], rtol=0, atol=0)
    torch.testing.assert_close(feats[0], once.norm(once.blocks[0](x + pos))[:, 1:], rtol=0, atol=0)
