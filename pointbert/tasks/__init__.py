"""Training stages as small :class:`~pointbert.engine.Task` recipes, one module per stage.

Shared by every stage command: :func:`config_from_args` (command-line flags -> a validated
:class:`~pointbert.config.Config`), :func:`resolve_device` and :func:`out_dir`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import (
    Config,
    ConfigError,
    apply_dict,
    apply_overrides,
    build_config,
    load_yaml,
    preset,
    validate,
)
from ..engine import resolve_device

__all__ = ["config_from_args", "resolve_device", "out_dir", "apply_data_arg"]

# Flags of `_add_train_args` that override one config field each (None = not given).
_FLAG_FIELDS = {"seed": "train.seed", "epochs": "train.epochs", "batch_size": "train.batch_size",
                "precision": "train.precision"}


def out_dir(args: Any, stage: str) -> Path:
    """The run folder: ``--out`` or ``runs/<stage>``."""
    return Path(getattr(args, "out", None) or Path("runs") / stage)


def apply_data_arg(cfg: Config, data: str | None) -> Config:
    """``--data``: a built-in dataset name (``synthetic``, or an official one whose folder is ``data.path``)
    or a dataset folder whose format is detected (``pointbert data inspect`` tells what it sees)."""
    if not data:
        return cfg
    from ..data import DATASETS

    path = Path(data).expanduser()
    if path.exists():
        from ..data.inspect import detect_format

        fmt = detect_format(path)
        if fmt == "files":
            fmt = "folder"  # a flat folder of clouds: FolderDataset explains what is missing
        if fmt == "file":
            raise ConfigError(f"--data {data}: is a single file; training needs a dataset folder "
                              "(one subfolder per class, or an official dataset layout)")
        if fmt not in DATASETS:
            raise ConfigError(f"--data {data}: detected a {fmt!r} dataset, which this loader does not read")
        # absolute: `evaluate CKPT` and `--resume` read it again from any working directory
        return apply_dict(cfg, {"data": {"dataset": fmt, "path": str(path.resolve())}}, where="--data")
    if data in DATASETS:
        return apply_dict(cfg, {"data": {"dataset": data}}, where="--data")
    raise ConfigError(f"--data {data}: no such folder, and not a built-in dataset ({', '.join(DATASETS)})")


def _resume_config(args: Any, stage: str) -> Config | None:
    """With ``--resume`` and a ``last.pt`` in the run folder (or, for few-shot, in its first fold folder):
    the config stored in it."""
    if not getattr(args, "resume", False):
        return None
    out = out_dir(args, stage)
    last = out / "last.pt"
    if not last.is_file():
        last = next(iter(sorted(out.glob("fold_*/last.pt"))), last)
    if not last.is_file():
        return None  # fit() reports the missing checkpoint
    from ..checkpoint import config_of, load_checkpoint

    return config_of(load_checkpoint(last), str(last))


def config_from_args(args: Any, kind: str, default_preset: str, stage: str | None = None) -> Config:
    """preset (``--preset``, a YAML ``preset:`` key, else ``default_preset``) -> ``--config`` YAML ->
    ``--data`` -> the flags ``--seed --epochs --batch-size --precision`` -> dotted overrides -> validate.

    With ``--resume`` and an existing ``<out>/last.pt`` the base is the config stored in the checkpoint
    instead of a preset (so ``--resume`` alone continues the run as it was started); ``--config``, flags
    and overrides given again are applied on top (e.g. ``--epochs 400`` to extend a run).
    ``stage`` names the default run folder ``runs/<stage>`` (default: ``kind``).
    """
    yaml_path = getattr(args, "config", None)
    base = _resume_config(args, stage or kind)
    if base is not None:
        if base.kind != kind:
            raise ConfigError(f"the checkpoint to resume is a {base.kind} run, this command trains a {kind}")
        cfg = base
        if yaml_path:
            cfg = apply_dict(cfg, {k: v for k, v in load_yaml(yaml_path).items() if k != "preset"},
                             where=str(yaml_path))
    else:
        name = getattr(args, "preset", None)
        if name is None and not (yaml_path and "preset" in load_yaml(yaml_path)):
            name = default_preset
        cfg = build_config(name, yaml_path, [], kind=kind) if (name or yaml_path) else preset(default_preset)
    cfg = apply_data_arg(cfg, getattr(args, "data", None))
    flags = []
    for attr, key in _FLAG_FIELDS.items():
        value = getattr(args, attr, None)
        if value is not None:
            flags.append(f"{key}={value}")
    cfg = apply_overrides(cfg, flags, where="flag")
    cfg = apply_overrides(cfg, list(getattr(args, "overrides", None) or []))
    if base is not None:
        changed = _changes(base.to_dict(), cfg.to_dict())
        if changed:
            print(f"note: resuming with changed settings: {'; '.join(changed)}", flush=True)
    return validate(cfg)


def _changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``section.field old -> new`` for every value that differs between two config dicts."""
    out = []
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(old.get(k), dict):
            out += _changes(old[k], v, f"{prefix}{k}.")
        elif old.get(k) != v:
            out.append(f"{prefix}{k} {old.get(k)} -> {v}")
    return out


def check_init(init: str | Path | None, scratch: bool, resume: bool, what: str) -> None:
    """Fine-tuning starts from exactly one of ``--init CHECKPOINT`` or ``--scratch`` (or resumes a run)."""
    from ..errors import CheckpointError

    if init and scratch:
        raise ConfigError("pass either --init CHECKPOINT or --scratch, not both")
    if not init and not scratch and not resume:
        raise ConfigError(f"pass --init CHECKPOINT ({what}) to fine-tune pre-trained weights, or --scratch "
                          "to train from random initialisation")
    if init and not Path(init).is_file():
        raise CheckpointError(f"{init}: no such checkpoint file")
