"""Analytic FLOP counts of the Point-BERT models, per cloud, from a :class:`pointbert.config.Config`.

Counted: every matrix product of the official computation (Linear / 1x1 conv layers and the two
attention products), 2 FLOPs per multiply-add. Not counted: normalisation, activations, pooling,
softmax, grouping (FPS, kNN) and the Chamfer loss, all small next to the products. A training step
counts 3x its forward (forward + backward for activations and weights); passes without gradient
(the frozen tokenizer's targets, the momentum encoder) count once.

These are the *model* FLOPs of the official computation and are used for both implementations, so
GFLOP/s is throughput in model work. pointbert executes fewer: ``split=True`` gives its count with
the global half of the mini-PointNet's second layer computed once per patch, and its token head only
sees masked patches (the official applies it to every patch).

Full-size classifier at 1024 points: 1.75 GFLOP in the mini-PointNet over 2,048 points, 2.84 in the
12 blocks over 65 tokens, 4.60 in all.
"""

from __future__ import annotations

from pointbert.config import Config


def patch_embed(cfg: Config, split: bool = False) -> float:
    """Mini-PointNet over G patches of K points (spec 1.3)."""
    p = cfg.patches
    h0, h1, h2 = p.hidden_dims
    points = p.num_patches * p.patch_size
    second_in = h1 if split else 2 * h1
    per_point = 3 * h0 + h0 * h1 + second_in * h2 + h2 * p.embed_dim
    return 2.0 * (points * per_point + (p.num_patches * h1 * h2 if split else 0))


def blocks(cfg: Config) -> float:
    """The Transformer blocks over 1 + G tokens (spec 1.4), attention products included."""
    b = cfg.backbone
    L, d = cfg.patches.num_patches + 1, b.dim
    hidden = int(d * b.mlp_ratio)
    linear = L * (d * 3 * d + d * d + 2 * d * hidden)
    attention = 2 * L * L * d  # q k^T and attn v over all heads
    return 2.0 * b.depth * (linear + attention)


def backbone(cfg: Config, split: bool = False) -> float:
    """Patch embedding, reduce_dim, position MLP and blocks."""
    p, b = cfg.patches, cfg.backbone
    extra = p.num_patches * (p.embed_dim * b.dim + 3 * b.pos_hidden + b.pos_hidden * b.dim)
    return patch_embed(cfg, split) + 2.0 * extra + blocks(cfg)


def classifier(cfg: Config, split: bool = False) -> float:
    h = cfg.head
    return backbone(cfg, split) + 2.0 * (2 * cfg.backbone.dim * h.hidden + h.hidden * h.num_classes)


def dgcnn(cfg: Config, in_dim: int, out_dim: int) -> float:
    """DGCNN over the G centers: input_trans, four EdgeConv layers on G*k edges, layer5 (spec 4.1)."""
    t, G = cfg.tokenizer, cfg.patches.num_patches
    dims = t.dgcnn_dims
    total, c = G * in_dim * dims[0], dims[0]
    for w in dims[1:]:
        total += G * t.dgcnn_k * 2 * c * w
        c = w
    return 2.0 * (total + G * sum(dims[1:]) * out_dim)


def tokenizer_targets(cfg: Config, split: bool = False) -> float:
    """Patch embedding + dgcnn_1: the token logits (what pre-training runs without gradient)."""
    return patch_embed(cfg, split) + dgcnn(cfg, cfg.patches.embed_dim, cfg.tokenizer.vocab_size)


def tokenizer(cfg: Config, split: bool = False) -> float:
    """The whole dVAE forward (spec 4.2): encoder, Gumbel sample @ codebook, dgcnn_2, folding decoder."""
    p, t = cfg.patches, cfg.tokenizer
    G, K = p.num_patches, p.patch_size
    codebook = G * t.vocab_size * t.token_dim
    coarse = G * (t.decoder_dim * t.decoder_hidden + t.decoder_hidden**2 + t.decoder_hidden * 3 * (K // 4))
    fold_in = t.decoder_dim + 5
    fold = G * K * (fold_in * t.fold_hidden + t.fold_hidden**2 + t.fold_hidden * 3)
    return (tokenizer_targets(cfg, split) + 2.0 * (codebook + coarse + fold)
            + dgcnn(cfg, t.token_dim, t.decoder_dim))


def mpm_encoder(cfg: Config, token_head: bool = True) -> float:
    """One MaskTransformer pass: backbone + projection head (+ the token head on every patch)."""
    b, m = cfg.backbone, cfg.mpm
    head = b.dim * m.proj_dim + m.proj_dim**2
    if token_head:
        head += cfg.patches.num_patches * b.dim * cfg.tokenizer.vocab_size
    return backbone(cfg) + 2.0 * head


def step(cfg: Config, case: str) -> float:
    """Model FLOPs per cloud of one benchmark case: tokenizer | pretrain | finetune | inference."""
    if case == "tokenizer":
        return 3 * tokenizer(cfg)
    if case == "pretrain":  # targets, 2 query passes with backward, 1 key pass
        return tokenizer_targets(cfg) + 2 * 3 * mpm_encoder(cfg) + mpm_encoder(cfg, token_head=False)
    if case == "finetune":
        return 3 * classifier(cfg)
    if case == "inference":
        return classifier(cfg)
    raise ValueError(f"unknown case {case!r}")
