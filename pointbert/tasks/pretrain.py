"""Stage 2: Point-BERT pre-training (spec 5): ``pointbert pretrain --tokenizer CKPT``.

* model: :class:`~pointbert.mpm.PointBERT` with the trained dVAE loaded and frozen (its patch embedding
  also initialises the query encoder's, spec 5.2); the tokenizer comes from a ``train-tokenizer``
  checkpoint or from the ``tokenizer.*`` weights of a pre-training checkpoint;
* step: ScaleAndTranslate, then ``model(points)``, which groups, tokenizes, masks, mixes, updates the
  momentum encoder and enqueues the keys (spec 5.5); loss = MPM + mixed contrastive;
* validation: a linear SVM on frozen features of the unmasked query encoder (spec 5.6), trained on the
  train split and scored on the test split of ``data.probe_dataset`` / ``data.probe_path``, for both
  the official 512-d projection (``svm_acc``, selects ``best.pt``) and the backbone's [cls ; max]
  (``svm_acc_backbone``). Skipped, with a message, when no probe data is configured. As the official
  shuffled loader drops its last partial batch, the SVM is fitted on a random ``len - len % batch`` of
  the train shapes (9,728 of 9,843 at batch 128); ``data.probe_drop_last=false`` uses them all.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..checkpoint import config_of, load_checkpoint
from ..config import Config, ConfigError, apply_dict, validate
from ..engine import Context, Task, derive_seed, fit, unwrap
from ..mpm import PointBERT


def load_tokenizer_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], Config]:
    """(dVAE state dict, its config) from a tokenizer checkpoint or a pre-training one (``tokenizer.*``)."""
    ckpt = load_checkpoint(path, ("tokenizer", "pretrain"))
    state = ckpt["model"]
    if ckpt["kind"] == "pretrain":
        state = {k[len("tokenizer."):]: v for k, v in state.items() if k.startswith("tokenizer.")}
    return state, config_of(ckpt, str(path))


class PretrainTask(Task):
    """Masked point modeling with point-patch mixing and momentum contrast (spec 5.5-5.6).

    Args:
        cfg: a pre-training config. The tokenizer checkpoint fixes ``tokenizer.*``,
            ``patches.embed_dim`` and ``patches.patch_size`` (its weights must load into the model);
            values that differ from ``cfg`` are taken from the checkpoint and reported.
        tokenizer: the tokenizer checkpoint; None only when resuming (the weights come from ``last.pt``).
        probe_standardize: standardise features before the SVM (the official uses raw features).
    """

    monitor, mode = "svm_acc", "max"
    STRUCTURE = {"tokenizer": ("vocab_size", "token_dim", "decoder_dim", "dgcnn_k", "dgcnn_dims",
                               "decoder_hidden", "fold_hidden"),
                 "patches": ("embed_dim", "patch_size", "hidden_dims")}  # fields the tokenizer's weights fix

    # the queue is the same on every rank (keys are all-gathered before enqueueing) and only rank 0's buffers
    # are evaluated and saved: DDP need not send the 16 MiB queue and the BatchNorm buffers every step
    broadcast_buffers = False

    @property
    def find_unused_parameters(self) -> bool:
        """DDP: the frozen key encoder and tokenizer are not tracked; the token head (lm_head) gets no
        gradient without the MPM loss, the projection head (cls_head) none without a contrastive loss."""
        m = self.cfg.mpm
        return not (m.mpm_loss and (m.mix_loss or m.moco_loss))

    def __init__(self, cfg: Config, tokenizer: str | Path | None = None, *, probe_standardize: bool = False):
        self.notes: list[str] = []
        self.tokenizer_state = None
        if tokenizer is not None:
            self.tokenizer_state, tok_cfg = load_tokenizer_checkpoint(tokenizer)
            cfg = self._adopt(cfg, tok_cfg, str(tokenizer))
        super().__init__(cfg)
        self.probe_standardize = probe_standardize
        self._probe_data: tuple[Any, Any] | None = None
        self._said_no_probe = False
        from .probe import probe_data_config

        probe = probe_data_config(cfg)
        if probe is not None and probe.data.path and not Path(probe.data.path).exists():
            raise ConfigError(f"data.probe_path {probe.data.path}: no such folder")

    def _adopt(self, cfg: Config, tok: Config, where: str) -> Config:
        fixed = {"tokenizer": tok.to_dict()["tokenizer"],
                 "patches": {k: getattr(tok.patches, k) for k in self.STRUCTURE["patches"]}}
        new = validate(apply_dict(cfg, fixed, where=where))
        for section, names in self.STRUCTURE.items():  # schedule fields do not matter here: not reported
            for k in names:
                before, after = getattr(getattr(cfg, section), k), getattr(getattr(new, section), k)
                if before != after:
                    self.notes.append(f"{section}.{k} = {after} from the tokenizer {where} "
                                      f"(config had {before})")
        return new

    def build_model(self) -> nn.Module:
        model = PointBERT(self.cfg)
        if self.tokenizer_state is not None:
            model.load_tokenizer(self.tokenizer_state)
        for note in self.notes:
            print(note, flush=True)
        return model

    def train_dataset(self):
        from ..data import build_dataset

        return build_dataset(self.cfg.data, "train", seed=self.cfg.train.seed)

    def training_step(self, model: nn.Module, batch: dict[str, Tensor], ctx: Context) -> dict[str, Tensor]:
        from ..data.transforms import augment, random_subset

        points = random_subset(batch["points"].float(), self.cfg.data.num_points, ctx.generator)
        points = augment(points, self.cfg.data.augment, ctx.generator)  # (B, N, 3)
        out = model(points)
        return {"loss": out.loss, "mpm_loss": out.mpm_loss, "mix_loss": out.mix_loss,
                "moco_loss": out.moco_loss, "mpm_acc": out.mpm_acc * 100}

    def evaluate(self, model: nn.Module, ctx: Context) -> dict[str, float]:
        """Linear-SVM probe (spec 5.6), in %: projection (``svm_acc``), backbone (``svm_acc_backbone``)."""
        from .probe import pretrain_features, probe_data_config, run_probe

        probe = probe_data_config(self.cfg)
        if probe is None or (not probe.data.path and probe.data.dataset != "synthetic"):
            if not self._said_no_probe:
                ctx.log("SVM probe skipped: no labelled probe data (set data.probe_dataset and "
                        "data.probe_path, e.g. data.probe_path=path/to/ModelNet40); no best.pt, only last.pt")
                self._said_no_probe = True
            return {}
        if self._probe_data is None:
            from ..data import build_dataset

            seed = self.cfg.train.seed
            self._probe_data = (build_dataset(probe.data, "train", seed=seed),
                                build_dataset(probe.data, "test", seed=seed))

        def features(points: Tensor) -> tuple[Tensor, Tensor]:
            with ctx.autocast():
                return pretrain_features(unwrap(model), points)

        t = self.cfg.train  # the official probe's shuffled drop_last loader, a stream per epoch (spec 11.19)
        drop = (t.batch_size, derive_seed(t.seed, 4, ctx.epoch)) if self.cfg.data.probe_drop_last else None
        proj, backbone = run_probe(features, *self._probe_data, num_points=probe.data.num_points,
                                   batch_size=2 * self.cfg.train.batch_size, device=ctx.device,
                                   num_workers=probe.data.num_workers, progress=False,
                                   standardize=self.probe_standardize,
                                   drop_last=drop)
        return {"svm_acc": proj, "svm_acc_backbone": backbone}


def pretrain_command(args: argparse.Namespace) -> int:
    """``pointbert pretrain --tokenizer CKPT``: writes ``<out>/{last,best}.pt`` (kind pretrain)."""
    from . import config_from_args, out_dir

    out = out_dir(args, "pretrain")
    resuming = args.resume and (out / "last.pt").is_file()
    if not args.tokenizer and not resuming:
        raise ConfigError("pre-training needs a trained tokenizer: pass --tokenizer CKPT (from "
                          "`pointbert train-tokenizer` or `pointbert import` of the official dVAE.pth)")
    cfg = config_from_args(args, "pretrain", "pretrain", stage="pretrain")
    task = PretrainTask(cfg, args.tokenizer if not resuming else None)
    fit(task, out, device=args.device, resume=args.resume, quiet=args.quiet, overwrite=args.overwrite)
    return 0
