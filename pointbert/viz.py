"""PNG renders (matplotlib, Agg backend: works headless).

* :func:`plot_curves`: the training curves of a run folder's ``metrics.jsonl``.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["plot_curves"]

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
