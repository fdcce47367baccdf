"""A plain, official-style Point-BERT: the baseline of the speed benchmark (not used by the library).

Written from the specification (docs/pointbert-spec.md, sections 1, 4, 5, 6, 9) in the layout of the
official model code, so that it costs on this machine what the official code costs with plain-PyTorch
stand-ins for its CUDA extensions:

* channel-first (B, C, N) tensors through ``Conv1d``/``Conv2d`` (kernel 1) for the mini-PointNet, the
  DGCNNs and the folding decoder; the mini-PointNet concatenates [global ; local] before its second layer;
* attention as explicit ``softmax(q k^T * scale) v``; timm-style DropPath;
* FPS as the usual pure-PyTorch loop (per step the squared distance to the last pick, a running minimum
  and ``torch.max``; starts at index 0), kNN as ``square_distance`` + ``topk``, Chamfer from the full
  pairwise difference tensor; block masks drawn per sample in a Python loop; the token head applied to
  every patch token before the masked ones are selected; the momentum update out of place.

Attribute names follow pointbert's modules, so :func:`load_ours` copies our weights in (a ``Linear``
weight (out, in) becomes a ``Conv1d`` (out, in, 1) or ``Conv2d`` (out, in, 1, 1) weight), and
``tests/test_speed_paths.py`` checks that both give the same outputs. Random numbers are drawn in the
same order as pointbert does (masks, mixing, Gumbel noise), so seeded steps agree too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pointbert.config import Config

# --------------------------------------------------------------------------------------------------
# Stand-ins for the CUDA extensions (spec 9)
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def fps(xyz: Tensor, num: int) -> Tensor:
    """Farthest point sampling from index 0: xyz (B, N, 3) -> (B, num) int64, one ``torch.max`` per pick."""
    B, N, _ = xyz.shape
    picks = torch.zeros(B, num, dtype=torch.long, device=xyz.device)
    distance = torch.full((B, N), 1e10, dtype=xyz.dtype, device=xyz.device)
    farthest = torch.zeros(B, dtype=torch.long, device=xyz.device)
    batch = torch.arange(B, device=xyz.device)
    for i in range(num):
        picks[:, i] = farthest
        last = xyz[batch, farthest].view(B, 1, 3)
        distance = torch.min(distance, torch.sum((xyz - last) ** 2, dim=-1))
        farthest = torch.max(distance, dim=-1)[1]
    return picks


def square_distance(src: Tensor, dst: Tensor) -> Tensor:
    """(B, S, 3), (B, N, 3) -> (B, S, N): -2 src.dst + |src|^2 + |dst|^2."""
    d = -2 * torch.matmul(src, dst.permute(0, 2, 1))
    d += torch.sum(src**2, -1)[:, :, None]
    d += torch.sum(dst**2, -1)[:, None, :]
    return d


def knn_point(k: int, xyz: Tensor, query: Tensor) -> Tensor:
    """Indices (B, S, k) of the k nearest xyz points of each query point (unsorted, as the official)."""
    return torch.topk(square_distance(query, xyz), k, dim=-1, largest=False, sorted=False)[1]


def chamfer_l1(p: Tensor, q: Tensor) -> Tensor:
    """(mean sqrt d1 + mean sqrt d2) / 2 over (B, N, 3), (B, M, 3), from the full (B, N, M) distances."""
    d = ((p[:, :, None, :] - q[:, None, :, :]) ** 2).sum(-1)
    d1, d2 = torch.min(d, dim=2)[0], torch.min(d, dim=1)[0]
    return (torch.sqrt(d1).mean() + torch.sqrt(d2).mean()) / 2


class Group(nn.Module):
    """points (B, N, 3) -> neighborhoods (B, G, K, 3) relative to their centers, centers (B, G, 3)."""

    def __init__(self, num_patches: int, patch_size: int):
        super().__init__()
        self.num_patches, self.patch_size = num_patches, patch_size

    def forward(self, xyz: Tensor) -> tuple[Tensor, Tensor]:
        B, N, _ = xyz.shape
        idx = fps(xyz, self.num_patches)  # gather_operation on the channel-first copy
        center = torch.gather(xyz.transpose(1, 2).contiguous(), 2, idx[:, None].expand(-1, 3, -1))
        center = center.transpose(1, 2).contiguous()  # (B, G, 3)
        idx = knn_point(self.patch_size, xyz, center)  # (B, G, K)
        idx = (idx + torch.arange(B, device=xyz.device).view(-1, 1, 1) * N).view(-1)
        nb = xyz.reshape(B * N, 3)[idx, :].view(B, self.num_patches, self.patch_size, 3).contiguous()
        return nb - center.unsqueeze(2), center


# --------------------------------------------------------------------------------------------------
# Mini-PointNet and Transformer (spec 1.3-1.5, 6.1)
# --------------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Official ``Encoder``: Conv1d(k=1) over (B*G, C, K); [global ; local] concatenated before layer 2."""

    def __init__(self, embed_dim: int, hidden_dims: tuple[int, int, int]):
        super().__init__()
        h0, h1, h2 = hidden_dims
        self.embed_dim = embed_dim
        self.first_conv = nn.Sequential(nn.Conv1d(3, h0, 1), nn.BatchNorm1d(h0), nn.ReLU(inplace=True),
                                        nn.Conv1d(h0, h1, 1))
        self.second_conv = nn.Sequential(nn.Conv1d(2 * h1, h2, 1), nn.BatchNorm1d(h2), nn.ReLU(inplace=True),
                                         nn.Conv1d(h2, embed_dim, 1))

    def forward(self, nb: Tensor) -> Tensor:
        B, G, K, _ = nb.shape
        f = self.first_conv(nb.reshape(B * G, K, 3).transpose(2, 1))  # (BG, h1, K)
        g = torch.max(f, dim=2, keepdim=True)[0]  # (BG, h1, 1)
        f = self.second_conv(torch.cat([g.expand(-1, -1, K), f], dim=1))  # (BG, C, K)
        return torch.max(f, dim=2, keepdim=False)[0].reshape(B, G, self.embed_dim)


class DropPath(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1 - self.p
        noise = (keep + torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device)).floor_()
        return x.div(keep) * noise


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, drop_path: float):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, num_heads, qkv_bias)
        self.drop_path = DropPath(drop_path)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Backbone(nn.Module):
    """Group -> mini-PointNet -> reduce_dim -> [cls ; tokens] + [cls_pos ; pos_embed(centers)] -> blocks -> norm."""

    def __init__(self, cfg: Config):
        super().__init__()
        p, b = cfg.patches, cfg.backbone
        self.group = Group(p.num_patches, p.patch_size)
        self.patch_embed = PatchEmbed(p.embed_dim, p.hidden_dims)
        self.reduce_dim = nn.Linear(p.embed_dim, b.dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, b.dim))
        self.cls_pos = nn.Parameter(torch.randn(1, 1, b.dim))
        self.pos_embed = nn.Sequential(nn.Linear(3, b.pos_hidden), nn.GELU(), nn.Linear(b.pos_hidden, b.dim))
        rates = [x.item() for x in torch.linspace(0, b.drop_path_rate, b.depth)]
        self.blocks = nn.ModuleList(Block(b.dim, b.num_heads, b.mlp_ratio, b.qkv_bias, r) for r in rates)
        self.norm = nn.LayerNorm(b.dim)

    def encode(self, x: Tensor, pos: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x + pos)
        return self.norm(x)

    def sequence(self, tokens: Tensor, center: Tensor) -> tuple[Tensor, Tensor]:
        B = tokens.shape[0]
        x = torch.cat((self.cls_token.expand(B, -1, -1), tokens), dim=1)
        pos = torch.cat((self.cls_pos.expand(B, -1, -1), self.pos_embed(center)), dim=1)
        return x, pos

    def forward(self, pts: Tensor) -> Tensor:
        nb, center = self.group(pts)
        x = self.encode(*self.sequence(self.reduce_dim(self.patch_embed(nb)), center))
        return torch.cat([x[:, 0], x[:, 1:].max(1)[0]], dim=-1)  # (B, 2*dim)


class Classifier(nn.Module):
    """Official ``PointTransformer``: backbone -> [cls ; max] -> Linear ReLU Dropout Linear."""

    def __init__(self, cfg: Config):
        super().__init__()
        h = cfg.head
        self.backbone = Backbone(cfg)
        self.head = nn.Sequential(nn.Linear(2 * cfg.backbone.dim, h.hidden), nn.ReLU(inplace=True),
                                  nn.Dropout(h.dropout), nn.Linear(h.hidden, h.num_classes))

    def forward(self, pts: Tensor) -> Tensor:
        return self.head(self.backbone(pts))


# --------------------------------------------------------------------------------------------------
# dVAE (spec 4)
# --------------------------------------------------------------------------------------------------


def graph_feature(x: Tensor, idx: Tensor) -> Tensor:
    """x (B, C, G), idx (B, G, k) -> (B, 2C, G, k) edge features [x_j - x_i ; x_i]."""
    B, C, G = x.shape
    k = idx.shape[-1]
    idx = (idx + torch.arange(B, device=x.device).view(-1, 1, 1) * G).view(-1)
    x = x.transpose(2, 1).contiguous()  # (B, G, C)
    neighbours = x.view(B * G, C)[idx, :].view(B, G, k, C)
    x = x.view(B, G, 1, C).expand(-1, -1, k, -1)
    return torch.cat((neighbours - x, x), dim=3).permute(0, 3, 1, 2).contiguous()


class DGCNN(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, k: int, dims: tuple[int, ...]):
        super().__init__()
        self.k, self.edge_layers = k, len(dims) - 1
        self.input_trans = nn.Conv1d(in_dim, dims[0], 1)
        c = dims[0]
        for i, w in enumerate(dims[1:], start=1):
            setattr(self, f"layer{i}", nn.Sequential(nn.Conv2d(2 * c, w, 1, bias=False), nn.GroupNorm(4, w),
                                                     nn.LeakyReLU(negative_slope=0.2)))
            c = w
        setattr(self, f"layer{len(dims)}", nn.Sequential(nn.Conv1d(sum(dims[1:]), out_dim, 1, bias=False),
                                                         nn.GroupNorm(4, out_dim), nn.LeakyReLU(negative_slope=0.2)))

    def forward(self, f: Tensor, center: Tensor) -> Tensor:
        """f (B, G, C_in), center (B, G, 3) -> (B, G, C_out)."""
        with torch.no_grad():
            idx = knn_point(self.k, center, center)  # (B, G, k)
        x = self.input_trans(f.transpose(2, 1))  # (B, 128, G)
        levels = []
        for i in range(1, self.edge_layers + 1):
            x = getattr(self, f"layer{i}")(graph_feature(x, idx)).max(dim=-1, keepdim=False)[0]
            levels.append(x)
        x = getattr(self, f"layer{self.edge_layers + 1}")(torch.cat(levels, dim=1))
        return x.transpose(2, 1)


class FoldingDecoder(nn.Module):
    def __init__(self, in_dim: int, num_fine: int, hidden: int, fold_hidden: int, grid: int = 2):
        super().__init__()
        self.num_fine, self.num_coarse, self.grid = num_fine, num_fine // grid**2, grid
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, hidden),
                                 nn.ReLU(inplace=True), nn.Linear(hidden, 3 * self.num_coarse))
        self.final_conv = nn.Sequential(
            nn.Conv1d(in_dim + 2 + 3, fold_hidden, 1), nn.BatchNorm1d(fold_hidden), nn.ReLU(inplace=True),
            nn.Conv1d(fold_hidden, fold_hidden, 1), nn.BatchNorm1d(fold_hidden), nn.ReLU(inplace=True),
            nn.Conv1d(fold_hidden, 3, 1))
        a = torch.linspace(-0.05, 0.05, grid)
        seed = torch.stack([a.view(1, grid).expand(grid, grid), a.view(grid, 1).expand(grid, grid)])  # u fastest
        self.register_buffer("folding_seed", seed.reshape(2, grid * grid), persistent=False)

    def forward(self, feature: Tensor) -> tuple[Tensor, Tensor]:
        """feature (BG, C) -> coarse (BG, num_coarse, 3), fine (BG, num_fine, 3)."""
        BG, C = feature.shape
        folds = self.grid**2
        coarse = self.mlp(feature).reshape(BG, self.num_coarse, 3)
        anchor = coarse.unsqueeze(2).expand(-1, -1, folds, -1).reshape(BG, self.num_fine, 3).transpose(2, 1)
        seed = self.folding_seed.unsqueeze(1).expand(-1, self.num_coarse, -1).reshape(1, 2, self.num_fine)
        feat = torch.cat([feature.unsqueeze(2).expand(-1, -1, self.num_fine), seed.expand(BG, -1, -1), anchor], dim=1)
        fine = self.final_conv(feat) + anchor  # (BG, 3, num_fine)
        return coarse, fine.transpose(2, 1)


class DiscreteVAE(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        p, t = cfg.patches, cfg.tokenizer
        self.vocab_size = t.vocab_size
        self.group = Group(p.num_patches, p.patch_size)
        self.patch_embed = PatchEmbed(p.embed_dim, p.hidden_dims)
        self.dgcnn_1 = DGCNN(p.embed_dim, t.vocab_size, t.dgcnn_k, t.dgcnn_dims)
        self.codebook = nn.Parameter(torch.randn(t.vocab_size, t.token_dim))
        self.dgcnn_2 = DGCNN(t.token_dim, t.decoder_dim, t.dgcnn_k, t.dgcnn_dims)
        self.decoder = FoldingDecoder(t.decoder_dim, p.patch_size, t.decoder_hidden, t.fold_hidden)

    def logits(self, nb: Tensor, center: Tensor) -> Tensor:
        return self.dgcnn_1(self.patch_embed(nb), center)

    def forward(self, pts: Tensor, temperature: float = 1.0, hard: bool = False) -> tuple[Tensor, ...]:
        nb, center = self.group(pts)
        logits = self.logits(nb, center)  # (B, G, V)
        soft_one_hot = F.gumbel_softmax(logits, tau=temperature, dim=2, hard=hard)
        sampled = torch.einsum("bgn,nc->bgc", soft_one_hot, self.codebook)
        feature = self.dgcnn_2(sampled, center)
        B, G, _ = feature.shape
        coarse, fine = self.decoder(feature.reshape(B * G, -1))
        coarse, fine = coarse.reshape(B, G, -1, 3), fine.reshape(B, G, -1, 3)
        with torch.no_grad():
            whole_coarse = (coarse + center.unsqueeze(2)).reshape(B, -1, 3)
            whole_fine = (fine + center.unsqueeze(2)).reshape(B, -1, 3)
        return whole_coarse, whole_fine, coarse, fine, nb, logits

    def loss(self, ret: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        """(reconstruction, KL to uniform) of a forward's output."""
        _, _, coarse, fine, nb, logits = ret
        B, G, K, _ = nb.shape
        gt = nb.reshape(B * G, K, 3)
        recon = chamfer_l1(coarse.reshape(B * G, -1, 3), gt) + chamfer_l1(fine.reshape(B * G, -1, 3), gt)
        log_qy = torch.log(F.softmax(logits, dim=-1).mean(dim=1))  # (B, V)
        log_uniform = torch.log(torch.tensor([1.0 / self.vocab_size], device=logits.device))
        kl = F.kl_div(log_qy, log_uniform.expand(B, self.vocab_size), None, None, "batchmean", log_target=True)
        return recon, kl


# --------------------------------------------------------------------------------------------------
# Pre-training (spec 5)
# --------------------------------------------------------------------------------------------------


class MaskedPointModel(nn.Module):
    """Official ``MaskTransformer``: draws its own block mask, token head on every patch token."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.mask_ratio = cfg.mpm.mask_ratio
        self.backbone = Backbone(cfg)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.backbone.dim))
        self.lm_head = nn.Linear(cfg.backbone.dim, cfg.tokenizer.vocab_size)
        self.cls_head = nn.Sequential(nn.Linear(cfg.backbone.dim, cfg.mpm.proj_dim), nn.GELU(),
                                      nn.Linear(cfg.mpm.proj_dim, cfg.mpm.proj_dim))

    def mask_center(self, center: Tensor) -> Tensor:
        """Block mask (B, G) bool, one sample at a time (random numbers drawn up front, in pointbert's order)."""
        B, G, _ = center.shape
        lo, hi = self.mask_ratio
        seeds = torch.randint(G, (B,), device=center.device).tolist()
        ratios = (lo + (hi - lo) * torch.rand(B, device=center.device)).tolist()
        masks = []
        for points, index, ratio in zip(center, seeds, ratios):
            distance = torch.norm(points[index].reshape(1, 3) - points, p=2, dim=-1)
            idx = torch.argsort(distance, dim=-1, descending=False)
            mask = torch.zeros(G, device=center.device)
            mask[idx[: int(ratio * G)]] = 1
            masks.append(mask.bool())
        return torch.stack(masks)

    def forward(self, nb: Tensor, center: Tensor, only_cls_tokens: bool = False):
        mask = self.mask_center(center)
        bb = self.backbone
        tokens = bb.reduce_dim(bb.patch_embed(nb))  # (B, G, dim)
        w = mask.unsqueeze(-1).type_as(tokens)
        tokens = tokens * (1 - w) + self.mask_token.expand(*tokens.shape[:2], -1) * w
        x = bb.encode(*bb.sequence(tokens, center))
        if only_cls_tokens:
            return self.cls_head(x[:, 0])
        logits = self.lm_head(x[:, 1:])  # (B, G, V)
        return self.cls_head(x[:, 0]), logits[~mask], logits[mask], mask


class PointBERT(nn.Module):
    """Official ``Point_BERT`` (released config: MPM loss + mixed-sample contrastive loss); forward -> loss."""

    def __init__(self, cfg: Config):
        super().__init__()
        m = cfg.mpm
        self.momentum, self.temperature = m.momentum, m.temperature
        self.query = MaskedPointModel(cfg)
        self.key = MaskedPointModel(cfg)
        self.key.load_state_dict(self.query.state_dict())
        self.key.requires_grad_(False)
        self.tokenizer = DiscreteVAE(cfg)
        self.tokenizer.requires_grad_(False)
        self.register_buffer("queue", F.normalize(torch.randn(m.proj_dim, m.queue_size), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    def forward(self, pts: Tensor) -> Tensor:
        nb, center = self.query.backbone.group(pts)
        with torch.no_grad():
            label = self.tokenizer.logits(nb, center).argmax(-1).long()  # (B, G)
        q_cls, _, logits, mask = self.query(nb, center)
        q_cls = F.normalize(q_cls, dim=1)  # for the (disabled) MoCo loss
        B, G = label.shape
        r = torch.rand(B, device=pts.device)  # point-patch mixing with sample B-1-b
        own = torch.rand(B, G, device=pts.device) < r[:, None]
        mix_nb = torch.where(own[..., None, None], nb, nb.flip(0))
        mix_center = torch.where(own[..., None], center, center.flip(0))
        mix_label = torch.where(own, label, label.flip(0))
        mix_cls, _, mix_logits, mix_mask = self.query(mix_nb, mix_center)
        mix_cls = F.normalize(mix_cls, dim=1)
        with torch.no_grad():
            for pq, pk in zip(self.query.parameters(), self.key.parameters()):
                pk.data = pk.data * self.momentum + pq.data * (1.0 - self.momentum)
            k = F.normalize(self.key(nb, center, only_cls_tokens=True), dim=1)
        loss = F.cross_entropy(logits, label[mask]) + F.cross_entropy(mix_logits, mix_label[mix_mask])
        queue = self.queue.clone().detach()
        cl = torch.cat([mix_cls @ k.T, mix_cls @ queue], dim=1) / self.temperature  # (B, B + K)
        target = torch.arange(B, device=pts.device)
        loss = loss + (r * F.cross_entropy(cl, target, reduction="none")
                       + (1 - r) * F.cross_entropy(cl, target.flip(0), reduction="none")).mean()
        with torch.no_grad():  # enqueue (one process)
            ptr = int(self.queue_ptr)
            self.queue[:, ptr:ptr + B] = k.T
            self.queue_ptr[0] = (ptr + B) % self.queue.shape[1]
        return loss


# --------------------------------------------------------------------------------------------------
# Building and loading pointbert's weights
# --------------------------------------------------------------------------------------------------

MODELS = {"classifier": Classifier, "tokenizer": DiscreteVAE, "pretrain": PointBERT}


def build(kind: str, cfg: Config) -> nn.Module:
    """The plain model of ``kind`` (classifier | tokenizer | pretrain) for ``cfg``'s sizes."""
    return MODELS[kind](cfg)


@torch.no_grad()
def load_ours(plain: nn.Module, ours: nn.Module | dict[str, Tensor]) -> nn.Module:
    """Copy a pointbert model's state into its plain twin (same keys; conv weights get unit dimensions)."""
    src = ours.state_dict() if isinstance(ours, nn.Module) else ours
    dst = plain.state_dict()
    if set(src) != set(dst):
        raise KeyError(f"key sets differ: only ours {sorted(set(src) - set(dst))[:5]}, "
                       f"only plain {sorted(set(dst) - set(src))[:5]}")
    plain.load_state_dict({k: src[k].reshape(v.shape) for k, v in dst.items()}, strict=True)
    return plain
