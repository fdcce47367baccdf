"""Exact import of official Point-BERT checkpoints (spec 7): dVAE, pre-trained, fine-tuned, part segmentation.

    .pth --(weights-only unpickling; numpy scalars allowed, nothing else)--> file dict
         --(base_model | model | model_state_dict | bare dict; strip "module.")--> official state dict
         --(kind from the keys, every size from the tensor shapes)--> our Config -> a fresh model
         --(KEY_MAP prefix renames + the conv-weight reshape rule)--> load_state_dict(strict=True)

Kinds (recognised from the keys, or forced with ``kind=``):

============  ==================================  ==============================  ======================
kind          official file                       recognised by                   our model
============  ==================================  ==============================  ======================
tokenizer     ``dVAE.pth`` (DiscreteVAE)          ``codebook`` + ``dgcnn_1.*``    ``DiscreteVAE``
pretrain      ``Point-BERT.pth`` (Point_BERT)     ``transformer_q.*``             ``PointBERT``
classifier    fine-tuned ``PointTransformer``     ``cls_head_finetune.*``         ``Classifier``
partseg       ``best_model.pth`` (get_model)      ``propagation_0.*``             ``PartSegmenter``
============  ==================================  ==============================  ======================

Sizes that are not in the tensors: ``num_heads`` (default ``dim // 64``, the official head width 64),
``num_points`` / ``num_patches`` (the official preset's: 1024 / 64, part segmentation 2048 / 128; with
only ``num_points`` given, ``num_patches = num_points // 16`` as in every official config), the
dVAE's ``dgcnn_k`` (4) and the drop-path rate (0.1). For a pre-trained file the momentum encoder
(``transformer_k.*``) and the key queue are dropped by default: the key encoder becomes a copy of
the query encoder and the queue is re-drawn, as at the start of pre-training (``keep_momentum=True``
keeps them).
"""

from __future__ import annotations

import argparse
import pickle
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .checkpoint import FORMAT, FORMAT_VERSION, build_model, config_of, export_safetensors, save_checkpoint
from .config import Config, ConfigError, preset, validate
from .errors import CheckpointError

# The 40 ModelNet40 classes in the official order (alphabetical, `modelnet40_shape_names.txt`).
MODELNET40_CLASSES = (
    "airplane", "bathtub", "bed", "bench", "bookshelf", "bottle", "bowl", "car", "chair", "cone",
    "cup", "curtain", "desk", "door", "dresser", "flower_pot", "glass_box", "guitar", "keyboard", "lamp",
    "laptop", "mantel", "monitor", "night_stand", "person", "piano", "plant", "radio", "range_hood", "sink",
    "sofa", "stairs", "stool", "table", "tent", "toilet", "tv_stand", "vase", "wardrobe", "xbox",
)

# --------------------------------------------------------------------------------------------------
# The key map: official name -> ours. A rule ending in "." renames a subtree, any other rule one key.
# The reshape rule: an official tensor whose shape is ours followed by unit dimensions (Conv1d weights
# (out, in, 1), Conv2d weights (out, in, 1, 1)) becomes ours (out, in); any other difference is an error.
# --------------------------------------------------------------------------------------------------

Rules = tuple[tuple[str, str], ...]

TRUNK: Rules = (  # official PointTransformer / MaskTransformer trunk -> our Backbone
    ("cls_token", "cls_token"), ("cls_pos", "cls_pos"), ("encoder.", "patch_embed."),
    ("reduce_dim.", "reduce_dim."), ("pos_embed.", "pos_embed."), ("blocks.blocks.", "blocks."),
    ("norm.", "norm."))
MPM_HEADS: Rules = (("mask_token", "mask_token"), ("lm_head.", "lm_head."), ("cls_head.", "cls_head."))
DVAE: Rules = (("codebook", "codebook"), ("encoder.", "patch_embed."), ("dgcnn_1.", "dgcnn_1."),
               ("dgcnn_2.", "dgcnn_2."), ("decoder.", "decoder."))
PARTSEG_HEAD: Rules = tuple((p, p) for p in ("propagation_0.", "propagation_1.", "propagation_2.",
                                             "dgcnn_pro_1.", "dgcnn_pro_2.", "conv1.", "bn1.", "conv2."))


def _under(src: str, dst: str, rules: Rules) -> Rules:
    return tuple((src + a, dst + b) for a, b in rules)


KEY_MAP: dict[str, Rules] = {
    "tokenizer": DVAE,
    "pretrain": (_under("transformer_q.", "query.backbone.", TRUNK)
                 + _under("transformer_q.", "query.", MPM_HEADS)
                 + _under("transformer_k.", "key.backbone.", TRUNK)
                 + _under("transformer_k.", "key.", MPM_HEADS)
                 + _under("dvae.", "tokenizer.", DVAE)
                 + (("queue", "queue"), ("queue_ptr", "queue_ptr"))),
    "classifier": _under("", "backbone.", TRUNK) + (("cls_head_finetune.", "head."),),
    "partseg": _under("", "backbone.", TRUNK) + PARTSEG_HEAD,
}

# What marks each kind (spec 7.3-7.6), checked in this order.
SIGNATURES = (("pretrain", "transformer_q.*"), ("partseg", "propagation_0.*"),
              ("classifier", "cls_head_finetune.*"), ("tokenizer", "codebook + dgcnn_1.*"))
BASE_PRESETS = {"tokenizer": "tokenizer", "pretrain": "pretrain", "classifier": "modelnet40-1k",
                "partseg": "partseg"}
STATE_KEYS = ("base_model", "model", "model_state_dict")  # file layouts, in order of preference (spec 7.1)
HEAD_WIDTH = 64  # official attention head width: 384 / 6


def rename(key: str, rules: Rules) -> str | None:
    """Our name for an official key under ``rules`` (first match wins), None when no rule applies."""
    for src, dst in rules:
        if key == src or (src.endswith(".") and key.startswith(src)):
            return dst + key[len(src):]
    return None


def fit_shape(key: str, value: Tensor, shape: torch.Size) -> Tensor:
    """The reshape rule: (out, in, 1[, 1]) -> (out, in); equal shapes pass; anything else is an error."""
    if value.shape == shape:
        return value
    extra = value.shape[len(shape):]
    if value.shape[: len(shape)] == shape and all(d == 1 for d in extra):
        return value.reshape(shape)
    raise CheckpointError(f"official tensor {key!r} has shape {tuple(value.shape)}, the model built from the "
                          f"inferred sizes expects {tuple(shape)}")


# --------------------------------------------------------------------------------------------------
# Reading the file safely
# --------------------------------------------------------------------------------------------------


def _numpy_scalar_globals() -> list[Any]:
    """Exactly what unpickling numpy scalars needs: the scalar constructor and the dtype classes."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    scalar = core.multiarray.scalar
    allowed: list[Any] = [scalar, np.dtype]
    for name in ("numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar"):  # numpy 1.x / 2.x files
        if name != f"{scalar.__module__}.{scalar.__name__}":
            allowed.append((scalar, name))
    dtypes = getattr(np, "dtypes", None)
    for name in ("Bool", "Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64",
                 "Float16", "Float32", "Float64", "LongDouble"):
        cls = getattr(dtypes, f"{name}DType", None)
        if cls is not None:
            allowed.append(cls)
    return allowed


def _allowed_names(allowed: list[Any]) -> set[str]:
    return {a[1] if isinstance(a, tuple) else f"{a.__module__}.{a.__qualname__}" for a in allowed}


def read_official(path: str | Path) -> Any:
    """``torch.load(weights_only=True)`` allowing numpy scalars (official metrics); never arbitrary code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    allowed = _numpy_scalar_globals()
    try:
        with torch.serialization.safe_globals(allowed), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pickle protocol")  # old files: harmless
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        bad = _unsafe_globals(path, str(e), _allowed_names(allowed))
        if bad:
            raise CheckpointError(f"{path}: weights-only loading refuses to unpickle {', '.join(bad[:3])}: "
                                  "loading it would execute code") from None
        raise CheckpointError(f"{path}: not a PyTorch checkpoint file ({_what_file(path, e)})") from None
    except Exception as e:  # noqa: BLE001 - truncated, not a torch file, ...
        raise CheckpointError(f"{path}: not a PyTorch checkpoint file ({_what_file(path, e)})") from None


def _what_file(path: Path, e: BaseException) -> str:
    """Why torch could not read ``path``, in words: a plain pickle, a text file, or torch's own reason."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head[:1] == b"\x80" and head[1:2] in (b"\x04", b"\x05"):
        return "a plain Python pickle, not written by torch.save; weights-only loading cannot read it"
    if head and all(32 <= b < 127 or b in b"\t\r\n" for b in head):
        return "it is a text file"
    return _first_line(e)


def _unsafe_globals(path: Path, message: str, allowed: set[str]) -> list[str]:
    """The globals of the pickle that weights-only loading would refuse, by name."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        names = [g for g in found if g not in allowed]
    except Exception:  # noqa: BLE001 - legacy format: fall back to the loader's message
        names = []
    return names or re.findall(r"GLOBAL ([\w.]+) was not an allowed global", message)


def _first_line(e: BaseException) -> str:
    """The reason in one line; for torch's weights-only failures the text after "WeightsUnpickler error:"."""
    text = str(e)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [s.strip() for s in text.splitlines() if s.strip()]
    first = lines[0].split(". ")[0].rstrip(".") if lines else type(e).__name__  # torch appends advice
    return first[:200]


def official_state_dict(obj: Any, where: str = "checkpoint") -> tuple[dict[str, Tensor], str, int]:
    """Pick the state dict out of an official file (spec 7.1) and strip a leading ``module.``.

    Returns (state dict, layout = "base_model" | "model" | "model_state_dict" | "bare", keys stripped).
    """
    if not isinstance(obj, dict):
        raise CheckpointError(f"{where}: holds a {type(obj).__name__}, not a dict of weights")
    if obj.get("format") == FORMAT:
        raise CheckpointError(f"{where}: is already a pointbert checkpoint; nothing to import")
    state, layout = _pick_state(obj)
    if not looks_official(obj):
        found = ", ".join(map(repr, list(obj)[:8]))
        raise CheckpointError(f"{where}: no state dict found: expected {', '.join(map(repr, STATE_KEYS))} "
                              f"or a dict of tensors; found keys {found}")
    stripped = sum(k.startswith("module.") for k in state)
    return {k.removeprefix("module."): v for k, v in state.items()}, layout, stripped


def _pick_state(obj: dict) -> tuple[dict, str]:
    """(the dict under the first of :data:`STATE_KEYS` that holds one, its key), or (``obj``, "bare")."""
    layout = next((k for k in STATE_KEYS if isinstance(obj.get(k), dict)), None)
    return (obj[layout], layout) if layout else (obj, "bare")


def looks_official(obj: dict) -> bool:
    """Weights as an official file holds them: under one of :data:`STATE_KEYS`, or a bare dict of tensors."""
    state, _ = _pick_state(obj)
    return bool(state) and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items())


def official_metrics(obj: Any) -> dict[str, Any]:
    """The numbers an official file records besides its weights (epoch, metrics, best_metrics,
    segmentation accuracies) as plain Python values; optimizer state and weights are left out."""
    if not isinstance(obj, dict):
        return {}
    out = {}
    for k, v in obj.items():
        if k in STATE_KEYS or "optimizer" in str(k) or "scheduler" in str(k):
            continue
        v = _plain(v)
        if v is not None:
            out[str(k)] = v
    return out


def _plain(v: Any) -> Any:
    """float/int (also from 0-d tensors and numpy scalars), or a dict/list of them; None if not numeric."""
    import numpy as np

    if isinstance(v, bool):
        return v
    if isinstance(v, Tensor) and v.numel() == 1 and v.dim() <= 1:
        v = v.item() if v.dtype != torch.float32 else np.float32(v.item())
    if isinstance(v, np.float32):
        return float(str(v))  # the shortest decimal of the float32 value: 93.1, not 93.0999984741211
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v)
    if isinstance(v, dict):
        d = {str(k): _plain(x) for k, x in v.items()}
        return {k: x for k, x in d.items() if x is not None} or None
    if isinstance(v, (list, tuple)) and v:
        items = [_plain(x) for x in v]
        return None if any(x is None for x in items) else items
    return None


# --------------------------------------------------------------------------------------------------
# Recognising the kind and inferring the sizes
# --------------------------------------------------------------------------------------------------


def detect_kind(state: dict[str, Tensor], where: str = "checkpoint") -> str:
    """tokenizer | pretrain | classifier | partseg from the (``module.``-stripped) keys."""
    keys = set(state)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if has("transformer_q."):
        return "pretrain"
    if has("propagation_0."):
        return "partseg"
    if has("cls_head_finetune."):
        return "classifier"
    if "codebook" in keys and has("dgcnn_1."):
        return "tokenizer"
    tops = Counter(k.split(".")[0] for k in keys)
    found = ", ".join(f"{name} ({n})" for name, n in sorted(tops.items(), key=lambda t: (-t[1], t[0]))[:8])
    expected = "; ".join(f"{kind}: {sig}" for kind, sig in SIGNATURES)
    raise CheckpointError(f"{where}: not a recognised official Point-BERT checkpoint: found {len(keys)} "
                          f"tensors under {found}; expected one of ({expected}); `pointbert import --kind` forces one")


class _Shapes:
    """Shape look-ups that fail with a clear message naming the missing official key."""

    def __init__(self, state: dict[str, Tensor], where: str, kind: str):
        self.state, self.where, self.kind = state, where, kind

    def __call__(self, key: str, dim: int | None = None) -> Any:
        if key not in self.state:
            raise CheckpointError(f"{self.where}: not a complete official {self.kind} checkpoint: "
                                  f"missing {key!r}")
        shape = self.state[key].shape
        return shape if dim is None else shape[dim]


def _trunk_sizes(s: _Shapes, p: str, num_heads: int | None) -> dict[str, Any]:
    """Backbone sizes from the official trunk under prefix ``p`` (spec 7.2)."""
    dim = s(p + "cls_token", -1)
    bp = p + "blocks.blocks."
    blocks = {int(k[len(bp):].split(".")[0]) for k in s.state if k.startswith(bp)}
    depth = max(blocks, default=-1) + 1
    if depth == 0 or blocks != set(range(depth)):
        raise CheckpointError(f"{s.where}: transformer blocks {sorted(blocks)} are not 0..depth-1")
    hidden = s(p + "blocks.blocks.0.mlp.fc1.weight", 0)
    if int(dim * (hidden / dim)) != hidden:
        raise CheckpointError(f"{s.where}: MLP width {hidden} is not representable as dim {dim} * mlp_ratio")
    if num_heads is None:
        num_heads = dim // HEAD_WIDTH
        if num_heads < 1 or dim % HEAD_WIDTH:
            raise CheckpointError(f"{s.where}: width {dim} is not a multiple of the official head width "
                                  f"{HEAD_WIDTH}; give --num-heads")
    return {"dim": dim, "depth": depth, "num_heads": num_heads, "mlp_ratio": hidden / dim,
            "qkv_bias": p + "blocks.blocks.0.attn.qkv.bias" in s.state,
            "pos_hidden": s(p + "pos_embed.0.weight", 0), **_encoder_sizes(s, p)}


def _encoder_sizes(s: _Shapes, p: str) -> dict[str, Any]:
    """Mini-PointNet widths (spec 7.2 encoder table) under prefix ``p``."""
    e = p + "encoder."
    return {"embed_dim": s(e + "second_conv.3.weight", 0),
            "hidden_dims": (s(e + "first_conv.0.weight", 0), s(e + "first_conv.3.weight", 0),
                            s(e + "second_conv.0.weight", 0))}


def _dvae_sizes(s: _Shapes, p: str) -> dict[str, Any]:
    """Tokenizer sizes from the official dVAE under prefix ``p`` (spec 7.2-7.3)."""
    vocab, token_dim = s(p + "codebook")
    coarse3 = s(p + "decoder.mlp.4.weight", 0)
    if coarse3 % 3:
        raise CheckpointError(f"{s.where}: decoder.mlp.4 has {coarse3} outputs, not 3 per coarse point")
    edge = sorted(int(k[len(p):].split(".")[1][5:]) for k in s.state
                  if k.startswith(p + "dgcnn_1.layer") and k.endswith(".0.weight"))
    if not edge or edge != list(range(1, len(edge) + 1)):
        raise CheckpointError(f"{s.where}: dgcnn_1 layers {edge} are not 1..n")
    last = edge[-1]  # the output layer; the ones before it are EdgeConv layers
    dgcnn_dims = (s(p + "dgcnn_1.input_trans.weight", 0),
                  *(s(p + f"dgcnn_1.layer{i}.0.weight", 0) for i in range(1, last)))
    sizes = {"vocab_size": vocab, "token_dim": token_dim,
             "decoder_dim": s(p + f"dgcnn_2.layer{last}.0.weight", 0), **_encoder_sizes(s, p),
             "patch_size": 4 * coarse3 // 3, "dgcnn_dims": dgcnn_dims,
             "decoder_hidden": s(p + "decoder.mlp.0.weight", 0),
             "fold_hidden": s(p + "decoder.final_conv.0.weight", 0)}
    widths = {"dgcnn_1 input": (s(p + "dgcnn_1.input_trans.weight", 1), sizes["embed_dim"]),
              "dgcnn_2 input": (s(p + "dgcnn_2.input_trans.weight", 1), token_dim),
              "dgcnn_1 output": (s(p + f"dgcnn_1.layer{last}.0.weight", 0), vocab),
              "decoder input": (s(p + "decoder.mlp.0.weight", 1), sizes["decoder_dim"])}
    for what, (got, want) in widths.items():
        if got != want:
            raise CheckpointError(f"{s.where}: inconsistent dVAE: {what} width is {got}, expected {want}")
    return sizes


def infer_config(state: dict[str, Tensor], kind: str, *, num_points: int | None = None,
                 num_patches: int | None = None, num_heads: int | None = None,
                 where: str = "checkpoint") -> tuple[Config, dict[str, Any]]:
    """Our Config for an official state dict of ``kind``, every size read off the tensor shapes.

    Returns (validated Config, the inferred sizes for the report).
    """
    s = _Shapes(state, where, kind)
    sizes: dict[str, Any] = {}
    if kind in ("pretrain", "classifier", "partseg"):
        sizes.update(_trunk_sizes(s, "transformer_q." if kind == "pretrain" else "", num_heads))
    if kind in ("tokenizer", "pretrain"):
        dvae = _dvae_sizes(s, "dvae." if kind == "pretrain" else "")
        if kind == "pretrain" and dvae["embed_dim"] != sizes["embed_dim"]:
            raise CheckpointError(f"{where}: the dVAE patch encoder ({dvae['embed_dim']}) and the "
                                  f"transformer's ({sizes['embed_dim']}) differ in width")
        sizes.update(dvae)
    if kind == "pretrain":
        if s("transformer_q.lm_head.weight", 0) != sizes["vocab_size"]:
            raise CheckpointError(f"{where}: lm_head predicts {s('transformer_q.lm_head.weight', 0)} tokens, "
                                  f"the dVAE codebook has {sizes['vocab_size']}")
        sizes["proj_dim"] = s("transformer_q.cls_head.0.weight", 0)
        if "queue" in state:
            sizes["queue_size"] = s("queue", 1)
    elif kind == "classifier":
        sizes["num_classes"] = s("cls_head_finetune.3.weight", 0)
        sizes["head_hidden"] = s("cls_head_finetune.0.weight", 0)
    elif kind == "partseg":
        sizes["num_parts"] = s("conv2.weight", 0)
        sizes["seg_hidden"] = s("conv1.weight", 0)
        sizes["prop_hidden"] = s("propagation_0.mlp_convs.0.weight", 0)
        sizes["num_categories"] = s("propagation_0.mlp_convs.0.weight", 1) - 3 - sizes["dim"]
    elif kind != "tokenizer":
        raise CheckpointError(f"unknown kind {kind!r}; choose one of {', '.join(KEY_MAP)}")
    sizes.setdefault("patch_size", 32)  # fine-tuned files hold no patch size: the official 32

    name = BASE_PRESETS[kind]
    if kind == "classifier" and num_points in (1024, 2048, 4096, 8192):
        name = f"modelnet40-{num_points // 1024}k"  # the official G and FPS pool for that size
    cfg = preset(name)
    if num_points is not None and name == BASE_PRESETS[kind]:
        cfg.data.num_points = num_points
        cfg.data.point_pool = max(num_points, round(num_points * 1200 / 1024))
        cfg.patches.num_patches = max(1, num_points // 16)  # 16 points per patch in every official config
    if num_patches is not None:
        cfg.patches.num_patches = num_patches
    cfg.patches.patch_size, cfg.patches.embed_dim = sizes["patch_size"], sizes["embed_dim"]
    cfg.patches.hidden_dims = sizes["hidden_dims"]
    b = cfg.backbone
    if "dim" in sizes:
        b.dim, b.depth, b.num_heads = sizes["dim"], sizes["depth"], sizes["num_heads"]
        b.mlp_ratio, b.qkv_bias, b.pos_hidden = sizes["mlp_ratio"], sizes["qkv_bias"], sizes["pos_hidden"]
        d = b.depth  # part segmentation reads blocks 4, 8, 12 of 12; other depths: the ends of the thirds
        thirds = (max(d // 3 - 1, 0), max(2 * d // 3 - 1, 0), d - 1)
        cfg.partseg.feature_blocks = (3, 7, 11) if d == 12 else thirds
    t = cfg.tokenizer
    if "vocab_size" in sizes:
        t.vocab_size, t.token_dim = sizes["vocab_size"], sizes["token_dim"]
        t.decoder_dim, t.dgcnn_dims = sizes["decoder_dim"], sizes["dgcnn_dims"]
        t.decoder_hidden, t.fold_hidden = sizes["decoder_hidden"], sizes["fold_hidden"]
    if kind == "pretrain":
        cfg.mpm.proj_dim = sizes["proj_dim"]
        cfg.mpm.queue_size = sizes.get("queue_size", cfg.mpm.queue_size)
    if kind == "classifier":
        cfg.head.num_classes, cfg.head.hidden = sizes["num_classes"], sizes["head_hidden"]
    if kind == "partseg":
        ps = cfg.partseg
        ps.num_parts, ps.num_categories = sizes["num_parts"], sizes["num_categories"]
        ps.head_hidden, ps.prop_hidden = sizes["seg_hidden"], sizes["prop_hidden"]
    else:  # unused outside part segmentation; kept consistent with a small num_points for validation
        cfg.partseg.num_level1 = min(cfg.partseg.num_level1, cfg.data.num_points)
        cfg.partseg.num_level2 = min(cfg.partseg.num_level2, cfg.partseg.num_level1)
    sizes.update(num_points=cfg.data.num_points, num_patches=cfg.patches.num_patches)
    try:
        return validate(cfg), sizes
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None


# --------------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------------


@dataclass
class ImportReport:
    """What :func:`convert_official` did, for the user."""

    source: str
    kind: str
    detected: bool  # recognised from the keys (False: forced)
    layout: str  # base_model | model | model_state_dict | bare
    module_prefix: int  # keys that carried "module."
    sizes: dict[str, Any]
    tensors: int = 0  # official tensors converted
    parameters: int = 0  # learnable values among them
    dropped: dict[str, int] = field(default_factory=dict)  # what -> number of tensors
    metrics: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        how = "recognised from its keys" if self.detected else "forced with --kind"
        prefix = f", 'module.' stripped from {self.module_prefix} keys" if self.module_prefix else ""
        out = [f"source: {self.source} (state dict under {self.layout!r}{prefix})",
               f"kind: {self.kind} ({how})",
               "sizes: " + ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
                                     for k, v in self.sizes.items()),
               f"converted: {self.tensors} tensors, {self.parameters:,} parameters"]
        if self.dropped:
            out.append("dropped: " + ", ".join(f"{n} tensors {what}" for what, n in self.dropped.items()))
        if self.metrics:
            out.append(f"official metrics: {self.metrics}")
        return out + [f"note: {n}" for n in self.notes]


Source = str | Path | dict


def convert_official(source: Source, kind: str | None = None, *, num_points: int | None = None,
                     num_patches: int | None = None, num_heads: int | None = None,
                     keep_momentum: bool = False, where: str | None = None) -> tuple[Config, nn.Module, ImportReport]:
    """Convert an official checkpoint (a path, the loaded file dict, or a bare state dict) exactly.

    ``where`` names a dict source in messages (default "state dict"; a path names itself).
    Returns (Config, model in eval mode with the official weights, :class:`ImportReport`).
    Raises :class:`CheckpointError` with one line for an unsafe, unrecognised or inconsistent file.
    """
    if isinstance(source, (str, Path)):
        where = str(source)
    where = where or "state dict"
    obj = read_official(source) if isinstance(source, (str, Path)) else source
    state, layout, stripped = official_state_dict(obj, where)
    detected = kind is None
    kind = kind or detect_kind(state, where)
    if kind not in KEY_MAP:
        raise CheckpointError(f"unknown kind {kind!r}; choose one of {', '.join(KEY_MAP)}")
    cfg, sizes = infer_config(state, kind, num_points=num_points, num_patches=num_patches,
                              num_heads=num_heads, where=where)
    report = ImportReport(Path(where).name, kind, detected,
                          layout, stripped, sizes, metrics=official_metrics(obj) if layout != "bare" else {})
    if sizes.get("num_heads") and num_heads is None:
        report.notes.append(f"num_heads {sizes['num_heads']} assumed (dim // {HEAD_WIDTH}, not stored in the "
                            "file); give --num-heads if the model was trained with another")

    if kind == "pretrain" and not keep_momentum:
        momentum = [k for k in state if k.startswith("transformer_k.")]
        queue = [k for k in state if k in ("queue", "queue_ptr")]
        state = {k: v for k, v in state.items() if k not in set(momentum + queue)}
        report.dropped = {"transformer_k.* (momentum encoder)": len(momentum), "queue, queue_ptr": len(queue)}
        report.notes.append("the key encoder is a copy of the query encoder and the queue is re-drawn, as at "
                            "the start of pre-training (--keep-momentum keeps the file's)")

    with torch.random.fork_rng(devices=[]):  # a reproducible fresh model (and queue), global RNG untouched
        torch.manual_seed(0)
        model = build_model(cfg)
    target = model.state_dict()
    rules = KEY_MAP[kind]
    converted: dict[str, Tensor] = {}
    unmapped = []
    for key, value in state.items():
        ours = rename(key, rules)
        if ours is None or ours not in target:
            unmapped.append(key)
            continue
        converted[ours] = fit_shape(key, value, target[ours].shape).to(target[ours].dtype)
    if unmapped:
        raise CheckpointError(f"{where}: {len(unmapped)} tensor(s) have no place in a {kind} model, e.g. "
                              f"{', '.join(map(repr, unmapped[:4]))}")
    params = dict(model.named_parameters())
    report.tensors = len(converted)
    report.parameters = sum(v.numel() for k, v in converted.items() if k in params)

    if kind == "pretrain" and not keep_momentum:
        for k in target:  # key encoder := query encoder (parameters and buffers); queue from the fresh model
            if k.startswith("key.") and "query." + k[4:] in converted:
                converted[k] = converted["query." + k[4:]]
            elif k in ("queue", "queue_ptr"):
                converted[k] = target[k]
    missing = [k for k in target if k not in converted]
    if missing:
        raise CheckpointError(f"{where}: not a complete official {kind} checkpoint: {len(missing)} tensor(s) "
                              f"missing, e.g. {', '.join(map(repr, missing[:4]))}")
    model.load_state_dict(converted, strict=True)
    return cfg, model.eval(), report


# --------------------------------------------------------------------------------------------------
# `pointbert import`
# --------------------------------------------------------------------------------------------------


def read_class_names(path: str | Path, num_classes: int) -> list[str]:
    """One class name per non-empty line; exactly ``num_classes`` of them."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such class-names file")
    try:
        names = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{p}: unreadable class-names file ({e})") from None
    if len(names) != num_classes:
        raise CheckpointError(f"{p}: {len(names)} class names for a classifier with {num_classes} outputs")
    return names


def official_checkpoint(source: Source, *, class_names: str | Path | None = None, where: str | None = None,
                        **options: Any) -> tuple[dict[str, Any], ImportReport]:
    """An official file converted into the dict a pointbert checkpoint holds (what :func:`load_checkpoint`
    returns) and the :class:`ImportReport`. ``options`` go to :func:`convert_official`; ``class_names`` is a
    text file of one name per line for a classifier (default: the ModelNet40 names for 40 outputs)."""
    cfg, model, report = convert_official(source, where=where, **options)
    ckpt: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": cfg.kind,
                            "config": cfg.to_dict(), "model": model.state_dict(),
                            "official_metrics": report.metrics, "source": report.source}
    if class_names:
        if cfg.kind != "classifier":
            raise CheckpointError(f"{class_names}: --class-names applies to classifiers, this is a {cfg.kind}")
        ckpt["class_names"] = read_class_names(class_names, cfg.head.num_classes)
        report.notes.append(f"class names from {class_names}")
    elif cfg.kind == "classifier" and cfg.head.num_classes == len(MODELNET40_CLASSES):
        ckpt["class_names"] = list(MODELNET40_CLASSES)
        report.notes.append("class names: the 40 ModelNet40 classes (airplane ... xbox), assumed for 40 "
                            "outputs (official ScanObjectNN files also have 40; give --class-names FILE "
                            "otherwise)")
    return ckpt, report


def import_command(args: argparse.Namespace) -> int:
    """``pointbert import SRC.pth --out DST [--kind] [--num-points] [--num-patches] [--num-heads]
    [--keep-momentum] [--class-names FILE] [--safetensors FILE]``."""
    for out in filter(None, (args.out, args.safetensors)):
        if Path(out).resolve() == Path(args.source).resolve():
            raise CheckpointError(f"{out}: is the official file being imported; give another output name")
        if Path(out).is_dir():
            raise CheckpointError(f"{out}: is a folder; give a file name")
    ckpt, report = official_checkpoint(
        args.source, kind=args.kind, num_points=args.num_points, num_patches=args.num_patches,
        num_heads=getattr(args, "num_heads", None), keep_momentum=getattr(args, "keep_momentum", False),
        class_names=args.class_names)
    cfg = config_of(ckpt, args.source)
    extra = {k: v for k, v in ckpt.items() if k not in ("format", "format_version", "kind", "config", "model")}
    save_checkpoint(args.out, cfg, ckpt["model"], **extra)
    if args.safetensors:
        export_safetensors(args.safetensors, cfg, ckpt["model"], source=report.source)
    for line in report.lines():
        print(line)
    print(f"wrote {args.out}" + (f" and {args.safetensors}" if args.safetensors else ""))
    return 0
