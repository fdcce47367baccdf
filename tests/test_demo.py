"""`pointbert demo` end to end at a tiny scale: every stage runs, the report and pictures are written,
and a second call continues from the finished runs instead of training again."""

import json

from pointbert.cli import main

TINY = ["--train-size", "45", "--test-size", "30", "--seeds", "1", "--way", "3", "--shot", "2",
        "--labels-per-class", "2", "--fewshot-epochs", "1", "--finetune-epochs", "1", "--quiet",
        "train.epochs=1", "backbone.depth=1", "data.num_points=128", "patches.num_patches=8",
        "mpm.queue_size=64", "train.batch_size=8"]


def test_demo_runs_every_stage_and_resumes(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), *TINY]) == 0
    report = (out / "report.md").read_text()
    for row in ("linear SVM", "few-shot 3-way 2-shot", "fine-tune, 2 labels per class"):
        assert row in report
    results = json.loads((out / "results.json").read_text())["results"]
    assert set(results["few-shot 3-way 2-shot"]) == {"pre-trained", "scratch"}
    assert (out / "patches_masks_tokens.png").stat().st_size > 10_000
    for run in ("tokenizer", "pretrain", "fewshot_scratch_0", "lowlabel_pre-trained_0"):
        assert (out / run / "last.pt").is_file()
    capsys.readouterr()
    assert main(["demo", "--out", str(out), *TINY]) == 0  # finished runs are reused, not retrained
    assert "trainable parameters" not in capsys.readouterr().out
    # other settings would mix stages made two ways: refused before any work, naming what changed
    assert main(["demo", "--out", str(out), *TINY, "--shot", "3"]) == 2
    err = capsys.readouterr().err
    assert "holds a demo made with other settings (--shot 2 -> 3)" in err and err.count("\n") == 1
    assert main(["demo", "--out", str(tmp_path / "small"), "--train-size", "20", "--quiet"]) == 2
    assert "only 0 classes have 10 shapes" in capsys.readouterr().err


def test_demo_checks_its_flags_before_any_work(tmp_path, capsys):
    for flags, message in ((["--seeds", "0"], "--seeds must be positive"),
                           (["--train-size", "-5"], "--train-size must be positive"),
                           (["--device", "gpu"], "is not a device name")):
        assert main(["demo", "--out", str(tmp_path / "d"), *flags]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
