"""Every fast path computes what the plain, official-style implementation computes (benchmarks/plain.py).

The plain models use the official layout (Conv1d/Conv2d over channel-first tensors, explicit attention,
the pure-PyTorch FPS loop, kNN by square_distance + topk, Chamfer from all pairwise distances) and load
our weights, so each check runs both on the same weights and inputs: outputs, losses, gradients and
BatchNorm running statistics agree within float tolerance, with every PatchEmbed fast path on and off.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks import flops, plain
from benchmarks.run import stated_peak
from pointbert import ops
from pointbert.config import preset
from pointbert.heads import Classifier
from pointbert.mpm import PointBERT
from pointbert.patches import PatchEmbed
from pointbert.tokenizer import DiscreteVAE

FAST_PATHS = [dict(split_global=True, compose_local=True, split_edges=True, split_first=True),
              dict(split_global=True, compose_local=False, split_edges=True, split_first=True),
              dict(split_global=False, split_edges=False, split_first=False)]
EVAL_PATHS = [dict(fold_bn=f, chunk_patches=c, split_global=s, compose_local=s) for f in (True, False)
              for c in (0, 3) for s in (True, False)]


def close(a: Tensor, b: Tensor, rel: float = 1e-4, what: str = "") -> None:
    """Equal up to ``rel`` of the largest magnitude of ``b``."""
    err, scale = (a - b).abs().max().item(), b.abs().max().item()
    assert err <= rel * max(scale, 1e-6), f"{what}: max error {err:.3g} vs scale {scale:.3g}"


def flagged(model: nn.Module, **flags) -> nn.Module:
    """Set each fast-path flag on every submodule whose class defines it (PatchEmbed, DGCNN, FoldingDecoder)."""
    for m in model.modules():
        for k, v in flags.items():
            if hasattr(type(m), k):
                setattr(m, k, v)
    return model


def grads(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def same_grads(ours: nn.Module, ref: nn.Module, rel: float = 1e-4) -> None:
    """Every gradient agrees. Some are zero in exact arithmetic (biases whose shift a training-mode
    BatchNorm removes): where the reference is below 1e-4 of the largest gradient, both need only be
    rounding noise (below 1e-3 of it)."""
    g_ours, g_ref = grads(ours), grads(ref)
    assert g_ours.keys() == g_ref.keys() and g_ours
    top = max(g.abs().max().item() for g in g_ref.values())
    for n, g in g_ours.items():
        r = g_ref[n].reshape(g.shape)
        if r.abs().max().item() < 1e-4 * top:
            assert g.abs().max().item() < 1e-3 * top, n
        else:
            close(g, r, rel, n)


def perturb_batchnorm(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial affine parameters and running statistics, so folding is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                c = m.num_features
                m.weight.copy_(1 + 0.3 * torch.randn(c, generator=g))
                m.bias.copy_(0.3 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.5 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))


def cloud(B: int, N: int, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, N, 3, generator=g) * torch.tensor([1.0, 0.7, 0.5])


# --------------------------------------------------------------------------------------------------
# PatchEmbed: split global half, BatchNorm folding, chunking
# --------------------------------------------------------------------------------------------------


def test_patch_embed_parameters_are_unchanged():
    """The fast paths keep the official parameter set: second_conv.0.weight is (h2, 2*h1)."""
    pe = PatchEmbed(256)
    shapes = {k: tuple(v.shape) for k, v in pe.state_dict().items() if k.endswith("weight")}
    assert shapes == {"first_conv.0.weight": (128, 3), "first_conv.1.weight": (128,),
                      "first_conv.3.weight": (256, 128), "second_conv.0.weight": (512, 512),
                      "second_conv.1.weight": (512,), "second_conv.3.weight": (256, 512)}
    assert sum(p.numel() for p in pe.parameters()) == 428_800  # the encoder of spec 6.1


@pytest.mark.parametrize("flags", FAST_PATHS)
def test_patch_embed_train_matches_plain(flags):
    """Training mode: embeddings, every gradient and the BatchNorm running statistics."""
    torch.manual_seed(0)
    ours = flagged(PatchEmbed(64, (32, 48, 80)), **flags).train()
    ref = plain.load_ours(plain.PatchEmbed(64, (32, 48, 80)), ours).train()
    nb = torch.randn(3, 7, 16, 3)
    w = torch.randn(3, 7, 64)
    (ours(nb) * w).sum().backward()
    out_ref = ref(nb)
    (out_ref * w).sum().backward()
    close(ours(nb.clone()).detach(), ref(nb.clone()).detach())  # second call: after one running-stat update
    same_grads(ours, ref)
    for k, v in ours.state_dict().items():
        if "running" in k:
            close(v, ref.state_dict()[k])


def test_patch_embed_backward_copies_no_gradient():
    """No in-place operation on a view in the training graph: its backward (CopySlices) would clone
    the whole (P*K, h2) gradient."""
    nodes, todo = set(), [PatchEmbed(64, (32, 48, 80)).train()(torch.randn(2, 3, 16, 3)).sum().grad_fn]
    while todo:
        fn = todo.pop()
        if fn is not None and fn not in nodes:
            nodes.add(fn)
            todo += [f for f, _ in fn.next_functions]
    names = {type(fn).__name__ for fn in nodes}
    assert "AddmmBackward0" in names and "CopySlices" not in names


@pytest.mark.parametrize("shape", [(1, 1, 16), (2, 3, 1), (1, 2, 1)])
def test_patch_embed_matches_plain_with_one_patch_or_one_point(shape):
    """P = 1 or K = 1 (degenerate broadcasts and views): the fast paths stay exact, train and eval."""
    torch.manual_seed(4)
    ours = PatchEmbed(64, (32, 48, 80))
    perturb_batchnorm(ours)
    ref = plain.load_ours(plain.PatchEmbed(64, (32, 48, 80)), ours)
    nb = torch.randn(*shape, 3)
    for train in (True, False):
        ours.train(train), ref.train(train)
        w = torch.randn(*shape[:2], 64)
        ours.zero_grad(), ref.zero_grad()
        (ours(nb) * w).sum().backward()
        (ref(nb) * w).sum().backward()
        close(ours(nb).detach(), ref(nb).detach(), 1e-5)
        same_grads(ours, ref)
        with torch.no_grad():  # without autograd compose_local accumulates in place
            close(ours(nb), ref(nb), 1e-5)


@pytest.mark.parametrize("flags", EVAL_PATHS)
def test_patch_embed_eval_matches_plain(flags):
    """Eval mode (running statistics), with folding and chunking on and off, gradients included."""
    torch.manual_seed(1)
    ours = PatchEmbed(64, (32, 48, 80))
    perturb_batchnorm(ours)
    ours = flagged(ours, **flags).eval()
    ref = plain.load_ours(plain.PatchEmbed(64, (32, 48, 80)), ours).eval()
    nb = torch.randn(2, 5, 16, 3)  # 10 patches: chunks of 3 leave a remainder
    close(ours(nb), ref(nb), 1e-5)
    w = torch.randn(2, 5, 64)
    (ours(nb) * w).sum().backward()
    (ref(nb) * w).sum().backward()
    same_grads(ours, ref)
    with torch.no_grad():
        close(ours(nb), ref(nb), 1e-5)


def test_patch_embed_without_batchnorm_or_running_stats():
    """Layers swapped for identities, or BatchNorm without running statistics, are used as they are."""
    torch.manual_seed(3)
    nb = torch.randn(2, 6, 8, 3)
    for norm in (lambda c: nn.Identity(), lambda c: nn.BatchNorm1d(c, track_running_stats=False)):
        ours = PatchEmbed(32, (16, 24, 40))
        ref = plain.load_ours(plain.PatchEmbed(32, (16, 24, 40)), ours)
        for m in (ours, ref):
            m.first_conv[1], m.second_conv[1] = norm(16), norm(40)
        ours.chunk_patches = 5
        close(ours.eval()(nb), ref.eval()(nb), 1e-5)


def test_chunking_only_in_eval_and_only_with_folding():
    """Chunks are exact only when BatchNorm uses running statistics (eval + folding)."""
    torch.manual_seed(2)
    pe = PatchEmbed(32, (16, 24, 40))
    perturb_batchnorm(pe)
    pe.chunk_patches = 2
    nb = torch.randn(2, 6, 8, 3)
    ref = plain.load_ours(plain.PatchEmbed(32, (16, 24, 40)), pe)
    close(pe.train()(nb), ref.train()(nb))  # batch statistics over all 12 patches, not per chunk


# --------------------------------------------------------------------------------------------------
# Whole models against the plain twins
# --------------------------------------------------------------------------------------------------


def small(name: str):
    """A tiny preset with narrow mini-PointNet, DGCNN and decoder, and no DropPath / dropout (the two
    implementations draw that noise differently)."""
    cfg = preset(name)
    cfg.patches.hidden_dims = (16, 24, 40)
    cfg.tokenizer.dgcnn_dims = (16, 24, 32, 32, 48)
    cfg.tokenizer.decoder_hidden, cfg.tokenizer.fold_hidden = 48, 32
    cfg.backbone.drop_path_rate = 0.0
    cfg.head.dropout = 0.0
    return cfg


def twins(kind: str, model_cls: type, flags: dict) -> tuple:
    """(cfg, ours, the plain twin with our weights), both in training mode, from the ``small`` tiny preset."""
    cfg = small(f"tiny-{kind}")
    torch.manual_seed(0)
    ours = flagged(model_cls(cfg), uniform_noise=False, **flags).train()  # the plain twin's Gumbel draws
    return cfg, ours, plain.load_ours(plain.build(kind, cfg), ours).train()


@pytest.mark.parametrize("flags", FAST_PATHS)
def test_classifier_step_matches_plain(flags):
    _, ours, ref = twins("classifier", Classifier, flags)
    pts, labels = cloud(4, 256), torch.tensor([0, 3, 5, 9])
    logits = ours(pts)
    ref_logits = ref(pts)
    close(logits, ref_logits)
    F.cross_entropy(logits, labels).backward()
    F.cross_entropy(ref_logits, labels).backward()
    same_grads(ours, ref)
    ours.eval(), ref.eval()
    with torch.no_grad():
        close(ours(pts), ref(pts), 1e-5)
        close(ours.forward_features(pts), ref.backbone(pts), 1e-5)


def test_classifier_full_width_inference_matches_plain():
    """The full-size mini-PointNet and Transformer widths (2 blocks), eval with every fast path on."""
    cfg = preset("modelnet40-1k")
    cfg.backbone.depth = 2
    torch.manual_seed(0)
    ours = Classifier(cfg)
    perturb_batchnorm(ours)
    ref = plain.load_ours(plain.build("classifier", cfg), ours).eval()
    ours.eval().backbone.patch_embed.chunk_patches = 50  # 128 patches: chunks of 50, 50, 28
    with torch.no_grad():
        pts = cloud(2, 1024, seed=3)
        close(ours(pts), ref(pts), 1e-5)


@pytest.mark.parametrize("flags", FAST_PATHS)
def test_tokenizer_step_matches_plain(flags):
    """dVAE training forward (same Gumbel noise), both losses and all gradients.

    A soft sample (temperature 2): near one-hot samples give near-identical codebook mixtures, whose
    max over DGCNN neighbours is then a near-tie that rounding may route either way."""
    _, ours, ref = twins("tokenizer", DiscreteVAE, flags)
    pts = cloud(3, 256, seed=1)
    torch.manual_seed(5)
    out = ours(pts, temperature=2.0)
    torch.manual_seed(5)
    ref_out = ref(pts, temperature=2.0)
    close(out.logits, ref_out[5])
    close(out.fine, ref_out[3])
    close(out.whole_coarse, ref_out[0])
    (recon, kl), (ref_recon, ref_kl) = ours.loss(out), ref.loss(ref_out)
    close(recon, ref_recon, 1e-5)
    close(kl, ref_kl, 1e-4)
    (recon + 0.3 * kl).backward()
    (ref_recon + 0.3 * ref_kl).backward()
    same_grads(ours, ref)
    ours.eval(), ref.eval()
    nb, center = ours.group(pts)
    with torch.no_grad():
        assert torch.equal(ours.tokenize(pts), ref.logits(nb, center).argmax(-1))


@pytest.mark.parametrize("flags", FAST_PATHS)
def test_pretrain_step_matches_plain(flags):
    """Two seeded pre-training steps: same masks, mixing, targets, losses, gradients, key encoder and queue."""
    _, ours, ref = twins("pretrain", PointBERT, flags)
    pts = cloud(4, 256, seed=2)
    for step in range(2):
        torch.manual_seed(10 + step)
        loss = ours(pts).loss
        torch.manual_seed(10 + step)
        ref_loss = ref(pts)
        close(loss, ref_loss, 1e-5)
        loss.backward()
        ref_loss.backward()
        same_grads(ours, ref, 1e-3)
        ours.zero_grad(), ref.zero_grad()
    close(ours.queue, ref.queue, 1e-5)
    assert torch.equal(ours.queue_ptr, ref.queue_ptr)
    for (name, v), w in zip(ours.key.state_dict().items(), ref.key.state_dict().values()):
        close(v.float(), w.float().reshape(v.shape), 1e-5, name)


# --------------------------------------------------------------------------------------------------
# Ops against the plain stand-ins, the FLOP counts, the stated peaks
# --------------------------------------------------------------------------------------------------


def test_ops_match_plain_stand_ins():
    pts = cloud(3, 500, seed=4)
    assert torch.equal(ops.fps(pts, 64), plain.fps(pts, 64))
    centers = ops.gather(pts, ops.fps(pts, 16))
    assert torch.equal(ops.knn(centers, pts, 10).sort(-1).values, plain.knn_point(10, pts, centers).sort(-1).values)
    p = cloud(6, 8, seed=5).requires_grad_()
    q = cloud(6, 32, seed=6)
    a = ops.chamfer_l1(p, q)
    (ga,) = torch.autograd.grad(a, p)
    b = plain.chamfer_l1(p, q)
    (gb,) = torch.autograd.grad(b, p)
    close(a, b, 1e-6)
    close(ga, gb, 1e-5)


def test_flop_counts():
    """The issue's figures: 1.75 GFLOP in the mini-PointNet, 2.84 in the blocks, 4.60 per cloud."""
    cfg = preset("modelnet40-1k")
    assert flops.patch_embed(cfg) / 1e9 == pytest.approx(1.7464, abs=1e-4)
    assert flops.blocks(cfg) / 1e9 == pytest.approx(2.8383, abs=1e-4)
    assert flops.classifier(cfg) / 1e9 == pytest.approx(4.604, abs=1e-3)
    saved = flops.patch_embed(cfg) - flops.patch_embed(cfg, split=True)
    assert saved == 2 * 64 * 256 * 512 * (32 - 1)  # the global half once per patch instead of per point
    assert flops.step(cfg, "finetune") == 3 * flops.step(cfg, "inference")
    tok = preset("tokenizer")
    assert flops.tokenizer(tok) > flops.tokenizer_targets(tok) > flops.patch_embed(tok)
    assert flops.step(preset("modelnet40-2k"), "inference") > 2 * flops.step(cfg, "inference")


def test_stated_peak_takes_the_longest_matching_name():
    assert stated_peak("NVIDIA H200", "bf16") == 989.4
    assert stated_peak("NVIDIA H200 NVL", "bf16") == 835.5
    assert stated_peak("NVIDIA H200 NVL", "fp32") == 60.0
    assert stated_peak("NVIDIA H100 80GB HBM3", "fp32") == 66.9
    assert stated_peak("NVIDIA H100 PCIe", "bf16") == 756.0
    assert stated_peak("NVIDIA A100-SXM4-80GB", "bf16") == 312.0
    assert stated_peak("NVIDIA GeForce RTX 4090", "bf16") is None
    assert stated_peak("", "fp32") is None
