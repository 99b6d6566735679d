"""Subcommand `checkpoint universal`: convert a checkpoint to DeepSpeed's universal format ahead of an
elastic resume (docs/checkpoints.md, "Elastic resume")."""

from __future__ import annotations

import argparse
import json
import time


def _universal(args: argparse.Namespace) -> int:
    from gaudi_pretrain.config import read_yaml, validate_config
    from gaudi_pretrain.errors import CheckpointError
    from gaudi_pretrain.train.checkpoint import read_client_state
    from gaudi_pretrain.train.checkpoint_dirs import resolve_checkpoint
    from gaudi_pretrain.train.universal import convert_to_universal, is_complete_universal, universal_dir

    ckpt = resolve_checkpoint(args.checkpoint)
    client = read_client_state(ckpt)
    stage = int(client.extra.get("zero_stage", validate_config(read_yaml(ckpt / "config.yaml")).train.zero_stage))
    if stage == 0:
        raise CheckpointError(
            f"{ckpt} was saved with ZeRO 0: its optimizer state is whole on every rank and resumes on any "
            "world size as it is (a universal checkpoint is for ZeRO 1-3)"
        )
    started = time.perf_counter()
    if is_complete_universal(ckpt) and not args.force:
        out, converted = universal_dir(ckpt), False
    else:
        out, converted = convert_to_universal(ckpt, client.step), True
    record = {"universal": str(out), "source": str(ckpt), "converted": converted}
    record["seconds"] = round(time.perf_counter() - started, 3)
    print(json.dumps(record))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    ckpt = sub.add_parser("checkpoint", help="operations on training checkpoints")
    actions = ckpt.add_subparsers(dest="checkpoint_command", metavar="ACTION")
    p = actions.add_parser(
        "universal",
        help="convert a ZeRO 1-3 checkpoint to DeepSpeed's universal format (for another world size or stage)",
        description="CHECKPOINT is a complete checkpoint directory or a run directory (its checkpoints/latest). "
        "Writes CHECKPOINT.universal/ beside it through DeepSpeed's ds_to_universal, in a temporary directory "
        "renamed at the end. `train --resume auto` does this by itself on rank 0 when the world size or ZeRO "
        "stage changed; converting ahead saves that time on the relaunched job (it reuses a complete conversion "
        "of the same save).",
    )
    p.add_argument("checkpoint", help="checkpoint directory or run directory")
    p.add_argument("--force", action="store_true", help="convert again even if a complete conversion exists")
    p.set_defaults(handler=_universal)
