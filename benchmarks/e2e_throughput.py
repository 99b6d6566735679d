"""End-to-end training throughput from real JPEG shards vs the synthetic-batch step throughput.

1. Builds shards the way a user would: photo-like 640×480 JPEGs (benchmarks/data_throughput.py's generator)
   + captions → `gaudi_pretrain.data.shards.build_shards` (shorter side resized to the config's image size,
   294 for the large model) and a byte-level BPE tokenizer trained on the captions (no downloads).
2. Runs `python -m gaudi_pretrain train` (the CLI, loader workers, DeepSpeed, metrics.jsonl) for --steps
   steps with random weights, `data.resampled=true` (an endless stream), no eval.
3. Reads metrics.jsonl, drops the log windows that hold the first --skip-steps steps (compile, warm-up),
   and compares the median logged samples/s with the synthetic-batch step throughput of the same step
   (`--synthetic-json` from step_throughput.py, or measured here by running it with --skip-hf). Target: ≥ 90%.
Writes <out>/e2e_<device-slug>.json and .md.

    python benchmarks/e2e_throughput.py --config configs/bridgetower_large.yaml --micro-batch 64 --steps 60 \\
        --synthetic-json benchmarks/results/nvidia-h100-80gb-hbm3.json
    python benchmarks/e2e_throughput.py --config configs/tiny.yaml --device cpu --steps 12 --log-every 2 \\
        --skip-steps 4 --images 256 --source-size 64x48 --workers 1     # CPU smoke
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import bench_common as bc
import numpy as np

from gaudi_pretrain.train.setup import make_backend

REPO = bc.REPO
TAIL = ", photographed on a sunny afternoon near the old harbour while people walk past the cafes"


def _write_images(args: tuple[int, int, int, int, str]) -> list[str]:
    """Worker: photo-like JPEGs [start, stop) into folder; returns their file names."""
    from data_throughput import photo_like

    start, stop, w, h, folder = args
    names = []
    for i in range(start, stop):
        rng = np.random.default_rng(1000 + i)
        name = f"{i:07d}.jpg"
        (Path(folder) / name).write_bytes(photo_like(rng, w, h))
        names.append(name)
    return names


def build_dataset(
    root: Path, images: int, source_size: tuple[int, int], image_size: int, workers: int, samples_per_shard: int
) -> dict[str, Any]:
    """Originals + captions → shards + tokenizer under `root`; reused when the manifest is already there."""
    from gaudi_pretrain.data.shards import build_shards, records_from_jsonl
    from gaudi_pretrain.data.synthetic import all_captions
    from gaudi_pretrain.data.tokenizer import train_demo_tokenizer

    shards, tok = root / "shards", root / "tokenizer"
    info_path = root / "dataset.json"
    wanted = {"images": images, "source_size": list(source_size), "image_size": image_size}
    if info_path.is_file() and json.loads(info_path.read_text()).get("wanted") == wanted:
        return json.loads(info_path.read_text())
    t0 = time.perf_counter()
    orig = root / "orig"
    orig.mkdir(parents=True, exist_ok=True)
    chunk = max(1, images // max(1, workers * 4))
    jobs = [(s, min(images, s + chunk), *source_size, str(orig)) for s in range(0, images, chunk)]
    if workers > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(workers) as pool:
            names = [n for part in pool.map(_write_images, jobs) for n in part]
    else:
        names = [n for job in jobs for n in _write_images(job)]
    gen_s = time.perf_counter() - t0
    captions = all_captions()
    lines = [
        json.dumps({"image": f"orig/{n}", "caption": f"{captions[i % len(captions)]}{TAIL} ({i})"})
        for i, n in enumerate(names)
    ]
    (root / "data.jsonl").write_text("\n".join(lines) + "\n")
    t1 = time.perf_counter()
    manifest = build_shards(
        records_from_jsonl(root / "data.jsonl"),
        shards,
        image_size=image_size,
        samples_per_shard=samples_per_shard,
        workers=workers,
        progress=False,
    )
    build_s = time.perf_counter() - t1
    train_demo_tokenizer([json.loads(x)["caption"] for x in lines], tok, vocab_size=512)
    info = {
        "wanted": wanted,
        "shards": str(shards),
        "tokenizer": str(tok),
        "samples": manifest["total"],
        "num_shards": len(manifest["shards"]),
        "generate_s": round(gen_s, 1),
        "build_s": round(build_s, 1),
        "shard_bytes_per_sample": int(sum(s["bytes"] for s in manifest["shards"]) / max(1, manifest["total"])),
    }
    info_path.write_text(json.dumps(info, indent=1))
    return info


def synthetic_rate(args, micro_batch: int, compile_on: bool, out: Path) -> tuple[float, dict[str, Any]]:
    """ours_samples_per_s from --synthetic-json, else from a step_throughput.py run (--skip-hf)."""
    if args.synthetic_json:
        res = json.loads(Path(args.synthetic_json).read_text())
        return float(res["ours_samples_per_s"]), {
            "source": args.synthetic_json,
            "micro_batch": res["ours"]["micro_batch"],
            "compile": res["ours"].get("compile"),
        }
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "step_throughput.py"),
        "--config",
        args.config,
        "--skip-hf",
        "--no-breakdown",
        "--no-oom-retry",
        "--micro-batch",
        str(micro_batch),
        "--device",
        args.device,
        "--steps",
        str(args.synthetic_steps),
        "--warmup",
        "2",
        "--compile" if compile_on else "--no-compile",
        "--out",
        str(out / "synthetic"),
        *args.overrides,
    ]
    print("synthetic:", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)
    (path,) = (out / "synthetic").glob("*.json")
    res = json.loads(path.read_text())
    return float(res["ours_samples_per_s"]), {
        "source": "step_throughput.py --skip-hf (this run)",
        "micro_batch": micro_batch,
        "compile": res["ours"].get("compile"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    p.add_argument("--config", default=str(REPO / "configs" / "bridgetower_large.yaml"))
    p.add_argument(
        "--micro-batch", type=int, default=None, help="default: the synthetic JSON's micro batch, else the config's"
    )
    p.add_argument("--steps", type=int, default=60, help="training steps (default 60)")
    p.add_argument("--log-every", type=int, default=10, help="logging.every_steps (default 10)")
    p.add_argument("--skip-steps", type=int, default=20, help="steps excluded as warm-up/compile (default 20)")
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: the config's data.num_workers)")
    p.add_argument("--images", type=int, default=2000, help="distinct images in the shards (default 2000)")
    p.add_argument("--source-size", default="640x480", help="original image size WxH (default 640x480)")
    p.add_argument("--build-workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--device", choices=("auto", "cuda", "cpu", "hpu"), default="auto")
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="backend.compile for the training run (default: on for CUDA)",
    )
    p.add_argument("--synthetic-json", default=None, help="step_throughput.py result to compare with")
    p.add_argument("--synthetic-steps", type=int, default=10)
    p.add_argument("--work-dir", default=None, help="where shards and the run go (default: a temp dir)")
    p.add_argument("--target", type=float, default=0.9)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="extra overrides for both runs")
    args = p.parse_args(argv)

    import tempfile

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="e2e_"))
    work.mkdir(parents=True, exist_ok=True)
    cfg = bc.bench_config(args.config, args.overrides, device=args.device)
    backend = make_backend(cfg)
    device = backend.device
    compile_on = args.compile if args.compile is not None else device.type == "cuda"
    mb = args.micro_batch
    if args.synthetic_json:  # train the way the synthetic step ran (after its OOM retries / compile fallback)
        synthetic_ours = json.loads(Path(args.synthetic_json).read_text())["ours"]
        mb = mb or synthetic_ours["micro_batch"]
        if args.compile is None:
            compile_on = synthetic_ours.get("compile") == "whole"
    mb = mb or cfg.train.micro_batch_size
    workers = args.workers if args.workers is not None else cfg.data.num_workers
    w, h = (int(x) for x in args.source_size.lower().split("x"))

    print(f"building {args.images} images {w}x{h} → shards at {cfg.model.vision.image_size} px in {work}", flush=True)
    data = build_dataset(
        work / "data",
        args.images,
        (w, h),
        cfg.model.vision.image_size,
        args.build_workers,
        samples_per_shard=max(50, args.images // 16),
    )
    print(
        f"  {data['samples']} samples in {data['num_shards']} shards (generate {data['generate_s']} s, "
        f"build {data['build_s']} s)",
        flush=True,
    )

    run_dir = work / "run"
    shutil.rmtree(run_dir, ignore_errors=True)  # metrics.jsonl appends: start clean
    overrides = [
        "model.from_pretrained=null",
        "model.init_vision_from=null",
        "model.init_text_from=null",
        f"data.train_shards=[{data['shards']}]",
        "data.eval_shards=[]",
        f"data.tokenizer={data['tokenizer']}",
        "data.resampled=true",
        f"data.num_workers={workers}",
        f"train.micro_batch_size={mb}",
        "train.gradient_accumulation_steps=1",
        "train.global_batch_size=null",
        f"train.max_steps={args.steps}",
        f"train.output_dir={run_dir}",
        f"logging.every_steps={args.log_every}",
        "logging.tensorboard=false",
        "logging.progress_bar=false",
        "checkpoint.every_steps=100000000",
        "checkpoint.export_hf=false",
        "checkpoint.resume=null",
        f"backend.name={device.type}",
        f"backend.compile={str(compile_on).lower()}",
        *args.overrides,
    ]
    cmd = [sys.executable, "-m", "gaudi_pretrain", "train", "--config", args.config, *overrides]
    print("train:", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}"})
    train_wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(f"training failed with exit code {proc.returncode}", flush=True)
        return proc.returncode
    from gaudi_pretrain.train.metrics import read_metrics

    records = [r for r in read_metrics(run_dir) if r.get("kind") == "train"]
    kept = [r for r in records if r["step"] - args.log_every >= args.skip_steps]
    if not kept:
        print(f"no log window after step {args.skip_steps}: raise --steps", flush=True)
        return 1
    e2e = statistics.median(r["samples_per_s"] for r in kept)
    synthetic, synthetic_info = synthetic_rate(args, mb, compile_on, work)
    ratio = e2e / synthetic
    result = {
        "benchmark": "e2e_throughput",
        "device": bc.device_name(device),
        "config": args.config,
        "micro_batch": mb,
        "loader_workers": workers,
        "compile": compile_on,
        "steps": args.steps,
        "skip_steps": args.skip_steps,
        "dataset": data,
        "e2e_samples_per_s": round(e2e, 2),
        "synthetic_samples_per_s": round(synthetic, 2),
        "synthetic": synthetic_info,
        "ratio": round(ratio, 3),
        "target": args.target,
        "passed": ratio >= args.target,
        "data_wait_frac": [r.get("data_wait_frac") for r in kept],
        "windows": [
            {
                "step": r["step"],
                "samples_per_s": r["samples_per_s"],
                "data_wait_frac": r.get("data_wait_frac"),
                "memory_gib": r.get("memory_gib"),
                "rss_with_workers_gib": r.get("rss_with_workers_gib"),
            }
            for r in records
        ],
        "train_wall_s": round(train_wall, 1),
        "versions": bc.versions(),
        "command": "python benchmarks/e2e_throughput.py " + " ".join(sys.argv[1:]),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    bc.write_result(args.out, "e2e_" + bc.device_slug(device, args.config), result, markdown(result))
    return 0


def markdown(res: dict[str, Any]) -> str:
    d = res["dataset"]
    lines = [
        f"# End-to-end training throughput: {res['device']}",
        "",
        f"`gaudi-pretrain train` with `{res['config']}` (random weights), micro batch {res['micro_batch']}, "
        f"{res['loader_workers']} loader workers, compile={res['compile']}, {res['steps']} steps; the log windows "
        f"after step {res['skip_steps']} count. Shards: {d['samples']} photo-like JPEGs in {d['num_shards']} shards "
        f"({d['shard_bytes_per_sample']} bytes/sample), resampled stream. {res['date']}.",
        f"Reproduce: `{res['command']}`",
        "",
        "| | samples/s |",
        "|---|---:|",
        f"| synthetic batches (step_throughput.py, ours) | {res['synthetic_samples_per_s']:.4g} |",
        f"| end to end from JPEG shards | {res['e2e_samples_per_s']:.4g} |",
        f"| ratio (target ≥ {res['target']:.0%}) | **{res['ratio']:.1%}** {'pass' if res['passed'] else 'FAIL'} |",
        "",
        "| log window ending at step | samples/s | data wait | device memory GiB | RSS with workers GiB |",
        "|---:|---:|---:|---:|---:|",
    ]
    for w in res["windows"]:
        lines.append(
            f"| {w['step']} | {w['samples_per_s']:.4g} | {100 * (w['data_wait_frac'] or 0):.1f}% | "
            f"{w['memory_gib'] or 0:.2f} | {w['rss_with_workers_gib'] or 0:.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
