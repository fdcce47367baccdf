"""Configs: every preset validates and mirrors the official numbers; YAML and dotted overrides; errors."""

import pytest

from pointbert.config import PRESETS, Config, ConfigError, apply_overrides, build_config, preset, save_yaml, validate


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_validates_and_round_trips(name, tmp_path):
    cfg = validate(preset(name))
    assert Config.from_dict(cfg.to_dict()) == cfg
    save_yaml(cfg, tmp_path / "c.yaml")
    assert build_config(yaml_path=tmp_path / "c.yaml") == cfg


def test_presets_mirror_the_official_configs():
    for points, groups, pool in [(1024, 64, 1200), (2048, 128, 2400), (4096, 256, 4800), (8192, 512, 8192)]:
        c = preset(f"modelnet40-{points // 1024}k")
        assert (c.data.num_points, c.patches.num_patches, c.data.point_pool) == (points, groups, pool)
        assert c.head.num_classes == 40 and c.train.batch_size == 32 and c.optim.grad_clip == 10
    t = preset("tokenizer")
    assert (t.optim.weight_decay, t.train.batch_size, t.tokenizer.vocab_size) == (5e-4, 64, 8192)
    p = preset("pretrain")
    assert (p.optim.warmup_epochs, p.train.batch_size, p.data.whole, p.mpm.queue_size) == (3, 128, True, 16384)
    assert p.mpm.mask_ratio == (0.25, 0.45) and p.mpm.momentum == 0.999 and p.mpm.temperature == 0.07
    assert not p.mpm.moco_loss and p.mpm.mix_loss and p.mpm.mpm_loss
    assert preset("fewshot").train.epochs == 150
    s = preset("partseg")
    assert (s.patches.num_patches, s.data.num_points, s.train.batch_size, s.train.extra_epoch) == (128, 2048, 16, False)
    assert preset("scanobjectnn-hardest").data.variant == "hardest"
    assert preset("modelnet40-1k").train.epochs + preset("modelnet40-1k").train.extra_epoch == 301


def test_overrides_are_typed():
    c = build_config("tiny-classifier", overrides=["optim.lr=1e-3", "backbone.depth=3", "mpm.mask_ratio=[0.1, 0.2]",
                                                   "data.path=123", "train.sync_bn=true"])
    assert c.optim.lr == 0.001 and c.backbone.depth == 3 and c.mpm.mask_ratio == (0.1, 0.2)
    assert c.data.path == "123" and c.train.sync_bn is True


def test_yaml_names_its_base_preset(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("preset: tiny-classifier\nbackbone:\n  depth: 3\noptim:\n  lr: 0.002\n")
    c = build_config(yaml_path=f, overrides=["optim.lr=0.003"])
    assert c.backbone.depth == 3 and c.optim.lr == 0.003 and c.patches.num_patches == 16


@pytest.mark.parametrize("override, message", [
    ("backbone.depht=3", "unknown key 'backbone.depht'"),
    ("backbone.depth=three", "expected an integer"),
    ("backbone.num_heads=5", "divisible"),
    ("mpm.mask_ratio=[0.5, 0.2]", "mask_ratio"),
    ("mpm.mask_ratio=[0.5]", "expected 2 values"),
    ("train.precision=fp8", "train.precision"),
    ("train.compile_mode=fast", "train.compile_mode must be one of default, reduce-overhead"),
    ("data.num_points=8", "data.num_points"),
    ("optim.lr=-1", "optim.lr"),
    ("backbone.ffn_act=swish", "backbone.ffn_act must be gelu or relu, got 'swish'"),
    ("backbone.pos_every_block=1", "expected true/false"),
    ("tokenizer.kl_direction=forward", "tokenizer.kl_direction must be uniform_q or q_uniform, got 'forward'"),
    ("tokenizer.logit_norm=maybe", "expected true/false"),
    ("tokenizer.chamfer_half=0", "expected true/false"),
    ("nonsense", "section.field=value"),
    ("train.seed=-1", "train.seed must be >= 0"),
    ("train.log_every=0", "train.log_every must be positive"),
    ("train.vote_views=0", "train.vote_views must be positive"),
    ("data.num_workers=-2", "data.num_workers must be >= 0, or -1 for auto"),
    ("optim.betas=[2, 3]", "optim.betas must be two values in"),
    ("optim.eps=-1", "optim.eps must be positive"),
    ("optim.lr=.inf", "optim.lr must be finite"),
    ("tokenizer.temp_start=0", "tokenizer.temp_start must be positive"),
    ("mpm.mask_ratio=[0, 0]", "hi > 0"),
    ("data.point_pool=10", "must be at least data.num_points"),
])
def test_bad_values_give_one_clear_line(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")) as e:
        validate(apply_overrides(preset("tiny-classifier"), [override]))
    assert "\n" not in str(e.value)


def test_yaml_that_is_binary_names_no_preset_or_another_kind(tmp_path):
    bad = {"bin.yaml": b"\x89PNG\x00\xff", "list.yaml": b"preset: [1]\n",
           "kind.yaml": b"preset: tiny-classifier\nkind: tokenizer\n"}
    for name, text in bad.items():
        (tmp_path / name).write_bytes(text)
    for name, message in (("bin.yaml", "not a text file"), ("list.yaml", "preset must be a preset name"),
                          ("kind.yaml", "kind 'tokenizer', this command needs a classifier config")):
        with pytest.raises(ConfigError, match=message):
            build_config(yaml_path=tmp_path / name, kind="classifier")


def test_missing_yaml_and_unknown_preset_and_wrong_kind(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        build_config(yaml_path=tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("modelnet41")
    with pytest.raises(ConfigError, match="is a classifier config"):
        build_config("tiny-classifier", kind="tokenizer")
    bad = tmp_path / "bad.yaml"
    bad.write_text("backbone: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        build_config(yaml_path=bad)


def test_paper_alternatives_default_to_the_official_code_and_are_settable():
    """spec 11.6, 11.7, 11.9: official behaviour by default, the paper's one override away; non-bools refused."""
    c = preset("tiny-classifier")
    assert (c.backbone.ffn_act, c.backbone.pos_every_block) == ("gelu", True)
    assert (c.tokenizer.logit_norm, c.tokenizer.kl_direction, c.tokenizer.chamfer_half) == (True, "uniform_q", True)
    c = build_config("tiny-classifier", overrides=[
        "backbone.ffn_act=relu", "backbone.pos_every_block=false", "tokenizer.logit_norm=false",
        "tokenizer.kl_direction=q_uniform", "tokenizer.chamfer_half=false"])
    assert (c.backbone.ffn_act, c.backbone.pos_every_block) == ("relu", False)
    assert (c.tokenizer.logit_norm, c.tokenizer.kl_direction, c.tokenizer.chamfer_half) == (False, "q_uniform", False)
    for section, name in (("backbone", "pos_every_block"), ("tokenizer", "logit_norm"), ("tokenizer", "chamfer_half")):
        bad = preset("tiny-classifier")
        setattr(getattr(bad, section), name, "no")  # set in code, past the YAML typing
        with pytest.raises(ConfigError, match=f"^{section}.{name} must be true or false, got 'no'$"):
            validate(bad)
