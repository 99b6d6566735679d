"""`shards build`: records → re-encoded tar shards, a stats file per shard and manifest.json, resumable."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gaudi_pretrain.data.shards.sources import Inputs, Record, dedupe
from gaudi_pretrain.data.shards.urls import MANIFEST
from gaudi_pretrain.errors import DataError
from gaudi_pretrain.utils import atomic_write_text

_KEY_PREFIX = re.compile(r"[A-Za-z0-9_-]*")
MANIFEST_ITEMS_LIMIT = 1000  # skipped inputs listed by name in the manifest (all are in *_stats.json)


@dataclass(frozen=True)
class _ShardJob:
    out_dir: str
    index: int
    first_key: int
    records: tuple[Record, ...]
    image_size: int
    quality: int
    key_prefix: str = ""

    @property
    def name(self) -> str:
        return f"{self.index:05d}"

    def digest(self) -> str:
        h = hashlib.sha256(json.dumps([self.image_size, self.quality, self.first_key, self.key_prefix]).encode())
        for r in self.records:
            h.update(json.dumps([r.image, r.caption, r.source]).encode())
        return h.hexdigest()[:20]


def _load_image_bytes(image: str | tuple[str, str], tars: dict[str, tarfile.TarFile]) -> bytes:
    if isinstance(image, str):
        return Path(image).read_bytes()
    tar_path, member = image
    if tar_path not in tars:
        tars[tar_path] = tarfile.open(tar_path, "r:")
    handle = tars[tar_path].extractfile(member)
    if handle is None:
        raise OSError(f"{member} is not a file in {tar_path}")
    return handle.read()


def _encode_sample(data: bytes, size: int, quality: int) -> tuple[bytes, dict[str, int]]:
    from PIL import Image

    from gaudi_pretrain.data.transforms import resize_shorter_side, to_rgb

    img = Image.open(io.BytesIO(data))
    original = img.size
    img = resize_shorter_side(to_rgb(img, size), size)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    dims = {"width": img.size[0], "height": img.size[1], "original_width": original[0], "original_height": original[1]}
    return buf.getvalue(), dims


def _add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed metadata: reproducible shards
    tf.addfile(info, io.BytesIO(data))


def _write_shard(job: _ShardJob) -> dict[str, Any]:
    """Write one shard to a temp name, then its stats, then rename the tar (its presence = complete)."""
    out = Path(job.out_dir)
    tmp = out / f".{job.name}.tar.tmp"
    skipped: list[dict[str, str]] = []
    written = 0
    tars: dict[str, tarfile.TarFile] = {}
    try:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
            for offset, rec in enumerate(job.records):
                key = f"{job.key_prefix}{job.first_key + offset:09d}"
                try:
                    jpg, dims = _encode_sample(_load_image_bytes(rec.image, tars), job.image_size, job.quality)
                except FileNotFoundError:
                    skipped.append({"source": rec.source, "reason": "missing image"})
                    continue
                except Exception as exc:  # PIL raises many types for bad bytes; never fatal
                    detail = f"{type(exc).__name__}: {str(exc)[:200]}"
                    skipped.append({"source": rec.source, "reason": "unreadable image", "detail": detail})
                    continue
                meta = {"key": key, "caption": rec.caption, **dims, "source": rec.source}
                _add_member(tf, f"{key}.jpg", jpg)
                _add_member(tf, f"{key}.txt", rec.caption.encode("utf-8"))
                _add_member(tf, f"{key}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))
                written += 1
    finally:
        for t in tars.values():
            t.close()
    stats = {
        "shard": f"{job.name}.tar",
        "samples": written,
        "bytes": tmp.stat().st_size,
        "inputs_digest": job.digest(),
        "skipped": skipped,
    }
    atomic_write_text(out / f"{job.name}_stats.json", json.dumps(stats, indent=1))
    os.replace(tmp, out / f"{job.name}.tar")
    return stats


def _complete_stats(job: _ShardJob) -> dict[str, Any] | None:
    out = Path(job.out_dir)
    tar, stats_path = out / f"{job.name}.tar", out / f"{job.name}_stats.json"
    if not (tar.is_file() and stats_path.is_file()):
        return None
    try:
        stats = json.loads(stats_path.read_text())
    except ValueError:
        return None
    if stats.get("inputs_digest") != job.digest() or stats.get("bytes") != tar.stat().st_size:
        return None
    return stats


def _plan_jobs(
    records: Sequence[Record],
    out: Path,
    image_size: int,
    quality: int,
    samples_per_shard: int,
    shard_sizes: Sequence[int] | None,
    key_prefix: str = "",
) -> list[_ShardJob]:
    sizes = list(shard_sizes) if shard_sizes else []
    jobs, start = [], 0
    while start < len(records):
        size = sizes[len(jobs)] if len(jobs) < len(sizes) else samples_per_shard
        chunk = tuple(records[start : start + size])
        jobs.append(_ShardJob(str(out), len(jobs), start, chunk, image_size, quality, key_prefix))
        start += size
    return jobs


def build_shards(
    inputs: Inputs,
    out_dir: str | Path,
    *,
    image_size: int = 294,
    samples_per_shard: int = 10_000,
    workers: int = 1,
    quality: int = 90,
    shard_sizes: Sequence[int] | None = None,
    progress: bool = True,
    key_prefix: str = "",
) -> dict[str, Any]:
    """Write `inputs` as shards into `out_dir`; shards already complete from an identical earlier run
    are kept. Keys are `key_prefix` + 9 digits from 0: give each source its own prefix when one run
    trains on several builds, so that their keys (sample logs, exactly-once audits) stay distinct.
    Returns (and writes, last) the manifest."""
    from tqdm import tqdm

    if samples_per_shard <= 0 or image_size <= 0:
        raise DataError("samples_per_shard and image_size must be positive")
    if not _KEY_PREFIX.fullmatch(key_prefix) or len(key_prefix) > 64:
        raise DataError(
            f"key prefix {key_prefix!r} may hold only letters, digits, '_' and '-' (at most 64): "
            "webdataset splits keys at the first dot"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    inputs = dedupe(inputs)
    jobs = _plan_jobs(inputs.records, out, image_size, quality, samples_per_shard, shard_sizes, key_prefix)
    _remove_stale(out, len(jobs))
    results: dict[int, dict[str, Any]] = {}
    todo = []
    for job in jobs:
        stats = _complete_stats(job)
        if stats is not None:
            results[job.index] = stats
        else:
            todo.append(job)
    bar = tqdm(
        total=len(inputs.records),
        unit="sample",
        desc=f"shards → {out}",
        disable=not progress,
        initial=sum(len(j.records) for j in jobs if j.index in results),
    )
    try:
        if workers > 1 and len(todo) > 1:
            import multiprocessing as mp

            with mp.get_context("fork" if os.name == "posix" else "spawn").Pool(min(workers, len(todo))) as pool:
                for stats, job in zip(pool.imap(_write_shard, todo), todo):
                    results[job.index] = stats
                    bar.update(len(job.records))
        else:
            for job in todo:
                results[job.index] = _write_shard(job)
                bar.update(len(job.records))
    finally:
        bar.close()
    manifest = _manifest(jobs, results, inputs.skipped, image_size, reused=len(jobs) - len(todo), key_prefix=key_prefix)
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def _remove_stale(out: Path, n_shards: int) -> None:
    """Remove shards of an earlier, larger build (only ones with our stats file beside them)."""
    (out / MANIFEST).unlink(missing_ok=True)  # rewritten last: a missing manifest = build incomplete
    for stats in out.glob("*_stats.json"):
        stem = stats.name[: -len("_stats.json")]
        if stem.isdigit() and int(stem) >= n_shards:
            (out / f"{stem}.tar").unlink(missing_ok=True)
            stats.unlink()


def _manifest(
    jobs: list[_ShardJob],
    results: dict[int, dict[str, Any]],
    input_skips: list[dict[str, str]],
    image_size: int,
    reused: int,
    key_prefix: str = "",
) -> dict[str, Any]:
    skipped = list(input_skips)
    for job in jobs:
        skipped.extend(results[job.index]["skipped"])
    return {
        "format": "gaudi_pretrain webdataset shards v1",
        "image_size": image_size,
        "key_prefix": key_prefix,
        "total": sum(r["samples"] for r in results.values()),
        "shards": [
            {
                "name": results[j.index]["shard"],
                "samples": results[j.index]["samples"],
                "bytes": results[j.index]["bytes"],
            }
            for j in jobs
        ],
        "reused_shards": reused,
        "skipped": {
            "count": len(skipped),
            "by_reason": dict(Counter(s["reason"] for s in skipped)),
            "items": skipped[:MANIFEST_ITEMS_LIMIT],
        },
    }
