"""`gaudi-pretrain`: the command-line entry point (docs/commands.md).

Each module of this package registers its subcommands (`register(subparsers)`); heavy imports (torch,
DeepSpeed, transformers) happen inside the handlers, so `--help` is instant. Errors meant for the user
(GaudiPretrainError) are printed as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from gaudi_pretrain import __version__
from gaudi_pretrain.cli.args import add_config_arguments
from gaudi_pretrain.errors import GaudiPretrainError

# Modules that provide `register(subparsers)`; each adds its subcommands with a `handler`.
COMMAND_MODULES = [
    "gaudi_pretrain.cli.train",
    "gaudi_pretrain.cli.demo",
    "gaudi_pretrain.cli.plot",
    "gaudi_pretrain.cli.shards",
    "gaudi_pretrain.cli.export",
    "gaudi_pretrain.cli.checkpoint",
]


def _config_command(args: argparse.Namespace) -> int:
    import json

    import yaml

    from gaudi_pretrain.config import deepspeed_config, load_config

    cfg = load_config(args.config, args.overrides)
    derived = deepspeed_config(cfg, args.world_size)  # validates the batch geometry before anything prints
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
    print(
        "# derived DeepSpeed config for world size",
        args.world_size,
        "(gradient_clipping moves to the training loop when the backend clips: fp32 with ZeRO 0)",
    )
    print("# " + json.dumps(derived))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gaudi-pretrain",
        description="BridgeTower ITM+MLM pretraining on Intel Gaudi (HPU), CUDA and CPU.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    config = sub.add_parser(
        "config",
        help="validate a config and print it resolved, with the derived DeepSpeed dict",
        description="Load FILE, apply overrides, validate, and print the resolved config.",
    )
    add_config_arguments(config)
    config.add_argument("--world-size", type=int, default=1, help="world size for the DeepSpeed dict")
    config.set_defaults(handler=_config_command)

    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except GaudiPretrainError as exc:
        print(f"gaudi-pretrain {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gaudi-pretrain {args.command}: interrupted", file=sys.stderr)
        return 130
