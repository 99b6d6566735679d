"""Subcommand `export-hf`: a training checkpoint → a transformers BridgeTower directory."""

from __future__ import annotations

import argparse
import json


def _export_hf(args: argparse.Namespace) -> int:
    from gaudi_pretrain.train.checkpoint import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out, overwrite=args.overwrite, best=args.best)
    print(json.dumps({"exported": str(out), "files": sorted(p.name for p in out.iterdir())}))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export-hf",
        help="write a transformers BridgeTower checkpoint (ForMaskedLM + ForImageAndTextRetrieval)",
        description="CHECKPOINT is a complete checkpoint directory or a run directory (its checkpoints/latest, or "
        "with --best its checkpoints/best: the best held-out ITM + MLM accuracy). OUT gets config.json (which "
        "records the training precision), model.safetensors (fp32: a bf16 run's optimizer master weights), "
        "preprocessor_config.json and the tokenizer named by data.tokenizer; it is written to a temporary "
        "directory and renamed at the end.",
    )
    p.add_argument("checkpoint", help="checkpoint directory or run directory")
    p.add_argument("out", help="output directory (must be absent or empty unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    p.add_argument("--best", action="store_true", help="the run's best checkpoint instead of its latest")
    p.set_defaults(handler=_export_hf)
