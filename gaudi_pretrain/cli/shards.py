"""`gaudi-pretrain shards {build,inspect,demo}`: build webdataset shards, look inside them, make the demo set.

Handlers import the heavy modules (PIL, tokenizers, transformers) lazily, so `--help` stays instant.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from gaudi_pretrain.errors import DataError


def register(subparsers: Any) -> None:
    shards = subparsers.add_parser(
        "shards",
        help="build, inspect or generate webdataset tar shards",
        description="Build webdataset tar shards (img2dataset-compatible layout), inspect shard directories, "
        "or generate the embedded demo dataset.",
    )
    sub = shards.add_subparsers(dest="shards_command", metavar="ACTION")
    sub.required = True

    build = sub.add_parser(
        "build",
        help="re-encode an image-caption dataset into shards",
        description="Write <out>/00000.tar … (<key>.jpg resized so the shorter side is --image-size, <key>.txt, "
        "<key>.json), <stem>_stats.json per shard and manifest.json. Unreadable images, missing captions and "
        "duplicate (image, caption) pairs are skipped and counted. Re-running skips shards already complete.",
    )
    src = build.add_mutually_exclusive_group(required=True)
    src.add_argument("--img2dataset", metavar="DIR", help="an img2dataset output directory (tar or files layout)")
    src.add_argument("--jsonl", metavar="FILE", help="JSON lines with 'image' (path) and 'caption'")
    src.add_argument("--csv", metavar="FILE", help="CSV with columns 'image' (path) and 'caption'")
    src.add_argument("--coco-json", metavar="FILE", help="COCO captions JSON (use with --coco-images)")
    build.add_argument("--coco-images", metavar="DIR", help="image folder for --coco-json")
    build.add_argument("--out", required=True, help="output directory for the shards")
    build.add_argument("--image-size", type=int, default=294, help="shorter side of stored images (default 294)")
    build.add_argument("--samples-per-shard", type=int, default=10_000, help="samples per shard (default 10000)")
    build.add_argument("--workers", type=int, default=1, help="parallel worker processes (default 1)")
    build.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    build.add_argument(
        "--key-prefix",
        default="",
        metavar="PREFIX",
        help="prefix of every sample key, e.g. 'cc3m-' (letters, digits, _ and -; default none): "
        "give each source its own when a run trains on several builds",
    )
    build.add_argument("--no-progress", action="store_true", help="no progress bar")
    build.set_defaults(handler=_build)

    inspect = sub.add_parser(
        "inspect",
        help="count samples and show example captions of any tar shards",
        description="Report shards, sample counts, sizes, member extensions, samples without a caption, read "
        "errors and a few example captions. Works on any webdataset/img2dataset tar directory or glob.",
    )
    inspect.add_argument("shards", nargs="+", help="directory, glob, brace pattern or tar path")
    inspect.add_argument("--examples", type=int, default=5, help="example captions to show (default 5)")
    inspect.add_argument("--json", action="store_true", help="print the full report as JSON")
    inspect.set_defaults(handler=_inspect)

    demo = sub.add_parser(
        "demo",
        help="generate the embedded demo dataset (colored shapes) and its tokenizer",
        description="Write <out>/train/*.tar, <out>/eval/*.tar (held out) and <out>/tokenizer: 32x32 JPEGs of "
        "colored shapes with captions like 'a red circle at the top left', deterministic from --seed.",
    )
    demo.add_argument("--out", required=True, help="output directory (e.g. data_shards/demo)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument("--train-samples", type=int, default=4000, help="training samples (default 4000)")
    demo.add_argument("--eval-samples", type=int, default=600, help="held-out samples (default 600)")
    demo.add_argument("--image-size", type=int, default=32, help="image size (default 32, as configs/tiny.yaml)")
    demo.add_argument("--workers", type=int, default=1, help="parallel worker processes (default 1)")
    demo.set_defaults(handler=_demo)


def _build(args: argparse.Namespace) -> int:
    from gaudi_pretrain.data import shards

    if args.coco_json and not args.coco_images:
        raise DataError("--coco-json needs --coco-images DIR")
    if args.coco_images and not args.coco_json:
        raise DataError("--coco-images is only used with --coco-json")
    if args.img2dataset:
        inputs = shards.records_from_img2dataset(args.img2dataset)
    elif args.jsonl:
        inputs = shards.records_from_jsonl(args.jsonl)
    elif args.csv:
        inputs = shards.records_from_csv(args.csv)
    else:
        inputs = shards.records_from_coco(args.coco_json, args.coco_images)
    manifest = shards.build_shards(
        inputs,
        args.out,
        image_size=args.image_size,
        samples_per_shard=args.samples_per_shard,
        workers=args.workers,
        quality=args.quality,
        progress=not args.no_progress,
        key_prefix=args.key_prefix,
    )
    skipped = manifest["skipped"]
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(skipped["by_reason"].items())) or "none"
    print(
        f"wrote {manifest['total']} samples in {len(manifest['shards'])} shards to {args.out} "
        f"({manifest['reused_shards']} reused); skipped {skipped['count']} ({reasons})"
    )
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from gaudi_pretrain.data.shards import inspect_shards

    report = inspect_shards(args.shards, examples=args.examples)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    sizes = [s["samples"] for s in report["shards"]]
    print(
        f"{len(sizes)} shards, {report['total_samples']} samples, {report['total_bytes'] / 1e6:.1f} MB "
        f"(per shard: min {min(sizes)}, max {max(sizes)})"
    )
    print(f"members: {report['members_by_extension']}; samples without caption: {report['samples_without_caption']}")
    for err in report["errors"]:
        print(f"read error: {err}")
    for caption in report["example_captions"]:
        print(f"  {caption}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from gaudi_pretrain.data.synthetic import build_demo_dataset

    summary = build_demo_dataset(
        args.out,
        seed=args.seed,
        train_samples=args.train_samples,
        eval_samples=args.eval_samples,
        image_size=args.image_size,
        workers=args.workers,
    )
    print(
        f"demo dataset in {args.out}: train {summary['train']['samples']} samples in shards "
        f"{summary['train']['shards']}, eval {summary['eval']['samples']}, tokenizer vocab "
        f"{summary['tokenizer']['vocab_size']} at {summary['tokenizer']['path']}"
    )
    return 0
