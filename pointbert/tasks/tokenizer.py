"""Stage 1: train the dVAE point tokenizer (spec 4): ``pointbert train-tokenizer``.

* step: Gumbel-softmax forward at temperature tau(it), loss = recon + beta(it) * KL, where tau and beta
  follow the per-ITERATION cosine schedules of spec 4.4 (set in :meth:`TokenizerTask.on_step`, the
  iteration being the optimizer step ``it = epoch * iters_per_epoch + batch``);
* optimiser: AdamW, weight decay 5e-4 from the ``tokenizer`` preset, the engine's warm-up + cosine;
* validation: the test split reconstructed with ``hard=True`` at tau = 1 (spec 4.6); F-Score@0.01,
  CD-L1 x 1000 and CD-L2 x 1000, averaged per category and then over categories, as the official;
  ``best.pt`` = lowest CDL1.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from ..config import Config
from ..data.transforms import random_subset
from ..engine import Context, Task, eval_loader, fit, unwrap
from ..tokenizer import DiscreteVAE, gumbel_temperature, kl_weight, reconstruction_metrics


@contextlib.contextmanager
def seeded_eval(ctx: Context) -> Iterator[None]:
    """Run a block with the global RNG forked and seeded with ``train.seed``: evaluation draws the same
    random numbers every time (Gumbel noise at validation) and leaves the training streams untouched."""
    with torch.random.fork_rng(devices=[ctx.device] if ctx.device.type == "cuda" else []):
        torch.manual_seed(ctx.cfg.train.seed if ctx.cfg is not None else 0)
        yield


def category_mean(values: dict[str, list[Tensor]], labels: list[Tensor]) -> dict[str, float]:
    """Per-sample metric lists -> mean over categories of the per-category means (official averaging)."""
    cats = torch.cat(labels)
    out = {}
    for name, parts in values.items():
        v = torch.cat(parts).double()
        out[name] = float(torch.stack([v[cats == c].mean() for c in torch.unique(cats)]).mean())
    return out


class TokenizerTask(Task):
    """dVAE training (spec 4.3-4.6); ``best.pt`` tracks the lowest validation CD-L1."""

    monitor = "CDL1"
    mode = "min"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.temperature = cfg.tokenizer.temp_start
        self.beta = 0.0
        self._test = None

    def build_model(self) -> nn.Module:
        return DiscreteVAE(self.cfg)

    def train_dataset(self):
        from ..data import build_dataset

        return build_dataset(self.cfg.data, "train", seed=self.cfg.train.seed)

    def on_step(self, step: int, epoch: int, ctx: Context) -> None:
        """Per-iteration schedules (spec 4.4): Gumbel temperature and KL weight at optimizer step ``step``."""
        self.temperature = gumbel_temperature(step, self.cfg.tokenizer)
        self.beta = kl_weight(step, self.cfg.tokenizer)

    def training_step(self, model: nn.Module, batch: dict[str, Tensor], ctx: Context) -> dict[str, Tensor]:
        points = random_subset(batch["points"], self.cfg.data.num_points, ctx.generator)
        out = model(points, temperature=self.temperature, hard=False)
        out = out._replace(coarse=out.coarse.float(), fine=out.fine.float(), logits=out.logits.float())
        with torch.autocast(ctx.device.type, enabled=False):  # Chamfer and KL in float32 under AMP
            recon, kl = unwrap(model).loss(out)
        one = recon.new_ones(())
        return {"loss": recon + self.beta * kl, "recon": recon.detach(), "kl": kl.detach(),
                "temperature": one * self.temperature, "kl_weight": one * self.beta}

    def evaluate(self, model: nn.Module, ctx: Context) -> dict[str, float]:
        """Reconstruction of the test split, ``hard=True``, tau = 1 (spec 4.6)."""
        from ..data import build_dataset

        if self._test is None:
            self._test = build_dataset(self.cfg.data, "test", seed=self.cfg.train.seed)
        values: dict[str, list[Tensor]] = {"CDL1": [], "CDL2": [], "F-Score": []}
        labels = []
        with seeded_eval(ctx):
            for batch in eval_loader(self._test, self.cfg.train.batch_size, seed=self.cfg.train.seed,
                                     device=ctx.device):
                points = random_subset(batch["points"], self.cfg.data.num_points)  # seeded by seeded_eval
                with ctx.autocast():
                    out = model(points, temperature=1.0, hard=True)
                m = reconstruction_metrics(out.whole_fine.float(), points.float())
                for k in values:
                    values[k].append(m[k].cpu())
                labels.append(batch["label"].reshape(-1).cpu())
        return category_mean(values, labels)


def train_tokenizer_command(args: argparse.Namespace) -> int:
    """``pointbert train-tokenizer``: train the dVAE; writes ``<out>/{last,best}.pt`` (kind tokenizer)."""
    from . import config_from_args, out_dir

    cfg = config_from_args(args, "tokenizer", "tokenizer", stage="tokenizer")
    fit(TokenizerTask(cfg), out_dir(args, "tokenizer"), device=args.device, resume=args.resume,
        quiet=args.quiet, overwrite=args.overwrite)
    return 0
