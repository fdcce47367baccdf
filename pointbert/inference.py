"""Inference with a trained or imported model: ``pointbert predict | tokenize | embed | segment``.

    INPUT (.npy (N,3+) or (B,N,3+), one point-cloud file, or a folder of them)
      -> load_clouds: (B, N, 3) float32 + names   [optional --normalize; FPS from point 0 to num_points]
      -> batches under torch.inference_mode(), model in eval mode
      -> predict:  logits (B, num_classes) float32    (classifier; --vote V averages V random views)
         tokenize: token ids (B, G) int64              (tokenizer, or pretrain: its own tokenizer)
         embed:    features (B, 2*dim) float32         (pretrain or classifier backbone: [cls ; max])
         segment:  part labels (B, N) int64            (part segmentation, clouds of one --category)

Everything is deterministic: FPS and kNN have no randomness, voting views come from ``seed``, and
the results do not depend on the batch size (BatchNorm uses its running statistics).

Tokens are computed in eval mode, i.e. the dVAE's BatchNorm uses its running statistics. The official
pre-training computes its targets with the frozen dVAE in train mode (batch statistics, spec 11.8), so
ids there can differ from these for the same cloud.
"""

from __future__ import annotations

import argparse
import io
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .checkpoint import atomic_write_bytes, config_of, load_model
from .engine import resolve_device
from .errors import DataError, PointBERTError

Points = np.ndarray | Tensor
FPS_CHUNK = 64  # clouds per batched FPS call


# --------------------------------------------------------------------------------------------------
# Reading the input
# --------------------------------------------------------------------------------------------------


Cloud = tuple[str, str, np.ndarray]  # (name printed with the results, source named in messages, (N, 3))


def _read_input(path: Path) -> list[Cloud]:
    """Every cloud in a file or a folder (its supported files, sorted by name); DataError naming the file."""
    from .data.io import SUPPORTED_EXTENSIONS, read_clouds

    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")
                       and p.suffix.lower() in SUPPORTED_EXTENSIONS)
        if not files:
            raise DataError(f"{path}: no point-cloud files in this folder "
                            f"(expected {' '.join(SUPPORTED_EXTENSIONS)})")
        from tqdm.auto import tqdm

        bar = tqdm(files, desc="reading", unit="file", leave=False, dynamic_ncols=True, disable=len(files) < 50)
        return [cloud for f in bar for cloud in read_clouds(f)]
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    return read_clouds(path)


def load_clouds(input: str | Path, num_points: int, normalize: bool = False, *, min_points: int = 1,
                seed: int = 0, warn: Callable[[str], None] | None = None) -> tuple[np.ndarray, list[str]]:
    """Read ``input`` into one batch of equally sized clouds.

    Args:
        input: a .npy of shape (N, 3+) or (B, N, 3+) (columns after x, y, z are ignored), any one file
            :func:`pointbert.data.io.read_points` reads, or a folder of such files (sorted by name).
        num_points: points per cloud fed to the model. Larger clouds are reduced by farthest point
            sampling from point 0 (deterministic).
        normalize: centre each cloud and scale it into the unit sphere first (default: as given).
        min_points: the fewest points a cloud may have (the model's max(num_patches, patch_size)):
            fewer is a DataError.
        seed: seed of the random repeats that fill up short clouds.
        warn: called with one line per resampled cloud (default :func:`warnings.warn`).

    Returns:
        points (B, N, 3) float32 and the B cloud names. N = num_points, except when every cloud has the
        same size n < num_points (n >= min_points): then the clouds are used as they are (N = n).
        Clouds of mixed sizes below num_points are filled up by repeating random points, with a warning.
    """
    from .data.io import fit_points
    from .data.io import normalize as unit_sphere

    warn = warn or (lambda msg: warnings.warn(msg, stacklevel=3))
    items = _read_input(Path(input))
    names, sources, clouds = (list(t) for t in zip(*items))
    for source, c in zip(sources, clouds):
        if len(c) < min_points:
            raise DataError(f"{source}: too few points ({len(c)}); the model needs at least {min_points}")
    if normalize:
        clouds = [unit_sphere(c, source=source) for source, c in zip(sources, clouds)]
    sizes = {len(c) for c in clouds}
    if len(sizes) == 1 and max(sizes) <= num_points:
        return np.stack(clouds), names  # all the same size, none larger: as given
    out = np.empty((len(clouds), num_points, 3), dtype=np.float32)
    _fps_into(out, clouds, num_points)
    rng = np.random.default_rng(seed)
    for i, c in enumerate(clouds):
        if len(c) < num_points:
            out[i], msg = fit_points(c, num_points, rng=rng)
            warn(f"{sources[i]}: {msg}")
    return out, names


def _fps_into(out: np.ndarray, clouds: list[np.ndarray], num_points: int) -> None:
    """out[i] = clouds[i] if it has num_points points, FPS(clouds[i], num_points) from point 0 if more."""
    from .ops import fps, gather

    by_size: dict[int, list[int]] = {}
    for i, c in enumerate(clouds):
        if len(c) == num_points:
            out[i] = c
        elif len(c) > num_points:
            by_size.setdefault(len(c), []).append(i)
    for idx in by_size.values():
        for j in range(0, len(idx), FPS_CHUNK):
            part = idx[j: j + FPS_CHUNK]
            x = torch.from_numpy(np.stack([clouds[i] for i in part]))  # (b, n, 3)
            out[part] = gather(x, fps(x, num_points)).numpy()


# --------------------------------------------------------------------------------------------------
# Batched model calls
# --------------------------------------------------------------------------------------------------


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _batches(fn: Callable[[Tensor, int], Tensor], points: Points, batch_size: int, desc: str) -> np.ndarray:
    """Concatenate ``fn(batch (b, N, 3) float32 on the CPU, offset of its first cloud)`` over batches.

    A progress bar (stderr) appears for three or more batches.
    """
    from tqdm import tqdm

    points = torch.as_tensor(points, dtype=torch.float32, device="cpu")
    if points.dim() != 3 or points.shape[-1] != 3:
        raise DataError(f"points must have shape (B, N, 3), got {tuple(points.shape)}")
    starts = range(0, len(points), batch_size)
    bar = tqdm(starts, desc=desc, unit="batch", file=sys.stderr, leave=False, disable=len(starts) < 3)
    return torch.cat([fn(points[s: s + batch_size], s).cpu() for s in bar]).numpy()


@torch.inference_mode()
def predict(model: nn.Module, points: Points, *, batch_size: int = 32, vote: int = 0,
            num_points: int | None = None, seed: int = 0) -> np.ndarray:
    """Class logits (B, num_classes) float32 of a classifier in eval mode.

    Args:
        points: (B, N, 3). Without voting the clouds are fed as they are.
        vote: V > 0 averages the logits of V random views per cloud (spec 6.3). ``points`` is then the
            FPS pool (B, P, 3) of each cloud (``data.point_pool`` points, 1200 for 1024); each view is
            one random subset of ``num_points`` pool indices (the same for every cloud, as in the
            official batch), then a random scale-and-translate per cloud. Views come from ``seed``
            alone (one generator per cloud), so the result does not depend on the batch size.
        num_points: points per view (voting only; default and at most P).
    """
    model.eval()
    device = _device_of(model)
    if vote <= 0:
        return _batches(lambda x, _: model(x.to(device)).float(), points, batch_size, "predict")
    from .data.transforms import scale_translate

    pool = torch.as_tensor(points).shape[1]
    n = min(num_points or pool, pool)
    rng = np.random.default_rng(seed)
    subsets = [torch.from_numpy(rng.choice(pool, n, replace=False)) for _ in range(vote)]

    def voted(x: Tensor, offset: int) -> Tensor:
        views = []
        for b in range(len(x)):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + offset + b)
            views += [scale_translate(x[b: b + 1, s], gen) for s in subsets]  # V x (1, n, 3)
        logits = model(torch.cat(views).to(device)).float()  # (b*V, C)
        return logits.view(len(x), vote, -1).mean(dim=1)

    return _batches(voted, points, max(1, batch_size // vote), "predict (vote)")


@torch.inference_mode()
def tokenize(model: nn.Module, points: Points, *, batch_size: int = 32) -> np.ndarray:
    """Token ids (B, G) int64: argmax of the dVAE logits, BatchNorm with running statistics (eval mode).

    ``model`` is a ``DiscreteVAE`` or a ``PointBERT`` (its frozen tokenizer is used).
    """
    tokenizer = getattr(model, "tokenizer", model).eval()
    device = _device_of(tokenizer)
    return _batches(lambda x, _: tokenizer.tokenize(x.to(device)), points, batch_size, "tokenize")


@torch.inference_mode()
def embed(model: nn.Module, points: Points, *, batch_size: int = 32) -> np.ndarray:
    """Global features (B, 2*dim) float32: [cls ; max over patches] after the final LayerNorm, no masking.

    ``model`` is a ``Classifier`` or a ``PointBERT`` (its query backbone) or a ``Backbone``.
    """
    backbone = getattr(model, "backbone", model).eval()
    device = _device_of(backbone)
    return _batches(lambda x, _: backbone(x.to(device)).float(), points, batch_size, "embed")


@torch.inference_mode()
def segment(model: nn.Module, points: Points, category: int, parts: Sequence[int], *,
            batch_size: int = 32) -> np.ndarray:
    """Part labels (B, N) int64 of a part segmentation model in eval mode for clouds of one ``category``:
    the argmax over that category's ``parts`` only, as the official evaluation (spec 6.5)."""
    model.eval()
    device = _device_of(model)
    allowed = torch.tensor(list(parts), device=device)

    def labels(x: Tensor, _: int) -> Tensor:
        cat = torch.full((len(x),), category, dtype=torch.long, device=device)
        return allowed[model(x.to(device), cat).float()[..., allowed].argmax(-1)]

    return _batches(labels, points, batch_size, "segment")


# --------------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------------

#: a cloud reaching further than this from its centre was not normalised (pc_norm puts it inside radius 1)
FAR_FROM_UNIT_SPHERE = 2.0

KINDS = {"predict": ("classifier",), "tokenize": ("tokenizer", "pretrain"),
         "embed": ("pretrain", "classifier"), "segment": ("partseg",)}


def _setup(args: argparse.Namespace, command: str, pool: bool = False):
    """(model, checkpoint dict, points (B, N, 3), names, points per view) for a command.

    With ``pool`` (voting) the clouds are read at ``data.point_pool`` points: the FPS pool of the views.
    """
    for flag in ("batch_size", "num_points"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise PointBERTError(f"--{flag.replace('_', '-')} must be positive, got {value}")
    model, ckpt = load_model(args.checkpoint, kinds=KINDS[command], device=resolve_device(args.device))
    cfg = config_of(ckpt, str(args.checkpoint))
    num_points = args.num_points or cfg.data.num_points
    need = max(cfg.patches.num_patches, cfg.patches.patch_size)
    if num_points < need:
        raise PointBERTError(f"--num-points {num_points}: the model groups {cfg.patches.num_patches} patches "
                             f"of {cfg.patches.patch_size} points, it needs at least {need}")
    if Path(args.out).is_dir():
        raise PointBERTError(f"--out {args.out}: is a folder; give a file name such as {Path(args.out) / 'out.npy'}")
    for what, given in (("checkpoint", args.checkpoint), ("input", args.input)):
        if Path(args.out).resolve() == Path(given).resolve():
            raise PointBERTError(f"--out {args.out}: is the {what}; writing there would destroy it")
    read = max(num_points, cfg.data.point_pool) if pool else num_points
    say = lambda m: print(f"pointbert {command}: warning: {m}", file=sys.stderr)  # noqa: E731
    points, names = load_clouds(args.input, read, args.normalize, min_points=need, warn=say)
    if not args.normalize:
        radius = np.linalg.norm(points - points.mean(1, keepdims=True), axis=-1).max()
        if radius > FAR_FROM_UNIT_SPHERE:
            say(f"{args.input}: clouds reach {radius:.3g} from their centre; the models are trained on clouds "
                "inside the unit sphere: pass --normalize")
    return model, ckpt, points, names, num_points


def _show(lines: Iterable[str], most: int = 10) -> None:
    """Print the first ``most`` lines, then how many more there are (the full list goes to a file)."""
    lines = list(lines)
    for line in lines[:most]:
        print(line)
    if len(lines) > most:
        print(f"... {len(lines) - most} more")


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _save(out: str, array: np.ndarray, what: str, names: list[str]) -> None:
    """Write ``array`` to exactly ``out`` and the cloud names, one per row, to ``<out stem>.names.txt``
    (both atomically: an interrupted run leaves the old files or the new ones)."""
    path = Path(out)
    atomic_write_bytes(path, _npy_bytes(array))
    listing = path.with_name(path.stem + ".names.txt")
    atomic_write_bytes(listing, "".join(f"{n}\n" for n in names).encode())
    print(f"wrote {what} {tuple(array.shape)} {array.dtype} to {path} (row names in {listing.name})", flush=True)


def predict_command(args: argparse.Namespace) -> int:
    """``pointbert predict CKPT INPUT --out logits.npy [--vote V] [--top K] ...``."""
    if args.vote < 0:
        raise PointBERTError(f"--vote must be >= 0, got {args.vote}")
    if args.top < 1:
        raise PointBERTError(f"--top must be positive, got {args.top}")
    model, ckpt, points, names, num_points = _setup(args, "predict", pool=args.vote > 0)
    logits = predict(model, points, batch_size=args.batch_size, vote=args.vote, num_points=num_points,
                     seed=getattr(args, "seed", 0))
    classes = ckpt.get("class_names") or []
    if len(classes) != logits.shape[1]:
        classes = [str(i) for i in range(logits.shape[1])]
    probs = torch.from_numpy(logits).softmax(dim=1)
    top = probs.topk(min(args.top, probs.shape[1]), dim=1)
    width = max(map(len, names))
    for name, p, idx in zip(names, top.values.tolist(), top.indices.tolist()):
        print(f"{name:<{width}}  " + "  ".join(f"{classes[i]} ({q:.3f})" for i, q in zip(idx, p)))
    _save(args.out, logits, "logits", names)
    return 0


def tokenize_command(args: argparse.Namespace) -> int:
    """``pointbert tokenize CKPT INPUT --out tokens.npy``: (B, G) int64 token ids."""
    model, _, points, names, _ = _setup(args, "tokenize")
    tokens = tokenize(model, points, batch_size=args.batch_size)
    width = max(map(len, names))
    for name, row in zip(names, tokens):
        shown = " ".join(map(str, row[:8])) + (" ..." if len(row) > 8 else "")
        print(f"{name:<{width}}  {len(np.unique(row))} distinct of {len(row)}: {shown}")
    _save(args.out, tokens, "token ids", names)
    return 0


def embed_command(args: argparse.Namespace) -> int:
    """``pointbert embed CKPT INPUT --out features.npy``: (B, 2*dim) float32 features."""
    model, _, points, names, _ = _setup(args, "embed")
    features = embed(model, points, batch_size=args.batch_size)
    _show(f"{i}  {name}" for i, name in enumerate(names))
    _save(args.out, features, "features", names)
    return 0


def resolve_category(table: dict, given: str) -> tuple[int, str, list[int]]:
    """(index, name, part labels) of the category named ``given`` (case-insensitive) or numbered by it in a
    :func:`~pointbert.tasks.partseg.category_parts` table."""
    cats = [str(c) for c in table]
    given = given.strip()
    index = next((i for i, c in enumerate(cats) if c.lower() == given.lower()), None)
    if index is None and given.isdigit() and int(given) < len(cats):
        index = int(given)
    if index is None:
        raise PointBERTError(f"--category {given!r}: not one of {', '.join(cats)} (or 0-{len(cats) - 1})")
    return index, cats[index], list(table[list(table)[index]])


def segment_command(args: argparse.Namespace) -> int:
    """``pointbert segment CKPT INPUT --category Chair --out parts.npy``: (B, N) int64 part labels."""
    from .tasks.partseg import category_parts

    model, ckpt, points, names, _ = _setup(args, "segment")
    index, category, parts = resolve_category(category_parts(config_of(ckpt, str(args.checkpoint)).data.dataset),
                                              args.category)
    labels = segment(model, points, index, parts, batch_size=args.batch_size)
    width = max(map(len, names))
    _show(f"{name:<{width}}  {category}: " + "  ".join(f"part {p} {n}" for p, n in zip(parts, counts))
          for name, counts in zip(names, (np.bincount(row, minlength=max(parts) + 1)[parts] for row in labels)))
    _save(args.out, labels, "part labels", names)
    where = Path(args.out).with_name(Path(args.out).stem + ".points.npy")
    atomic_write_bytes(where, _npy_bytes(points.astype(np.float32)))
    print(f"wrote the points labelled {tuple(points.shape)} to {where}")
    return 0
