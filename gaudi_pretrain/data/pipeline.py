"""Shards → fixed-shape ITM+MLM batches, split exactly across ranks and loader workers, exactly resumable.

The split is by sample index, not by whole shards (webdataset's tar conventions and URL opener are kept):
an epoch plan from (seed, epoch), cut into world_size × workers contiguous ranges, block-shuffled, every
worker yielding the same number of batches (padding rows where it runs short), masks and negatives seeded
per batch so a resumed loader needs only a cursor. The rules, and what counts as a skipped sample:
docs/architecture.md "Exact-once data split" and docs/data.md.
"""

from __future__ import annotations

import logging
import math
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import count
from typing import Any

import numpy as np
import torch

from gaudi_pretrain.data.epoch_plan import EpochPlan, blocks, fresh_plan, remainder, select, split_range
from gaudi_pretrain.data.masking import itm_negatives, mask_tokens
from gaudi_pretrain.data.shards import (
    IMAGE_EXTS,
    ReadReport,
    caption_of,
    is_safe_key,
    iter_samples,
    resolve_shards,
    shard_sample_counts,
)
from gaudi_pretrain.data.transforms import decode_image, normalize_images, tokenize
from gaudi_pretrain.errors import DataError

log = logging.getLogger(__name__)

STATE_VERSION = 2
_READABLE_VERSIONS = (1, 2)  # 1: before re-split plans were recorded
_READ_EXTS = ("txt", "json") + IMAGE_EXTS
_TAG_ORDER, _TAG_BLOCK, _TAG_BATCH = 1, 2, 3  # keep the seeded streams independent


def _rng(*entropy: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(e) for e in entropy]))


# ------------------------------------------------------------------------------------------ plan


@dataclass(frozen=True)
class LoaderSpec:
    """Everything a worker needs (picklable; identical on every rank except `rank`)."""

    urls: tuple[str, ...]
    counts: tuple[int, ...]
    seed: int
    rank: int
    world_size: int
    workers: int  # logical workers per rank (>= 1; 1 when the DataLoader runs in-process)
    batch_size: int
    image_size: int
    max_text_len: int
    shuffle: bool
    shuffle_buffer: int
    resampled: bool
    mlm_probability: float
    itm_negative_prob: float
    itm_hard_negatives: float
    itm_hard_negatives_ramp_epochs: int
    split_tag: int  # 0 train, 1 eval: different seeded streams

    @property
    def num_samples(self) -> int:
        return sum(self.counts)

    @property
    def parts(self) -> int:
        return self.world_size * self.workers

    @property
    def worker_batches(self) -> int:
        """Batches each worker yields in a fresh epoch (the same for all)."""
        return self.batches_for(fresh_plan(self.num_samples, self.parts))

    def batches_for(self, plan: EpochPlan) -> int:
        """Batches each worker yields for `plan` (the same for all; 0 for an empty plan)."""
        if plan.length == 0:
            return 0
        return max(1, math.ceil(math.ceil(plan.length / self.parts) / self.batch_size))

    def plan(self, epoch: int, plans: dict[int, EpochPlan]) -> EpochPlan:
        """The epoch's plan: a re-split remainder when a resume left one, else the whole epoch."""
        return plans.get(epoch) or fresh_plan(self.num_samples, self.parts)

    def epoch_segments(self, epoch: int) -> list[tuple[int, int, int]]:
        """The epoch's sample order as (shard index, first, stop) segments covering exactly N samples."""
        nonempty = [i for i, c in enumerate(self.counts) if c > 0]
        rng = _rng(self.seed, self.split_tag, _TAG_ORDER, epoch)
        if not self.resampled:
            order = [nonempty[i] for i in rng.permutation(len(nonempty))] if self.shuffle else nonempty
            return [(k, 0, self.counts[k]) for k in order]
        segments, total = [], 0
        while total < self.num_samples:  # shards drawn with replacement, the last one cut to make N
            k = nonempty[int(rng.integers(len(nonempty)))]
            take = min(self.counts[k], self.num_samples - total)
            segments.append((k, 0, take))
            total += take
        return segments


# ---------------------------------------------------------------------------------------- worker


class _BatchMaker:
    """Turns decoded rows into the contract's fixed-shape batch (in a worker)."""

    def __init__(self, spec: LoaderSpec, tokenizer: Any):
        self.spec, self.tok = spec, tokenizer
        self.special_ids = sorted(set(tokenizer.all_special_ids) | {tokenizer.pad_token_id})
        vocab = np.arange(len(tokenizer), dtype=np.int64)
        self.random_ids = vocab[~np.isin(vocab, self.special_ids)]
        self.mask_id = tokenizer.mask_token_id

    def hard_fraction(self, epoch: int) -> float:
        """`itm_hard_negatives`, reached linearly over the first `itm_hard_negatives_ramp_epochs` epochs."""
        ramp = self.spec.itm_hard_negatives_ramp_epochs
        return self.spec.itm_hard_negatives * (min(1.0, epoch / ramp) if ramp > 0 else 1.0)

    def __call__(
        self, rows: list[tuple[str, str, np.ndarray]], rng: np.random.Generator, epoch: int = 0
    ) -> dict[str, Any]:
        b, s = self.spec.batch_size, self.spec.image_size
        n = len(rows)
        images = np.zeros((b, s, s, 3), dtype=np.uint8)
        keys, captions = [""] * b, [""] * b  # padding rows: empty caption → "<s></s><pad>…"
        for i, (key, caption, image) in enumerate(rows):
            images[i], keys[i], captions[i] = image, key, caption
        valid = np.arange(b) < n
        input_ids, attention = tokenize(self.tok, captions, self.spec.max_text_len)
        mlm_ids, mlm_labels = mask_tokens(
            input_ids,
            special_ids=self.special_ids,
            mask_id=self.mask_id,
            random_ids=self.random_ids,
            probability=self.spec.mlm_probability,
            rng=rng,
            valid=valid,
        )
        itm_index, itm_labels = itm_negatives(
            valid, captions, negative_prob=self.spec.itm_negative_prob, rng=rng, hard=self.hard_fraction(epoch)
        )
        pixels = normalize_images(images)
        pixels[n:] = 0.0
        return assemble_batch(pixels, input_ids, attention, mlm_ids, mlm_labels, itm_index, itm_labels, valid, keys)


def assemble_batch(
    pixels: torch.Tensor,
    input_ids: np.ndarray,
    attention: np.ndarray,
    mlm_ids: np.ndarray,
    mlm_labels: np.ndarray,
    itm_index: np.ndarray,
    itm_labels: np.ndarray,
    valid: np.ndarray,
    keys: list[str],
) -> dict[str, Any]:
    """The batch contract the model and the loop consume (numpy arrays → tensors, no copies)."""
    return {
        "pixel_values": pixels,
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention),
        "mlm_input_ids": torch.from_numpy(mlm_ids),
        "mlm_labels": torch.from_numpy(mlm_labels),
        "itm_image_index": torch.from_numpy(itm_index),
        "itm_labels": torch.from_numpy(itm_labels),
        "sample_mask": torch.from_numpy(valid),
        "keys": keys,
    }


def _raw_samples(spec: LoaderSpec, segments: list[tuple[int, int, int]], lo: int, hi: int) -> Iterator[Any]:
    """One item per sample index in [lo, hi) of the epoch order: (key, parts) or None if missing."""
    offset = 0
    for shard, first, stop in segments:
        seg_lo, seg_hi = max(lo, offset), min(hi, offset + stop - first)
        if seg_lo < seg_hi:
            start, end = first + seg_lo - offset, first + seg_hi - offset
            url, report, got = spec.urls[shard], ReadReport(), 0
            for _, key, parts in iter_samples(url, start, end, read_exts=_READ_EXTS, report=report):
                got += 1
                yield key, parts
            if report.error:
                log.warning("shard %s: %s", url, report.error)
            for _ in range(end - start - got):  # truncated shard or fewer samples than counted
                yield None
        offset += stop - first
        if offset >= hi:
            return


def _decode(item: Any, size: int) -> tuple[str, str, np.ndarray] | None:
    if item is None:
        return None
    key, parts = item
    if not is_safe_key(key):
        return None
    caption = caption_of(parts)
    image = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
    if caption is None or image is None:
        return None
    try:
        return key, caption, decode_image(image, size)
    except Exception:  # PIL raises many types on bad bytes; a corrupt sample is skipped, never fatal
        return None


def _block_size(spec: LoaderSpec) -> int:
    return spec.shuffle_buffer if spec.shuffle and spec.shuffle_buffer > 1 else 1


class _BlockReader:
    """Reads natural-order sample ranges, continuing one open stream while the ranges follow each other."""

    def __init__(self, spec: LoaderSpec, segments: list[tuple[int, int, int]]):
        self.spec, self.segments = spec, segments
        self.raw: Iterator[Any] | None = None
        self.next = self.limit = -1

    def read(self, lo: int, hi: int, limit: int) -> list[Any]:
        if self.raw is None or lo != self.next or hi > self.limit:
            self.raw, self.limit = _raw_samples(self.spec, self.segments, lo, limit), limit
        self.next = hi
        return [next(self.raw) for _ in range(hi - lo)]


def _plan_items(spec: LoaderSpec, epoch: int, plan: EpochPlan, start: int, stop: int) -> Iterator[Any]:
    """The raw items at plan positions [start, stop): each base block is read in natural order and
    served in its seeded shuffled order."""
    block, n = _block_size(spec), spec.num_samples
    reader = _BlockReader(spec, spec.epoch_segments(epoch))
    for g, b, first, end in blocks(n, plan.base_parts, block, select(plan, start, stop)):
        lo, hi = split_range(n, plan.base_parts, g)
        block_lo = lo + b * block
        items = reader.read(block_lo, min(block_lo + block, hi), hi)
        order = (
            _rng(spec.seed, spec.split_tag, _TAG_BLOCK, epoch, g, b).permutation(len(items))
            if block > 1
            else range(len(items))
        )
        for j in range(first, end):
            yield items[order[j]]


def iter_worker_batches(
    spec: LoaderSpec,
    tokenizer: Any,
    logical_worker: int,
    cursor: dict[str, int],
    plans: dict[int, EpochPlan] | None = None,
) -> Iterator[dict[str, Any]]:
    """The infinite batch stream of one logical worker, starting at `cursor` (epoch, batch, pos)."""
    make = _BatchMaker(spec, tokenizer)
    g = spec.rank * spec.workers + logical_worker
    for epoch in count(cursor["epoch"]):
        plan = spec.plan(epoch, plans or {})
        nb = spec.batches_for(plan)
        first = epoch == cursor["epoch"]
        k0, pos = (cursor["batch"], cursor["pos"]) if first else (0, 0)
        start, stop = split_range(plan.length, spec.parts, g)
        length = stop - start
        items = _plan_items(spec, epoch, plan, start + pos, stop)
        for k in range(k0, nb):
            rows: list[tuple[str, str, np.ndarray]] = []
            skipped = 0
            # The last batch drains the slice, so trailing corrupt samples are still counted.
            while pos < length and (len(rows) < spec.batch_size or k == nb - 1):
                sample = _decode(next(items), spec.image_size)
                pos += 1
                if sample is None:
                    skipped += 1
                elif len(rows) < spec.batch_size:
                    rows.append(sample)
                else:  # impossible by construction (nb * B >= slice length); fail loudly if not
                    raise RuntimeError("data plan error: more samples than batches")
            batch = make(rows, _rng(spec.seed, spec.split_tag, _TAG_BATCH, epoch, g, k), epoch)
            batch["skipped"] = skipped  # a host count (an int, no tensor): the loop never reads the device for it
            batch["_cursor"] = {"worker": logical_worker, "epoch": epoch, "batch": k, "pos": pos}
            yield batch


def _ignore_sigterm(_worker_id: int) -> None:
    """A job-wide SIGTERM (Slurm signals every process) must not kill a loader worker before its rank has
    saved: the rank handles it (train/preemption.py); workers exit with their parent."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class _BatchStream(torch.utils.data.IterableDataset):
    """DataLoader worker w serves logical worker (w + offset) % workers: after a resume the
    DataLoader's round-robin restarts at worker 0, the rank's batch order must not.
    A module-level class, so it also pickles under the spawn start method (macOS, Windows)."""

    def __init__(
        self,
        spec: LoaderSpec,
        tokenizer: Any,
        cursors: list[dict[str, int]],
        offset: int,
        plans: dict[int, EpochPlan],
    ):
        self.spec, self.tokenizer, self.cursors, self.offset, self.plans = spec, tokenizer, cursors, offset, plans

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        w = ((info.id if info is not None else 0) + self.offset) % self.spec.workers
        return iter_worker_batches(self.spec, self.tokenizer, w, self.cursors[w], self.plans)


# ---------------------------------------------------------------------------------------- loader


class PretrainLoader:
    """An infinite iterable of batches for one rank, with `batches_per_epoch`, `state_dict()` and
    `load_state_dict()`. Each `iter()` continues from the current cursor: the state saved after
    batch k makes a fresh loader yield batch k+1 next, with the same keys and masks."""

    def __init__(self, spec: LoaderSpec, tokenizer: Any, num_workers: int, prefetch_factor: int, epoch_offset: int = 0):
        self.spec, self.tokenizer = spec, tokenizer
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.batches_per_epoch = spec.workers * spec.worker_batches
        self.samples_per_epoch = spec.num_samples
        self._consumed = 0
        self._cursors = [{"epoch": epoch_offset, "batch": 0, "pos": 0} for _ in range(spec.workers)]
        self._plans: dict[int, EpochPlan] = {}  # epochs a geometry change re-split (docs/checkpoints.md)

    @property
    def epoch(self) -> int:
        """The epoch of the next batch."""
        return self._cursors[self._consumed % self.spec.workers]["epoch"]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        spec = self.spec
        offset = self._consumed % spec.workers
        dataset = _BatchStream(spec, self.tokenizer, [dict(c) for c in self._cursors], offset, dict(self._plans))
        if self.num_workers == 0:
            stream: Any = iter(dataset)
        else:
            # A private generator: creating the iterator must not draw from the global torch RNG, or a
            # resumed run's dropout stream would shift relative to an uninterrupted one.
            stream = iter(
                torch.utils.data.DataLoader(
                    dataset,
                    batch_size=None,
                    num_workers=self.num_workers,
                    prefetch_factor=self.prefetch_factor,
                    persistent_workers=False,
                    generator=torch.Generator().manual_seed(self.spec.seed),
                    worker_init_fn=_ignore_sigterm,
                )
            )
        try:
            for batch in stream:
                cur = batch.pop("_cursor")
                expected = self._consumed % spec.workers
                if cur["worker"] != expected:
                    raise RuntimeError(
                        f"data loader order broke: batch from worker {cur['worker']}, expected {expected}"
                    )
                done = cur["batch"] + 1 == spec.batches_for(spec.plan(cur["epoch"], self._plans))
                self._cursors[expected] = (
                    {"epoch": cur["epoch"] + 1, "batch": 0, "pos": 0}
                    if done
                    else {"epoch": cur["epoch"], "batch": cur["batch"] + 1, "pos": cur["pos"]}
                )
                self._consumed += 1
                yield batch
        finally:
            # Shut the workers down here, on close() and on an error alike. Freeing the DataLoader's iterator
            # is not enough: a propagating error's traceback keeps it alive, and at interpreter exit
            # multiprocessing would SIGTERM the workers, which they ignore, and wait forever.
            shutdown = getattr(stream, "_shutdown_workers", None)  # torch's own cleanup; idempotent
            if shutdown is not None:
                shutdown()

    # ------------------------------------------------------------------------------ resume

    def _layout(self) -> dict[str, Any]:
        """What a resume must keep: the epoch's sample order and its shuffle blocks depend on it."""
        s = self.spec
        return {
            "num_samples": s.num_samples,
            "num_shards": len(s.urls),
            "seed": s.seed,
            "resampled": s.resampled,
            "shuffle_buffer": s.shuffle_buffer if s.shuffle else 0,
        }

    def _geometry(self) -> dict[str, Any]:
        """What a resume may change: the epoch's remainder is then re-split (`resume`)."""
        s = self.spec
        return {"world_size": s.world_size, "workers": s.workers, "batch_size": s.batch_size}

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable cursor of this rank (take it after the batch you consumed last)."""
        low = min(c["epoch"] for c in self._cursors)
        return {
            "version": STATE_VERSION,
            "rank": self.spec.rank,
            **self._layout(),
            **self._geometry(),
            "batches_consumed": self._consumed,
            "epoch": self.epoch,
            "workers_state": [dict(c) for c in self._cursors],
            "plans": {str(e): p.to_json() for e, p in sorted(self._plans.items()) if e >= low},
        }

    def resume(self, states: list[dict[str, Any]]) -> bool:
        """Continue from every old rank's `state_dict()` (rank order). Same geometry: this rank's cursor.
        Otherwise the interrupted epoch's unconsumed positions are re-split over this geometry, and later
        epochs use it. Returns True when it re-split."""
        for state in states:
            if state.get("version") not in _READABLE_VERSIONS:
                raise DataError(f"data loader state has version {state.get('version')}, expected {STATE_VERSION}")
            diff = [f"{k} {state.get(k)!r} → {v!r}" for k, v in self._layout().items() if state.get(k) != v]
            if diff:
                raise DataError("cannot resume the data stream exactly, its sample order changed: " + ", ".join(diff))
        old = {k: states[0][k] for k in self._geometry()}
        if old == self._geometry() and len(states) == self.spec.world_size:
            self._load(states[self.spec.rank])
            return False
        self._resplit(states, old)
        return True

    def _load(self, state: dict[str, Any]) -> None:
        self._consumed = int(state["batches_consumed"])
        self._cursors = [{k: int(c[k]) for k in ("epoch", "batch", "pos")} for c in state["workers_state"]]
        self._plans = {int(e): EpochPlan.from_json(p) for e, p in state.get("plans", {}).items()}

    def _resplit(self, states: list[dict[str, Any]], old: dict[str, Any]) -> None:
        if len(states) != old["world_size"]:
            raise DataError(f"{len(states)} rank cursors for a checkpoint of {old['world_size']} ranks")
        cursors = [c for state in states for c in state["workers_state"]]  # global worker order
        plans = {int(e): EpochPlan.from_json(p) for e, p in states[0].get("plans", {}).items()}
        epoch = min(c["epoch"] for c in cursors)
        parts = old["world_size"] * old["workers"]
        n = self.spec.num_samples
        plan = plans.get(epoch) or fresh_plan(n, parts)
        consumed = []
        for g, c in enumerate(cursors):
            if c["epoch"] == epoch:
                consumed.append(int(c["pos"]))
            elif (c["epoch"], c["batch"], c["pos"]) == (epoch + 1, 0, 0):  # done with the epoch (round robin)
                lo, hi = split_range(plan.length, parts, g)
                consumed.append(hi - lo)
            else:
                raise DataError(
                    f"inconsistent data cursors in the checkpoint: worker {g} at {c}, others at epoch {epoch}"
                )
        left = remainder(plan, parts, consumed)
        if left.length == 0:  # the epoch was complete: the next one starts whole in the new geometry
            epoch, self._plans = epoch + 1, {}
        elif epoch not in plans and left.length == n:  # nothing of it consumed: it starts whole too
            self._plans = {}
        else:
            self._plans = {epoch: left}
        self._consumed = 0
        self._cursors = [{"epoch": epoch, "batch": 0, "pos": 0} for _ in range(self.spec.workers)]


def resolve_split(cfg: Any, split: str) -> list[str]:
    """The shards of `data.<split>_shards`; errors name the config key and the offending spec."""
    specs = cfg.data.train_shards if split == "train" else cfg.data.eval_shards
    if not specs:
        raise DataError(f"data.{split}_shards is empty")
    try:
        return resolve_shards(specs, cfg.data.allow_pipe_urls)
    except DataError as exc:
        raise DataError(f"data.{split}_shards: {exc}") from None


def build_loader(
    cfg: Any, tokenizer: Any, rank: int = 0, world_size: int = 1, split: str = "train", epoch_offset: int = 0
) -> PretrainLoader:
    """The rank's batch stream over `cfg.data.{train,eval}_shards` (see the module docstring)."""
    if split not in ("train", "eval"):
        raise DataError(f"unknown split '{split}' (train or eval)")
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} outside world size {world_size}")
    d = cfg.data
    specs = d.train_shards if split == "train" else d.eval_shards
    urls = resolve_split(cfg, split)
    counts = shard_sample_counts(urls)
    if sum(counts) == 0:
        raise DataError(f"the shards of data.{split}_shards ({specs}) hold no samples")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers are forked after the tokenizer ran
    train = split == "train"
    spec = LoaderSpec(
        urls=tuple(urls),
        counts=tuple(counts),
        seed=cfg.train.seed,
        rank=rank,
        world_size=world_size,
        workers=max(1, d.num_workers),
        batch_size=cfg.train.micro_batch_size,
        image_size=cfg.model.vision.image_size,
        max_text_len=d.max_text_len,
        shuffle=train,
        shuffle_buffer=d.shuffle_buffer,
        resampled=d.resampled and train,
        mlm_probability=d.mlm_probability,
        itm_negative_prob=d.itm_negative_prob,
        itm_hard_negatives=d.itm_hard_negatives if train else 0.0,
        itm_hard_negatives_ramp_epochs=d.itm_hard_negatives_ramp_epochs,
        split_tag=0 if train else 1,
    )
    return PretrainLoader(spec, tokenizer, d.num_workers, d.prefetch_factor, epoch_offset)
