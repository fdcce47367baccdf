"""Self-describing checkpoints: one file rebuilds its model.

A checkpoint is a plain dict saved with ``torch.save`` and always read back with
``torch.load(weights_only=True)`` (loading never executes code)::

    format          "pointbert"
    format_version  1
    kind            tokenizer | pretrain | classifier | partseg
    config          the resolved Config as a nested dict
    model           the model state dict
    class_names     optional list of class names (classifiers)
    ... training runs add: optimizer, scaler, step, epoch, metrics, best_metrics, rng, ...

Writes are atomic: a temporary file in the same folder, fsync, then ``os.replace``.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import Config, ConfigError, validate
from .errors import CheckpointError

FORMAT = "pointbert"
FORMAT_VERSION = 1


def build_model(cfg: Config) -> nn.Module:
    """The model of ``cfg.kind``, freshly initialised as the official code does."""
    if cfg.kind == "tokenizer":
        from .tokenizer import DiscreteVAE

        return DiscreteVAE(cfg)
    if cfg.kind == "pretrain":
        from .mpm import PointBERT

        return PointBERT(cfg)
    if cfg.kind == "classifier":
        from .heads import Classifier

        return Classifier(cfg)
    if cfg.kind == "partseg":
        from .heads import PartSegmenter

        return PartSegmenter(cfg)
    raise ConfigError(f"unknown model kind {cfg.kind!r}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one."""
    path = Path(path)
    if path.is_dir() or not path.name:
        raise IsADirectoryError(21, "is a folder; give a file name", str(path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:  # name the file the user asked for, not the temporary one
        raise OSError(e.errno, f"cannot write here ({e.strerror})", str(path)) from None
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # as open() would create it, not mkstemp's owner-only 0600
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(path: str | Path, cfg: Config, model: nn.Module | dict[str, torch.Tensor],
                    **extra: Any) -> None:
    """Atomically save a self-describing checkpoint. ``extra`` holds optimizer state, step, metrics, ..."""
    state = model.state_dict() if isinstance(model, nn.Module) else model
    state = {k: v.detach().cpu() for k, v in state.items()}
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": cfg.kind,
               "config": cfg.to_dict(), "model": state, **extra}
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | Path, kinds: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Read a pointbert checkpoint safely (weights only) and check its format and kind.

    An official Point-BERT ``.pth`` (dVAE, pre-trained, fine-tuned, part segmentation) is converted in
    memory as ``pointbert import`` would with its defaults, with a note on stderr, so every command and
    ``--init`` / ``--tokenizer`` accept the released files as they are."""
    from .official import looks_official, official_checkpoint, read_official

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file" + (" (a folder)" if path.is_dir() else ""))
    ckpt = read_official(path)  # weights only: a file that needs code is refused, naming what it needs
    if isinstance(ckpt, dict) and ckpt.get("format") != FORMAT and looks_official(ckpt):
        ckpt, report = official_checkpoint(ckpt, where=str(path))
        c = ckpt["config"]
        print(f"note: {path} is an official Point-BERT {report.kind} file, converted in memory for "
              f"{c['data']['num_points']} points in {c['patches']['num_patches']} patches (`pointbert import "
              f"--num-points N --num-patches G` converts it for other sizes and saves it)",
              file=sys.stderr, flush=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a pointbert checkpoint")
    if not isinstance(ckpt.get("model"), dict) or not isinstance(ckpt.get("config"), dict) \
            or not isinstance(ckpt.get("format_version", 0), int):
        raise CheckpointError(f"{path}: a damaged pointbert checkpoint (its model, config or format_version "
                              "entry is missing or of the wrong type)")
    if ckpt.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: written by a newer pointbert (format {ckpt['format_version']}); upgrade")
    if kinds is not None and ckpt.get("kind") not in kinds:
        raise CheckpointError(f"{path}: is a {ckpt.get('kind')} checkpoint, expected {' or '.join(kinds)}")
    return ckpt


def config_of(ckpt: dict[str, Any], where: str = "checkpoint") -> Config:
    try:
        return validate(Config.from_dict(ckpt["config"]))
    except (KeyError, ConfigError) as e:
        raise CheckpointError(f"{where}: invalid stored config ({e})") from None


def describe_mismatch(model: nn.Module, state: dict[str, Any]) -> str:
    """Why ``state`` does not load strictly into ``model``, in one line: missing, unexpected, other shapes."""
    own = model.state_dict()
    parts = []
    for what, names in (("missing", [k for k in own if k not in state]),
                        ("unexpected", [k for k in state if k not in own]),
                        ("other shape", [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
                                         if k in state and hasattr(state[k], "shape")
                                         and state[k].shape != own[k].shape])):
        if names:
            parts.append(f"{len(names)} {what}, e.g. {', '.join(names[:2])}")
    return "; ".join(parts) or "the tensors do not load"


def load_model(path: str | Path, kinds: tuple[str, ...] | None = None,
               device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model from the file alone, load its weights strictly, put it in eval mode."""
    ckpt = load_checkpoint(path, kinds)
    cfg = config_of(ckpt, str(path))
    model = build_model(cfg)
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError:
        raise CheckpointError(f"{path}: weights do not match the stored config "
                              f"({describe_mismatch(model, ckpt['model'])})") from None
    return model.to(device).eval(), ckpt


def export_safetensors(path: str | Path, cfg: Config, model: nn.Module | dict[str, torch.Tensor],
                       **metadata: str) -> None:
    """Write the weights as safetensors; the config travels as JSON in the metadata."""
    from safetensors.torch import save

    state = model.state_dict() if isinstance(model, nn.Module) else model
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    meta = {"format": FORMAT, "kind": cfg.kind, "config": json.dumps(cfg.to_dict()), **metadata}
    atomic_write_bytes(path, save(state, metadata=meta))


def load_safetensors(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, Config]:
    """Rebuild a model from a safetensors file written by :func:`export_safetensors`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if meta.get("format") != FORMAT or "config" not in meta:
        raise CheckpointError(f"{path}: safetensors file without a pointbert config in its metadata")
    cfg = config_of({"config": json.loads(meta["config"])}, str(path))
    model = build_model(cfg)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), cfg
