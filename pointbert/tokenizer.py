"""The point tokenizer: a discrete VAE over point patches (spec 4, official ``models/dvae.py``).

    points (B,N,3) -> group -> neighborhoods (B,G,K,3), centers (B,G,3)
    encode:  PatchEmbed (B,G,C_e) -> DGCNN over the center graph -> logits (B,G,V)
    sample:  Gumbel-softmax over the V words -> soft one-hot (B,G,V) @ codebook (V,D) -> z (B,G,D)
    decode:  DGCNN over the same graph (B,G,C_d) -> folding decoder -> coarse (B,G,K/4,3), fine (B,G,K,3)
    loss:    Chamfer-L1(coarse) + Chamfer-L1(fine) against every patch, + beta(step) * KL(uniform || mean_G q)

The paper's alternatives to the official choices are config fields (spec 11.6-11.7): ``tokenizer.logit_norm``
(false: no GroupNorm + LeakyReLU on the logits), ``tokenizer.kl_direction`` (``q_uniform``: KL(mean_G q ||
uniform)) and ``tokenizer.chamfer_half`` (false: Chamfer-L1 without the factor 1/2).

At pre-training time only the encoder half is used: a patch's token is ``argmax`` of its logits
(:meth:`DiscreteVAE.tokenize`, spec 4.7), with no Gumbel noise.

Layout. The official code works channel-first with Conv1d/Conv2d(kernel 1); here every point-wise
layer is a ``Linear`` over channel-last tensors ((B,G,C) per patch, (B,G,k,C) per graph edge), which
is the same map with the weight's trailing unit dimensions dropped. Submodule names and indices follow
the official ones (``dgcnn_1.layer1.0`` conv, ``.1`` GroupNorm, ...), so official keys map one to one;
only ``encoder.`` is called ``patch_embed.`` here. GroupNorm normalises exactly as on the official
(B,C,G,k) layout: per sample, over the channels of a group and all positions (:class:`GroupNormLast`).

Initialisation is PyTorch's default everywhere, as the official dVAE; the codebook is N(0, 1).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from .config import Config, TokenizerConfig
from .errors import CheckpointError
from .patches import PatchEmbed, group

# --------------------------------------------------------------------------------------------------
# DGCNN over the patch-center graph (spec 4.1)
# --------------------------------------------------------------------------------------------------


class GroupNormLast(nn.GroupNorm):
    """``nn.GroupNorm`` for channel-last input (B, *, C).

    Same parameters, state-dict keys and numbers as ``nn.GroupNorm`` on the channel-first tensor
    (B, C, *): per sample, mean and (biased) variance over the C/num_groups channels of a group and
    every position ``*``; then a per-channel affine map. The input is handed to ``F.group_norm`` as a
    channels-last view (B, C, L, 1) of its own memory, which the native kernel handles without a copy.
    """

    def forward(self, x: Tensor) -> Tensor:
        B, C = x.shape[0], x.shape[-1]
        h = x.reshape(B, -1, 1, C).permute(0, 3, 1, 2)  # (B, C, L, 1) view, channels-last in memory
        h = F.group_norm(h, self.num_groups, self.weight, self.bias, self.eps)
        return h.permute(0, 2, 3, 1).reshape(*x.shape[:-1], C)  # back to (B, *, C)


def edge_features(f: Tensor, idx: Tensor, neighbour_feats: Tensor | None = None) -> Tensor:
    """EdgeConv input: for query i and each neighbour j in idx[i], concat[f_j - f_i, f_i].

    Args:
        f: (B, G, C) features f_i of the query points.
        idx: (B, G, k) neighbour indices into ``neighbour_feats`` (default: into ``f`` itself).
        neighbour_feats: (B, N, C) features f_j of another point set (the part-segmentation
            propagation from a coarser level); None for the self-graph.

    Returns:
        (B, G, k, 2C) edge features.
    """
    neighbours = ops.gather(f if neighbour_feats is None else neighbour_feats, idx)  # (B, G, k, C)
    center = f.unsqueeze(2).expand_as(neighbours)  # (B, G, k, C)
    return torch.cat([neighbours - center, center], dim=-1)


def edge_conv(block: nn.Sequential, f: Tensor, idx: Tensor) -> Tensor:
    """``block(edge_features(f, idx))`` without building the (B, G, k, 2C) edge features.

    The block's bias-free linear map W = [W_d | W_c] on [f_j - f_i ; f_i] equals W_d f_j + (W_c - W_d) f_i,
    so both halves are computed once per point, (B, G, C) @ (C, 2C'), and the neighbour half is gathered:
    k times fewer multiply-adds than the (B, G, k, 2C) @ (2C, C') of the plain form. Then the block's
    GroupNorm and activation, as in the plain form (equal up to float rounding).

    f (B, G, C), idx (B, G, k) -> (B, G, k, C').
    """
    linear, rest = block[0], block[1:]
    C = f.shape[-1]
    w_d, w_c = linear.weight[:, :C], linear.weight[:, C:]  # (C', C) each
    nbr, own = F.linear(f, torch.cat([w_d, w_c - w_d])).chunk(2, dim=-1)  # (B, G, C') each
    return rest(ops.gather(nbr, idx) + own.unsqueeze(2))


def _conv_block(in_dim: int, out_dim: int) -> nn.Sequential:
    """1x1 conv (bias-free) -> GroupNorm(4) -> LeakyReLU(0.2), channel-last.

    The activation works in place on the GroupNorm output (which GroupNorm's backward does not need; a
    positive slope lets LeakyReLU's backward use its output): the same numbers, one tensor fewer."""
    return nn.Sequential(nn.Linear(in_dim, out_dim, bias=False), GroupNormLast(4, out_dim),
                         nn.LeakyReLU(0.2, inplace=True))


class DGCNN(nn.Module):
    """Four EdgeConv layers over a static kNN graph of the patch centers, then a point-wise layer.

    input_trans (C_in -> 128) -> layer1..4 (edge features, conv, GroupNorm, LeakyReLU, max over k)
    with widths 256, 512, 512, 1024 -> concat (2304) -> layer5 (conv, GroupNorm, LeakyReLU) -> C_out.
    The graph joins each center to its k nearest centers, itself included. Note that layer5's
    GroupNorm and LeakyReLU also apply when the output is the token logits (spec 11.6); ``out_norm=False``
    leaves them out, layer5 is then its bias-free linear map alone (``layer5.0``, no ``layer5.1`` keys).
    """

    #: fast path (on): each EdgeConv layer through :func:`edge_conv`, k times fewer multiply-adds.
    split_edges = True

    def __init__(self, in_dim: int, out_dim: int, k: int = 4,
                 dims: tuple[int, ...] = (128, 256, 512, 512, 1024), out_norm: bool = True):
        super().__init__()
        self.k, self.out_norm = k, out_norm
        self.input_trans = nn.Linear(in_dim, dims[0])
        c = dims[0]
        self.edge_layers = len(dims) - 1
        for i, w in enumerate(dims[1:], start=1):
            setattr(self, f"layer{i}", _conv_block(2 * c, w))
            c = w
        out = _conv_block(sum(dims[1:]), out_dim) if out_norm else nn.Sequential(
            nn.Linear(sum(dims[1:]), out_dim, bias=False))
        setattr(self, f"layer{len(dims)}", out)

    def graph(self, centers: Tensor) -> Tensor:
        """centers (B, G, 3) -> (B, G, k) indices of each center's k nearest centers (self first)."""
        with torch.no_grad():
            return ops.knn(centers, centers, self.k)

    def forward(self, f: Tensor, centers: Tensor) -> Tensor:
        """f (B, G, C_in), centers (B, G, 3) -> (B, G, C_out)."""
        idx = self.graph(centers)  # (B, G, k)
        f = self.input_trans(f)  # (B, G, 128)
        levels = []
        for i in range(1, self.edge_layers + 1):
            layer = getattr(self, f"layer{i}")
            edges = edge_conv(layer, f, idx) if self.split_edges else layer(edge_features(f, idx))  # (B,G,k,C')
            f = ops.max_pool(edges, 2)  # (B, G, C')
            levels.append(f)
        return getattr(self, f"layer{self.edge_layers + 1}")(torch.cat(levels, dim=-1))  # (B,G,2304) -> (B,G,C_out)


# --------------------------------------------------------------------------------------------------
# Folding decoder (spec 4.2 step 7)
# --------------------------------------------------------------------------------------------------


class FoldingDecoder(nn.Module):
    """Patch feature -> coarse points by an MLP, then each coarse point folded into 4 fine points.

    ``mlp``: Linear(C -> 1024) ReLU Linear(1024 -> 1024) ReLU Linear(1024 -> 3*num_coarse),
    num_coarse = num_fine / 4. Fine point n = 4m + s belongs to coarse point m and gets the 2-D seed
    s of a 2x2 grid, (u, v) = (-.05,-.05), (+.05,-.05), (-.05,+.05), (+.05,+.05) (u fastest).
    ``final_conv`` maps concat[patch feature, seed, coarse point] (C+5) -> 512 -> 512 -> 3 per point
    (BatchNorm + ReLU between), and fine = that offset + its coarse point. Official name: ``Decoder``.
    """

    grid_size = 2
    #: fast path (on): ``final_conv``'s first layer maps each input once per distinct value, not once
    #: per fine point: W [f ; s ; a] + b = (W_f f + b) + W_a a + W_s s with the patch feature f once per
    #: patch, the coarse point a once per coarse point and the seed s once, then one broadcast sum;
    #: equal up to float rounding.
    split_first = True

    def __init__(self, in_dim: int, num_fine: int, hidden: int = 1024, fold_hidden: int = 512):
        super().__init__()
        folds = self.grid_size**2
        if num_fine % folds:
            raise ValueError(f"num_fine ({num_fine}) must be a multiple of {folds}")
        self.num_fine, self.num_coarse = num_fine, num_fine // folds
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, 3 * self.num_coarse))
        self.final_conv = nn.Sequential(
            nn.Linear(in_dim + 2 + 3, fold_hidden), nn.BatchNorm1d(fold_hidden), nn.ReLU(inplace=True),
            nn.Linear(fold_hidden, fold_hidden), nn.BatchNorm1d(fold_hidden), nn.ReLU(inplace=True),
            nn.Linear(fold_hidden, 3))
        grid = torch.linspace(-0.05, 0.05, self.grid_size)
        u = grid.repeat(self.grid_size)  # varies fastest
        v = grid.repeat_interleave(self.grid_size)
        self.register_buffer("folding_seed", torch.stack([u, v], dim=-1), persistent=False)  # (4, 2)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """features (B, G, C) -> coarse (B, G, num_coarse, 3), fine (B, G, num_fine, 3), local coordinates."""
        B, G, C = features.shape
        folds = self.grid_size**2
        coarse = self.mlp(features).view(B, G, self.num_coarse, 3)
        anchor = coarse.repeat_interleave(folds, dim=2)  # (B, G, num_fine, 3): fine n -> coarse n // 4
        if self.split_first:
            first = self.final_conv[0]
            w_f, w_s, w_a = first.weight.split([C, 2, 3], dim=1)
            per_coarse = (F.linear(features, w_f, first.bias).unsqueeze(2)  # (B, G, 1, H) once per patch
                          + F.linear(coarse, w_a))  # (B, G, num_coarse, H) once per coarse point
            h = per_coarse.unsqueeze(3) + F.linear(self.folding_seed.to(features.dtype), w_s)  # + (folds, H)
            offset = self.final_conv[1:](h.reshape(B * G * self.num_fine, -1))  # fine n = folds * m + s
        else:
            seed = self.folding_seed.repeat(self.num_coarse, 1).to(features.dtype)  # (num_fine, 2): n -> n % 4
            x = torch.cat([features.unsqueeze(2).expand(B, G, self.num_fine, C),
                           seed.expand(B, G, self.num_fine, 2), anchor], dim=-1)  # (B, G, num_fine, C+5)
            offset = self.final_conv(x.reshape(B * G * self.num_fine, C + 5))  # BatchNorm over all B*G*num_fine
        fine = offset.view(B, G, self.num_fine, 3) + anchor
        return coarse, fine


# --------------------------------------------------------------------------------------------------
# The discrete VAE (spec 4.2-4.3, 4.7)
# --------------------------------------------------------------------------------------------------


class TokenizerOutput(NamedTuple):
    """Everything one dVAE forward produces (spec 4.2 step 8, plus the sample itself)."""

    neighborhoods: Tensor  # (B, G, K, 3) ground-truth patches, local coordinates
    centers: Tensor  # (B, G, 3)
    logits: Tensor  # (B, G, V) dgcnn_1 output (after its GroupNorm + LeakyReLU unless logit_norm is off)
    soft_one_hot: Tensor  # (B, G, V) Gumbel-softmax sample (one-hot rows when hard=True)
    coarse: Tensor  # (B, G, K/4, 3) local
    fine: Tensor  # (B, G, K, 3) local
    whole_coarse: Tensor  # (B, G*K/4, 3) coarse + center, no grad
    whole_fine: Tensor  # (B, G*K, 3) fine + center, no grad


class DiscreteVAE(nn.Module):
    """Point-BERT's tokenizer: patch -> one of V discrete tokens -> reconstructed patch.

    Submodules (official names in brackets): ``patch_embed`` [encoder], ``dgcnn_1``, ``codebook``,
    ``dgcnn_2``, ``decoder``. Official state dicts load after renaming ``encoder.`` to
    ``patch_embed.`` and squeezing the trailing unit dimensions of the conv weights.
    """

    #: fast path (on unless ``tokenizer.gumbel_noise="exponential"``): Gumbel noise as -log(-log U) from
    #: ``torch.rand`` (:func:`gumbel_softmax`, ``noise="uniform"``): the same distribution, 0.35 s less per
    #: full-size step at batch 32 on 2 CPU cores; off = ``F.gumbel_softmax``'s ``exponential_`` draws, bit
    #: for bit (same seed, same sample).
    uniform_noise = True

    def __init__(self, cfg: Config | None = None):
        super().__init__()
        cfg = cfg or Config(kind="tokenizer")
        p, t = cfg.patches, cfg.tokenizer
        self.num_patches, self.patch_size = p.num_patches, p.patch_size
        self.vocab_size = t.vocab_size
        self.patch_embed = PatchEmbed(p.embed_dim, p.hidden_dims)
        self.dgcnn_1 = DGCNN(p.embed_dim, t.vocab_size, k=t.dgcnn_k, dims=t.dgcnn_dims, out_norm=t.logit_norm)
        self.codebook = nn.Parameter(torch.randn(t.vocab_size, t.token_dim))
        self.dgcnn_2 = DGCNN(t.token_dim, t.decoder_dim, k=t.dgcnn_k, dims=t.dgcnn_dims)
        self.decoder = FoldingDecoder(t.decoder_dim, num_fine=p.patch_size, hidden=t.decoder_hidden,
                                      fold_hidden=t.fold_hidden)
        if t.gumbel_noise == "exponential":
            self.uniform_noise = False
        self.kl_direction, self.chamfer_half = t.kl_direction, t.chamfer_half  # loss options (spec 11.6-11.7)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """A strict load whose weights have the logit GroupNorm while the model has none (or the other way
        round) fails with one line naming ``tokenizer.logit_norm``, before the key-by-key mismatch."""
        last = f"{prefix}dgcnn_1.layer{self.dgcnn_1.edge_layers + 1}."
        if strict and f"{last}0.weight" in state_dict and (f"{last}1.weight" in state_dict) != self.dgcnn_1.out_norm:
            has = f"{last}1.weight" in state_dict
            raise CheckpointError(f"the dVAE weights {'have' if has else 'lack'} the GroupNorm on the logits "
                                  f"({last}1.*), the model was built with tokenizer.logit_norm="
                                  f"{str(self.dgcnn_1.out_norm).lower()}: set tokenizer.logit_norm={str(has).lower()}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def group(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """points (B, N, 3) -> neighborhoods (B, G, K, 3) local, centers (B, G, 3)."""
        return group(points, self.num_patches, self.patch_size)

    def logits(self, neighborhoods: Tensor, centers: Tensor) -> Tensor:
        """neighborhoods (B, G, K, 3), centers (B, G, 3) -> token logits (B, G, V)."""
        return self.dgcnn_1(self.patch_embed(neighborhoods), centers)

    @torch.no_grad()
    def tokenize_patches(self, neighborhoods: Tensor, centers: Tensor) -> Tensor:
        """neighborhoods (B, G, K, 3), centers (B, G, 3) -> token ids (B, G) int64: argmax of the logits.

        No Gumbel noise (spec 4.7). The caller chooses the mode: the official pre-training keeps the
        frozen tokenizer's BatchNorm in train mode (batch statistics, spec 11.8).
        """
        return self.logits(neighborhoods, centers).argmax(dim=-1)

    def tokenize(self, points: Tensor) -> Tensor:
        """points (B, N, 3) -> token ids (B, G) int64, one per FPS patch (see :meth:`tokenize_patches`)."""
        return self.tokenize_patches(*self.group(points))

    def decode(self, one_hot_or_ids: Tensor, centers: Tensor) -> tuple[Tensor, Tensor]:
        """Tokens -> local patches.

        Args:
            one_hot_or_ids: (B, G, V) soft or hard one-hot weights over the codebook, or (B, G) integer
                ids (same as a hard one-hot: the codebook rows are taken directly).
            centers: (B, G, 3), which define the DGCNN graph.

        Returns:
            coarse (B, G, K/4, 3), fine (B, G, K, 3), both relative to their centers.
        """
        if one_hot_or_ids.is_floating_point():
            if one_hot_or_ids.shape[-1] != self.vocab_size:
                raise ValueError(f"one-hot weights must end in the vocabulary size {self.vocab_size}, "
                                 f"got shape {tuple(one_hot_or_ids.shape)}")
            z = one_hot_or_ids @ self.codebook  # (B, G, V) @ (V, D) -> (B, G, D)
        else:
            z = F.embedding(one_hot_or_ids, self.codebook)  # (B, G) -> (B, G, D)
        return self.decoder(self.dgcnn_2(z, centers))

    def forward(self, points: Tensor, temperature: float = 1.0, hard: bool = False) -> TokenizerOutput:
        """points (B, N, 3) -> :class:`TokenizerOutput`: encode, Gumbel-softmax sample, decode (spec 4.2).

        ``hard=False`` (training) mixes codebook rows with the relaxed sample; ``hard=True``
        (validation, visualisation) uses straight-through one-hot samples, still with Gumbel noise.
        """
        neighborhoods, centers = self.group(points)
        logits = self.logits(neighborhoods, centers)  # (B, G, V)
        noise = "uniform" if self.uniform_noise else "exponential"
        soft_one_hot = gumbel_softmax(logits, tau=temperature, hard=hard, noise=noise)  # (B, G, V)
        coarse, fine = self.decode(soft_one_hot, centers)
        with torch.no_grad():
            B = points.shape[0]
            whole_coarse = (coarse + centers.unsqueeze(2)).reshape(B, -1, 3)  # (B, G*K/4, 3)
            whole_fine = (fine + centers.unsqueeze(2)).reshape(B, -1, 3)  # (B, G*K, 3)
        return TokenizerOutput(neighborhoods, centers, logits, soft_one_hot, coarse, fine,
                               whole_coarse, whole_fine)

    def loss(self, out: TokenizerOutput) -> tuple[Tensor, Tensor]:
        """(reconstruction, KL) scalars; the training loss is ``recon + kl_weight(step) * kl`` (spec 4.3).

        recon = CD-L1(coarse, patch) + CD-L1(fine, patch), all B*G patches as separate sets, CD-L1 with
        the official 1/2 (without it if ``tokenizer.chamfer_half`` is off, spec 11.7). kl =
        :func:`kl_to_uniform` of the logits in the direction ``tokenizer.kl_direction`` (spec 11.6).
        """
        B, G, K, _ = out.neighborhoods.shape
        gt = out.neighborhoods.reshape(B * G, K, 3)
        half = self.chamfer_half
        recon = (ops.chamfer_l1(out.coarse.reshape(B * G, -1, 3), gt, half)
                 + ops.chamfer_l1(out.fine.reshape(B * G, -1, 3), gt, half))
        return recon, kl_to_uniform(out.logits, self.kl_direction)


def gumbel_softmax(logits: Tensor, tau: float = 1.0, hard: bool = False, noise: str = "exponential") -> Tensor:
    """``F.gumbel_softmax(logits, tau, hard, dim=-1)`` with two large tensors instead of six.

    ``noise="exponential"``: bit for bit ``F.gumbel_softmax``: the same draws in the same order
    (``exponential_`` on a fresh tensor, then ``-log``), the same operations in the same order, in place
    on the noise tensor; only the softmax output is new (and kept for backward).
    ``noise="uniform"``: the same Gumbel(0, 1) distribution as ``-log(-log U)``, U uniform on [0, 1)
    (``torch.rand``, about 4x faster than ``exponential_`` on CPU), U = 0 raised to eps/4 (for float32
    the middle of the lowest 2^-24 bin) so that every sample is finite; other random numbers than torch's.
    ``hard``: straight-through one-hot of the arg-max, as ``F.gumbel_softmax``.
    Reduced-precision logits (bf16 / fp16 under autocast) are taken to float32 first: noise, softmax and
    output in float32, as the sampled distribution needs.
    """
    if logits.dtype in (torch.bfloat16, torch.float16):
        logits = logits.float()
    if noise == "exponential":
        z = torch.empty_like(logits, memory_format=torch.legacy_contiguous_format).exponential_().log_()
    elif noise == "uniform":
        u = torch.rand_like(logits, memory_format=torch.legacy_contiguous_format)
        z = u.clamp_(min=torch.finfo(u.dtype).eps / 4).log_().neg_().log_()  # log(-log U) = log E, E ~ Exp(1)
    else:
        raise ValueError(f"noise must be 'exponential' or 'uniform', got {noise!r}")
    z = z.neg_().add_(logits)  # logits + Gumbel(0, 1); z requires grad through logits
    if tau != 1.0:
        z = z.div_(tau)
    y = z.softmax(dim=-1)
    if not hard:
        return y
    one_hot = torch.zeros_like(logits, memory_format=torch.legacy_contiguous_format)
    one_hot.scatter_(-1, y.max(dim=-1, keepdim=True)[1], 1.0)
    return one_hot - y.detach() + y


class _MeanSoftmax(torch.autograd.Function):
    """logits (B, G, V) -> mean over G of softmax(logits) (B, V), with one (B, G, V) tensor in backward.

    Autograd's chain (softmax, then mean) builds two: the mean's gradient expanded and divided by G, then
    softmax's backward. Here d/dl = s * (g/G - <s, g/G>) in one broadcast and one in-place product; the
    same numbers up to float rounding."""

    @staticmethod
    def forward(ctx, logits: Tensor) -> Tensor:
        s = logits.softmax(dim=-1)
        ctx.save_for_backward(s)
        return s.mean(dim=1)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (s,) = ctx.saved_tensors
        g = (grad / s.shape[1]).unsqueeze(1)  # (B, 1, V)
        return (g - s @ g.transpose(1, 2)).mul_(s)  # (B, G, V) - (B, G, 1), times s


def kl_to_uniform(logits: Tensor, direction: str = "uniform_q") -> Tensor:
    """mean_b KL(Uniform || q_b), q_b = mean over the G patches of softmax(logits) (spec 4.3).

    logits (B, G, V) -> scalar. No Gumbel noise, no temperature; computed as the official
    ``F.kl_div(log q, log U, log_target=True, reduction="batchmean")``.
    ``direction="q_uniform"``: the usual direction mean_b KL(q_b || Uniform) = mean_b sum_v q_bv (log q_bv + log V)
    instead (spec 11.6), with log q_b from log-softmax (finite even where a q_bv underflows to 0).
    """
    if direction == "uniform_q":
        log_q = _MeanSoftmax.apply(logits).log()  # (B, V)
        log_uniform = torch.log(torch.tensor(1.0 / logits.shape[-1], dtype=log_q.dtype, device=log_q.device))
        return F.kl_div(log_q, log_uniform.expand_as(log_q), reduction="batchmean", log_target=True)
    if direction == "q_uniform":
        log_q = torch.logsumexp(logits.log_softmax(dim=-1), dim=1) - math.log(logits.shape[1])  # (B, V)
        return (log_q.exp() * (log_q + math.log(logits.shape[-1]))).sum(dim=-1).mean()
    raise ValueError(f"KL direction must be 'uniform_q' or 'q_uniform', got {direction!r}")


# --------------------------------------------------------------------------------------------------
# Schedules (spec 4.4), pure functions of the training iteration
# --------------------------------------------------------------------------------------------------


def _cosine(start: float, end: float, t: float, steps: int) -> float:
    """start at t = 0 -> end at t = steps along half a cosine; end afterwards."""
    if t > steps:
        return end
    return end + (start - end) * (1.0 + math.cos(math.pi * t / steps)) / 2.0


def gumbel_temperature(step: int, cfg: TokenizerConfig) -> float:
    """Gumbel-softmax temperature at iteration ``step``: cosine 1 -> 0.0625 over 100k; tau(50k) = 0.531."""
    return _cosine(cfg.temp_start, cfg.temp_end, step, cfg.temp_steps)


def kl_weight(step: int, cfg: TokenizerConfig) -> float:
    """KL weight at iteration ``step``: 0 for 10k, then cosine 0 -> 0.1 over 100k, e.g. beta(60k) = 0.05."""
    t = step - cfg.kl_delay
    if t < 0:
        return 0.0
    return _cosine(0.0, cfg.kl_weight, t, cfg.kl_steps)


# --------------------------------------------------------------------------------------------------
# Validation metrics (spec 4.6)
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def reconstruction_metrics(whole_fine: Tensor, points: Tensor, threshold: float = 0.01) -> dict[str, Tensor]:
    """Per-cloud reconstruction quality of the official dVAE validation.

    Args:
        whole_fine: (B, M, 3) reconstructed clouds (``TokenizerOutput.whole_fine``).
        points: (B, N, 3) input clouds.
        threshold: F-score distance threshold (Euclidean, not squared).

    Returns:
        ``{"F-Score", "CDL1", "CDL2"}``, each (B,) float: F-Score@threshold = harmonic mean of
        precision (fraction of reconstructed points whose nearest input point is closer than the
        threshold) and recall (the converse), 0 when both are 0 -- as the official, which uses open3d's
        ``compute_point_cloud_distance`` (Euclidean distances); CD-L1 x 1000 and CD-L2 x 1000 of each
        cloud. The official runs with batch 1; with equal-sized clouds the batch mean of these values
        equals its batch-level Chamfer numbers.
    """
    d1, d2 = ops.chamfer(whole_fine, points)  # squared NN distances (B, M), (B, N)
    e1, e2 = d1.sqrt(), d2.sqrt()
    precision = (e1 < threshold).float().mean(dim=1)
    recall = (e2 < threshold).float().mean(dim=1)
    total = precision + recall
    f_score = torch.where(total > 0, 2 * precision * recall / total.clamp_min(1e-12), torch.zeros_like(total))
    return {
        "F-Score": f_score,
        "CDL1": (e1.mean(dim=1) + e2.mean(dim=1)) / 2 * 1000,
        "CDL2": (d1.mean(dim=1) + d2.mean(dim=1)) * 1000,
    }
