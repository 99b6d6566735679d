"""`gaudi-pretrain demo`: the whole pipeline on CPU in a few minutes (README command 1).

Builds the embedded demo dataset (if absent), trains the tiny model, evaluates on held-out shards,
exports a transformers checkpoint, and prints a summary whose last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

from gaudi_pretrain.errors import ConfigError

TINY_CONFIG = Path("configs/tiny.yaml")


def find_tiny_config() -> Path:
    """configs/tiny.yaml in the working directory, else beside the package source (a checkout)."""
    for candidate in (TINY_CONFIG, Path(__file__).resolve().parents[2] / TINY_CONFIG):
        if candidate.is_file():
            return candidate
    raise ConfigError("configs/tiny.yaml not found: run the demo from the repository root")


def run_demo(out: str | Path, steps: int | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    from gaudi_pretrain.config import load_config
    from gaudi_pretrain.data.synthetic import DEMO_VERSION, build_demo_dataset, demo_dataset_version
    from gaudi_pretrain.train import train

    out = Path(out)
    shards = out / "shards"
    if demo_dataset_version(shards) != DEMO_VERSION:  # absent, half-built or drawn by an older generator
        print(f"building the demo dataset in {shards}", flush=True)
        shutil.rmtree(shards, ignore_errors=True)
        build_demo_dataset(shards)
    run_dir, hf_dir = out / "run", out / "hf"
    for stale in (run_dir, hf_dir):  # the demo's own outputs: start fresh every time
        shutil.rmtree(stale, ignore_errors=True)
    demo_overrides = [
        f"data.train_shards=['{shards}/train/*.tar']",
        f"data.eval_shards=['{shards}/eval/*.tar']",
        f"data.tokenizer={shards}/tokenizer",
        f"train.output_dir={run_dir}",
        "checkpoint.export_hf=false",  # the demo exports once, to OUT/hf
    ]
    if steps is not None:
        demo_overrides.append(f"train.max_steps={steps}")
    cfg = load_config(find_tiny_config(), demo_overrides + list(overrides or []))
    started = time.perf_counter()
    summary = train(cfg)
    from gaudi_pretrain.train.checkpoint import export_checkpoint  # torch: imported once train() prepared for it

    export_checkpoint(run_dir, hf_dir)
    ev, tr = summary["eval"], summary["train"]
    result = {
        "steps": tr.get("step"),
        "samples_per_s": round(tr.get("samples_per_s", 0.0), 1),
        "itm_acc": round(ev.get("itm_acc", 0.0), 4),
        "mlm_acc": round(ev.get("mlm_acc", 0.0), 4),
        "ir_r1": round(ev.get("ir_r1", 0.0), 4),
        "tr_r1": round(ev.get("tr_r1", 0.0), 4),
        "r1_chance": round(1 / cfg.eval.retrieval_samples, 4),  # one true pair among N candidates
        "wall_s": round(time.perf_counter() - started, 1),
        "run_dir": str(run_dir),
        "hf_dir": str(hf_dir),
    }
    print(
        f"demo finished: {result['steps']} steps, held-out ITM acc {result['itm_acc']:.3f}, "
        f"MLM acc {result['mlm_acc']:.3f}, IR R@1 {result['ir_r1']:.3f}, TR R@1 {result['tr_r1']:.3f} "
        f"(chance {result['r1_chance']:.3f} over {cfg.eval.retrieval_samples} pairs)"
    )
    print(f"run: {run_dir}   transformers export: {hf_dir}   curves: gaudi-pretrain plot {run_dir}")
    print(json.dumps(result))
    return result


def _demo(args: argparse.Namespace) -> int:
    run_demo(args.out, steps=args.steps, overrides=args.overrides)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
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
