"""Which positions of an epoch each logical worker reads, and the re-split of an interrupted epoch.

Pure arithmetic, no I/O (the loader and benchmarks/elastic_resplit.py share it). The rules and why they
keep every sample exactly once across a change of world size: docs/checkpoints.md, "Elastic resume".
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

Interval = tuple[int, int]


@dataclass(frozen=True)
class EpochPlan:
    """The base positions an epoch still serves, in order. Base positions index the epoch's sample order
    cut into `base_parts` contiguous ranges, each block-shuffled; a fresh epoch serves all of them."""

    base_parts: int
    intervals: tuple[Interval, ...]

    @property
    def length(self) -> int:
        return sum(b - a for a, b in self.intervals)

    def to_json(self) -> dict[str, object]:
        return {"base_parts": self.base_parts, "intervals": [list(i) for i in self.intervals]}

    @classmethod
    def from_json(cls, data: dict[str, object]) -> EpochPlan:
        intervals = tuple((int(a), int(b)) for a, b in data["intervals"])  # type: ignore[union-attr]
        return cls(int(data["base_parts"]), intervals)  # type: ignore[arg-type]


def fresh_plan(num_samples: int, parts: int) -> EpochPlan:
    return EpochPlan(parts, ((0, num_samples),))


def split_range(length: int, parts: int, index: int) -> Interval:
    """The `index`-th of `parts` contiguous, near-equal slices of [0, length)."""
    return index * length // parts, (index + 1) * length // parts


def select(plan: EpochPlan, start: int, stop: int) -> list[Interval]:
    """The base intervals behind plan positions [start, stop)."""
    out, offset = [], 0
    for a, b in plan.intervals:
        lo, hi = max(start, offset), min(stop, offset + b - a)
        if lo < hi:
            out.append((a + lo - offset, a + hi - offset))
        offset += b - a
        if offset >= stop:
            break
    return out


def base_worker(num_samples: int, base_parts: int, q: int) -> int:
    """The base range holding base position q."""
    g = min(base_parts - 1, q * base_parts // num_samples)
    while split_range(num_samples, base_parts, g)[1] <= q:
        g += 1
    while split_range(num_samples, base_parts, g)[0] > q:
        g -= 1
    return g


def blocks(num_samples: int, base_parts: int, block: int, intervals: Sequence[Interval]) -> Iterator[tuple[int, ...]]:
    """(base range g, block b, first, stop): the shuffled positions [first, stop) of block b of range g,
    one tuple per block touched by `intervals`, in order."""
    for q0, q1 in intervals:
        q = q0
        while q < q1:
            g = base_worker(num_samples, base_parts, q)
            lo, hi = split_range(num_samples, base_parts, g)
            b = (q - lo) // block
            start = lo + b * block
            end = min(q1, hi, start + block)
            yield g, b, q - start, end - start
            q = end


def merge(intervals: Sequence[Interval]) -> tuple[Interval, ...]:
    out: list[list[int]] = []
    for a, b in intervals:
        if a == b:
            continue
        if out and out[-1][1] == a:
            out[-1][1] = b
        else:
            out.append([a, b])
    return tuple((a, b) for a, b in out)


def remainder(plan: EpochPlan, parts: int, consumed: Sequence[int]) -> EpochPlan:
    """What `plan` still serves when worker g of `parts` had consumed the first consumed[g] positions of
    its slice (in worker order: the re-split keeps the epoch's order)."""
    if len(consumed) != parts:
        raise ValueError(f"{len(consumed)} worker cursors for {parts} workers")
    left: list[Interval] = []
    for g, pos in enumerate(consumed):
        start, stop = split_range(plan.length, parts, g)
        if not 0 <= pos <= stop - start:
            raise ValueError(f"worker {g} consumed {pos} of {stop - start} positions")
        left.extend(select(plan, start + pos, stop))
    return EpochPlan(plan.base_parts, merge(left))
