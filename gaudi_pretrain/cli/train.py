"""Subcommands `train`, `launch-env` and `eval`."""

from __future__ import annotations

import argparse
import json
import os
import sys

from gaudi_pretrain.cli.args import add_config_arguments


def _train(args: argparse.Namespace) -> int:
    from gaudi_pretrain.config import load_config

    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"checkpoint.resume={args.resume}")
    cfg = load_config(args.config, overrides)
    from gaudi_pretrain.train import train

    summary = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:  # set for every rank by distributed.init_distributed
        final = {k: v for k, v in summary["eval"].items() if k != "kind"}
        print(json.dumps({"step": summary["train"].get("step"), **final}))
    return 0


def _launch_env(args: argparse.Namespace) -> int:
    from gaudi_pretrain.config import load_config

    cfg = load_config(args.config, args.overrides)
    for name, value in cfg.backend.launch_environment().items():
        print(f"{name}={value}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from gaudi_pretrain import launch_env
    from gaudi_pretrain.config import apply_overrides, load_config, read_yaml, validate_config
    from gaudi_pretrain.errors import CheckpointError
    from gaudi_pretrain.train.checkpoint_dirs import resolve_checkpoint

    ckpt = resolve_checkpoint(args.checkpoint, args.checkpoint)
    if ckpt is None:
        raise CheckpointError(f"no complete checkpoint at {args.checkpoint}")
    if args.config is not None:
        cfg = load_config(args.config, args.overrides)
    else:
        cfg = validate_config(apply_overrides(read_yaml(ckpt / "config.yaml"), args.overrides))
    launch_env.apply(cfg.backend, can_set="torch" not in sys.modules)  # the Gaudi bridge reads it on import
    from gaudi_pretrain.train.evaluate import evaluate_checkpoint

    print(json.dumps(evaluate_checkpoint(ckpt, cfg)))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="pretrain BridgeTower (ITM+MLM) with DeepSpeed on hpu/cuda/cpu",
        description="Train from a YAML config; dotted overrides change single values. "
        "Launch one process per device (mpirun, torchrun or deepspeed set the rank environment).",
    )
    add_config_arguments(p)
    p.add_argument(
        "--resume",
        metavar="auto|DIR",
        default=None,
        help="resume from the latest checkpoint of the run ('auto') or from a checkpoint directory",
    )
    p.set_defaults(handler=_train)

    p = sub.add_parser(
        "launch-env",
        help="print the NAME=value variables a launcher exports before Python starts (the train arguments)",
        description="Validate the run config like `train` and print, one NAME=value per line, what must be in "
        "the environment before Python starts for it (on Gaudi: PT_HPU_LAZY_MODE, read by the bridge when torch "
        "is first imported). launch/*.sh call it with the train arguments; nothing is printed for cpu/cuda.",
    )
    add_config_arguments(p)
    p.add_argument("--resume", metavar="auto|DIR", default=None, help="accepted and ignored (train's option)")
    p.set_defaults(handler=_launch_env)

    p = sub.add_parser(
        "eval",
        help="evaluate a checkpoint: ITM/MLM accuracy and retrieval recall on eval shards",
        description="Evaluate CHECKPOINT (a checkpoint directory, or a run directory: its latest) on "
        "data.eval_shards of the checkpoint's config (or --config).",
    )
    p.add_argument("checkpoint", help="checkpoint directory or run directory")
    p.add_argument("--config", default=None, help="config to use instead of the checkpoint's config.yaml")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="dotted overrides")
    p.set_defaults(handler=_eval)
