"""The backbone: a standard pre-norm Transformer over point patches (spec 1.4-1.5).

points (B,N,3) -> group -> PatchEmbed (B,G,C_e) -> reduce_dim (B,G,dim) -> [cls ; tokens]
with positions [cls_pos ; pos_embed(centers)] re-added before every block -> blocks -> LayerNorm.
The paper's alternatives (spec 11.9) are config fields: ``backbone.ffn_act="relu"`` (the block MLP's
activation) and ``backbone.pos_every_block=false`` (positions added once, before the first block).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from .config import BackboneConfig, PatchConfig
from .patches import PatchEmbed, group


class DropPath(nn.Module):
    """Stochastic depth per sample (timm semantics): drop the residual branch with probability p.

    The mask is the official ``floor(keep + U)``, U ~ uniform, so seeded runs draw what the official
    code draws. The keep probability is also held as a tensor: ``torch.compile`` then treats the blocks'
    different rates as data, one graph for all of them, instead of one recompilation per block.
    """

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.register_buffer("keep", torch.tensor(1.0 - p), persistent=False)
        self.p = p

    @property
    def p(self) -> float:
        return self._p

    @p.setter
    def p(self, value: float) -> None:  # keeps the flag and the tensor in step with the rate
        self._p, self.active = float(value), value > 0.0
        self.keep.fill_(1.0 - value)

    def forward(self, x: Tensor) -> Tensor:
        if not (self.active and self.training):
            return x
        # drawn and floored in float32 at least: in bf16, keep + U rounds and the drop rate drifts from p
        dtype = torch.promote_types(x.dtype, torch.float32)
        keep = self.keep.to(dtype)
        u = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), dtype=dtype, device=x.device)
        return x * (u + keep).floor_().div_(keep).to(x.dtype)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Attention(nn.Module):
    """Multi-head self-attention: one qkv projection (rows [q; k; v], heads contiguous), softmax(q k^T / sqrt(d))."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, L, C = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # backward stacks the 3 gradients (qkv[i] would zero-fill a full-size one each)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, heads, L, head_dim)
        return self.proj(x.transpose(1, 2).reshape(B, L, C))


#: the block MLP's activations by ``backbone.ffn_act`` (spec 11.9): the official GELU, the paper's ReLU
FFN_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str = "gelu"):
        super().__init__()
        if act not in FFN_ACTIVATIONS:
            raise ValueError(f"FFN activation must be one of {', '.join(FFN_ACTIVATIONS)}, got {act!r}")
        self.fc1 = nn.Linear(dim, hidden)
        self.act = FFN_ACTIVATIONS[act]()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """x <- x + DropPath(Attn(LN(x))); x <- x + DropPath(MLP(LN(x)))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, drop_path: float,
                 act: str = "gelu"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Backbone(nn.Module):
    """The Point-BERT Transformer encoder, the unit of reuse for every stage.

    Initialisation as the official fine-tuning model (spec 6.1): PyTorch defaults, ``cls_token`` zeros,
    ``cls_pos`` N(0, 1). Pre-training re-initialises with :func:`init_trunc_normal` (spec 5.2).
    """

    def __init__(self, patches: PatchConfig | None = None, cfg: BackboneConfig | None = None):
        super().__init__()
        patches = patches or PatchConfig()
        cfg = cfg or BackboneConfig()
        self.num_patches, self.patch_size = patches.num_patches, patches.patch_size
        self.dim = cfg.dim
        self.pos_every_block = cfg.pos_every_block  # False: positions added before block 0 only (spec 11.9)
        self.patch_embed = PatchEmbed(patches.embed_dim, patches.hidden_dims)
        self.reduce_dim = nn.Linear(patches.embed_dim, cfg.dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.cls_pos = nn.Parameter(torch.randn(1, 1, cfg.dim))
        self.pos_embed = nn.Sequential(nn.Linear(3, cfg.pos_hidden), nn.GELU(), nn.Linear(cfg.pos_hidden, cfg.dim))
        rates = torch.linspace(0, cfg.drop_path_rate, cfg.depth).tolist()
        self.blocks = nn.ModuleList(
            Block(cfg.dim, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, r, cfg.ffn_act) for r in rates)
        self.norm = nn.LayerNorm(cfg.dim)

    def no_weight_decay(self) -> set[str]:
        """Parameter names without weight decay besides 1-D tensors and biases (spec 1.7)."""
        return {"cls_token"}

    def group(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """points (B, N, 3) -> neighborhoods (B, G, K, 3), centers (B, G, 3)."""
        return group(points, self.num_patches, self.patch_size)

    def embed(self, neighborhoods: Tensor, centers: Tensor, mask: Tensor | None = None,
              mask_token: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Input sequence and positions, both (B, 1+G, dim); masked patches (mask (B,G) True) become mask_token."""
        tokens = self.reduce_dim(self.patch_embed(neighborhoods))  # (B, G, dim)
        if mask is not None:
            tokens = torch.where(mask.unsqueeze(-1), mask_token.to(tokens.dtype), tokens)
        B = tokens.shape[0]
        x = torch.cat([self.cls_token.expand(B, -1, -1), tokens], dim=1)
        pos = torch.cat([self.cls_pos.expand(B, -1, -1), self.pos_embed(centers)], dim=1)
        return x, pos

    def block_input(self, x: Tensor, pos: Tensor, i: int) -> Tensor:
        """Input of block ``i``: ``x + pos`` before every block (official), or before block 0 only
        (``pos_every_block=False``, the paper's single combination at the input, spec 11.9)."""
        return x + pos if self.pos_every_block or i == 0 else x

    def encode(self, x: Tensor, pos: Tensor) -> Tensor:
        """Blocks with the position re-added before each, then the final LayerNorm: (B, L, dim) -> (B, L, dim)."""
        for i, blk in enumerate(self.blocks):
            x = blk(self.block_input(x, pos, i))
        return self.norm(x)

    def forward_tokens(self, neighborhoods: Tensor, centers: Tensor, mask: Tensor | None = None,
                       mask_token: Tensor | None = None) -> Tensor:
        """Patches -> normalised token sequence (B, 1+G, dim), cls first."""
        return self.encode(*self.embed(neighborhoods, centers, mask, mask_token))

    def forward_features(self, points: Tensor) -> Tensor:
        """points (B, N, 3) -> normalised token sequence (B, 1+G, dim), cls first (timm semantics)."""
        return self.forward_tokens(*self.group(points))

    @staticmethod
    def pool(tokens: Tensor) -> Tensor:
        """(B, 1+G, dim) -> (B, 2*dim): [cls ; max over patch tokens], the fine-tuning feature (spec 6.1)."""
        return torch.cat([tokens[:, 0], ops.max_pool(tokens[:, 1:], 1)], dim=-1)

    def forward(self, points: Tensor) -> Tensor:
        """points (B, N, 3) -> global features (B, 2*dim)."""
        return self.pool(self.forward_features(points))

    def forward_intermediates(self, points: Tensor | None = None, indices: Sequence[int] = (3, 7, 11), *,
                              patches: tuple[Tensor, Tensor] | None = None) -> tuple[list[Tensor], Tensor]:
        """Outputs of the given blocks (0-based), each through the shared final LayerNorm, cls dropped.

        Takes ``points`` (B, N, 3) or precomputed ``patches=(neighborhoods, centers)``.
        Returns ([ (B, G, dim) per index ], centers (B, G, 3)). Used by part segmentation (spec 6.5).
        """
        neighborhoods, centers = patches if patches is not None else self.group(points)
        x, pos = self.embed(neighborhoods, centers)
        wanted = sorted(set(indices))
        if any(not 0 <= i < len(self.blocks) for i in wanted):
            raise ValueError(f"block indices {list(indices)} out of range 0..{len(self.blocks) - 1}")
        found: dict[int, Tensor] = {}
        for i, blk in enumerate(self.blocks[: wanted[-1] + 1]):
            x = blk(self.block_input(x, pos, i))
            if i in wanted:
                found[i] = self.norm(x)[:, 1:]
        return [found[i] for i in indices], centers


def init_trunc_normal(module: nn.Module, std: float = 0.02) -> None:
    """The official MaskTransformer init (spec 5.2): Linear/conv weights ~ trunc_normal(std), biases 0, LayerNorm 1/0.

    Applied recursively; BatchNorm and GroupNorm keep PyTorch defaults. Token parameters are handled by the caller.
    """
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d)):
            nn.init.trunc_normal_(m.weight, std=std, a=-2.0, b=2.0)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def compile_blocks(model: nn.Module, **options) -> int:
    """``torch.compile`` in place every mini-PointNet and Transformer block inside ``model`` (the
    per-patch and per-token work); grouping (FPS, kNN), heads and losses stay eager. Parameter names and
    checkpoints are unchanged. ``options`` go to ``torch.compile`` (e.g. ``backend``, ``mode``).
    Returns the number of modules compiled."""
    mods = [m for m in model.modules() if isinstance(m, (PatchEmbed, Block))]
    for m in mods:
        m.compile(**options)
    return len(mods)

