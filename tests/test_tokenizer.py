"""The dVAE tokenizer (spec 4) against references written from the spec: official layouts, loops, formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pointbert import ops
from pointbert.config import Config, ConfigError, preset, validate
from pointbert.tokenizer import (
    DGCNN,
    DiscreteVAE,
    FoldingDecoder,
    GroupNormLast,
    edge_features,
    gumbel_softmax,
    gumbel_temperature,
    kl_to_uniform,
    kl_weight,
    reconstruction_metrics,
)


@pytest.fixture(scope="module")
def full() -> DiscreteVAE:
    torch.manual_seed(0)
    return DiscreteVAE(Config(kind="tokenizer"))


@pytest.fixture
def tiny() -> DiscreteVAE:
    torch.manual_seed(0)
    return DiscreteVAE(preset("tiny-tokenizer"))


def clouds(b: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, 3, generator=g)


def randomise_norms(module: nn.Module, seed: int = 0) -> None:
    """Non-trivial affine parameters and running statistics, so that they are actually tested."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, (nn.GroupNorm, nn.BatchNorm1d)):
            with torch.no_grad():
                m.weight.copy_(1 + 0.5 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.5 * torch.randn(m.bias.shape, generator=g))
                if isinstance(m, nn.BatchNorm1d):
                    m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=g))
                    m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))


# --------------------------------------------------------------------------------------------------
# Size and official keys (spec 7.2, 7.3)
# --------------------------------------------------------------------------------------------------


def official_dvae_table() -> dict[str, tuple[int, ...]]:
    """The 75 entries of the released dVAE.pth (spec 7.2-7.3), written out from the spec's tables."""
    t: dict[str, tuple[int, ...]] = {"codebook": (8192, 256)}

    def bn(prefix: str, c: int) -> None:
        for s in ("weight", "bias", "running_mean", "running_var"):
            t[f"{prefix}.{s}"] = (c,)
        t[f"{prefix}.num_batches_tracked"] = ()

    e = "encoder."
    t[e + "first_conv.0.weight"], t[e + "first_conv.0.bias"] = (128, 3, 1), (128,)
    bn(e + "first_conv.1", 128)
    t[e + "first_conv.3.weight"], t[e + "first_conv.3.bias"] = (256, 128, 1), (256,)
    t[e + "second_conv.0.weight"], t[e + "second_conv.0.bias"] = (512, 512, 1), (512,)
    bn(e + "second_conv.1", 512)
    t[e + "second_conv.3.weight"], t[e + "second_conv.3.bias"] = (256, 512, 1), (256,)
    for name, c_out in (("dgcnn_1", 8192), ("dgcnn_2", 256)):
        p = name + "."
        t[p + "input_trans.weight"], t[p + "input_trans.bias"] = (128, 256, 1), (128,)
        for i, (c_in, c) in enumerate([(256, 256), (512, 512), (1024, 512), (1024, 1024)], start=1):
            t[f"{p}layer{i}.0.weight"] = (c, c_in, 1, 1)
            t[f"{p}layer{i}.1.weight"] = t[f"{p}layer{i}.1.bias"] = (c,)
        t[p + "layer5.0.weight"] = (c_out, 2304, 1)
        t[p + "layer5.1.weight"] = t[p + "layer5.1.bias"] = (c_out,)
    d = "decoder."
    for i, (o, n_in) in {0: (1024, 256), 2: (1024, 1024), 4: (24, 1024)}.items():
        t[f"{d}mlp.{i}.weight"], t[f"{d}mlp.{i}.bias"] = (o, n_in), (o,)
    t[d + "final_conv.0.weight"], t[d + "final_conv.0.bias"] = (512, 261, 1), (512,)
    bn(d + "final_conv.1", 512)
    t[d + "final_conv.3.weight"], t[d + "final_conv.3.bias"] = (512, 512, 1), (512,)
    bn(d + "final_conv.4", 512)
    t[d + "final_conv.6.weight"], t[d + "final_conv.6.bias"] = (3, 512, 1), (3,)
    return t


def test_parameter_count(full):
    assert sum(p.numel() for p in full.parameters()) == 27_620_891


def test_state_dict_matches_official_keys(full):
    official = official_dvae_table()
    assert len(official) == 75
    ours = {k: tuple(v.shape) for k, v in full.state_dict().items()}
    mapped = {}
    for key, shape in official.items():
        key = "patch_embed." + key.removeprefix("encoder.") if key.startswith("encoder.") else key
        while shape and shape[-1] == 1:  # Conv1d/Conv2d(kernel 1) -> Linear
            shape = shape[:-1]
        mapped[key] = shape
    assert ours == mapped
    assert list(ours)[0] == "codebook"
    assert "decoder.folding_seed" not in ours  # a non-persistent buffer
    assert dict(full.named_buffers())["decoder.folding_seed"].shape == (4, 2)


def test_full_size_forward_batch_1(full):
    torch.manual_seed(1)
    out = full(clouds(1, 1024))
    shapes = {f: tuple(getattr(out, f).shape) for f in out._fields}
    assert shapes == {"neighborhoods": (1, 64, 32, 3), "centers": (1, 64, 3), "logits": (1, 64, 8192),
                      "soft_one_hot": (1, 64, 8192), "coarse": (1, 64, 8, 3), "fine": (1, 64, 32, 3),
                      "whole_coarse": (1, 512, 3), "whole_fine": (1, 2048, 3)}
    recon, kl = full.loss(out)
    assert torch.isfinite(recon) and torch.isfinite(kl) and kl >= 0


# --------------------------------------------------------------------------------------------------
# DGCNN (spec 4.1) vs the official channel-first layout
# --------------------------------------------------------------------------------------------------


def test_group_norm_layer_matches_conv2d_groupnorm_layout():
    torch.manual_seed(0)
    B, G, k = 3, 10, 4
    layer = DGCNN(16, 8, k=k).layer2  # 1x1 conv 512 -> 512, GroupNorm(4, 512), LeakyReLU(0.2)
    randomise_norms(layer)
    c_out, c_in = layer[0].weight.shape
    conv = nn.Conv2d(c_in, c_out, 1, bias=False)
    gn = nn.GroupNorm(4, c_out)
    with torch.no_grad():
        conv.weight.copy_(layer[0].weight[:, :, None, None])
        gn.weight.copy_(layer[1].weight)
        gn.bias.copy_(layer[1].bias)
    x = 2 * torch.randn(B, G, k, c_in) + 1  # channel-last edge features, non-zero mean
    ours = layer(x)  # (B, G, k, C)
    ref = F.leaky_relu(gn(conv(x.permute(0, 3, 1, 2).contiguous())), 0.2)  # official (B, C, G, k)
    assert (ours - ref.permute(0, 2, 3, 1)).abs().max() < 1e-5
    # layer5 normalises a (B, G, C) tensor like GroupNorm on (B, C, G)
    y = torch.randn(B, G, 32) * 3 - 2
    gn5 = GroupNormLast(4, 32)
    randomise_norms(gn5, seed=1)
    ref5 = F.group_norm(y.transpose(1, 2).contiguous(), 4, gn5.weight, gn5.bias, gn5.eps).transpose(1, 2)
    assert (gn5(y) - ref5).abs().max() < 1e-5


def test_edge_features_brute_force():
    torch.manual_seed(0)
    B, G, C, k = 2, 7, 5, 4
    f, centers = torch.randn(B, G, C), torch.randn(B, G, 3)
    idx = DGCNN(C, 8, k=k).graph(centers)
    assert idx.shape == (B, G, k)
    assert torch.equal(idx[..., 0], torch.arange(G).expand(B, G))  # self included, nearest
    e = edge_features(f, idx)
    assert e.shape == (B, G, k, 2 * C)
    for b in range(B):
        d = ((centers[b, :, None] - centers[b, None]) ** 2).sum(-1)
        for i in range(G):
            assert set(idx[b, i].tolist()) == set(d[i].argsort()[:k].tolist())
            for jj in range(k):
                j = idx[b, i, jj]
                assert torch.equal(e[b, i, jj], torch.cat([f[b, j] - f[b, i], f[b, i]]))


def official_dgcnn(m: DGCNN, f: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """The official DGCNN forward, channel-first with conv weights (out, in, 1[, 1]) (spec 4.1)."""
    B, G, _ = f.shape
    k = m.k
    d = ((centers[:, :, None] - centers[:, None]) ** 2).sum(-1)  # (B, G, G)
    idx = d.topk(k, dim=-1, largest=False).indices.transpose(1, 2)  # (B, k, G) as KNN_CUDA returns it

    def graph_feature(x):  # x (B, C, G) -> (B, 2C, G, k)
        C = x.shape[1]
        flat = x.transpose(1, 2).reshape(B * G, C)
        nb = flat[(idx + torch.arange(B)[:, None, None] * G).reshape(-1)]
        nb = nb.view(B, k, G, C).permute(0, 3, 2, 1)
        xq = x[..., None].expand(-1, -1, -1, k)
        return torch.cat([nb - xq, xq], dim=1)

    def block(seq, x):
        w = seq[0].weight
        w = w[:, :, None, None] if x.dim() == 4 else w[:, :, None]
        conv = F.conv2d if x.dim() == 4 else F.conv1d
        return F.leaky_relu(F.group_norm(conv(x, w), 4, seq[1].weight, seq[1].bias, 1e-5), 0.2)

    x = F.conv1d(f.transpose(1, 2), m.input_trans.weight[:, :, None], m.input_trans.bias)
    levels = []
    for seq in (m.layer1, m.layer2, m.layer3, m.layer4):
        x = block(seq, graph_feature(x)).max(dim=-1).values
        levels.append(x)
    return block(m.layer5, torch.cat(levels, dim=1)).transpose(1, 2)


def test_dgcnn_matches_official_layout():
    torch.manual_seed(0)
    m = DGCNN(16, 24, k=4)
    randomise_norms(m)
    f, centers = torch.randn(2, 12, 16), torch.randn(2, 12, 3)
    ours = m(f, centers)
    assert ours.shape == (2, 12, 24)
    assert (ours - official_dgcnn(m, f, centers)).abs().max() < 1e-5


# --------------------------------------------------------------------------------------------------
# Folding decoder (spec 4.2 step 7)
# --------------------------------------------------------------------------------------------------


def test_decoder_seed_layout_and_fine_from_coarse_loop():
    torch.manual_seed(0)
    C, num_fine = 6, 12
    dec = FoldingDecoder(C, num_fine)
    randomise_norms(dec)
    dec.eval()  # BatchNorm with running statistics: every point is independent, so a loop can check it
    seeds = [(-0.05, -0.05), (0.05, -0.05), (-0.05, 0.05), (0.05, 0.05)]  # spec 4.2: u fastest
    assert torch.allclose(dec.folding_seed, torch.tensor(seeds))
    feats = torch.randn(2, 3, C)
    coarse, fine = dec(feats)
    assert coarse.shape == (2, 3, 3, 3) and fine.shape == (2, 3, num_fine, 3)
    with torch.no_grad():
        for b in range(2):
            for g in range(3):
                c = dec.mlp(feats[b, g]).view(3, 3)
                assert torch.allclose(coarse[b, g], c, atol=1e-6)
                for n in range(num_fine):
                    m, s = divmod(n, 4)
                    x = torch.cat([feats[b, g], torch.tensor(seeds[s]), c[m]])
                    expected = dec.final_conv(x[None])[0] + c[m]
                    assert torch.allclose(fine[b, g, n], expected, atol=1e-5)


def test_decoder_batchnorm_statistics_as_official_conv1d():
    """Train mode: BatchNorm statistics over all B*G*num_fine points, as Conv1d on (B*G, C, num_fine)."""
    torch.manual_seed(0)
    C, num_fine, B, G = 6, 8, 2, 5
    dec = FoldingDecoder(C, num_fine)
    randomise_norms(dec)
    feats = torch.randn(B, G, C)
    coarse, fine = dec(feats)
    fc = dec.final_conv
    anchor = coarse.reshape(B * G, -1, 3).repeat_interleave(4, dim=1).transpose(1, 2)  # (BG, 3, N)
    seed = dec.folding_seed.t().repeat(1, num_fine // 4)  # (2, N)
    x = torch.cat([feats.reshape(B * G, C, 1).expand(-1, -1, num_fine), seed.expand(B * G, -1, -1), anchor],
                  dim=1)  # (BG, C+5, N)
    for i in (0, 3):
        x = F.conv1d(x, fc[i].weight[:, :, None], fc[i].bias)
        bn = fc[i + 1]
        x = F.relu(F.batch_norm(x, None, None, bn.weight, bn.bias, training=True, eps=bn.eps))
    x = F.conv1d(x, fc[6].weight[:, :, None], fc[6].bias) + anchor
    assert (fine - x.transpose(1, 2).reshape(B, G, num_fine, 3)).abs().max() < 1e-5


# --------------------------------------------------------------------------------------------------
# Sampling, tokenisation, decoding
# --------------------------------------------------------------------------------------------------


def test_gumbel_hard_gives_one_hot_rows_and_decodes_like_ids(tiny):
    tiny.eval()
    torch.manual_seed(0)
    out = tiny(clouds(2, 256), temperature=1.0, hard=True)
    y = out.soft_one_hot
    assert y.shape == (2, 16, 64)
    assert torch.allclose(y.sum(-1), torch.ones(2, 16))
    assert torch.allclose(y.amax(-1), torch.ones(2, 16))
    assert ((y == 0) | (y - 1).abs().lt(1e-6)).all()
    ids = y.argmax(-1)
    coarse, fine = tiny.decode(ids, out.centers)
    assert torch.allclose(coarse, out.coarse, atol=1e-5) and torch.allclose(fine, out.fine, atol=1e-5)
    coarse2, fine2 = tiny.decode(F.one_hot(ids, 64).float(), out.centers)
    assert torch.allclose(fine2, fine, atol=1e-5) and torch.allclose(coarse2, coarse, atol=1e-5)
    # whole clouds: local patches moved back to their centers, without grad
    assert not out.whole_fine.requires_grad
    assert torch.allclose(out.whole_fine, (out.fine + out.centers[:, :, None]).reshape(2, -1, 3))
    assert torch.allclose(out.whole_coarse, (out.coarse + out.centers[:, :, None]).reshape(2, -1, 3))


def test_soft_sample_mixes_codebook_rows(tiny):
    torch.manual_seed(0)
    out = tiny(clouds(2, 256), temperature=0.5)
    y = out.soft_one_hot
    assert torch.allclose(y.sum(-1), torch.ones(2, 16)) and (y.amax(-1) < 1).any()


def test_tokenize_is_argmax_of_logits_and_deterministic(tiny):
    tiny.eval()
    x = clouds(3, 256)
    ids = tiny.tokenize(x)
    assert ids.shape == (3, 16) and ids.dtype == torch.int64
    assert torch.equal(ids, tiny.tokenize(x))
    neighborhoods, centers = tiny.group(x)
    assert torch.equal(ids, tiny.logits(neighborhoods, centers).argmax(-1))
    assert torch.equal(ids, tiny.tokenize_patches(neighborhoods, centers))
    assert not tiny.tokenize(x).requires_grad


# --------------------------------------------------------------------------------------------------
# Loss (spec 4.3), schedules (spec 4.4), metrics (spec 4.6)
# --------------------------------------------------------------------------------------------------


def brute_chamfer_l1(p: np.ndarray, q: np.ndarray) -> float:
    """Official CD-L1 over a batch of sets (S, N, 3), (S, M, 3): (mean sqrt d1 + mean sqrt d2) / 2."""
    d1, d2 = [], []
    for a, b in zip(p, q):
        for x in a:
            d1.append(min(math.dist(x, y) for y in b))
        for y in b:
            d2.append(min(math.dist(y, x) for x in a))
    return (sum(d1) / len(d1) + sum(d2) / len(d2)) / 2


def test_loss_against_brute_force(tiny):
    torch.manual_seed(0)
    out = tiny(clouds(2, 256))
    recon, kl = tiny.loss(out)
    gt = out.neighborhoods.detach().double().reshape(32, 8, 3).numpy()
    coarse = out.coarse.detach().double().reshape(32, 2, 3).numpy()
    fine = out.fine.detach().double().reshape(32, 8, 3).numpy()
    expected = brute_chamfer_l1(coarse, gt) + brute_chamfer_l1(fine, gt)
    assert recon.item() == pytest.approx(expected, rel=1e-5)
    # KL(U || q_b) = sum_n (1/V)(log(1/V) - log q_b,n), averaged over b; q_b = mean_g softmax(logits)
    V = 64
    p = torch.softmax(out.logits.detach().double(), -1)
    kl_ref = 0.0
    for b in range(2):
        q = p[b].mean(0)
        kl_ref += sum((1 / V) * (math.log(1 / V) - math.log(q[n])) for n in range(V)) / 2
    assert kl.item() == pytest.approx(kl_ref, rel=1e-5)
    assert kl_to_uniform(torch.zeros(2, 16, V)).abs() < 1e-6  # uniform usage costs nothing


def test_schedules_match_spec():
    t = Config(kind="tokenizer").tokenizer
    assert gumbel_temperature(0, t) == pytest.approx(1.0)
    assert gumbel_temperature(50_000, t) == pytest.approx(0.53125)
    assert round(gumbel_temperature(50_000, t), 3) == 0.531
    assert gumbel_temperature(100_000, t) == pytest.approx(0.0625)
    assert gumbel_temperature(197_000, t) == 0.0625
    assert kl_weight(0, t) == 0.0 and kl_weight(9_999, t) == 0.0 and kl_weight(10_000, t) == 0.0
    assert kl_weight(60_000, t) == pytest.approx(0.05)
    assert kl_weight(110_000, t) == pytest.approx(0.1)
    assert kl_weight(197_000, t) == 0.1
    assert kl_weight(35_000, t) == pytest.approx(0.1 * (1 - math.cos(math.pi * 0.25)) / 2)


def test_reconstruction_metrics_brute_force():
    g = torch.Generator().manual_seed(0)
    pred, gt = torch.rand(2, 20, 3, generator=g), torch.rand(2, 15, 3, generator=g)
    th = 0.2
    m = reconstruction_metrics(pred, gt, threshold=th)
    assert set(m) == {"F-Score", "CDL1", "CDL2"} and all(v.shape == (2,) for v in m.values())
    for b in range(2):
        e1 = [min(math.dist(x, y) for y in gt[b].tolist()) for x in pred[b].tolist()]
        e2 = [min(math.dist(y, x) for x in pred[b].tolist()) for y in gt[b].tolist()]
        precision = sum(d < th for d in e1) / len(e1)
        recall = sum(d < th for d in e2) / len(e2)
        f = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        assert m["F-Score"][b].item() == pytest.approx(f, abs=1e-6)
        assert m["CDL1"][b].item() == pytest.approx(1000 * (np.mean(e1) + np.mean(e2)) / 2, rel=1e-5)
        cd2 = 1000 * (np.mean(np.square(e1)) + np.mean(np.square(e2)))
        assert m["CDL2"][b].item() == pytest.approx(cd2, rel=1e-5)
    # the batch mean equals the official batch-level Chamfer numbers (equal-sized clouds)
    assert m["CDL1"].mean().item() == pytest.approx(1000 * ops.chamfer_l1(pred, gt).item(), rel=1e-5)
    assert m["CDL2"].mean().item() == pytest.approx(1000 * ops.chamfer_l2(pred, gt).item(), rel=1e-5)
    far = reconstruction_metrics(pred + 10, gt)
    assert torch.equal(far["F-Score"], torch.zeros(2))


# --------------------------------------------------------------------------------------------------
# Training step
# --------------------------------------------------------------------------------------------------


def test_backward_reaches_every_part(tiny):
    torch.manual_seed(0)
    sched = preset("tiny-tokenizer").tokenizer  # kl_delay 10, kl_steps 100
    out = tiny(clouds(2, 256), temperature=gumbel_temperature(30, sched))
    recon, kl = tiny.loss(out)
    (recon + kl_weight(60, sched) * kl).backward()
    for name, p in tiny.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    for part in ("patch_embed", "dgcnn_1", "codebook", "dgcnn_2", "decoder"):
        grads = [p.grad.abs().sum() for n, p in tiny.named_parameters() if n.startswith(part)]
        assert grads and sum(grads) > 0, part


@pytest.mark.parametrize("tau", [1.0, 0.3])
@pytest.mark.parametrize("hard", [False, True])
def test_gumbel_softmax_is_torch_s_bit_for_bit(tau, hard):
    """Same noise, same values and same gradients as ``F.gumbel_softmax`` under the same seed."""
    logits = torch.randn(2, 5, 300, requires_grad=True)
    weights = torch.randn(2, 5, 300)
    results = []
    for fn in (lambda x: F.gumbel_softmax(x, tau=tau, hard=hard, dim=-1), lambda x: gumbel_softmax(x, tau, hard)):
        torch.manual_seed(7)
        y = fn(logits)
        (y * weights).sum().backward()
        results.append((y.detach(), logits.grad))
        logits.grad = None
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_gumbel_softmax_of_bf16_logits_samples_in_float32():
    logits = torch.randn(2, 5, 300)
    torch.manual_seed(7)
    want = gumbel_softmax(logits.bfloat16().float(), 0.5)
    torch.manual_seed(7)
    got = gumbel_softmax(logits.bfloat16(), 0.5)
    assert got.dtype == torch.float32 and torch.equal(got, want)


def test_uniform_gumbel_noise_has_the_gumbel_distribution():
    """noise="uniform": arg-max frequencies of logits + noise are softmax(logits) (the Gumbel-max
    property), and the relaxed sample's mean over many draws is E[softmax(logits + G)] as with torch's."""
    torch.manual_seed(0)
    logits = torch.tensor([0.0, 1.0, -1.0, 2.0, 0.5])
    n = 200_000
    freq = gumbel_softmax(logits.expand(n, 5), hard=True, noise="uniform").mean(0)
    p = logits.softmax(-1)
    assert (freq - p).abs().max() < 4 * (p * (1 - p) / n).sqrt().max()  # within 4 standard errors
    soft = [gumbel_softmax(logits.expand(n, 5), tau=0.7, noise=kind).mean(0) for kind in ("uniform", "exponential")]
    assert (soft[0] - soft[1]).abs().max() < 0.005


def test_uniform_gumbel_noise_is_finite_at_the_ends_of_the_uniform_draws(monkeypatch):
    """U = 0 (possible from torch.rand) and the largest U below 1 give finite samples."""
    top = 1 - torch.finfo(torch.float32).eps / 2
    for u in (0.0, top):
        monkeypatch.setattr(torch, "rand_like", lambda x, u=u, **kw: torch.full_like(x, u))
        logits = torch.zeros(2, 3, 7, requires_grad=True)
        y = gumbel_softmax(logits, tau=0.5, noise="uniform")
        y.sum().backward()
        assert torch.isfinite(y).all() and torch.isfinite(logits.grad).all()
        assert torch.allclose(y, torch.full_like(y, 1 / 7))
    with pytest.raises(ValueError, match="noise"):
        gumbel_softmax(logits, noise="normal")


def test_tokenizer_uses_uniform_noise_by_default_and_torch_s_when_switched_off(tiny):
    """The default draws differ from F.gumbel_softmax's; uniform_noise=False reproduces them bit for bit."""
    pts = clouds(2, 256)
    tiny.train()
    outs = {}
    for flag in (True, False):
        tiny.uniform_noise = flag
        torch.manual_seed(3)
        outs[flag] = tiny(pts).soft_one_hot
    del tiny.uniform_noise
    logits = tiny.logits(*tiny.group(pts))
    torch.manual_seed(3)
    assert torch.equal(outs[False], F.gumbel_softmax(logits, tau=1.0, dim=-1))
    assert not torch.allclose(outs[True], outs[False])


def test_gumbel_noise_config_key():
    """tokenizer.gumbel_noise=exponential switches the fast noise off; other values are refused."""
    cfg = preset("tiny-tokenizer")
    assert DiscreteVAE(cfg).uniform_noise
    cfg.tokenizer.gumbel_noise = "exponential"
    assert not DiscreteVAE(validate(cfg)).uniform_noise
    cfg.tokenizer.gumbel_noise = "normal"
    with pytest.raises(ConfigError, match="tokenizer.gumbel_noise"):
        validate(cfg)


# --------------------------------------------------------------------------------------------------
# The paper's alternatives (spec 11.6-11.7): plain logits, KL(q || uniform), Chamfer-L1 without 1/2
# --------------------------------------------------------------------------------------------------


def tiny_with(**fields) -> DiscreteVAE:
    cfg = preset("tiny-tokenizer")
    for k, v in fields.items():
        setattr(cfg.tokenizer, k, v)
    torch.manual_seed(0)
    return DiscreteVAE(validate(cfg))


def test_official_loss_options_are_the_defaults():
    t = Config(kind="tokenizer").tokenizer
    assert (t.logit_norm, t.kl_direction, t.chamfer_half) == (True, "uniform_q", True)
    m = tiny_with()
    assert m.dgcnn_1.out_norm and m.dgcnn_2.out_norm and (m.kl_direction, m.chamfer_half) == ("uniform_q", True)


def test_chamfer_without_half_is_twice_the_official():
    g = torch.Generator().manual_seed(0)
    p, q = torch.randn(6, 8, 3, generator=g), torch.randn(6, 5, 3, generator=g)
    assert torch.equal(ops.chamfer_l1(p, q, half=False), 2 * ops.chamfer_l1(p, q))
    assert ops.chamfer_l1(p, q, half=False).item() == pytest.approx(2 * brute_chamfer_l1(p.numpy(), q.numpy()),
                                                                    rel=1e-5)
    half, full = tiny_with(), tiny_with(chamfer_half=False)
    torch.manual_seed(0)
    out = half(clouds(2, 256))
    recon, kl = half.loss(out)
    recon2, kl2 = full.loss(out)  # same weights, same sample: only the loss differs
    assert torch.equal(recon2, 2 * recon) and torch.equal(kl2, kl)


def test_kl_q_to_uniform_against_hand_computation():
    g = torch.Generator().manual_seed(0)
    V = 7
    logits = (2 * torch.randn(3, 5, V, generator=g)).double().requires_grad_()
    q = logits.softmax(-1).mean(1)  # (B, V): q_b = mean over patches
    ref = sum(sum(q[b, n] * math.log(q[b, n].item() * V) for n in range(V)) for b in range(3)) / 3
    kl = kl_to_uniform(logits, "q_uniform")
    assert kl.item() == pytest.approx(ref.item(), rel=1e-12)
    official = kl_to_uniform(logits, "uniform_q")
    ref_official = sum(sum((1 / V) * (math.log(1 / V) - math.log(q[b, n].item())) for n in range(V))
                       for b in range(3)) / 3
    assert official.item() == pytest.approx(ref_official, rel=1e-12) and kl.item() != pytest.approx(official.item())
    assert torch.equal(kl_to_uniform(logits), official)  # the official direction is the default
    grad, ref_grad = torch.autograd.grad(kl, logits)[0], torch.autograd.grad(
        (q * (q * V).log()).sum(-1).mean(), logits)[0]
    torch.testing.assert_close(grad, ref_grad)
    assert kl_to_uniform(torch.zeros(2, 4, V), "q_uniform").abs() < 1e-6  # uniform usage costs nothing
    peaked = torch.full((1, 2, V), -200.0)  # softmax underflows to 0 for all but word 0: still finite
    peaked[..., 0] = 200.0
    peaked.requires_grad_()
    kl_peaked = kl_to_uniform(peaked, "q_uniform")
    assert kl_peaked.item() == pytest.approx(math.log(V), rel=1e-5)  # a one-hot q: KL = log V
    kl_peaked.backward()
    assert torch.isfinite(peaked.grad).all()
    with pytest.raises(ValueError, match="KL direction"):
        kl_to_uniform(logits, "forward")
    model = tiny_with(kl_direction="q_uniform")
    torch.manual_seed(0)
    out = model(clouds(2, 256))
    assert torch.equal(model.loss(out)[1], kl_to_uniform(out.logits, "q_uniform"))


def test_logit_norm_off_gives_the_plain_linear_logits():
    normed, plain = tiny_with().eval(), tiny_with(logit_norm=False).eval()
    ref_keys = set(normed.state_dict())
    assert set(plain.state_dict()) == ref_keys - {"dgcnn_1.layer5.1.weight", "dgcnn_1.layer5.1.bias"}
    assert all(torch.equal(v, normed.state_dict()[k]) for k, v in plain.state_dict().items())  # same seeded weights
    assert len(plain.dgcnn_1.layer5) == 1 and plain.dgcnn_1.layer5[0].bias is None
    assert len(plain.dgcnn_2.layer5) == 3  # the decoder's DGCNN keeps its GroupNorm + LeakyReLU
    randomise_norms(normed.dgcnn_1.layer5)
    captured = []
    normed.dgcnn_1.layer5.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    nb, centers = normed.group(clouds(2, 256))
    with torch.no_grad():
        official = normed.logits(nb, centers)
        h = F.linear(captured[0], normed.dgcnn_1.layer5[0].weight)  # (B, G, V): the concat of the EdgeConv levels
        gn = normed.dgcnn_1.layer5[1]
        ref_official = F.leaky_relu(F.group_norm(h.transpose(1, 2), 4, gn.weight, gn.bias, gn.eps).transpose(1, 2), 0.2)
        torch.testing.assert_close(official, ref_official)
        torch.testing.assert_close(plain.logits(nb, centers), h, rtol=0, atol=0)
        assert torch.equal(plain.tokenize_patches(nb, centers), h.argmax(-1))


def test_logit_norm_mismatch_fails_with_one_clear_line(tmp_path):
    from pointbert.checkpoint import load_model, save_checkpoint
    from pointbert.errors import CheckpointError
    from pointbert.mpm import PointBERT

    normed, plain = tiny_with(), tiny_with(logit_norm=False)
    with pytest.raises(CheckpointError, match=r"have the GroupNorm .* set tokenizer.logit_norm=true$") as e:
        plain.load_state_dict(normed.state_dict())
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match=r"lack the GroupNorm .*dgcnn_1.layer5.1.*set tokenizer.logit_norm=false"):
        normed.load_state_dict(plain.state_dict())
    cfg = preset("tiny-pretrain")  # the frozen tokenizer of pre-training: same check under the "tokenizer." prefix
    with pytest.raises(CheckpointError, match="tokenizer.logit_norm=false"):
        PointBERT(cfg).load_tokenizer(plain.state_dict())
    cfg.tokenizer.logit_norm = False
    PointBERT(cfg).load_tokenizer(plain.state_dict())  # matching options load strictly
    plain.load_state_dict(plain.state_dict(), strict=False)
    tok = preset("tiny-tokenizer")
    tok.tokenizer.logit_norm = False
    save_checkpoint(tmp_path / "t.pt", tok, plain)
    loaded, _ = load_model(tmp_path / "t.pt")
    assert not loaded.dgcnn_1.out_norm and loaded.state_dict().keys() == plain.state_dict().keys()
