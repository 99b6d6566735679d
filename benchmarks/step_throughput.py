"""Training-step throughput on one device: transformers' BridgeTower reference vs our step, in one process.

(a) transformers: BridgeTowerForMaskedLM + BridgeTowerForImageAndTextRetrieval sharing one BridgeTowerModel,
    the recipe-faithful step — MLM forward (masked text, true images) + ITM forward (clean text, images of
    `itm_image_index`, 50% swapped), loss = MLM + ITM, autocast (bf16 when the config says bf16), fused
    AdamW (CUDA) over fp32 parameters.
(b) ours: gaudi_pretrain's BridgeTowerForPretraining (one shared vision pass, SDPA attention through the
    backend seam, backend compile / fused optimizer / autocast), stepped by `train.loop.train_step` through
    the DeepSpeed engine exactly as `gaudi-pretrain train` does (bf16 params + fp32 master weights in
    ZeRO's optimizer for the large config); `--engine torch` steps it without DeepSpeed instead.
Both on the same synthetic loader-shaped batches (CPU tensors copied to the device each step), after
`--warmup` steps, median of `--steps` timed steps. Also measured in the same run: a dense matmul peak
(bf16 8192³ on CUDA), peak device memory of each, and a per-phase breakdown of ours (vision, text,
cross-modal, heads, optimizer) from an instrumented pass. `--variant` adds lever ablations of ours.

Writes <out>/<device-slug>.json and .md (e.g. benchmarks/results/nvidia-h100-80gb-hbm3.json; a config other
than bridgetower_large adds its name: cpu-tiny.json). Weights are random (no downloads).

    python benchmarks/step_throughput.py --config configs/bridgetower_large.yaml --micro-batch 48 --hf-micro-batch 32
    python benchmarks/step_throughput.py --config configs/tiny.yaml --device cpu --steps 2 --warmup 1   # smoke
    python benchmarks/step_throughput.py --skip-hf --no-breakdown --variant compile=none --variant mb=96,ckpt=1

Variant keys (comma-separated, applied on top of the main run's settings): mb=N, engine=deepspeed|torch,
compile=none|whole|blocks|cudagraphs, attention=sdpa|eager, ckpt=0|1, precision=bf16|fp32, zero=0|1|2,
ga=N (gradient accumulation: one step = N micro-batches, deepspeed only), vision=shared|twice (twice: no shared
vision pass, the recipe's cost), qkv=separate|fused (one projection matmul for q/k/v in text/cross attention), optim=backend|foreach|forloop
(the backend's fused AdamW, or torch's unfused implementations).
FLOP/s of a variant count the model FLOPs of the default objective (vision=twice does more work per sample).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import bench_common as bc

from gaudi_pretrain.train.setup import make_backend

REPO = bc.REPO
DEFAULT_CONFIG = REPO / "configs" / "bridgetower_large.yaml"

VARIANT_KEYS = {
    "mb": ("train.micro_batch_size", int),
    "attention": ("model.attention", str),
    "ckpt": ("model.activation_checkpointing", lambda v: v.lower() in ("1", "true", "yes")),
    "precision": ("train.precision", str),
    "zero": ("train.zero_stage", int),
    "ga": ("train.gradient_accumulation_steps", int),
}
PATCH_KEYS = ("vision", "qkv")  # bench_common.ModelPatches: vision=shared|twice, qkv=separate|fused
COMPILE_MODES = ("none", "whole", "blocks", "cudagraphs")
_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", flush=True)


def parse_variant(spec: str) -> dict[str, Any]:
    """'mb=96,ckpt=1' → {'mb': '96', 'ckpt': '1'} (validated keys)."""
    out = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in (*VARIANT_KEYS, *PATCH_KEYS, "engine", "compile", "optim"):
            raise SystemExit(
                f"bad --variant item {item!r}: use key=value with key in "
                f"{sorted((*VARIANT_KEYS, *PATCH_KEYS, 'engine', 'compile', 'optim'))}"
            )
        if key == "compile":
            value = {"0": "none", "1": "whole", "false": "none", "true": "whole"}.get(value.lower(), value)
            if value not in COMPILE_MODES:
                raise SystemExit(f"--variant compile={value}: one of {COMPILE_MODES}")
        out[key] = value
    return out


def _guarded(fn: Callable[[], dict[str, Any]], device) -> dict[str, Any]:
    """Run one measurement; an OOM or error becomes a status instead of ending the whole benchmark. Memory
    and compiled graphs are released afterwards either way (the next measurement starts clean)."""
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001 - recorded and reported; the next measurement still runs
        status = "oom" if bc.is_oom(exc) else "error"
        message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:400]
        if status == "error":
            traceback.print_exc()
        log(f"  -> {status}: {message}")
        result = {"status": status, "error": message}
    bc.free_memory(device)
    return result


def _rates(median_step_s: float, micro_batch: int, flops: float, peak_tflops: float) -> dict[str, Any]:
    sps = micro_batch / median_step_s
    tflops = sps * flops / 1e12
    return {
        "samples_per_s": _sig(sps),
        "tflops": _sig(tflops),
        "pct_of_matmul_peak": _sig(100 * tflops / peak_tflops) if peak_tflops else None,
    }


def _sig(x: float, digits: int = 4) -> float:
    """Round to significant digits (CPU smoke numbers are tiny, GPU ones are not)."""
    return float(f"{x:.{digits}g}")


def measure_ours(
    cfg,
    engine: str,
    compile_mode: str,
    args,
    peak_tflops: float,
    breakdown: bool,
    patches: dict[str, str] | None = None,
    optimizer_impl: str = "backend",
) -> dict[str, Any]:
    from gaudi_pretrain.model.flops import flops_per_sample

    backend = make_backend(cfg)
    device = backend.device
    mb, ga = cfg.train.micro_batch_size, cfg.train.gradient_accumulation_steps
    record: dict[str, Any] = {
        "micro_batch": mb,
        "engine": engine,
        "compile": compile_mode,
        "attention": cfg.model.attention,
        "activation_checkpointing": cfg.model.activation_checkpointing,
        "precision": cfg.train.precision,
        "zero_stage": cfg.train.zero_stage if engine == "deepspeed" else None,
        "grad_accum": ga,
        "optimizer": optimizer_impl,
        **(patches or {}),
    }
    bc.reset_peak_memory(device)
    t0 = time.perf_counter()
    with bc.ModelPatches(**(patches or {})) as model_patches:
        ours = bc.build_ours(
            cfg,
            backend,
            engine=engine,
            compile_mode=compile_mode,
            seed=args.seed,
            patches=model_patches,
            optimizer_impl=optimizer_impl,
        )
        record["build_s"] = round(time.perf_counter() - t0, 2)
        try:
            timing = bc.time_steps(ours.step, device, args.warmup, args.steps)
            record.update(
                status="ok",
                **timing,
                **_rates(
                    timing["median_step_s"], mb * ga, flops_per_sample(cfg.model, cfg.data.max_text_len), peak_tflops
                ),
                peak_memory_gib=round(bc.peak_memory_gib(device), 2),
            )
            if breakdown:
                record["breakdown"] = bc.phase_breakdown(ours)
        finally:
            ours.close()
            del ours
    return record


def measure_hf(cfg, args, peak_tflops: float) -> dict[str, Any]:
    backend = make_backend(cfg)
    device = backend.device
    mb = cfg.train.micro_batch_size
    record: dict[str, Any] = {"micro_batch": mb, "precision": cfg.train.precision, "attention": "eager (transformers)"}
    bc.reset_peak_memory(device)
    t0 = time.perf_counter()
    hf = bc.build_hf(cfg, backend, seed=args.seed)
    record["build_s"] = round(time.perf_counter() - t0, 2)
    record["params"] = hf.params
    try:
        timing = bc.time_steps(hf.step, device, args.warmup, args.steps)
        record.update(
            status="ok",
            **timing,
            **_rates(timing["median_step_s"], mb, bc.hf_flops_per_sample(cfg), peak_tflops),
            peak_memory_gib=round(bc.peak_memory_gib(device), 2),
        )
    finally:
        hf.close()
        del hf
    return record


def with_oom_retry(measure: Callable[[int], dict[str, Any]], micro_batch: int, device, retry: bool) -> dict[str, Any]:
    """Measure at `micro_batch`; on OOM (if `retry`) try 3/4 of it, down to 8, and record the failures."""
    failed: list[int] = []
    mb = micro_batch
    while True:
        result = _guarded(lambda mb=mb: measure(mb), device)
        if result.get("status") != "oom" or not retry or mb <= 8:
            break
        failed.append(mb)
        mb = max(8, (mb * 3 // 4) // 8 * 8)
        log(f"  retrying with micro batch {mb}")
    result.setdefault("micro_batch", mb)
    result["oom_micro_batches"] = failed
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="run config (model section and shapes)")
    p.add_argument("--micro-batch", type=int, default=None, help="our micro batch (default: the config's)")
    p.add_argument("--hf-micro-batch", type=int, default=None, help="transformers' micro batch (default: ours)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported; default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps (default 3)")
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile our model (default: on for CUDA, off elsewhere)",
    )
    p.add_argument(
        "--compile-mode",
        choices=COMPILE_MODES[1:],
        default="whole",
        help="with --compile: whole model (as backend.compile), per block, or CUDA graphs",
    )
    p.add_argument(
        "--engine",
        choices=("deepspeed", "torch"),
        default="deepspeed",
        help="our step through the DeepSpeed engine as in training (default) or plain torch",
    )
    p.add_argument("--device", choices=("auto", "cuda", "cpu", "hpu"), default="auto")
    p.add_argument("--skip-hf", action="store_true", help="do not run the transformers reference")
    p.add_argument("--no-breakdown", action="store_true", help="skip the per-phase instrumented pass")
    p.add_argument("--no-oom-retry", action="store_true", help="do not retry a smaller micro batch on OOM")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="K=V[,K=V]",
        help="an extra configuration of ours to time (repeatable; see below)",
    )
    p.add_argument(
        "--deadline-s",
        type=float,
        default=None,
        help="start no variant after this many seconds since launch (the rest are marked skipped)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="results directory")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    args = p.parse_args(argv)
    launched = time.perf_counter()
    variants = [(spec, parse_variant(spec)) for spec in args.variant]

    cfg = bc.bench_config(args.config, args.overrides, device=args.device, micro_batch=args.micro_batch)
    backend = make_backend(cfg)
    device = backend.device
    compile_on = args.compile if args.compile is not None else device.type == "cuda"
    compile_mode = args.compile_mode if compile_on else "none"
    cfg = bc.config_with(cfg, **{"backend.compile": compile_mode == "whole"})
    hf_mb = args.hf_micro_batch or cfg.train.micro_batch_size
    from gaudi_pretrain.model.flops import flops_per_sample

    ours_flops, hf_flops = flops_per_sample(cfg.model, cfg.data.max_text_len), bc.hf_flops_per_sample(cfg)
    log(
        f"device {bc.device_name(device)}; config {args.config}; ours mb {cfg.train.micro_batch_size} "
        f"({args.engine}, compile={compile_mode}); transformers mb {hf_mb}"
    )

    peak = bc.matmul_peak_tflops(device)
    log(f"matmul peak: {peak['tflops']:.4g} TFLOP/s ({peak['dtype']} {peak['n']}^3)")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = bc.device_slug(device, args.config)
    hf: dict[str, Any] | None = None
    ours: dict[str, Any] = {"status": "not run yet"}
    variant_results: list[dict[str, Any]] = []

    def write() -> dict[str, Any]:
        """(Re)write the results after every measurement: a run cut short keeps what it measured."""
        result = summarize(args, cfg, device, peak, hf, ours, variant_results, ours_flops, hf_flops)
        (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
        (out / f"{stem}.md").write_text(markdown(result))
        return result

    if not args.skip_hf:
        log("transformers reference ...")
        hf = with_oom_retry(
            lambda mb: measure_hf(bc.config_with(cfg, **{"train.micro_batch_size": mb}), args, peak["tflops"]),
            hf_mb,
            device,
            not args.no_oom_retry,
        )
        log(f"  {hf.get('samples_per_s')} samples/s")
        write()

    log("ours ...")
    ours = with_oom_retry(
        lambda mb: measure_ours(
            bc.config_with(cfg, **{"train.micro_batch_size": mb}),
            args.engine,
            compile_mode,
            args,
            peak["tflops"],
            not args.no_breakdown,
        ),
        cfg.train.micro_batch_size,
        device,
        not args.no_oom_retry,
    )
    if ours.get("status") == "error" and compile_mode != "none":
        log("  compiled step failed; measuring the eager step instead")
        ours = dict(
            with_oom_retry(
                lambda mb: measure_ours(
                    bc.config_with(cfg, **{"train.micro_batch_size": mb, "backend.compile": False}),
                    args.engine,
                    "none",
                    args,
                    peak["tflops"],
                    not args.no_breakdown,
                ),
                cfg.train.micro_batch_size,
                device,
                not args.no_oom_retry,
            ),
            compile_error=ours.get("error"),
        )
    log(f"  {ours.get('samples_per_s')} samples/s")
    write()

    for spec, v in variants:
        if args.deadline_s is not None and time.perf_counter() - launched > args.deadline_s:
            variant_results.append({"variant": spec, "status": "skipped (deadline)"})
            continue
        changes = {VARIANT_KEYS[k][0]: VARIANT_KEYS[k][1](val) for k, val in v.items() if k in VARIANT_KEYS}
        vcfg = bc.config_with(cfg, **changes)
        engine, mode = v.get("engine", args.engine), v.get("compile", compile_mode)
        vcfg = bc.config_with(vcfg, **{"backend.compile": mode == "whole"})
        patches = {k: val for k, val in v.items() if k in PATCH_KEYS}
        log(f"variant {spec} ...")
        optim = v.get("optim", "backend")
        r = _guarded(
            lambda vcfg=vcfg, engine=engine, mode=mode, patches=patches, optim=optim: measure_ours(
                vcfg, engine, mode, args, peak["tflops"], False, patches, optim
            ),
            device,
        )
        r.setdefault("micro_batch", vcfg.train.micro_batch_size)
        variant_results.append({"variant": spec, **r})
        log(f"  {r.get('samples_per_s')} samples/s ({r.get('status')})")
        write()

    result = write()
    print(markdown(result))
    print(f"wrote {out / stem}.json and .md")
    return 0 if ours.get("status") == "ok" else 1


def summarize(args, cfg, device, peak, hf, ours, variants, ours_flops, hf_flops) -> dict[str, Any]:
    ours_sps = ours.get("samples_per_s")
    hf_sps = hf.get("samples_per_s") if hf else None
    return {
        "benchmark": "step_throughput",
        "device": bc.device_name(device),
        "device_slug": bc.device_slug(device, args.config),
        "config": str(Path(args.config).resolve().relative_to(REPO))
        if Path(args.config).resolve().is_relative_to(REPO)
        else args.config,
        "image_size": cfg.model.vision.image_size,
        "text_len": cfg.data.max_text_len,
        "versions": bc.versions(),
        "matmul_peak_tflops": _sig(peak["tflops"]),
        "matmul_peak": peak,
        "flops_per_sample_ours": ours_flops,
        "flops_per_sample_hf": hf_flops,
        "cross_layers": cfg.model.num_hidden_layers,
        "ours_samples_per_s": ours_sps,
        "hf_samples_per_s": hf_sps,
        "speedup_vs_hf": _sig(ours_sps / hf_sps, 3) if ours_sps and hf_sps else None,
        "ours_tflops": ours.get("tflops"),
        "hf_tflops": hf.get("tflops") if hf else None,
        "ours_pct_of_matmul_peak": ours.get("pct_of_matmul_peak"),
        "hf_pct_of_matmul_peak": hf.get("pct_of_matmul_peak") if hf else None,
        "ours_peak_memory_gib": ours.get("peak_memory_gib"),
        "hf_peak_memory_gib": hf.get("peak_memory_gib") if hf else None,
        "ours": ours,
        "hf": hf,
        "flop_share": bc.flop_shares(cfg),
        "variants": variants,
        "steps": args.steps,
        "warmup": args.warmup,
        "command": "python benchmarks/step_throughput.py " + " ".join(sys.argv[1:]),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _fmt(v: Any, spec: str = ".1f") -> str:
    if isinstance(v, float) and 0 < abs(v) < 1 and spec.endswith("f"):
        return format(v, ".3g")  # CPU smoke numbers are tiny
    return "—" if v is None else format(v, spec) if isinstance(v, (int, float)) else str(v)


def _row(name: str, r: dict[str, Any] | None) -> str:
    if not r:
        return f"| {name} | — | not run | | | | |"
    if r.get("status") != "ok":
        return f"| {name} | {r.get('micro_batch')} | {r.get('status')}: {r.get('error', '')} | | | | |"
    return (
        f"| {name} | {r['micro_batch']} | **{r['samples_per_s']:.1f}** | {_fmt(r['tflops'], '.1f')} | "
        f"{_fmt(r['pct_of_matmul_peak'])} | {_fmt(r['peak_memory_gib'], '.1f')} | {1e3 * r['median_step_s']:.1f} |"
    )


def markdown(res: dict[str, Any]) -> str:
    ours, hf = res["ours"], res["hf"]
    v = res["versions"]
    lines = [
        f"# Step throughput: {res['device']}",
        "",
        f"`{res['config']}`, {res['image_size']} px, {res['text_len']} tokens, random weights, synthetic batches; "
        f"median of {res['steps']} steps after {res['warmup']} warm-up. torch {v.get('torch')}, transformers "
        f"{v.get('transformers')}, deepspeed {v.get('deepspeed')}; {res['date']}.",
        f"Reproduce: `{res['command']}`",
        "",
        f"Matmul peak measured in this run: **{_fmt(res['matmul_peak_tflops'])} TFLOP/s** "
        f"({res['matmul_peak']['dtype']}, {res['matmul_peak']['n']}³).",
        f"FLOPs per sample (fwd+bwd, matmuls): ours {res['flops_per_sample_ours'] / 1e12:.4g} T (one vision pass, "
        f"two text + cross-modal passes); transformers {res['flops_per_sample_hf'] / 1e12:.4g} T (two full passes).",
        "",
        "| step | micro batch | samples/s | TFLOP/s | % of matmul peak | peak memory GiB | step ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
        _row("transformers reference: 2 forwards, autocast, fused AdamW", hf),
        _row(f"ours: {ours.get('engine')}, compile={ours.get('compile')}, {ours.get('precision')}", ours),
        "",
        f"ours / transformers: **{_fmt(res['speedup_vs_hf'], '.2f')}×** samples/s.",
    ]
    if ours.get("compile_error"):
        lines.append(f"The compiled step failed ({ours['compile_error']}); the row above is the eager step.")
    for who, r in (("transformers", hf), ("ours", ours)):
        if r and r.get("oom_micro_batches"):
            lines.append(f"{who}: out of memory at micro batch {r['oom_micro_batches']}.")
    bd = ours.get("breakdown")
    if bd and "error" in bd:
        lines += ["", f"Per-phase breakdown failed: {bd['error']}"]
    elif bd:
        share = res["flop_share"]
        lines += [
            "",
            f"## Per-phase breakdown of ours (instrumented eager pass, {bd.get('rows')} rows)",
            "",
            "| phase | forward ms | backward ms | total ms | share of time | share of FLOPs |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for phase in ("vision", "text", "cross", "heads"):
            lines.append(
                f"| {phase} | {_fmt(bd['ms'].get('fwd:' + phase), '.2f')} | "
                f"{_fmt(bd['ms'].get('bwd:' + phase), '.2f')} | {bd['phase_ms'][phase]:.2f} | "
                f"{100 * bd['phase_share'][phase]:.1f}% | {100 * share[phase]:.1f}% |"
            )
        lines.append(
            f"| rest of backward (embeddings, engine) | | {_fmt(bd['ms'].get('bwd:engine'), '.2f')} | "
            f"{bd['phase_ms']['engine_backward_rest']:.2f} | "
            f"{100 * bd['phase_share']['engine_backward_rest']:.1f}% | |"
        )
        lines.append(
            f"| optimizer step | | | {bd['phase_ms']['optimizer']:.2f} | "
            f"{100 * bd['phase_share']['optimizer']:.1f}% | 0% |"
        )
        lines.append(f"| total | | | {bd['total_ms']:.2f} | | |")
        lines.append("")
        lines.append(
            "vision = patch embedding + CLIP blocks + image bridges; text = RoBERTa (MLM and ITM texts in one "
            f"[2B, L] pass) + text bridges; cross = {res['cross_layers']} bridged cross-modal layers per stream, both "
            "passes; "
            "heads = MLM/ITM heads and losses. " + bd["note"] + "."
        )
    if res["variants"]:
        lines += [
            "",
            "## Variants of ours",
            "",
            "| variant | micro batch | samples/s | TFLOP/s | % of matmul peak | peak memory GiB | step ms |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        lines += [_row(r["variant"], r) for r in res["variants"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
