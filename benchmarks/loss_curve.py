"""Does the optimized training path keep the model's numerics? Loss curves of the first steps, compared.

Two runs of `train.loop.train_step` (the DeepSpeed engine, as `gaudi-pretrain train`) from the SAME initial
weights on the SAME synthetic batches, dropout off (so the only difference is arithmetic):
- optimized: the config's precision and ZeRO stage (large: bf16 params + fp32 master weights, ZeRO-1),
  SDPA attention, torch.compile (default on CUDA), the backend's fused AdamW;
- reference: fp32 everywhere (TF32 off), eager attention (plain softmax), no compile, ZeRO 0.
Reports per-step total / MLM / ITM losses of both and the relative difference of the total loss; the check
passes when max_step |L_opt − L_ref| / L_ref ≤ --tolerance (default 0.02: bf16 keeps 8 mantissa bits, and
differences grow a little with every update). Writes <out>/loss_curve_<device-slug>.json and .md.

    python benchmarks/loss_curve.py --config configs/bridgetower_large.yaml --micro-batch 16 --steps 20
    python benchmarks/loss_curve.py --config configs/tiny.yaml --device cpu --steps 5 --micro-batch 8   # smoke
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timezone
from typing import Any

import bench_common as bc
import torch

from gaudi_pretrain.train.setup import make_backend

REPO = bc.REPO


def run(cfg, batches: list[dict[str, Any]], init_state, compile_mode: str, label: str) -> dict[str, Any]:
    backend = make_backend(cfg)
    t0 = time.perf_counter()
    ours = bc.build_ours(
        cfg,
        backend,
        engine="deepspeed",
        compile_mode=compile_mode,
        batches=(dict(b) for b in batches),
        init_state=init_state,
    )
    losses = []
    try:
        for i in range(len(batches)):
            ours.step()
            record = ours.last_losses()
            record["applied"] = record["loss"] is not None  # a skipped (non-finite) step leaves no losses
            losses.append(record)
            print(
                f"  {label} step {i + 1}: loss {record['loss']:.5f} (mlm {record['mlm_loss']:.5f}, "
                f"itm {record['itm_loss']:.5f})",
                flush=True,
            )
    finally:
        ours.close()
        del ours
        bc.free_memory(backend.device)
    return {
        "precision": cfg.train.precision,
        "zero_stage": cfg.train.zero_stage,
        "attention": cfg.model.attention,
        "compile": compile_mode,
        "seconds": round(time.perf_counter() - t0, 1),
        "losses": losses,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    p.add_argument("--config", default=str(REPO / "configs" / "bridgetower_large.yaml"))
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=2e-4, help="base lr, constant (no warm-up), x lr_multiplier as usual")
    p.add_argument("--device", choices=("auto", "cuda", "cpu", "hpu"), default="auto")
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compile the optimized run (default: on for CUDA)",
    )
    p.add_argument("--tolerance", type=float, default=0.02, help="max relative difference of the total loss")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = p.parse_args(argv)

    common = [
        "model.dropout=0.0",
        "optim.warmup_ratio=0.0",
        "train.max_steps=1000000",
        f"optim.lr={args.lr}",
        *args.overrides,
    ]
    optimized = bc.bench_config(args.config, common, device=args.device, micro_batch=args.micro_batch)
    backend = make_backend(optimized)
    device = backend.device
    compile_on = args.compile if args.compile is not None else device.type == "cuda"
    reference = bc.config_with(
        optimized,
        **{"train.precision": "fp32", "train.zero_stage": 0, "model.attention": "eager", "backend.compile": False},
    )
    optimized = bc.config_with(optimized, **{"model.attention": "sdpa", "backend.compile": compile_on})

    init = bc.build_model_on_device(optimized, backend, None)
    init_state = {k: v.detach().to("cpu", copy=True) for k, v in init.state_dict().items()}
    del init
    bc.free_memory(device)
    batches = bc.fixed_batches(optimized, args.micro_batch, args.steps, seed=args.seed)

    print(
        f"optimized: {optimized.train.precision}, ZeRO {optimized.train.zero_stage}, sdpa, "
        f"compile={'whole' if compile_on else 'none'}",
        flush=True,
    )
    opt = run(optimized, batches, init_state, "whole" if compile_on else "none", "optimized")
    print("reference: fp32 (TF32 off), ZeRO 0, eager attention, no compile", flush=True)
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        ref = run(reference, batches, init_state, "none", "reference")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32

    rel = [abs(o["loss"] - r["loss"]) / max(abs(r["loss"]), 1e-12) for o, r in zip(opt["losses"], ref["losses"])]
    result = {
        "benchmark": "loss_curve",
        "device": bc.device_name(device),
        "config": args.config,
        "micro_batch": args.micro_batch,
        "steps": args.steps,
        "lr": args.lr,
        "versions": bc.versions(),
        "optimized": opt,
        "reference": ref,
        "rel_diff_total_loss": [round(x, 6) for x in rel],
        "max_rel_diff": round(max(rel), 6),
        "first_step_rel_diff": round(rel[0], 6),
        "tolerance": args.tolerance,
        "passed": max(rel) <= args.tolerance,
        "loss_decreased": ref["losses"][-1]["loss"] < ref["losses"][0]["loss"],
        "command": "python benchmarks/loss_curve.py " + " ".join(sys.argv[1:]),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    bc.write_result(args.out, "loss_curve_" + bc.device_slug(device, args.config), result, markdown(result))
    return 0 if result["passed"] else 1


def markdown(res: dict[str, Any]) -> str:
    o, r = res["optimized"], res["reference"]
    lines = [
        f"# Loss curve, optimized vs fp32 eager: {res['device']}",
        "",
        f"`{res['config']}`, micro batch {res['micro_batch']}, {res['steps']} steps, lr {res['lr']} constant, dropout 0, "
        f"same initial weights and batches; {res['date']}. Reproduce: `{res['command']}`",
        f"Optimized: {o['precision']}, ZeRO {o['zero_stage']}, {o['attention']}, compile={o['compile']}. "
        f"Reference: {r['precision']} (TF32 off), ZeRO {r['zero_stage']}, {r['attention']} attention, no compile.",
        "",
        f"Max relative difference of the total loss: **{100 * res['max_rel_diff']:.3f}%** (step 1, before any "
        f"update: {100 * res['first_step_rel_diff']:.3f}%); tolerance {100 * res['tolerance']:.1f}% → "
        f"**{'pass' if res['passed'] else 'FAIL'}**.",
        "",
        "| step | reference loss | optimized loss | rel. diff | ref MLM | opt MLM | ref ITM | opt ITM |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, (a, b, d) in enumerate(zip(r["losses"], o["losses"], res["rel_diff_total_loss"]), 1):
        lines.append(
            f"| {i} | {a['loss']:.5f} | {b['loss']:.5f} | {100 * d:.3f}% | {a['mlm_loss']:.4f} | "
            f"{b['mlm_loss']:.4f} | {a['itm_loss']:.4f} | {b['itm_loss']:.4f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
