"""Masked Point Modeling pre-training (spec 5): block masks, mask token, token head, point-patch
mixing, and the momentum key encoder with its queue.

One training step of :class:`PointBERT` (spec 5.5), in order:

1. group the (augmented) clouds into patches;
2. target token ids from the frozen tokenizer (argmax of its logits);
3. query encoder on the original clouds with a block mask -> token logits at masked positions;
4. mix patches between sample b and sample B-1-b -> query encoder on the mixed clouds (own mask);
5. EMA-update the key encoder, encode the original clouds (with their own mask) -> keys;
6. MPM loss = CE on masked tokens (original + mixed);
7. mixed-sample contrastive loss against [in-batch keys ; queue] with soft targets r_b, 1-r_b;
8. enqueue the (all-gathered) keys.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import Config
from .tokenizer import DiscreteVAE
from .transformer import Backbone, init_trunc_normal

# --------------------------------------------------------------------------------------------------
# Masks and mixing (no Python loop over the batch)
# --------------------------------------------------------------------------------------------------


def block_mask(centers: Tensor, ratio: tuple[float, float]) -> Tensor:
    """Mask a contiguous block of patches per sample (official ``_mask_center``).

    For each sample: pick a random center c, rank all centers by Euclidean distance to c (c first),
    draw r ~ U(lo, hi) and mask the floor(r * G) nearest.

    centers (B, G, 3) -> mask (B, G) bool, True = masked. ``ratio[1] == 0`` masks nothing.
    """
    B, G, _ = centers.shape
    device = centers.device
    if ratio[1] == 0:
        return torch.zeros(B, G, dtype=torch.bool, device=device)
    seed = torch.randint(G, (B,), device=device)
    dist = torch.linalg.vector_norm(centers - centers[torch.arange(B, device=device), seed][:, None], dim=-1)
    order = dist.argsort(dim=1, stable=True)  # (B, G), nearest first
    r = ratio[0] + (ratio[1] - ratio[0]) * torch.rand(B, device=device)
    num = (r * G).long()  # int() of a positive float
    in_block = torch.arange(G, device=device)[None] < num[:, None]  # (B, G) by rank
    return torch.zeros(B, G, dtype=torch.bool, device=device).scatter(1, order, in_block)


def random_mask(centers: Tensor, ratio: tuple[float, float]) -> Tensor:
    """Mask each patch independently with probability r, one r ~ U(lo, hi) for the whole batch, as the
    official ``_mask_center_rand`` draws it (unused by the released config, spec 5.3).

    centers (B, G, 3) -> mask (B, G) bool.
    """
    B, G, _ = centers.shape
    if ratio[1] == 0:
        return torch.zeros(B, G, dtype=torch.bool, device=centers.device)
    r = ratio[0] + (ratio[1] - ratio[0]) * torch.rand((), device=centers.device)
    return torch.rand(B, G, device=centers.device) < r


def mix_patches(neighborhoods: Tensor, centers: Tensor, labels: Tensor
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Point-patch mixing (spec 5.4): sample b takes patches of sample B-1-b at the same group index.

    Per sample r_b ~ U(0,1); patch g stays own when u_g < r_b. Centers and token targets move with
    their patches. Returns (r (B,), neighborhoods (B,G,K,3), centers (B,G,3), labels (B,G)).
    """
    B, G = labels.shape
    r = torch.rand(B, device=centers.device)
    own = torch.rand(B, G, device=centers.device) < r[:, None]  # (B, G)
    mixed_nb = torch.where(own[..., None, None], neighborhoods, neighborhoods.flip(0))
    mixed_c = torch.where(own[..., None], centers, centers.flip(0))
    mixed_l = torch.where(own, labels, labels.flip(0))
    return r, mixed_nb, mixed_c, mixed_l


def random_replace(tokens: Tensor, mask: Tensor, prob: float) -> tuple[Tensor, Tensor]:
    """Replace unmasked tokens with probability ``prob`` by tokens drawn from the whole batch (detached).

    tokens (B, G, C), mask (B, G) -> (tokens, prediction mask = masked | replaced). Off by default (spec 5.3).
    """
    if prob == 0:
        return tokens, mask
    B, G, C = tokens.shape
    replace = (torch.rand(B, G, device=tokens.device) < prob) & ~mask
    shuffled = tokens.detach().reshape(B * G, C)[torch.randperm(B * G, device=tokens.device)].view(B, G, C)
    return torch.where(replace[..., None], shuffled, tokens), mask | replace


def mix_contrastive_loss(mix_q: Tensor, keys: Tensor, queue: Tensor, r: Tensor, temperature: float) -> Tensor:
    """Mixed-sample contrastive loss (paper Eq. 3, official ``cutmix_loss``).

    mix_q (B, P) normalised queries of the mixed clouds, keys (B, P) normalised keys of the original
    clouds, queue (P, K), r (B,) own-patch ratios. Logits [mix_q k^T ; mix_q queue] / T, soft target
    r_b on key b and 1 - r_b on key B-1-b; mean over the batch. Always in float32, outside autocast.
    """
    with torch.autocast(mix_q.device.type, enabled=False):
        mix_q, keys, queue = mix_q.float(), keys.float(), queue.float()
        logits = torch.cat([mix_q @ keys.T, mix_q @ queue], dim=1) / temperature  # (B, B + K)
    own = torch.arange(len(keys), device=keys.device)
    ce_own = F.cross_entropy(logits, own, reduction="none")
    ce_partner = F.cross_entropy(logits, own.flip(0), reduction="none")
    return (r * ce_own + (1 - r) * ce_partner).mean()


def moco_contrastive_loss(q: Tensor, keys: Tensor, queue: Tensor, temperature: float) -> Tensor:
    """Plain MoCo InfoNCE: positive q_b . k_b against the queue (off in the released config), in float32."""
    with torch.autocast(q.device.type, enabled=False):
        q, keys, queue = q.float(), keys.float(), queue.float()
        logits = torch.cat([(q * keys).sum(1, keepdim=True), q @ queue], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


# --------------------------------------------------------------------------------------------------
# The query / key encoder
# --------------------------------------------------------------------------------------------------


class MaskedPointModel(nn.Module):
    """Backbone + mask token + token head + contrastive projection (official ``MaskTransformer``)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        dim, proj = cfg.backbone.dim, cfg.mpm.proj_dim
        self.backbone = Backbone(cfg.patches, cfg.backbone)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.lm_head = nn.Linear(dim, cfg.tokenizer.vocab_size)
        self.cls_head = nn.Sequential(nn.Linear(dim, proj), nn.GELU(), nn.Linear(proj, proj))
        for p in (self.backbone.cls_token, self.backbone.cls_pos, self.mask_token):
            nn.init.trunc_normal_(p, std=0.02, a=-2.0, b=2.0)
        init_trunc_normal(self)

    def draw_mask(self, centers: Tensor) -> Tensor:
        """(B, G, 3) -> (B, G) bool with the configured mask type and ratio."""
        m = self.cfg.mpm
        return (block_mask if m.mask_type == "block" else random_mask)(centers, m.mask_ratio)

    def forward(self, neighborhoods: Tensor, centers: Tensor, mask: Tensor | None = None,
                replace_prob: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
        """Encode patches with ``mask`` (B,G) bool (None = no masking).

        Returns (cls projection (B, proj_dim), normalised patch tokens (B, G, dim), prediction mask (B, G)).
        Token logits are ``lm_head(tokens[mask])``, computed by the caller only where needed.
        """
        bb = self.backbone
        tokens = bb.reduce_dim(bb.patch_embed(neighborhoods))  # (B, G, dim)
        if mask is None:
            mask = torch.zeros(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        tokens, predict = random_replace(tokens, mask, replace_prob)
        tokens = torch.where(mask[..., None], self.mask_token.to(tokens.dtype), tokens)
        B = tokens.shape[0]
        x = torch.cat([bb.cls_token.expand(B, -1, -1), tokens], dim=1)
        pos = torch.cat([bb.cls_pos.expand(B, -1, -1), bb.pos_embed(centers)], dim=1)
        x = bb.encode(x, pos)  # (B, 1+G, dim)
        return self.cls_head(x[:, 0]), x[:, 1:], predict


# --------------------------------------------------------------------------------------------------
# The pre-training model
# --------------------------------------------------------------------------------------------------


class PretrainOutput(NamedTuple):
    loss: Tensor  # total, what backward() is called on
    mpm_loss: Tensor  # token cross-entropy (original + mixed)
    mix_loss: Tensor  # mixed-sample contrastive loss (paper Eq. 3)
    moco_loss: Tensor  # plain MoCo loss (off by default: 0)
    mpm_acc: Tensor  # fraction of masked tokens predicted right on the original clouds


@torch.no_grad()
def _gather_all(x: Tensor) -> Tensor:
    """All-gather along dim 0 across processes (identity without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class PointBERT(nn.Module):
    """Point-BERT pre-training: query encoder (trained), key encoder (EMA), frozen tokenizer, key queue.

    Build, then call :meth:`load_tokenizer` with a trained dVAE; ``forward(points)`` returns the losses.
    """

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.query = MaskedPointModel(cfg)
        self.key = copy.deepcopy(self.query)
        self.key.requires_grad_(False)
        self.tokenizer = DiscreteVAE(cfg)
        self.tokenizer.requires_grad_(False)
        queue = F.normalize(torch.randn(cfg.mpm.proj_dim, cfg.mpm.queue_size), dim=0)
        self.register_buffer("queue", queue)
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @property
    def backbone(self) -> Backbone:
        return self.query.backbone

    def no_weight_decay(self) -> set[str]:
        return {"query.mask_token", "query.backbone.cls_token"}

    @torch.no_grad()
    def load_tokenizer(self, tokenizer: DiscreteVAE | dict) -> None:
        """Load dVAE weights (strict), copy its patch embedding into the query encoder, then the query
        parameters into the key encoder (spec 5.2: parameters only; key BatchNorm buffers keep their own)."""
        state = tokenizer.state_dict() if isinstance(tokenizer, nn.Module) else tokenizer
        self.tokenizer.load_state_dict(state, strict=True)
        self.query.backbone.patch_embed.load_state_dict(self.tokenizer.patch_embed.state_dict())
        for pk, pq in zip(self.key.parameters(), self.query.parameters()):
            pk.copy_(pq)

    def train(self, mode: bool = True) -> PointBERT:
        super().train(mode)
        if not self.cfg.mpm.tokenizer_bn_train:
            self.tokenizer.eval()
        return self

    @torch.no_grad()
    def _momentum_update(self) -> None:
        m = self.cfg.mpm.momentum
        for pk, pq in zip(self.key.parameters(), self.query.parameters()):
            pk.mul_(m).add_(pq.detach(), alpha=1 - m)

    @torch.no_grad()
    def _enqueue(self, keys: Tensor) -> None:
        keys = _gather_all(keys)
        K, n = self.queue.shape[1], keys.shape[0]
        cols = (self.queue_ptr + torch.arange(n, device=keys.device)) % K  # on the device: no host sync
        self.queue[:, cols] = keys.T.to(self.queue.dtype)
        self.queue_ptr.add_(n).remainder_(K)

    @torch.no_grad()
    def targets(self, neighborhoods: Tensor, centers: Tensor) -> Tensor:
        """Token ids (B, G) from the frozen tokenizer (spec 5.5 step 2), always in fp32: under bf16 autocast
        the argmax over the vocabulary picks another token for about one patch in ten."""
        with torch.autocast(neighborhoods.device.type, enabled=False):
            return self.tokenizer.logits(neighborhoods.float(), centers.float()).argmax(-1)

    def forward(self, points: Tensor) -> PretrainOutput:
        """points (B, N, 3), already augmented -> losses of one training step (spec 5.5)."""
        cfg = self.cfg.mpm
        neighborhoods, centers = self.query.backbone.group(points)
        labels = self.targets(neighborhoods, centers)  # (B, G)
        zero = points.new_zeros(())

        mask = self.query.draw_mask(centers)
        q, tokens, predict = self.query(neighborhoods, centers, mask, cfg.replace_prob)
        r, mix_nb, mix_c, mix_labels = mix_patches(neighborhoods, centers, labels)
        mix_mask = self.query.draw_mask(mix_c)
        mix_q, mix_tokens, mix_predict = self.query(mix_nb, mix_c, mix_mask, cfg.replace_prob)

        with torch.no_grad():
            self._momentum_update()
            key_mask = self.key.draw_mask(centers) if cfg.key_masked else None
            k = F.normalize(self.key(neighborhoods, centers, key_mask)[0].float(), dim=1)  # (B, proj)

        mpm_loss, acc = zero, zero
        if cfg.mpm_loss:
            logits = self.query.lm_head(tokens[predict]).float()  # (n_masked, V), row-major (b, g)
            mix_logits = self.query.lm_head(mix_tokens[mix_predict]).float()
            mpm_loss = F.cross_entropy(logits, labels[predict]) + F.cross_entropy(mix_logits, mix_labels[mix_predict])
            acc = (logits.argmax(-1) == labels[predict]).float().mean().detach()

        queue = self.queue.clone().detach()
        mix_loss = zero
        if cfg.mix_loss:
            mix_loss = mix_contrastive_loss(F.normalize(mix_q.float(), dim=1), k, queue, r, cfg.temperature)
        moco_loss = zero
        if cfg.moco_loss:
            moco_loss = moco_contrastive_loss(F.normalize(q.float(), dim=1), k, queue, cfg.temperature)

        self._enqueue(k)
        return PretrainOutput(mpm_loss + mix_loss + moco_loss, mpm_loss.detach(), mix_loss.detach(),
                              moco_loss.detach(), acc)

    @torch.no_grad()
    def predict_masked(self, points: Tensor, mask: Tensor | None = None) -> tuple[Tensor, ...]:
        """Masked point modeling at inference: which token does the model put in each masked patch?

        points (B, N, 3); mask (B, G) bool (default: one mask drawn as in training). Returns
        (neighborhoods (B, G, K, 3), centers (B, G, 3), mask, target ids (B, G) from the tokenizer,
        predicted ids (B, G) from the query encoder; meaningful where ``mask``).
        """
        neighborhoods, centers = self.query.backbone.group(points)
        if mask is None:
            mask = self.query.draw_mask(centers)
        tokens = self.query(neighborhoods, centers, mask)[1]
        predicted = self.query.lm_head(tokens).argmax(-1)
        return neighborhoods, centers, mask, self.targets(neighborhoods, centers), predicted

    @torch.no_grad()
    def probe_features(self, points: Tensor) -> Tensor:
        """Unmasked query projection (B, proj_dim), not normalised: the SVM-probe feature (spec 5.6)."""
        return self.query(*self.query.backbone.group(points))[0]
