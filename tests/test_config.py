"""Typed config: presets load, overrides apply, bad input is one precise error."""

from pathlib import Path

import pytest

from gaudi_pretrain.config import deepspeed_config, load_config
from gaudi_pretrain.errors import ConfigError

PRESETS = sorted(Path("configs").glob("*.yaml"))


def test_presets_exist():
    assert {p.name for p in PRESETS} >= {"tiny.yaml", "bridgetower_base.yaml", "bridgetower_large.yaml"}


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_loads_and_derives_deepspeed(path):
    cfg = load_config(path)
    world = 64 if cfg.train.global_batch_size == 4096 else 1
    ds = deepspeed_config(cfg, world)
    assert ds["train_batch_size"] == cfg.train.micro_batch_size * cfg.train.gradient_accumulation_steps * world
    assert ds["bf16"]["enabled"] == (cfg.train.precision == "bf16")


def test_large_preset_is_the_paper_recipe():
    cfg = load_config("configs/bridgetower_large.yaml")
    assert (cfg.model.vision.image_size, cfg.model.vision.patch_size) == (294, 14)
    assert cfg.model.num_hidden_layers == 6 and cfg.model.text.num_hidden_layers == 24
    assert cfg.optim.betas == (0.9, 0.98) and cfg.optim.eps == 1e-8 and cfg.optim.weight_decay == 0.01
    assert cfg.optim.lr == 1e-5 and cfg.optim.lr_multiplier == 5 and cfg.optim.warmup_ratio == 0.1
    assert cfg.train.global_batch_size == 4096 and cfg.train.max_steps == 100_000
    assert cfg.data.max_text_len == 50


def test_dotted_override_applies_with_yaml_types():
    cfg = load_config(
        "configs/tiny.yaml",
        ["train.micro_batch_size=8", "optim.betas=[0.8, 0.9]", "model.vision.image_size=48", "checkpoint.resume=auto"],
    )
    assert cfg.train.micro_batch_size == 8
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.model.vision.image_size == 48
    assert cfg.checkpoint.resume == "auto"


def test_typo_names_key_and_suggests():
    with pytest.raises(ConfigError, match=r"train\.micro_bach_size.*did you mean 'train\.micro_batch_size'"):
        load_config("configs/tiny.yaml", ["train.micro_bach_size=8"])


def test_unknown_section_key_in_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'optim\.learning_rate'"):
        load_config(f)


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("train.micro_batch_size=abc", r"'abc'.*train\.micro_batch_size"),
        ("train.micro_batch_size=0", r"train\.micro_batch_size"),
        ("train.precision=fp8", r"train\.precision"),
        ("model.vision.image_size=33", r"image_size 33 is not a multiple of patch_size 8"),
        ("data.max_text_len=100", r"max_text_len 100 exceeds"),
        ("model.text.hidden_size=64", r"text\.hidden_size 64 must equal hidden_size 128"),
        ("train", r"not of the form"),
    ],
)
def test_bad_values_are_one_clear_error(override, pattern):
    with pytest.raises(ConfigError, match=pattern) as info:
        load_config("configs/tiny.yaml", [override])
    assert "\n" not in str(info.value)


def test_missing_and_unparsable_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(scalar)


def test_global_batch_must_match_geometry():
    cfg = load_config("configs/bridgetower_large.yaml")
    with pytest.raises(ConfigError, match="global_batch_size 4096 != .* world size 8 = 512"):
        deepspeed_config(cfg, 8)
    assert deepspeed_config(cfg, 64)["train_batch_size"] == 4096


def test_relaunch_on_another_world_size_keeps_the_global_batch():
    """A relaunch on fewer devices derives the accumulation from train.global_batch_size; where no
    accumulation fits it refuses in one line naming the nearest feasible global batches."""
    from gaudi_pretrain.config import fit_batch_geometry

    cfg = load_config("configs/bridgetower_large.yaml")
    assert fit_batch_geometry(cfg, 64) is cfg
    fitted = fit_batch_geometry(cfg, 32)
    assert fitted.train.gradient_accumulation_steps == 8 and deepspeed_config(fitted, 32)["train_batch_size"] == 4096
    with pytest.raises(
        ConfigError, match=r"world size 56 = 896; nearest feasible on 56 ranks: 4032 \(micro 12 x accumulation 6\)"
    ) as err:
        fit_batch_geometry(cfg, 56)
    assert "\n" not in str(err.value)


def test_fingerprint_tracks_model_not_schedule():
    a = load_config("configs/tiny.yaml")
    b = load_config("configs/tiny.yaml", ["train.max_steps=7", "optim.lr=0.5"])
    c = load_config("configs/tiny.yaml", ["model.num_hidden_layers=1"])
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
