"""Masked point modeling: masks, mixing, contrastive losses, momentum encoder, queue, a full step."""

import math

import pytest
import torch
import torch.nn.functional as F

from pointbert.config import Config, preset
from pointbert.mpm import (
    MaskedPointModel,
    PointBERT,
    block_mask,
    mix_contrastive_loss,
    mix_patches,
    moco_contrastive_loss,
    random_mask,
    random_replace,
)


def test_block_mask_is_a_nearest_block_of_the_right_size():
    torch.manual_seed(0)
    centers = torch.randn(64, 64, 3)
    mask = block_mask(centers, (0.25, 0.45))
    counts = mask.sum(1)
    assert counts.min() >= 16 and counts.max() <= 28  # floor(r * 64), r in [0.25, 0.45]
    assert len(set(counts.tolist())) > 5  # the ratio is drawn per sample
    for b in range(64):
        d = torch.cdist(centers[b], centers[b])  # (G, G)
        n = int(counts[b])
        # some center c has exactly the masked set as its n nearest centers (itself first)
        found = any(set(d[c].argsort()[:n].tolist()) == set(mask[b].nonzero().flatten().tolist())
                    for c in mask[b].nonzero().flatten().tolist())
        assert found


def test_block_mask_none_when_ratio_zero_and_random_mask_ratio():
    centers = torch.randn(4, 64, 3)
    assert not block_mask(centers, (0.0, 0.0)).any()
    torch.manual_seed(0)
    rates = torch.stack([random_mask(torch.randn(400, 64, 3), (0.25, 0.45)).float().mean(1) for _ in range(20)])
    # one ratio per batch (official): the rows of a batch share it, the batches spread over U(0.25, 0.45)
    assert rates.std(1).max() < 0.08 and 0.25 - 0.02 < rates.mean(1).min() < rates.mean(1).max() < 0.45 + 0.02
    assert rates.mean(1).std() > 0.03
    assert not random_mask(centers, (0.0, 0.0)).any()


def test_mix_patches_takes_partner_patches_at_the_same_index():
    torch.manual_seed(0)
    B, G = 6, 10
    nb, c = torch.randn(B, G, 4, 3), torch.randn(B, G, 3)
    labels = torch.randint(100, (B, G))
    r, mnb, mc, ml = mix_patches(nb, c, labels)
    assert r.shape == (B,) and torch.all((r >= 0) & (r < 1))
    for b in range(B):
        for g in range(G):
            own = torch.equal(mnb[b, g], nb[b, g])
            src = b if own else B - 1 - b
            assert torch.equal(mnb[b, g], nb[src, g])
            assert torch.equal(mc[b, g], c[src, g]) and ml[b, g] == labels[src, g]
    # the own-patch fraction follows r
    torch.manual_seed(1)
    r, mnb, _, _ = mix_patches(torch.arange(400.)[:, None, None, None].expand(400, 1000, 1, 3).contiguous(),
                               torch.zeros(400, 1000, 3), torch.zeros(400, 1000, dtype=torch.long))
    own_frac = (mnb[:, :, 0, 0] == torch.arange(400.)[:, None]).float().mean(1)
    assert torch.allclose(own_frac, r, atol=0.06)


def test_random_replace_marks_replaced_positions():
    torch.manual_seed(0)
    tokens = torch.randn(4, 50, 8)
    mask = torch.zeros(4, 50, dtype=torch.bool)
    mask[:, :10] = True
    same, m = random_replace(tokens, mask, 0.0)
    assert same is tokens and m is mask
    out, predict = random_replace(tokens, mask, 0.5)
    replaced = predict & ~mask
    assert replaced.any() and not replaced[:, :10].any()
    assert torch.equal(out[~replaced], tokens[~replaced])


def test_mix_contrastive_loss_matches_its_formula():
    torch.manual_seed(0)
    B, P, K, T = 5, 8, 12, 0.07
    q = F.normalize(torch.randn(B, P), dim=1)
    k = F.normalize(torch.randn(B, P), dim=1)
    queue = F.normalize(torch.randn(P, K), dim=0)
    r = torch.rand(B)
    total = 0.0
    for b in range(B):
        logits = [float(q[b] @ k[j]) / T for j in range(B)] + [float(q[b] @ queue[:, j]) / T for j in range(K)]
        lse = math.log(sum(math.exp(x) for x in logits))
        total += r[b].item() * (lse - logits[b]) + (1 - r[b].item()) * (lse - logits[B - 1 - b])
    assert math.isclose(mix_contrastive_loss(q, k, queue, r, T).item(), total / B, rel_tol=1e-5)
    lm = moco_contrastive_loss(q, k, queue, T).item()
    ref = sum(math.log(math.exp(float(q[b] @ k[b]) / T) + sum(math.exp(float(q[b] @ queue[:, j]) / T)
                                                                for j in range(K))) - float(q[b] @ k[b]) / T
              for b in range(B)) / B
    assert math.isclose(lm, ref, rel_tol=1e-5)
    fp32 = mix_contrastive_loss(q, k, queue, r, T), moco_contrastive_loss(q, k, queue, T)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 logits / 0.07 would be off by ~1%: kept in fp32
        assert torch.equal(mix_contrastive_loss(q, k, queue, r, T), fp32[0])
        assert torch.equal(moco_contrastive_loss(q, k, queue, T), fp32[1])


def test_masked_point_model_init_and_parameter_count():
    torch.manual_seed(0)
    m = MaskedPointModel(Config(kind="pretrain"))
    # official transformer_q: 167 entries / 25,472,896 parameters (spec 7.4)
    assert sum(p.numel() for p in m.parameters()) == 25_472_896
    assert len(m.state_dict()) == 167
    assert abs(m.mask_token.std().item() - 0.02) < 0.01 and abs(m.backbone.cls_pos.std().item() - 0.02) < 0.01
    assert abs(m.lm_head.weight.std().item() - 0.02) < 0.001 and torch.all(m.lm_head.bias == 0)


def _tiny_pointbert(**mpm):
    cfg = preset("tiny-pretrain")
    for k, v in mpm.items():
        setattr(cfg.mpm, k, v)
    torch.manual_seed(0)
    model = PointBERT(cfg)
    from pointbert.tokenizer import DiscreteVAE

    model.load_tokenizer(DiscreteVAE(cfg))
    return model, cfg


def test_load_tokenizer_copies_patch_embed_into_query_and_parameters_into_key():
    model, cfg = _tiny_pointbert()
    for (n, a), b in zip(model.query.backbone.patch_embed.state_dict().items(),
                         model.tokenizer.patch_embed.state_dict().values()):
        assert torch.equal(a, b), n
    for a, b in zip(model.query.parameters(), model.key.parameters()):
        assert torch.equal(a, b)
    assert not any(p.requires_grad for p in model.key.parameters())
    assert not any(p.requires_grad for p in model.tokenizer.parameters())


def test_pretraining_step_trains_query_only_and_updates_key_and_queue():
    model, cfg = _tiny_pointbert()
    model.train()
    points = torch.randn(8, 256, 3)
    key_before = [p.clone() for p in model.key.parameters()]
    queue_before = model.queue.clone()
    out = model(points)
    for v in out:
        assert torch.isfinite(v)
    assert out.mpm_loss > 0 and out.mix_loss > 0 and out.moco_loss == 0
    torch.testing.assert_close(out.loss, out.mpm_loss + out.mix_loss)
    assert math.isclose(out.mpm_loss.item(), 2 * math.log(cfg.tokenizer.vocab_size), rel_tol=0.3)
    out.loss.backward()
    assert all(p.grad is not None for p in model.query.parameters())
    assert all(p.grad is None for p in model.key.parameters())
    assert all(p.grad is None for p in model.tokenizer.parameters())
    # EMA: key <- m key + (1-m) query (query unchanged before the optimizer step)
    m = cfg.mpm.momentum
    for kb, k, q in zip(key_before, model.key.parameters(), model.query.parameters()):
        torch.testing.assert_close(k, m * kb + (1 - m) * q)
    # queue: 8 new columns at the pointer, pointer advanced
    assert int(model.queue_ptr) == 8
    assert not torch.equal(model.queue[:, :8], queue_before[:, :8])
    assert torch.equal(model.queue[:, 8:], queue_before[:, 8:])
    torch.testing.assert_close(model.queue[:, :8].norm(dim=0), torch.ones(8))


def test_queue_wraps_around():
    model, cfg = _tiny_pointbert()
    model.train()
    K = cfg.mpm.queue_size  # 64
    with torch.no_grad():
        for _ in range(9):
            model(torch.randn(8, 256, 3))
    assert int(model.queue_ptr) == (9 * 8) % K


@pytest.mark.parametrize("opts", [dict(mask_type="random"), dict(moco_loss=True), dict(replace_prob=0.2),
                                  dict(key_masked=False, tokenizer_bn_train=False),
                                  dict(mix_loss=False, mpm_loss=True)])
def test_pretraining_options_run(opts):
    model, _ = _tiny_pointbert(**opts)
    model.train()
    out = model(torch.randn(4, 256, 3))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    if opts.get("moco_loss"):
        assert out.moco_loss > 0
    if opts.get("tokenizer_bn_train") is False:
        assert not model.tokenizer.training


def test_probe_features_are_unmasked_and_deterministic():
    model, cfg = _tiny_pointbert()
    model.eval()
    pts = torch.randn(3, 256, 3)
    a, b = model.probe_features(pts), model.probe_features(pts)
    assert a.shape == (3, cfg.mpm.proj_dim) and torch.equal(a, b)


def test_predict_masked_predicts_tokens_only_from_visible_patches_and_renders(tmp_path):
    from pointbert.viz import masked_prediction_panel

    model, cfg = _tiny_pointbert()
    model.eval()
    pts = torch.randn(2, 256, 3)
    torch.manual_seed(0)
    nb, centers, mask, target, predicted = model.predict_masked(pts)
    G = cfg.patches.num_patches
    assert nb.shape == (2, G, cfg.patches.patch_size, 3) and mask.shape == target.shape == predicted.shape == (2, G)
    assert mask.any() and torch.equal(target, model.targets(nb, centers))
    # the prediction for masked patches does not see their points: change them, nothing changes
    nb2 = torch.where(mask[..., None, None], torch.randn_like(nb), nb)
    tokens = model.query(nb2, centers, mask)[1]
    assert torch.equal(model.query.lm_head(tokens).argmax(-1)[mask], predicted[mask])
    again = model.predict_masked(pts, mask)
    assert torch.equal(again[2], mask) and torch.equal(again[4], predicted)
    panel = masked_prediction_panel(model.tokenizer, nb[0], centers[0], mask[0], target[0], predicted[0])
    visible, masked = int((~mask[0]).sum()), int(mask[0].sum())
    K = cfg.patches.patch_size
    assert panel["points"].shape == (visible * K + masked * model.tokenizer.decoder.num_fine, 3)
    right = float((predicted[0][mask[0]] == target[0][mask[0]]).float().mean())
    assert f"{100 * right:.0f}% of ids right" in panel["title"]


def test_token_targets_are_fp32_under_bf16_autocast():
    """The argmax over the vocabulary is precision-sensitive: the official targets are fp32 (spec 5.5)."""
    model, cfg = _tiny_pointbert()
    seen = []
    logits = model.tokenizer.logits

    def spy(nb, c):
        out = logits(nb, c)
        seen.append((nb.dtype, out.dtype, torch.is_autocast_enabled("cpu")))
        return out

    model.tokenizer.logits = spy
    points = torch.rand(2, cfg.data.num_points, 3)
    nb, centers = model.query.backbone.group(points)
    plain = model.targets(nb, centers)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(model.targets(nb, centers), plain)
    assert seen == [(torch.float32, torch.float32, False)] * 2
