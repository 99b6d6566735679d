"""Reading tar shards as webdataset does: members grouped into samples by key; sample counts; inspection.

The key is the member path up to the first dot of its base name, the extension everything after it;
consecutive members with the same key form one sample. Seekable local tars are read with `tarfile`
(unwanted members are skipped unread); other URLs are opened with webdataset's `gopen`.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gaudi_pretrain.data.shards.urls import is_url, read_manifest, resolve_shards

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")

# -------------------------------------------------------------------------------------- reading


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def is_safe_key(key: str) -> bool:
    """A sample key the pipeline uses: not absolute, no `..` component, no control characters.

    Keys come from tar member names; one that looks like a path leaving the shard, or that would break a
    line of the per-rank sample log, is never used as a sample (the pipeline skips and counts it)."""
    return bool(key) and not key.startswith("/") and ".." not in key.split("/") and not _CONTROL.search(key)


def split_member_name(name: str) -> tuple[str, str] | None:
    """webdataset's rule: key = path up to the first dot of the base name, ext = the rest."""
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem or not ext:
        return None
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


@dataclass
class ReadReport:
    """What went wrong while reading one shard (filled in by `iter_samples`)."""

    error: str | None = None
    extensions: Counter = field(default_factory=Counter)  # members seen per extension (read or not)


def _open_tar(url: str) -> tuple[tarfile.TarFile, Any]:
    if is_url(url):
        from webdataset.gopen import gopen

        stream = gopen(url, "rb")
        return tarfile.open(fileobj=stream, mode="r|"), stream
    fileobj = open(url, "rb")
    try:
        return tarfile.open(fileobj=fileobj, mode="r:"), fileobj
    except BaseException:
        fileobj.close()
        raise


def iter_samples(
    url: str,
    start: int = 0,
    stop: int | None = None,
    read_exts: Iterable[str] | None = None,
    report: ReadReport | None = None,
) -> Iterator[tuple[int, str, dict[str, bytes]]]:
    """Yield (ordinal, key, {ext: bytes}) for samples start <= ordinal < stop of one tar.

    Members of samples before `start` are skipped without reading their data (on seekable files);
    `read_exts` limits which members are read (the others appear in the dict with the value None).
    A truncated or unreadable tar ends the iteration early (the error goes to `report`) instead of
    raising: callers count the missing samples.
    """
    wanted = {e.lower() for e in read_exts} if read_exts is not None else None
    report = report if report is not None else ReadReport()
    ordinal, key, parts = -1, None, {}
    try:
        tf, handle = _open_tar(url)
    except (tarfile.TarError, OSError, EOFError) as exc:
        if "empty file" not in str(exc):
            report.error = f"{type(exc).__name__}: {exc}"
        return
    try:
        for member in tf:
            if not member.isfile():
                continue
            split = split_member_name(member.name)
            if split is None:
                continue
            mkey, ext = split
            report.extensions[ext] += 1
            if mkey != key:
                if key is not None and start <= ordinal:
                    yield ordinal, key, parts
                ordinal, key, parts = ordinal + 1, mkey, {}
                if stop is not None and ordinal >= stop:
                    return
            if ordinal >= start:
                parts[ext] = tf.extractfile(member).read() if wanted is None or ext in wanted else None
        if key is not None and start <= ordinal and (stop is None or ordinal < stop):
            yield ordinal, key, parts
    except (tarfile.TarError, OSError, EOFError) as exc:
        report.error = f"{type(exc).__name__}: {exc}"
        # The sample being read when the error hit is incomplete: drop it (callers count it missing).
    finally:
        tf.close()
        handle.close()


_COUNT_CACHE: dict[tuple[str, int, int], int] = {}


def count_samples_by_scan(url: str) -> int:
    """Number of samples in a tar from its headers alone (cached per path, size and mtime)."""
    ident = (url, -1, -1)
    if not is_url(url):
        st = os.stat(url)
        ident = (os.path.abspath(url), st.st_size, st.st_mtime_ns)
    if ident not in _COUNT_CACHE:
        n = 0
        for _ in iter_samples(url, read_exts=()):
            n += 1
        _COUNT_CACHE[ident] = n
    return _COUNT_CACHE[ident]


def shard_sample_counts(urls: Sequence[str]) -> list[int]:
    """Sample count of each shard: from manifest.json (if its byte size still matches), else the
    `<stem>_stats.json` beside the tar (ours: `samples`; img2dataset: `successes`), else a header scan."""
    manifests: dict[str, dict[str, Any]] = {}
    counts = []
    for url in urls:
        counts.append(_count_from_metadata(url, manifests) if not is_url(url) else None)
        if counts[-1] is None:
            counts[-1] = count_samples_by_scan(url)
    return counts


def _count_from_metadata(path: str, manifests: dict[str, dict[str, Any]]) -> int | None:
    directory, name = os.path.split(os.path.abspath(path))
    if directory not in manifests:
        m = read_manifest(directory)
        manifests[directory] = {s["name"]: s for s in m["shards"]} if m else {}
    entry = manifests[directory].get(name)
    size = os.path.getsize(path)
    # A shard shorter than its metadata says was truncated after it was written: the declared count
    # stands, and the samples lost with the tail are read as missing (skipped and counted). A shard of
    # another size than declared otherwise (rewritten) is counted by a header scan.
    if entry is not None and _bytes_at_least(entry.get("bytes"), size):
        return int(entry["samples"])
    stats_path = os.path.join(directory, name.rsplit(".tar", 1)[0] + "_stats.json")
    if os.path.isfile(stats_path):
        try:
            stats = json.loads(Path(stats_path).read_text())
        except ValueError:
            return None
        if "samples" in stats and _bytes_at_least(stats.get("bytes"), size):
            return int(stats["samples"])
        if "successes" in stats and "samples" not in stats:  # img2dataset
            return int(stats["successes"])
    return None


def _bytes_at_least(declared: Any, size: int) -> bool:
    return isinstance(declared, int) and declared >= size


def inspect_shards(specs: str | Sequence[str], examples: int = 5, allow_pipe_urls: bool = False) -> dict[str, Any]:
    """Counts, sizes, member extensions, incomplete samples and example captions of any tar shards."""
    urls = resolve_shards(specs, allow_pipe_urls)
    shards, exts, captions, errors = [], Counter(), [], []
    total = incomplete = 0
    for url in urls:
        report, n = ReadReport(), 0
        for _, key, parts in iter_samples(url, read_exts=("txt", "json"), report=report):
            n += 1
            if caption_of(parts) is None:
                incomplete += 1
            elif len(captions) < examples:
                captions.append(f"{key}: {caption_of(parts)}")
        total += n
        exts.update(report.extensions)
        size = os.path.getsize(url) if not is_url(url) else None
        shards.append({"shard": url, "samples": n, "bytes": size})
        if report.error:
            errors.append(f"{url}: {report.error}")
    return {
        "shards": shards,
        "total_samples": total,
        "total_bytes": sum(s["bytes"] or 0 for s in shards),
        "members_by_extension": dict(exts),
        "samples_without_caption": incomplete,
        "example_captions": captions,
        "errors": errors,
    }


def caption_of(parts: dict[str, bytes | None]) -> str | None:
    """The caption of a sample: its .txt, else the "caption" field of its .json."""
    if parts.get("txt") is not None:
        text = parts["txt"].decode("utf-8", errors="replace").strip()
        return text or None
    if parts.get("json") is not None:
        try:
            text = json.loads(parts["json"]).get("caption")
        except (ValueError, AttributeError):
            return None
        return str(text).strip() or None if text is not None else None
    return None
