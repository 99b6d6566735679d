"""The real `gaudi-pretrain` entry point: help, config validation errors as one line and exit 2."""

import subprocess
import sys

import pytest

from gaudi_pretrain.cli import build_parser


def run_cli(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "gaudi_pretrain", *args], capture_output=True, text=True, timeout=timeout
    )


def _subcommands():
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


def test_help_lists_subcommands():
    result = run_cli("--help")
    assert result.returncode == 0
    for name in _subcommands():
        assert name in result.stdout
    assert {"train", "demo", "config"} <= set(_subcommands())


@pytest.mark.parametrize("name", _subcommands())
def test_every_subcommand_has_help(name):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([name, "--help"])
    assert info.value.code == 0


def test_train_typo_exits_nonzero_and_names_key():
    result = run_cli("train", "--config", "configs/tiny.yaml", "train.micro_bach_size=8")
    assert result.returncode == 2
    err = result.stderr.strip().splitlines()
    assert len(err) == 1, result.stderr
    assert "micro_bach_size" in err[0] and "micro_batch_size" in err[0]


def test_train_wrong_type_exits_nonzero():
    result = run_cli("train", "--config", "configs/tiny.yaml", "train.max_steps=many")
    assert result.returncode == 2
    assert "train.max_steps" in result.stderr and "many" in result.stderr


def test_train_missing_config_file():
    result = run_cli("train", "--config", "configs/nope.yaml")
    assert result.returncode == 2
    assert "configs/nope.yaml" in result.stderr


def test_config_command_prints_resolved_and_deepspeed():
    result = run_cli("config", "--config", "configs/tiny.yaml", "train.micro_batch_size=8")
    assert result.returncode == 0, result.stderr
    assert "micro_batch_size: 8" in result.stdout
    assert '"train_micro_batch_size_per_gpu": 8' in result.stdout
