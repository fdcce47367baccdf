"""`pointbert <command>`: the command line.

Parsers are defined here (cheap to import); each command's work lives in the module of its concept
and is imported only when the command runs. A :class:`~pointbert.errors.PointBERTError` (bad file,
bad setting, wrong checkpoint) is printed as one line on stderr with exit status 2, no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> "module:function"; the function takes the parsed args and returns an exit status.
COMMANDS = {
    "demo": "pointbert.demo:demo_command",
    "import": "pointbert.official:import_command",
    "predict": "pointbert.inference:predict_command",
    "tokenize": "pointbert.inference:tokenize_command",
    "embed": "pointbert.inference:embed_command",
    "segment": "pointbert.inference:segment_command",
    "train-tokenizer": "pointbert.tasks.tokenizer:train_tokenizer_command",
    "pretrain": "pointbert.tasks.pretrain:pretrain_command",
    "finetune": "pointbert.tasks.finetune:finetune_command",
    "evaluate": "pointbert.tasks.finetune:evaluate_command",
    "fewshot": "pointbert.tasks.fewshot:fewshot_command",
    "partseg": "pointbert.tasks.partseg:partseg_command",
    "probe": "pointbert.tasks.probe:probe_command",
    "render": "pointbert.viz:render_command",
    "data inspect": "pointbert.data.inspect:inspect_command",
    "data prepare": "pointbert.data.cache:prepare_command",
}


def _add_inference_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("checkpoint", help="a pointbert checkpoint or an official Point-BERT .pth (converted in memory)")
    p.add_argument("input", help="a .npy of shape (N,3) or (B,N,3), one point-cloud file, or a folder of them")
    p.add_argument("--out", required=True, help=f"where to write the {what} (.npy)")
    p.add_argument("--num-points", type=int, default=None,
                   help="points per cloud fed to the model (default: the checkpoint's data.num_points); "
                        "clouds with more are reduced by FPS from point 0")
    p.add_argument("--normalize", action="store_true",
                   help="centre each cloud and scale it into the unit sphere first (default: use points as given)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps, ... (default cpu)")


def _add_train_args(p: argparse.ArgumentParser, preset: str) -> None:
    """Flags shared by every training stage."""
    p.add_argument("overrides", nargs="*", metavar="section.field=value",
                   help="dotted config overrides, e.g. optim.lr=1e-3 backbone.depth=6 (see pointbert/config.py)")
    p.add_argument("--config", default=None, help="a YAML config file (may name its base with `preset:`)")
    p.add_argument("--preset", default=None, help=f"a named preset (default {preset}); see pointbert.config.PRESETS")
    p.add_argument("--data", default=None,
                   help="a dataset folder (format detected) or a built-in dataset name (default: the preset's)")
    p.add_argument("--out", default=None, help="run folder for checkpoints, logs and curves (default runs/<stage>)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda if available)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None,
                   help="training epochs (the official presets run one more, epochs 0..N inclusive as the official "
                        "loops; add train.extra_epoch=false for exactly N)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch size (kept under torchrun)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default=None)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --out that already holds a run (default: refuse)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (one log line per epoch)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="pointbert",
        description="Point-BERT: point tokenizer, masked point modeling pre-training, fine-tuning and inference.")
    parser.add_argument("--version", action="version", version=f"pointbert {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")

    p = sub.add_parser("demo", help="the main job on built-in synthetic shapes: tokenizer, pre-training, then "
                                    "pre-trained vs from-scratch with few labels; a report with pictures")
    p.add_argument("overrides", nargs="*", metavar="section.field=value",
                   help="overrides applied to every stage's demo preset, e.g. backbone.depth=2")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo); rerun to continue")
    p.add_argument("--seeds", type=int, default=3, help="seeds (episodes, label subsets) per comparison")
    p.add_argument("--train-size", type=int, default=1500, help="synthetic training shapes (unlabelled for "
                                                                "pre-training)")
    p.add_argument("--test-size", type=int, default=450)
    p.add_argument("--way", type=int, default=5)
    p.add_argument("--shot", type=int, default=10)
    p.add_argument("--fewshot-epochs", type=int, default=30)
    p.add_argument("--labels-per-class", type=int, default=10)
    p.add_argument("--finetune-epochs", type=int, default=30)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("import", help="convert an official Point-BERT .pth (dVAE, pre-trained, fine-tuned, "
                                      "part segmentation) into a pointbert checkpoint")
    p.add_argument("source", help="the official .pth file")
    p.add_argument("--out", required=True, help="the pointbert checkpoint to write (.pt)")
    p.add_argument("--kind", choices=["tokenizer", "pretrain", "classifier", "partseg"], default=None,
                   help="what the file holds (default: recognised from its keys)")
    p.add_argument("--num-points", type=int, default=None,
                   help="points per cloud the imported model will expect (default: the official preset's)")
    p.add_argument("--num-patches", type=int, default=None,
                   help="patches per cloud (default: the official preset's; 64 for 1k points)")
    p.add_argument("--num-heads", type=int, default=None,
                   help="attention heads (not stored in official files; default dim // 64, i.e. 6 for 384)")
    p.add_argument("--keep-momentum", action="store_true",
                   help="pre-trained files: keep the momentum encoder and queue (default: drop them; the key "
                        "encoder becomes a copy of the query encoder, as at the start of pre-training)")
    p.add_argument("--class-names", default=None,
                   help="a text file with one class name per line, stored in the checkpoint for `predict`")
    p.add_argument("--safetensors", default=None, help="also export the weights to this .safetensors file")

    p = sub.add_parser("predict", help="class logits of point clouds from a classifier checkpoint")
    _add_inference_args(p, "logits (B, num_classes)")
    p.add_argument("--vote", type=int, default=0, metavar="VIEWS",
                   help="average the logits over this many random views, as the official voting test; 0 = no voting")
    p.add_argument("--seed", type=int, default=0, help="seed of the random voting views (default 0)")
    p.add_argument("--top", type=int, default=1, help="print this many top classes per cloud")

    p = sub.add_parser("tokenize", help="discrete token ids (B, G) from a tokenizer or pre-training checkpoint")
    _add_inference_args(p, "token ids (B, G)")

    p = sub.add_parser("embed", help="backbone features (B, 2*dim): [cls ; max over patches]")
    _add_inference_args(p, "features (B, 2*dim)")

    p = sub.add_parser("segment", help="per-point part labels (B, N) from a part segmentation checkpoint")
    _add_inference_args(p, "part labels (B, N); the points labelled go to <stem>.points.npy")
    p.add_argument("--category", required=True,
                   help="the object category of the clouds (ShapeNetPart: Airplane, Chair, ...; or its index)")

    p = sub.add_parser("train-tokenizer", help="train the dVAE point tokenizer")
    _add_train_args(p, "tokenizer")

    p = sub.add_parser("pretrain",
                       help="masked point modeling pre-training with point-patch mixing and momentum contrast")
    _add_train_args(p, "pretrain")
    p.add_argument("--tokenizer", required=False, default=None,
                   help="a trained tokenizer checkpoint (from train-tokenizer, or the official dVAE.pth)")

    p = sub.add_parser("finetune", help="fine-tune a classifier (ModelNet40, ScanObjectNN, any labelled folder)")
    _add_train_args(p, "modelnet40-1k")
    p.add_argument("--init", default=None,
                   help="a pre-training (or classifier) checkpoint to start from; official .pth files too")
    p.add_argument("--scratch", action="store_true", help="train from random initialisation (no --init)")

    p = sub.add_parser("evaluate", help="test accuracy of a classifier checkpoint, optionally with voting")
    p.add_argument("checkpoint", help="a classifier checkpoint (best.pt of finetune, or from `pointbert import`)")
    p.add_argument("overrides", nargs="*", metavar="section.field=value")
    p.add_argument("--data", default=None, help="the test data (default: the checkpoint's)")
    p.add_argument("--vote", action="store_true", help="also the accuracy of the official 10-view voting test")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=None)

    p = sub.add_parser("fewshot",
                       help="few-shot episodes: fine-tune per fold, report mean +- std (the official protocol)")
    _add_train_args(p, "fewshot")
    p.add_argument("--init", default=None, help="a pre-training checkpoint (omit with --scratch)")
    p.add_argument("--scratch", action="store_true", help="train from random initialisation (no --init)")
    p.add_argument("--way", type=int, default=None, help="classes per episode (default: the preset's, 5)")
    p.add_argument("--shot", type=int, default=None, help="training shapes per class (default: the preset's, 10)")
    p.add_argument("--folds", default="0-9", help="folds to run: 0-9, or 0,3,5 (default 0-9)")

    p = sub.add_parser("partseg", help="part segmentation fine-tuning (the official ShapeNetPart recipe)")
    _add_train_args(p, "partseg")
    p.add_argument("--init", default=None, help="a pre-training checkpoint to start from (omit with --scratch)")
    p.add_argument("--scratch", action="store_true", help="train from random initialisation (no --init)")

    p = sub.add_parser("probe", help="linear SVM on frozen backbone features: train split -> test split accuracy")
    p.add_argument("--init", default=None, help="a pre-training or classifier checkpoint (omit with --random)")
    p.add_argument("--random", action="store_true", help="probe a randomly initialised backbone instead")
    p.add_argument("overrides", nargs="*", metavar="section.field=value")
    p.add_argument("--preset", default=None, help="config preset of the --random model (default pretrain)")
    p.add_argument("--data", default=None, help="dataset name or folder (default: the checkpoint's)")
    p.add_argument("--feature", choices=["backbone", "projection"], default="backbone",
                   help="backbone: [cls ; max] (2*dim); projection: the pre-training cls head (what the official "
                        "SVM validation reads)")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--out", default=None, help="write the result as JSON here")

    p = sub.add_parser("render", help="a PNG of clouds with their patches, masks, token ids and reconstructions "
                                      "(tokenizer / pre-training checkpoints), predicted classes (classifiers) "
                                      "or parts (part segmentation)")
    p.add_argument("checkpoint", help="a tokenizer, pre-training, classifier or part segmentation checkpoint")
    p.add_argument("input", help="a .npy (N,3) or (B,N,3), a point-cloud file, or a folder of them")
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--num-points", type=int, default=None, help="points per cloud (default: the checkpoint's)")
    p.add_argument("--normalize", action="store_true", help="centre and scale each cloud into the unit sphere")
    p.add_argument("--max-clouds", type=int, default=4, help="render at most this many clouds (default 4)")
    p.add_argument("--category", default=None,
                   help="part segmentation checkpoints: the clouds' object category (Airplane, Chair, ...)")

    data = sub.add_parser("data", help="inspect and prepare datasets")
    dsub = data.add_subparsers(dest="data_command", metavar="<data command>")
    p = dsub.add_parser("inspect", help="detect the format of a dataset or file; count classes, splits, points; "
                                        "list unreadable or degenerate files")
    p.add_argument("path", help="a dataset folder or a single point-cloud file")
    p.add_argument("--dataset", default="auto",
                   help="force a format: auto, folder, modelnet40, modelnet10, shapenet55, scanobjectnn, "
                        "fewshot, shapenetpart, file")
    p.add_argument("--max-files", type=int, default=None, help="check at most this many files (default all)")
    p = dsub.add_parser("prepare", help="convert a dataset once into a memory-mapped cache that training reads")
    p.add_argument("path", help="the dataset folder")
    p.add_argument("--dataset", default="auto", help="the format (default: detected)")
    p.add_argument("--split", default="all", help="train, test or all (default all)")
    p.add_argument("--num-points", type=int, default=None,
                   help="points stored per shape, reduced by FPS (default: all points, or 8192 for the "
                        "official ModelNet FPS pre-sampling)")
    p.add_argument("--out", default=None, help="cache folder (default: <path>/.pointbert-cache)")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable files and report how many")
    return parser


def main(argv: list[str] | None = None) -> int:
    from .errors import PointBERTError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # dotted overrides may come after the flags: `evaluate ckpt --vote train.vote_views=5`
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    name = args.command
    if name is None:
        parser.print_help()
        return 1
    if name == "data":
        if args.data_command is None:
            parser.parse_args(["data", "--help"])
        name = f"data {args.data_command}"
    module, func = COMMANDS[name].split(":")
    try:
        return int(getattr(importlib.import_module(module), func)(args) or 0)
    except PointBERTError as e:
        print(f"pointbert {name}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and closed early
        sys.stderr.close()
        return 0
    except OSError as e:  # a path the user gave that cannot be read or written: one line, no traceback
        if e.filename is None:
            raise
        print(f"pointbert {name}: error: {e.filename}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pointbert {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
