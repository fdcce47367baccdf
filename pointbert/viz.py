"""PNG renders (matplotlib, Agg backend: works headless).

* :func:`plot_curves`: the training curves of a run folder's ``metrics.jsonl``.
* :func:`render_panels`, :func:`patch_panels`: clouds, patches, masks, token ids, reconstructions.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["plot_curves", "render_panels", "patch_panels"]

_SKIP = {"kind", "step", "epoch", "time", "lr", "samples_per_s"}


def _read_rows(jsonl_path: Path) -> list[dict]:
    rows = []
    for line in jsonl_path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def plot_curves(jsonl_path: str | Path, png_path: str | Path) -> Path | None:
    """Write ``png_path``: training loss (and other logged train scalars), learning rate and evaluation
    metrics against the optimizer step, read from a ``metrics.jsonl`` written by :func:`pointbert.engine.fit`.

    Panels: "train loss" (every train scalar whose name contains ``loss``; log scale when it spans more
    than an order of magnitude), "learning rate", one "train <name>" panel per other train scalar
    (e.g. ``acc``, ``grad_norm``), and one "eval <name>" panel per evaluation metric (points; best and
    last value in the title, best = min for names containing ``loss``, else max).
    Returns the path, or None when there is nothing to plot.
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend state, works headless

    jsonl_path, png_path = Path(jsonl_path), Path(png_path)
    rows = _read_rows(jsonl_path) if jsonl_path.is_file() else []
    train = [r for r in rows if r.get("kind", "train") == "train"]
    evals = [r for r in rows if r.get("kind") == "eval"]
    if not train and not evals:
        return None

    def keys(rs: list[dict]) -> list[str]:
        seen: dict[str, None] = {}
        for r in rs:
            for k, v in r.items():
                if k not in _SKIP and isinstance(v, (int, float)) and not isinstance(v, bool):
                    seen[k] = None
        return list(seen)

    train_keys, eval_keys = keys(train), keys(evals)
    loss_keys = [k for k in train_keys if "loss" in k]
    other_train = [k for k in train_keys if "loss" not in k]
    panels: list[tuple[str, list[dict], list[str]]] = []
    if loss_keys:
        panels.append(("train loss", train, loss_keys))
    if any("lr" in r for r in train):
        panels.append(("learning rate", train, ["lr"]))
    panels += [(f"train {k}", train, [k]) for k in other_train]
    panels += [(f"eval {k}", evals, [k]) for k in eval_keys]

    cols = min(3, len(panels))
    nrows = -(-len(panels) // cols)
    fig = Figure(figsize=(4.6 * cols, 3.2 * nrows))
    axes = fig.subplots(nrows, cols, squeeze=False)
    for ax, (title, rs, ks) in zip(axes.flat, panels):
        for k in ks:
            pts = [(r["step"], r[k]) for r in rs if isinstance(r.get(k), (int, float))]
            if not pts:
                continue
            x, y = zip(*pts)
            style = dict(marker="o", markersize=3) if rs is evals else {}
            ax.plot(x, y, label=k, linewidth=1.2, **style)
            if rs is evals:
                best = max(y) if "loss" not in k else min(y)
                ax.set_title(f"{title} (best {best:.4g}, last {y[-1]:.4g})", fontsize=10)
        if rs is not evals:
            ax.set_title(title, fontsize=10)
        values = [r[k] for r in rs for k in ks if isinstance(r.get(k), (int, float))]
        if title == "train loss" and values and min(values) > 0 \
                and max(values) > 20 * min(values):
            ax.set_yscale("log")  # only when the values span more than an order of magnitude
        if len(ks) > 1:
            ax.legend(fontsize=8)
        ax.set_xlabel("step", fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    last_epoch = max(r.get("epoch", 0) for r in rows)
    fig.suptitle(f"{jsonl_path.parent.name or jsonl_path.parent.resolve().name}: "
                 f"{max(r.get('step', 0) for r in rows)} steps, {last_epoch + 1} epochs", fontsize=11)
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    return png_path


# --------------------------------------------------------------------------------------------------
# Point-cloud pictures: clouds, patches, masks, tokens, reconstructions
# --------------------------------------------------------------------------------------------------

_PATCH_COLORS = "tab20"


def _scatter(ax, pts, colors=None, size: float = 2.0, cmap=None, alpha: float = 1.0) -> None:
    """3-D scatter of (N, 3) points with y up (ShapeNet/ModelNet convention), equal aspect."""
    import numpy as np

    pts = np.asarray(pts, dtype=np.float32)
    c = pts[:, 1] if colors is None else np.asarray(colors)
    extra = {"cmap": cmap or "viridis"} if c.ndim == 1 else {}  # values through a colormap, or RGB(A)
    # view: x right, z towards the viewer, y up
    ax.scatter(pts[:, 0], pts[:, 2], pts[:, 1], c=c, s=size, alpha=alpha, linewidths=0, depthshade=False,
               **extra)
    lo, hi = pts.min(0), pts.max(0)
    mid, half = (lo + hi) / 2, max(float((hi - lo).max()) / 2, 1e-6)
    ax.set_xlim(mid[0] - half, mid[0] + half)
    ax.set_ylim(mid[2] - half, mid[2] + half)
    ax.set_zlim(mid[1] - half, mid[1] + half)
    ax.view_init(elev=20, azim=-60)
    ax.set_axis_off()


def render_panels(panels: list[dict], png_path: str | Path, cols: int | None = None,
                  title: str | None = None, panel_size: float = 3.0) -> Path:
    """Write a grid of 3-D scatter panels to ``png_path``.

    Each panel is a dict: ``points`` (N, 3), optional ``colors`` (N,) values or (N, 3/4) RGB(A),
    ``cmap``, ``size``, ``title``, and ``overlay``: another (M, 3) set drawn on top in black
    (e.g. patch centers).
    """
    from matplotlib.figure import Figure

    n = len(panels)
    cols = cols or min(n, 4)
    rows = -(-n // cols)
    fig = Figure(figsize=(panel_size * cols, panel_size * rows + (0.4 if title else 0)))
    for i, p in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1, projection="3d")
        _scatter(ax, p["points"], p.get("colors"), p.get("size", 2.0), p.get("cmap"))
        if p.get("overlay") is not None:
            o = p["overlay"]
            ax.scatter(o[:, 0], o[:, 2], o[:, 1], c="black", s=8, depthshade=False)
        if p.get("title"):
            ax.set_title(p["title"], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    return png_path


def patch_panels(neighborhoods, centers, mask=None, tokens=None, title: str = "") -> list[dict]:
    """Panels for one cloud's patches: colored by patch, masked patches grey, and by token id.

    neighborhoods (G, K, 3) local, centers (G, 3), mask (G,) bool, tokens (G,) int.
    """
    import numpy as np

    nb = np.asarray(neighborhoods, dtype=np.float32)
    c = np.asarray(centers, dtype=np.float32)
    mask = None if mask is None else np.asarray(mask, dtype=bool)
    tokens = None if tokens is None else np.asarray(tokens)
    G, K, _ = nb.shape
    pts = (nb + c[:, None]).reshape(-1, 3)
    patch_id = np.repeat(np.arange(G), K)
    panels = [{"points": pts, "colors": patch_id % 20, "cmap": _PATCH_COLORS, "overlay": c,
               "title": f"{title}\n{G} patches of {K} points" if title else f"{G} patches of {K} points"}]
    if mask is not None:
        m = np.repeat(np.asarray(mask, dtype=bool), K)
        rgba = np.where(m[:, None], [0.8, 0.8, 0.8, 0.25], [0.12, 0.47, 0.71, 1.0])
        panels.append({"points": pts, "colors": rgba, "title": f"masked {int(np.sum(mask))}/{G} (grey)"})
    if tokens is not None:
        t = np.repeat(np.asarray(tokens), K)
        panels.append({"points": pts, "colors": t % 20, "cmap": _PATCH_COLORS,
                       "title": f"token ids ({len(np.unique(tokens))} distinct)"})
    return panels


def masked_prediction_panel(tokenizer, neighborhoods, centers, mask, target, predicted) -> dict:
    """One cloud's masked point modeling result: the visible patches as given (blue) and, in the masked
    places, the tokenizer's decoding of the PREDICTED token ids (red); the title gives the share of masked
    patches whose predicted id equals the tokenizer's.

    neighborhoods (G, K, 3) local, centers (G, 3), mask (G,) bool, target and predicted (G,) int.
    """
    import numpy as np

    _, fine = tokenizer.decode(predicted[None], centers[None])
    guessed = (fine[0] + centers[:, None])[mask].reshape(-1, 3).numpy()
    visible = (neighborhoods + centers[:, None])[~mask].reshape(-1, 3).numpy()
    pts = np.concatenate([visible, guessed])
    rgba = np.concatenate([np.tile([0.12, 0.47, 0.71, 1.0], (len(visible), 1)),
                           np.tile([0.84, 0.15, 0.16, 1.0], (len(guessed), 1))])
    right = float((predicted[mask] == target[mask]).float().mean()) if bool(mask.any()) else float("nan")
    return {"points": pts, "colors": rgba,
            "title": f"masked patches predicted (red)\n{100 * right:.0f}% of ids right"}


def render_command(args) -> int:
    """``pointbert render CKPT INPUT --out file.png``: each cloud with its patches and what the model makes
    of them: token ids and the tokenizer's reconstruction (tokenizer / pre-training checkpoints; the
    pre-training ones also show a mask and the decoded token predictions for the masked patches), the
    predicted class (classifiers) or the predicted parts (part segmentation, with ``--category``)."""
    import numpy as np
    import torch

    from .checkpoint import config_of, load_model
    from .errors import PointBERTError
    from .inference import load_clouds

    if args.max_clouds < 1:
        raise PointBERTError(f"--max-clouds must be positive, got {args.max_clouds}")
    model, ckpt = load_model(args.checkpoint, ("tokenizer", "pretrain", "classifier", "partseg"))
    cfg = config_of(ckpt, args.checkpoint)
    if cfg.kind == "partseg" and not getattr(args, "category", None):
        raise PointBERTError(f"{args.checkpoint}: a part segmentation checkpoint; give the clouds' --category")
    num_points, need = args.num_points or cfg.data.num_points, max(cfg.patches.num_patches, cfg.patches.patch_size)
    if num_points < need:
        raise PointBERTError(f"--num-points {num_points}: the model groups {cfg.patches.num_patches} patches of "
                             f"{cfg.patches.patch_size} points, it needs at least {need}")
    if Path(args.out).suffix.lower() not in (".png", ".jpg", ".jpeg", ".pdf", ".svg"):
        raise PointBERTError(f"--out {args.out}: give a picture file name (.png, .jpg, .pdf or .svg)")
    points, names = load_clouds(args.input, num_points, args.normalize, min_points=need)
    points = torch.from_numpy(points[: args.max_clouds])
    tokenizer = model if cfg.kind == "tokenizer" else getattr(model, "tokenizer", None)
    panels: list[dict] = []
    torch.manual_seed(0)
    with torch.no_grad():
        if cfg.kind == "pretrain":
            nb, centers, mask, ids, predicted = model.eval().predict_masked(points)
        elif tokenizer is not None:
            nb, centers = tokenizer.group(points)
            ids, mask, predicted = tokenizer.tokenize_patches(nb, centers), None, None
        if tokenizer is not None:
            _, fine = tokenizer.decode(ids, centers)
            recon = (fine + centers[:, :, None]).flatten(1, 2)
            for b, name in enumerate(names[: len(points)]):
                panels += patch_panels(nb[b], centers[b], None if mask is None else mask[b], ids[b],
                                       title=str(name))
                panels.append({"points": recon[b].numpy(), "title": "reconstruction from the token ids"})
                if predicted is not None:
                    panels.append(masked_prediction_panel(tokenizer, nb[b], centers[b], mask[b], ids[b],
                                                          predicted[b]))
        elif cfg.kind == "partseg":
            from matplotlib import colormaps

            from .inference import resolve_category, segment
            from .tasks.partseg import category_parts

            index, category, parts = resolve_category(category_parts(cfg.data.dataset), args.category)
            labels = segment(model, points, index, parts, batch_size=len(points))
            nb, centers = model.backbone.group(points)
            for b, name in enumerate(names[: len(points)]):
                panels += patch_panels(nb[b], centers[b], title=str(name))
                colors = colormaps["tab10"]((labels[b] - min(parts)) % 10)  # same part, same colour in every panel
                panels.append({"points": points[b].numpy(), "colors": colors,
                               "title": f"{category}: predicted parts {', '.join(map(str, np.unique(labels[b])))}"})
        else:
            nb, centers = model.backbone.group(points)
            probs = model(points).softmax(-1)
            classes = ckpt.get("class_names") or [str(i) for i in range(probs.shape[1])]
            for b, name in enumerate(names[: len(points)]):
                p, c = probs[b].max(0)
                panels += patch_panels(nb[b], centers[b],
                                       title=f"{name}: {classes[int(c)]} ({100 * float(p):.0f}%)")
    cols = {"tokenizer": 3, "pretrain": 5, "partseg": 4, "classifier": min(4, len(panels))}[cfg.kind]
    path = render_panels(panels, args.out, cols=cols, title=f"{Path(args.checkpoint).name} ({cfg.kind})")
    print(f"wrote {path}")
    return 0
