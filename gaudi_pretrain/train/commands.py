"""Subcommands `train`, `eval`, `demo` and `plot`."""

from __future__ import annotations

import argparse
import json
import os


def _train(args: argparse.Namespace) -> int:
    from gaudi_pretrain.config import load_config

    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"checkpoint.resume={args.resume}")
    cfg = load_config(args.config, overrides)
    from gaudi_pretrain.train.loop import train

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
    from gaudi_pretrain.train.standalone import evaluate_checkpoint

    record = evaluate_checkpoint(args.checkpoint, args.overrides, config_path=args.config)
    print(json.dumps(record))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from gaudi_pretrain.train.demo import run_demo

    run_demo(args.out, steps=args.steps, overrides=args.overrides)
    return 0


def _plot(args: argparse.Namespace) -> int:
    from gaudi_pretrain.train.plot import plot_run

    path = plot_run(args.run_dir, args.out)
    print(path)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from gaudi_pretrain.cli import add_config_arguments

    p = sub.add_parser(
        "train",
        help="pretrain BridgeTower (ITM+MLM) with DeepSpeed on hpu/cuda/cpu",
        description="Train from a YAML config; dotted overrides change single values. "
        "Launch one process per device (mpirun, torchrun or deepspeed set the rank environment).",
    )
    add_config_arguments(p)
    p.add_argument("--resume", metavar="auto|DIR", default=None,
                   help="resume from the latest checkpoint of the run ('auto') or from a checkpoint directory")
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

    p = sub.add_parser(
        "demo",
        help="build the embedded demo set, train the tiny model on CPU, evaluate and export",
        description="The whole pipeline in a few minutes on CPU: OUT/shards (demo dataset), OUT/run "
        "(training run), OUT/hf (transformers export). The last line printed is a JSON summary.",
    )
    p.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: configs/tiny.yaml)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="overrides for the tiny config")
    p.set_defaults(handler=_demo)

    p = sub.add_parser(
        "plot",
        help="write a PNG of loss, accuracy and throughput curves of a run",
        description="Read RUN_DIR/metrics.jsonl and write RUN_DIR/curves.png (or --out).",
    )
    p.add_argument("run_dir", help="run directory holding metrics.jsonl")
    p.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/curves.png)")
    p.set_defaults(handler=_plot)
