"""Arguments several subcommands share."""

from __future__ import annotations

import argparse


def add_config_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """The `--config FILE [section.key=value ...]` pair every config-driven subcommand takes."""
    parser.add_argument("--config", required=required, help="YAML run config (see configs/)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="dotted overrides applied on top of the file, e.g. train.micro_batch_size=8",
    )
