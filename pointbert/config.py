"""Typed configuration: dataclasses with the paper's defaults, named presets, YAML and dotted overrides.

One source of truth. Every number the method uses lives in a field here (the spec section that
gives it is named in the comment); YAML files and ``section.field=value`` overrides only change
fields, and :func:`validate` rejects anything inconsistent with a one-line message.

A :class:`Config` has a ``kind`` (``tokenizer | pretrain | classifier | partseg``) and sections:

* ``patches``   grouping: num_patches G, patch_size K, embed_dim of the mini-PointNet (spec 1.2-1.3)
* ``backbone``  the Transformer (spec 1.4-1.5)
* ``tokenizer`` the dVAE (spec 4)
* ``mpm``       masked point modeling, mixing and momentum contrast (spec 5)
* ``head``      classification head (spec 6.1)
* ``partseg``   part segmentation head (spec 6.5)
* ``data``      dataset and sampling (spec 2, 6.2)
* ``optim``     AdamW + warm-up/cosine schedule (spec 1.7)
* ``train``     epochs, batch, evaluation, precision (spec 1.7, 6.2)
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import PointBERTError

KINDS = ("tokenizer", "pretrain", "classifier", "partseg")
#: torch.compile modes of train.compile_mode (reduce-overhead adds CUDA graphs on GPU)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class ConfigError(PointBERTError, ValueError):
    """A configuration value is missing, unknown or inconsistent."""


@dataclass
class PatchConfig:
    num_patches: int = 64  # G, FPS centers (spec 3)
    patch_size: int = 32  # K, kNN neighbours per center (spec 3)
    embed_dim: int = 256  # mini-PointNet output channels, `encoder_dims` (spec 1.3)
    hidden_dims: tuple[int, int, int] = (128, 256, 512)  # mini-PointNet: 3->h0->h1, max, 2*h1->h2->embed_dim


@dataclass
class BackboneConfig:
    dim: int = 384  # trans_dim (spec 1.4)
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    drop_path_rate: float = 0.1  # linspace(0, rate, depth) (spec 1.4)
    pos_hidden: int = 128  # position MLP 3 -> 128 -> dim (spec 1.5)
    ffn_act: str = "gelu"  # block MLP activation: gelu as official | relu as the paper's appendix (spec 11.9)
    pos_every_block: bool = True  # position added before every block, as official; false: at the input only (spec 11.9)


@dataclass
class TokenizerConfig:
    """The dVAE (spec 4)."""

    vocab_size: int = 8192  # num_tokens
    token_dim: int = 256  # tokens_dims: codebook width
    decoder_dim: int = 256  # decoder_dims: dgcnn_2 output = folding decoder input
    dgcnn_k: int = 4  # kNN over centers in the DGCNNs (spec 4.1)
    dgcnn_dims: tuple[int, ...] = (128, 256, 512, 512, 1024)  # input_trans, then EdgeConv layers 1-4
    decoder_hidden: int = 1024  # coarse MLP width of the folding decoder
    fold_hidden: int = 512  # per-point folding MLP width
    # Gumbel temperature: cosine from start to end over `temp_steps` iterations (spec 4.4)
    temp_start: float = 1.0
    temp_end: float = 0.0625
    temp_steps: int = 100_000
    # KL weight: 0 for `kl_delay` iterations, then cosine 0 -> kl_weight over `kl_steps` (spec 4.4)
    kl_weight: float = 0.1
    kl_delay: int = 10_000
    kl_steps: int = 100_000
    # Gumbel noise of the relaxed sample: "uniform" = -log(-log U) from torch.rand (same distribution,
    # faster on CPU); "exponential" = F.gumbel_softmax's exponential_ draws (the official code's numbers)
    gumbel_noise: str = "uniform"
    logit_norm: bool = True  # GroupNorm + LeakyReLU(0.2) on the logits, as official; false: plain linear (spec 11.6)
    # KL against the uniform prior of q = mean over patches of softmax(logits) (spec 11.6): "uniform_q" =
    # KL(uniform || q), as official; "q_uniform" = KL(q || uniform), the usual direction
    kl_direction: str = "uniform_q"
    chamfer_half: bool = True  # loss Chamfer-L1 with the official factor 1/2; false: the paper's, without (spec 11.7)


@dataclass
class MPMConfig:
    """Masked point modeling with point-patch mixing and momentum contrast (spec 5)."""

    mask_type: str = "block"  # block | random (spec 5.3, 11.3)
    mask_ratio: tuple[float, float] = (0.25, 0.45)  # per-sample ratio ~ U(lo, hi)
    replace_prob: float = 0.0  # random token replacement, off in the released config
    proj_dim: int = 512  # `cls_dim` of the contrastive projection head
    momentum: float = 0.999  # key encoder EMA
    temperature: float = 0.07
    queue_size: int = 16_384
    mpm_loss: bool = True  # `dvae_loss`
    mix_loss: bool = True  # `cutmix_loss`, paper Eq. 3
    moco_loss: bool = False  # plain MoCo on un-mixed clouds: off in the released config (spec 11.1)
    key_masked: bool = True  # the key encoder sees block-masked clouds, as the official code (spec 11.2)
    tokenizer_bn_train: bool = True  # frozen dVAE BatchNorm in batch-stat mode, as official (spec 11.8)


@dataclass
class HeadConfig:
    """Classification head: [cls ; max] -> Linear -> ReLU -> Dropout -> Linear (spec 6.1)."""

    num_classes: int = 40  # cls_dim; 40 even for ScanObjectNN and few-shot in the official configs
    hidden: int = 256
    dropout: float = 0.5


@dataclass
class PartSegConfig:
    """Part segmentation head (spec 6.5)."""

    num_parts: int = 50
    num_categories: int = 16
    feature_blocks: tuple[int, int, int] = (3, 7, 11)  # 0-based blocks whose outputs are used
    num_level1: int = 512  # FPS points of level L1
    num_level2: int = 256  # FPS points of level L2
    prop_hidden: int = 1536
    head_hidden: int = 128
    dropout: float = 0.5


@dataclass
class DataConfig:
    # synthetic | shapenet55 | modelnet40 | modelnet10 | scanobjectnn | fewshot | shapenetpart | folder
    dataset: str = "synthetic"
    path: str = ""
    variant: str = ""  # scanobjectnn: objectbg | objectonly | hardest
    num_points: int = 1024  # npoints fed to the model
    point_pool: int = 1200  # `point_all`: FPS pool from which training subsets are drawn (spec 6.2)
    whole: bool = False  # ShapeNet-55: train+test for pre-training (spec 2.1)
    augment: str = "scale_translate"  # scale_translate | partseg | none (spec 2.6)
    way: int = 5
    shot: int = 10
    fold: int = 0
    num_workers: int = -1  # data loader processes; -1 = auto: 4 (the official) on CPU, 8 with CUDA, <= CPUs per rank
    probe_dataset: str = ""  # labelled dataset for the SVM probe during pre-training ("" = none)
    probe_path: str = ""
    probe_drop_last: bool = True  # the official SVM probe: a shuffled train loader dropping its last partial
    # batch (9,728 of 9,843 ModelNet40 shapes at batch 128, spec 11.19); false = every train shape


@dataclass
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_epochs: int = 10
    warmup_lr: float = 1e-6  # hard-coded in the official builder (spec 1.7)
    min_lr: float = 1e-6
    grad_clip: float = 10.0  # max L2 norm; 0 disables
    label_smoothing: float = 0.0  # official `--label_smoothing` uses 0.2 (spec 6.1)
    schedule: str = "epoch"  # epoch: the official timm CosLR stepped per epoch (spec 1.7) | step: per-step
    fused: bool = True  # fused AdamW kernel where torch has one (same update up to rounding); false: official loop


@dataclass
class TrainConfig:
    epochs: int = 300  # schedule length (`max_epoch`)
    extra_epoch: bool = True  # the official loops run epochs 0..max_epoch inclusive (spec 0)
    batch_size: int = 32  # global batch
    grad_accum: int = 1
    eval_every: int = 1  # evaluate after epochs k, 2k, ... (0-based, skipping 0, spec 4.6/6.2) and the last
    seed: int = 0
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    vote_views: int = 10  # voting: views averaged (spec 6.3)
    vote_repeats: int = 9  # voting: repetitions, max reported (spec 6.3)
    vote_above: float = 90.0  # fine-tuning: one vote pass when acc > this and a new best, or acc > 91.5,
    # keeping best_vote.pt (the official ckpt-best_vote, spec 6.2); 101 = never
    sync_bn: bool = False
    checkpoint_every: int = 200  # also save `last` every this many steps (0: at epoch ends only)
    keep_epochs: int = 0  # also keep epoch-<e>.pt of the last this many epochs (official: 5 dVAE, 10 pre-training)
    log_every: int = 10  # steps between metric-log lines
    keep_memory: bool = True  # CPU, Linux: keep freed memory for reuse (pointbert.memory; false: glibc's default)
    compile: bool = False  # torch.compile the mini-PointNet and Transformer blocks (no gain measured on CPU)
    compile_mode: str = "default"  # torch.compile mode with train.compile (reduce-overhead: CUDA graphs)


@dataclass
class Config:
    kind: str = "classifier"
    patches: PatchConfig = field(default_factory=PatchConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    mpm: MPMConfig = field(default_factory=MPMConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    partseg: PartSegConfig = field(default_factory=PartSegConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        return apply_dict(cls(), d, where="config")

    def replace(self, **overrides: Any) -> Config:
        """A copy with dotted overrides applied: ``cfg.replace(**{"backbone.depth": 4})``."""
        return apply_overrides(self, [f"{k}={v!r}" if isinstance(v, str) else f"{k}={_yaml_dump(v)}"
                                      for k, v in overrides.items()])


# --------------------------------------------------------------------------------------------------
# Presets mirroring the official configs (spec 3-6) and tiny ones for tests.
# --------------------------------------------------------------------------------------------------


def _tokenizer() -> Config:  # cfgs/ShapeNet55_models/dvae.yaml
    c = Config(kind="tokenizer")
    c.data = DataConfig(dataset="shapenet55", num_points=1024, augment="none")
    c.optim = OptimConfig(lr=5e-4, weight_decay=5e-4, warmup_epochs=10, grad_clip=0.0)
    c.train = TrainConfig(epochs=300, batch_size=64, keep_epochs=5)  # spec 4.6
    return c


def _pretrain() -> Config:  # cfgs/Mixup_models/Point-BERT.yaml
    c = Config(kind="pretrain")
    c.data = DataConfig(dataset="shapenet55", num_points=1024, whole=True, augment="scale_translate",
                        probe_dataset="modelnet40")
    c.optim = OptimConfig(lr=5e-4, weight_decay=0.05, warmup_epochs=3, grad_clip=0.0)
    c.train = TrainConfig(epochs=300, batch_size=128, sync_bn=True, keep_epochs=10)  # spec 5.6
    return c


def _modelnet(points: int) -> Config:  # cfgs/ModelNet_models/PointTransformer*.yaml
    c = Config(kind="classifier")
    groups = {1024: 64, 2048: 128, 4096: 256, 8192: 512}[points]
    pool = {1024: 1200, 2048: 2400, 4096: 4800, 8192: 8192}[points]
    c.patches = PatchConfig(num_patches=groups)
    c.data = DataConfig(dataset="modelnet40", num_points=points, point_pool=pool)
    return c


def _scanobjectnn(variant: str) -> Config:  # cfgs/ScanObjectNN_models/*.yaml
    c = Config(kind="classifier")
    c.data = DataConfig(dataset="scanobjectnn", variant=variant, num_points=1024, point_pool=1200)
    return c


def _fewshot() -> Config:  # cfgs/Fewshot_models/PointTransformer.yaml
    c = Config(kind="classifier")
    c.data = DataConfig(dataset="fewshot", num_points=1024, point_pool=1200)
    c.optim = OptimConfig(warmup_epochs=10)
    c.train = TrainConfig(epochs=150)
    return c


def _partseg() -> Config:  # segmentation/train_partseg.py
    c = Config(kind="partseg")
    c.patches = PatchConfig(num_patches=128)
    c.data = DataConfig(dataset="shapenetpart", num_points=2048, augment="partseg")
    c.optim = OptimConfig(lr=5e-4, weight_decay=0.05, warmup_epochs=10, grad_clip=0.0)
    c.train = TrainConfig(epochs=300, extra_epoch=False, batch_size=16)
    return c


def _tiny(kind: str) -> Config:
    """Small models for tests: same method, small numbers (the tokenizer keeps full-width DGCNN layers)."""
    c = Config(kind=kind)
    c.patches = PatchConfig(num_patches=16, patch_size=8, embed_dim=32)
    c.backbone = BackboneConfig(dim=32, depth=2, num_heads=2, pos_hidden=16, drop_path_rate=0.1)
    c.tokenizer = TokenizerConfig(vocab_size=64, token_dim=16, decoder_dim=16,
                                  temp_steps=100, kl_delay=10, kl_steps=100)
    c.mpm = MPMConfig(proj_dim=16, queue_size=64)
    c.head = HeadConfig(num_classes=10, hidden=16)
    c.partseg = PartSegConfig(num_parts=50, num_categories=16, feature_blocks=(0, 1, 1),
                              num_level1=64, num_level2=32, prop_hidden=32, head_hidden=16)
    c.data = DataConfig(dataset="synthetic", num_points=256, point_pool=300, num_workers=0)
    c.optim = OptimConfig(warmup_epochs=1)
    c.train = TrainConfig(epochs=2, batch_size=8, extra_epoch=False)
    if kind == "partseg":
        c.data.augment = "partseg"
    return c


def _demo(kind: str) -> Config:
    """The `pointbert demo` scale: the same method, narrower and shallower, for 2 CPU cores in minutes.

    512 points in 32 patches of 16; mini-PointNet 32/64/128 -> 128; 4 blocks of width 128; a 256-token
    dVAE. Iteration-based tokenizer schedules are shrunk to the run length in the same proportions as the
    official ones (temperature over ~half the run, KL weight after a 5% delay).
    """
    c = Config(kind=kind)
    c.patches = PatchConfig(num_patches=32, patch_size=16, embed_dim=128, hidden_dims=(32, 64, 128))
    c.backbone = BackboneConfig(dim=128, depth=4, num_heads=4, pos_hidden=64, drop_path_rate=0.1)
    c.tokenizer = TokenizerConfig(vocab_size=256, token_dim=64, decoder_dim=64,
                                  dgcnn_dims=(32, 64, 64, 128, 128), decoder_hidden=128, fold_hidden=64,
                                  temp_steps=280, kl_delay=28, kl_steps=280)
    c.mpm = MPMConfig(proj_dim=128, queue_size=1024)
    c.head = HeadConfig(num_classes=15, hidden=128)
    c.partseg = PartSegConfig(feature_blocks=(1, 2, 3), num_level1=256, num_level2=128, prop_hidden=256,
                              head_hidden=64)
    c.data = DataConfig(dataset="synthetic", num_points=512, point_pool=600, num_workers=0,
                        augment="none" if kind == "tokenizer" else "scale_translate",
                        probe_dataset="synthetic" if kind == "pretrain" else "")
    c.optim = OptimConfig(lr=1e-3, weight_decay=5e-4 if kind == "tokenizer" else 0.05, warmup_epochs=1,
                          grad_clip=0.0 if kind != "classifier" else 10.0, schedule="step")
    c.train = TrainConfig(epochs={"tokenizer": 12, "pretrain": 20}.get(kind, 30), batch_size=32,
                          extra_epoch=False, eval_every={"tokenizer": 6, "pretrain": 10}.get(kind, 5))
    return c


def _small(kind: str) -> Config:
    """The CPU-scale ModelNet40 protocol (benchmarks/modelnet40.md): the demo's model scale (512 points
    in 32 patches of 16, 4 blocks of width 128, 256 tokens) on the 9,843 ModelNet40 training shapes, about
    an hour for every stage on 2 CPU cores. ``kind`` is tokenizer, pretrain, classifier or fewshot.

    The stored 1024-point clouds are read as 512 random points per cloud for the tokenizer and
    pre-training (the ShapeNet-55 sampling), FPS 600 then 512 random for classification (spec 6.2).
    Tokenizer schedules are shrunk to its 6 epochs (1,842 steps at batch 32) in the demo's proportions.
    """
    c = _demo("classifier" if kind == "fewshot" else kind)
    c.data.dataset, c.data.probe_dataset = "modelnet40", ""
    c.head.num_classes = 40
    if kind == "tokenizer":
        c.tokenizer.temp_steps, c.tokenizer.kl_delay, c.tokenizer.kl_steps = 900, 90, 900
        c.train.epochs, c.train.eval_every = 6, 3
    elif kind == "pretrain":
        c.train.epochs, c.train.eval_every = 12, 12
    elif kind == "classifier":
        c.train.epochs, c.train.eval_every, c.train.vote_repeats = 5, 1, 1
    else:  # few-shot episodes: support sets of 50-200 shapes, the query set evaluated every 5 epochs
        c.data.dataset = "fewshot"
        c.train.epochs, c.train.eval_every, c.train.batch_size = 20, 5, 16
    return c


PRESETS: dict[str, typing.Callable[[], Config]] = {
    "tokenizer": _tokenizer,
    "pretrain": _pretrain,
    "modelnet40-1k": lambda: _modelnet(1024),
    "modelnet40-2k": lambda: _modelnet(2048),
    "modelnet40-4k": lambda: _modelnet(4096),
    "modelnet40-8k": lambda: _modelnet(8192),
    "scanobjectnn-objectbg": lambda: _scanobjectnn("objectbg"),
    "scanobjectnn-objectonly": lambda: _scanobjectnn("objectonly"),
    "scanobjectnn-hardest": lambda: _scanobjectnn("hardest"),
    "fewshot": _fewshot,
    "partseg": _partseg,
    "demo-tokenizer": lambda: _demo("tokenizer"),
    "demo-pretrain": lambda: _demo("pretrain"),
    "demo-classifier": lambda: _demo("classifier"),
    "small-tokenizer": lambda: _small("tokenizer"),
    "small-pretrain": lambda: _small("pretrain"),
    "small-classifier": lambda: _small("classifier"),
    "small-fewshot": lambda: _small("fewshot"),
    "tiny-tokenizer": lambda: _tiny("tokenizer"),
    "tiny-pretrain": lambda: _tiny("pretrain"),
    "tiny-classifier": lambda: _tiny("classifier"),
    "tiny-partseg": lambda: _tiny("partseg"),
}


def preset(name: str) -> Config:
    """A fresh copy of a named preset (see :data:`PRESETS`)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]()


# --------------------------------------------------------------------------------------------------
# YAML, dotted overrides, validation
# --------------------------------------------------------------------------------------------------


def _yaml_dump(v: Any) -> str:
    import yaml

    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML-parsed value to the annotated field type, or raise ConfigError."""
    origin = typing.get_origin(tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float)
                                                                     and value.is_integer())):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if isinstance(value, str) and tp in (int, float):  # YAML 1.1 reads "1e-3" as a string
        try:
            value = float(value) if tp is float else int(value)
        except ValueError:
            pass
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], where) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    raise ConfigError(f"{where}: unsupported field type {tp!r}")  # pragma: no cover


def _field_types(obj: Any) -> dict[str, Any]:
    return typing.get_type_hints(type(obj))


def apply_dict(cfg: Config, d: dict[str, Any], where: str = "config") -> Config:
    """Return a copy of ``cfg`` with the nested dict ``d`` applied; unknown keys are errors."""
    cfg = copy.deepcopy(cfg)

    def merge(obj: Any, sub: dict[str, Any], path: str) -> None:
        if not isinstance(sub, dict):
            raise ConfigError(f"{where}: {path or 'top level'} must be a mapping, got {sub!r}")
        types = _field_types(obj)
        for k, v in sub.items():
            name = f"{path}.{k}" if path else str(k)
            if k not in types:
                known = ", ".join(f.name for f in fields(obj))
                raise ConfigError(f"{where}: unknown key {name!r} (known: {known})")
            cur = getattr(obj, k)
            if dataclasses.is_dataclass(cur):
                merge(cur, v, name)
            else:
                setattr(obj, k, _coerce(v, types[k], f"{where}: {name}"))

    merge(cfg, d, "")
    return cfg


def apply_overrides(cfg: Config, overrides: list[str], where: str = "override") -> Config:
    """Apply ``section.field=value`` strings (values parsed as YAML: ``1e-3``, ``[0.2, 0.4]``, ``true``)."""
    import yaml

    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{where} {item!r}: expected section.field=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        nested: dict[str, Any] = {}
        cur = nested
        parts = key.strip().split(".")
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
        cur[parts[-1]] = value
        if value is None:
            raise ConfigError(f"{where} {item!r}: empty value")
        if isinstance(value, (int, float)) and _is_str_field(cfg, parts):
            value = raw
            cur[parts[-1]] = raw
        cfg = apply_dict(cfg, nested, where=f"{where} {item!r}")
    return cfg


def _is_str_field(cfg: Config, parts: list[str]) -> bool:
    obj: Any = cfg
    for p in parts[:-1]:
        obj = getattr(obj, p, None)
        if obj is None:
            return False
    try:
        return _field_types(obj).get(parts[-1]) is str
    except TypeError:
        return False


def load_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such config file")
    try:
        d = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not a text file (a YAML config is expected)") from None
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        raise ConfigError(f"{p}: invalid YAML{'' if line is None else f' at line {line + 1}'}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level")
    return d


def build_config(preset_name: str | None = None, yaml_path: str | Path | None = None,
                 overrides: list[str] | None = None, kind: str | None = None) -> Config:
    """preset (or defaults for ``kind``) -> YAML file -> dotted overrides -> validate.

    A YAML file may name its base with a top-level ``preset:`` key.
    """
    d: dict[str, Any] = load_yaml(yaml_path) if yaml_path else {}
    base = preset_name or d.pop("preset", None)
    d.pop("preset", None)
    if base is not None and not isinstance(base, str):
        raise ConfigError(f"{yaml_path}: preset must be a preset name, got {base!r}")
    if kind and d.get("kind", kind) != kind:
        raise ConfigError(f"{yaml_path}: kind {d['kind']!r}, this command needs a {kind} config")
    cfg = preset(base) if base else Config(kind=kind or "classifier")
    if kind and cfg.kind != kind:
        raise ConfigError(f"preset {base!r} is a {cfg.kind} config, this command needs a {kind} config")
    if d:
        cfg = apply_dict(cfg, d, where=str(yaml_path))
    cfg = apply_overrides(cfg, overrides or [])
    validate(cfg)
    return cfg


def save_yaml(cfg: Config, path: str | Path) -> None:
    import yaml

    def plain(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    Path(path).write_text(yaml.safe_dump(plain(cfg.to_dict()), sort_keys=False))


def validate(cfg: Config) -> Config:
    """Raise ConfigError with one clear line for the first inconsistent value."""

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    need(cfg.kind in KINDS, f"kind must be one of {', '.join(KINDS)}, got {cfg.kind!r}")
    p, b, t, m = cfg.patches, cfg.backbone, cfg.tokenizer, cfg.mpm
    for name, v in [("patches.num_patches", p.num_patches), ("patches.patch_size", p.patch_size),
                    ("patches.embed_dim", p.embed_dim), ("backbone.dim", b.dim),
                    ("backbone.depth", b.depth), ("backbone.num_heads", b.num_heads),
                    ("backbone.pos_hidden", b.pos_hidden), ("tokenizer.vocab_size", t.vocab_size),
                    ("tokenizer.token_dim", t.token_dim), ("tokenizer.decoder_dim", t.decoder_dim),
                    ("tokenizer.dgcnn_k", t.dgcnn_k), ("head.num_classes", cfg.head.num_classes),
                    ("data.num_points", cfg.data.num_points), ("train.batch_size", cfg.train.batch_size),
                    ("train.grad_accum", cfg.train.grad_accum), ("train.eval_every", cfg.train.eval_every),
                    ("mpm.proj_dim", m.proj_dim), ("mpm.queue_size", m.queue_size)]:
        need(v > 0, f"{name} must be positive, got {v}")
    for name, v in [("train.keep_epochs", cfg.train.keep_epochs),
                    ("train.checkpoint_every", cfg.train.checkpoint_every)]:
        need(v >= 0, f"{name} must be >= 0, got {v}")
    need(b.dim % b.num_heads == 0,
         f"backbone.dim ({b.dim}) must be divisible by backbone.num_heads ({b.num_heads})")
    need(0 <= b.drop_path_rate < 1, f"backbone.drop_path_rate must be in [0, 1), got {b.drop_path_rate}")
    need(cfg.data.num_points >= p.patch_size,
         f"data.num_points ({cfg.data.num_points}) must be at least patches.patch_size ({p.patch_size})")
    need(len(p.hidden_dims) == 3 and min(p.hidden_dims) > 0, "patches.hidden_dims must be 3 positive widths")
    need(len(t.dgcnn_dims) >= 2 and min(t.dgcnn_dims) > 0,
         "tokenizer.dgcnn_dims must list the input width and at least one EdgeConv width, all positive")
    need(t.decoder_hidden > 0 and t.fold_hidden > 0, "tokenizer decoder widths must be positive")
    need(p.num_patches <= cfg.data.num_points,
         f"patches.num_patches ({p.num_patches}) must not exceed data.num_points ({cfg.data.num_points})")
    need(t.dgcnn_k <= p.num_patches,
         f"tokenizer.dgcnn_k ({t.dgcnn_k}) must not exceed patches.num_patches ({p.num_patches})")
    need(p.patch_size % 4 == 0, f"patches.patch_size ({p.patch_size}) must be a multiple of 4 "
         "(the folding decoder makes 4 fine points per coarse point)")
    need(t.gumbel_noise in ("uniform", "exponential"),
         f"tokenizer.gumbel_noise must be uniform or exponential, got {t.gumbel_noise!r}")
    need(t.kl_direction in ("uniform_q", "q_uniform"),
         f"tokenizer.kl_direction must be uniform_q or q_uniform, got {t.kl_direction!r}")
    need(b.ffn_act in ("gelu", "relu"), f"backbone.ffn_act must be gelu or relu, got {b.ffn_act!r}")
    for name, v in [("backbone.pos_every_block", b.pos_every_block), ("tokenizer.logit_norm", t.logit_norm),
                    ("tokenizer.chamfer_half", t.chamfer_half)]:
        need(isinstance(v, bool), f"{name} must be true or false, got {v!r}")
    lo, hi = m.mask_ratio
    need(0 <= lo <= hi < 1, f"mpm.mask_ratio must satisfy 0 <= lo <= hi < 1, got {list(m.mask_ratio)}")
    need(m.mask_type in ("block", "random"), f"mpm.mask_type must be block or random, got {m.mask_type!r}")
    need(0 <= m.replace_prob < 1, f"mpm.replace_prob must be in [0, 1), got {m.replace_prob}")
    need(0 <= m.momentum <= 1, f"mpm.momentum must be in [0, 1], got {m.momentum}")
    need(m.temperature > 0, f"mpm.temperature must be positive, got {m.temperature}")
    need(0 <= cfg.head.dropout < 1, f"head.dropout must be in [0, 1), got {cfg.head.dropout}")
    ps = cfg.partseg
    if cfg.kind == "partseg":  # the section is unused by the other models
        need(all(0 <= i < b.depth for i in ps.feature_blocks),
             f"partseg.feature_blocks {list(ps.feature_blocks)} must index blocks 0..{b.depth - 1}")
        need(ps.num_level2 <= ps.num_level1 <= cfg.data.num_points,
             "partseg levels must satisfy num_level2 <= num_level1 <= data.num_points")
    o = cfg.optim
    need(o.lr > 0, f"optim.lr must be positive, got {o.lr}")
    need(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    need(o.warmup_epochs >= 0, f"optim.warmup_epochs must be >= 0, got {o.warmup_epochs}")
    need(o.grad_clip >= 0, f"optim.grad_clip must be >= 0 (0 disables), got {o.grad_clip}")
    need(0 <= o.label_smoothing < 1, f"optim.label_smoothing must be in [0, 1), got {o.label_smoothing}")
    need(o.schedule in ("epoch", "step"), f"optim.schedule must be epoch or step, got {o.schedule!r}")
    need(cfg.train.epochs > 0, f"train.epochs must be positive, got {cfg.train.epochs}")
    need(cfg.train.compile_mode in COMPILE_MODES,
         f"train.compile_mode must be one of {', '.join(COMPILE_MODES)}, got {cfg.train.compile_mode!r}")
    need(cfg.train.precision in ("auto", "fp32", "bf16", "fp16"),
         f"train.precision must be auto, fp32, bf16 or fp16, got {cfg.train.precision!r}")
    need(cfg.data.augment in ("scale_translate", "partseg", "none"),
         f"data.augment must be scale_translate, partseg or none, got {cfg.data.augment!r}")
    tr = cfg.train
    for name, v in [("train.log_every", tr.log_every), ("train.vote_views", tr.vote_views),
                    ("train.vote_repeats", tr.vote_repeats), ("tokenizer.temp_steps", t.temp_steps),
                    ("tokenizer.kl_steps", t.kl_steps), ("tokenizer.temp_start", t.temp_start),
                    ("tokenizer.temp_end", t.temp_end), ("optim.eps", o.eps)]:
        need(v > 0, f"{name} must be positive, got {v}")
    need(cfg.data.num_workers >= -1, f"data.num_workers must be >= 0, or -1 for auto, got {cfg.data.num_workers}")
    for name, v in [("train.seed", tr.seed), ("data.fold", cfg.data.fold),
                    ("optim.warmup_lr", o.warmup_lr), ("optim.min_lr", o.min_lr), ("tokenizer.kl_delay", t.kl_delay)]:
        need(v >= 0, f"{name} must be >= 0, got {v}")
    need(o.lr < float("inf"), f"optim.lr must be finite, got {o.lr}")
    need(len(o.betas) == 2 and all(0 <= x < 1 for x in o.betas), f"optim.betas must be two values in [0, 1), "
         f"got {list(o.betas)}")
    need(hi > 0, f"mpm.mask_ratio must allow masking (hi > 0), got {list(m.mask_ratio)}")
    if cfg.kind == "classifier":  # training subsets and voting views are drawn from the FPS pool
        need(cfg.data.point_pool >= cfg.data.num_points,
             f"data.point_pool ({cfg.data.point_pool}) must be at least data.num_points ({cfg.data.num_points})")
    return cfg
