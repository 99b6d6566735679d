"""The elastic re-split at the mission's scale, simulated: no data is read, only the epoch plan's arithmetic
(gaudi_pretrain/data/epoch_plan.py, what the loader runs on resume).

One process plans an epoch of --shards × --samples-per-shard over --ranks × --workers, lets every worker
consume a random part of its slice, re-splits the remainder over --new-ranks × --workers, and checks that
consumed + re-split positions cover every position exactly once. Reports time, peak memory (RSS) and the
size of the per-rank cursor (JSON) that a checkpoint stores. Writes benchmarks/results/elastic_resplit.json.

    python benchmarks/elastic_resplit.py                                  # 1,400 x 10,000, 512 x 8 -> 504
    python benchmarks/elastic_resplit.py --shards 14 --ranks 8 --new-ranks 7   # smoke
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

from gaudi_pretrain.data.epoch_plan import fresh_plan, remainder, select, split_range

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=int, default=1400)
    p.add_argument("--samples-per-shard", type=int, default=10_000)
    p.add_argument("--ranks", type=int, default=512)
    p.add_argument("--new-ranks", type=int, default=504)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "elastic_resplit.json")
    args = p.parse_args(argv)

    n = args.shards * args.samples_per_shard
    parts, new_parts = args.ranks * args.workers, args.new_ranks * args.workers
    rng = np.random.default_rng(args.seed)
    started = time.perf_counter()
    plan = fresh_plan(n, parts)
    seen = np.zeros(n, dtype=np.uint8)
    consumed = []
    for g in range(parts):
        lo, hi = split_range(n, parts, g)
        pos = int(rng.integers(0, hi - lo + 1))  # how far worker g got before the node died
        consumed.append(pos)
        for a, b in select(plan, lo, lo + pos):
            seen[a:b] += 1
    left = remainder(plan, parts, consumed)
    resplit_s = time.perf_counter() - started
    cursor = json.dumps({"plans": {"0": left.to_json()}})
    t0 = time.perf_counter()
    for g in range(new_parts):  # every new worker's slice of the remainder
        for a, b in select(left, *split_range(left.length, new_parts, g)):
            seen[a:b] += 1
    slices_s = time.perf_counter() - t0
    exactly_once = bool((seen == 1).all())
    result = {
        "samples": n,
        "old_geometry": f"{args.ranks} ranks x {args.workers} workers",
        "new_geometry": f"{args.new_ranks} ranks x {args.workers} workers",
        "remaining_samples": left.length,
        "remainder_intervals": len(left.intervals),
        "resplit_seconds": round(resplit_s, 3),
        "new_slices_seconds": round(slices_s, 3),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "cursor_plan_bytes_per_rank": len(cursor),
        "exactly_once": exactly_once,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0 if exactly_once else 1


if __name__ == "__main__":
    sys.exit(main())
