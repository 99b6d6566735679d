"""Webdataset tar shards: resolving shard specs, reading samples, counting them, and building shards.

Format (img2dataset-compatible): `<out>/00000.tar …`, each sample `<key>.jpg` (re-encoded, shorter side
resized to `image_size`, bicubic), `<key>.txt` (caption) and `<key>.json` (key, caption, width, height,
original_width, original_height, source); keys are an optional prefix + 9 digits. Beside each tar `<stem>_stats.json`
(samples, skipped inputs, a hash of the inputs that went into it) and, written last, `manifest.json`
(shards with sample counts and byte sizes, total, skipped inputs by reason).

Reading follows webdataset's conventions: members are grouped into samples by key, the key being the
member path up to the first dot of its base name and the extension everything after it; consecutive
members with the same key form one sample. We read tars with `tarfile` directly (seekable local files
skip unwanted members without reading them) and open non-local URLs with webdataset's `gopen`.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import os
import re
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from gaudi_pretrain.errors import DataError
from gaudi_pretrain.paths import is_inside

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
MANIFEST = "manifest.json"
MANIFEST_ITEMS_LIMIT = 1000  # skipped inputs listed by name in the manifest (all are in *_stats.json)
_GLOB_CHARS = set("*?[")

# ---------------------------------------------------------------------------------- shard specs


_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]+):")
# Schemes webdataset's gopen opens: `pipe:` through a shell (refused unless data.allow_pipe_urls), the
# others by running curl / gsutil / ais / huggingface_hub with the URL as one argument (no shell).
REMOTE_SCHEMES = ("http", "https", "sftp", "ftps", "scp", "gs", "ais", "htgs", "hf")


def url_scheme(spec: str) -> str | None:
    """The URL scheme of a shard spec, lower-cased (as urllib and gopen see it); None for a local path."""
    m = _SCHEME.match(spec)
    return m.group(1).lower() if m else None


def _is_url(spec: str) -> bool:
    return url_scheme(spec) not in (None, "file")


def _check_scheme(url: str, spec: str, allow_pipe_urls: bool) -> None:
    scheme = url_scheme(url)
    if scheme == "pipe" and not allow_pipe_urls:
        raise DataError(
            f"shard spec '{spec}' is a pipe: URL, which runs a shell command; "
            "set data.allow_pipe_urls=true only for trusted configs"
        )
    if scheme not in (None, "file", "pipe") and scheme not in REMOTE_SCHEMES:
        raise DataError(f"shard spec '{spec}' has the unsupported URL scheme '{scheme}:' "
                        f"(local paths, file://, pipe: or {', '.join(REMOTE_SCHEMES)})")


def resolve_shards(specs: str | Sequence[str], allow_pipe_urls: bool = False) -> list[str]:
    """Expand shard specs (globs, brace patterns, directories, paths, URLs) into a list of shards.

    A directory holding `manifest.json` means exactly the shards that manifest lists; any other
    directory means its `*.tar` files. Missing paths and empty globs are errors naming the spec.
    URL schemes are checked before and after expansion (webdataset substitutes `${WDS_*}` variables and
    lower-cases schemes), so no spelling of a `pipe:` URL gets through without data.allow_pipe_urls.
    """
    from webdataset.shardlists import expand_urls

    if isinstance(specs, str):
        specs = [specs]
    out: list[str] = []
    for spec in specs:
        spec = str(spec).strip()
        _check_scheme(spec, spec, allow_pipe_urls)
        if _is_url(spec):
            urls = expand_urls(spec)
            for url in urls:
                _check_scheme(url, spec, allow_pipe_urls)
            out.extend(urls)
            continue
        spec = spec.removeprefix("file://")
        for item in expand_urls(spec):
            _check_scheme(item, spec, allow_pipe_urls)
            item = os.path.expanduser(item)
            if any(c in item for c in _GLOB_CHARS):
                found = sorted(p for p in glob.glob(item) if os.path.isfile(p))
                if not found:
                    raise DataError(f"no shards match '{spec}'")
                out.extend(found)
            elif os.path.isdir(item):
                out.extend(_shards_in_dir(item, spec))
            elif os.path.isfile(item):
                out.append(item)
            else:
                raise DataError(f"shard path not found: '{item}' (from '{spec}')")
    if not out:
        raise DataError(f"no shards in {list(specs)}")
    return out


def _shards_in_dir(path: str, spec: str) -> list[str]:
    manifest = read_manifest(path)
    if manifest is not None:
        for entry in manifest["shards"]:
            name = str(entry.get("name", ""))
            if not name or os.path.isabs(name) or not is_inside(path, name) or url_scheme(name):
                raise DataError(f"{path}/{MANIFEST} lists the shard '{name}', which is not a file in {path}")
        listed = [os.path.join(path, s["name"]) for s in manifest["shards"]]
        missing = [p for p in listed if not os.path.isfile(p)]
        if missing:
            raise DataError(f"{missing[0]} is listed in {path}/{MANIFEST} but missing ({len(missing)} missing)")
        return listed
    found = sorted(str(p) for p in Path(path).glob("*.tar"))
    if not found:
        raise DataError(f"directory '{path}' (from '{spec}') holds no .tar shards")
    return found


def read_manifest(directory: str | Path) -> dict[str, Any] | None:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except ValueError:
        manifest = None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise DataError(f"{path} is not a valid shard manifest")
    return manifest


# -------------------------------------------------------------------------------------- reading


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_KEY_PREFIX = re.compile(r"[A-Za-z0-9_-]*")


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
    if _is_url(url):
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
    if not _is_url(url):
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
        counts.append(_count_from_metadata(url, manifests) if not _is_url(url) else None)
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
        size = os.path.getsize(url) if not _is_url(url) else None
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


# ------------------------------------------------------------------------------------- building


@dataclass(frozen=True)
class Record:
    """One input (image, caption) pair before building. `image` is a file path or (tar, member)."""

    image: str | tuple[str, str]
    caption: str
    source: str  # written to the sample's json (path, url or tar:member)


@dataclass
class Inputs:
    records: list[Record] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)

    def skip(self, source: str, reason: str, detail: str = "") -> None:
        self.skipped.append({"source": source, "reason": reason, **({"detail": detail} if detail else {})})


def _clean_caption(value: Any) -> str | None:
    if value is None:
        return None
    text = " ".join(str(value).split())
    return text or None


def _add(inputs: Inputs, image: Any, caption: Any, source: str) -> None:
    caption = _clean_caption(caption)
    if not image:
        inputs.skip(source, "missing image")
    elif caption is None:
        inputs.skip(source, "missing caption")
    else:
        inputs.records.append(Record(image, caption, source))


def records_from_jsonl(path: str | Path) -> Inputs:
    """JSON lines with `image` (path; relative to the file's directory) and `caption`."""
    path = Path(path)
    inputs, base = Inputs(), path.resolve().parent
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            inputs.skip(f"{path}:{lineno}", "invalid record", str(exc))
            continue
        image = row.get("image")
        _add(inputs, str(base / image) if image else None, row.get("caption"), str(image or f"{path}:{lineno}"))
    return inputs


def records_from_csv(path: str | Path) -> Inputs:
    """CSV with a header naming `image` (path; relative to the file's directory) and `caption`."""
    path = Path(path)
    inputs, base = Inputs(), path.resolve().parent
    rows = csv.DictReader(io.StringIO(_read_text(path)))
    if not rows.fieldnames or "image" not in rows.fieldnames or "caption" not in rows.fieldnames:
        raise DataError(f"{path}: CSV header must name the columns 'image' and 'caption' (found {rows.fieldnames})")
    for row in rows:
        image = (row.get("image") or "").strip()
        _add(inputs, str(base / image) if image else None, row.get("caption"), image or f"{path}:{rows.line_num}")
    return inputs


def records_from_coco(captions_json: str | Path, images_dir: str | Path) -> Inputs:
    """COCO captions (`annotations` with image_id + caption, `images` with id + file_name)."""
    try:
        data = json.loads(_read_text(Path(captions_json)))
        files = {img["id"]: img["file_name"] for img in data["images"]}
        annotations = data["annotations"]
    except (ValueError, KeyError, TypeError):
        raise DataError(f"{captions_json} is not a COCO captions file (needs 'images' and 'annotations')") from None
    inputs, base = Inputs(), Path(images_dir).resolve()
    for ann in annotations:
        name = files.get(ann.get("image_id"))
        source = name or f"image_id {ann.get('image_id')}"
        _add(inputs, str(base / name) if name else None, ann.get("caption"), source)
    return inputs


def records_from_img2dataset(directory: str | Path) -> Inputs:
    """An img2dataset output: `*.tar` shards, or the `files` layout (`00000/000000000.jpg` + `.txt`)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"img2dataset directory not found: {directory}")
    inputs = Inputs()
    tars = sorted(directory.glob("*.tar"))
    if tars:
        for tar in tars:
            report = ReadReport()
            for _, key, parts in iter_samples(str(tar), read_exts=("txt", "json"), report=report):
                image_ext = next((e for e in IMAGE_EXTS if e in parts), None)
                meta = _json_or_empty(parts.get("json"))
                source = meta.get("url") or f"{tar.name}:{key}"
                member = f"{key}.{image_ext}" if image_ext else None
                _add(inputs, (str(tar), member) if member else None, caption_of(parts), source)
            if report.error:
                inputs.skip(str(tar), "unreadable shard", report.error)
        return inputs
    images = sorted(p for p in directory.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTS)
    if not images:
        raise DataError(f"{directory} holds neither .tar shards nor images (img2dataset layouts)")
    for img in images:
        parts = {}
        for ext in ("txt", "json"):
            side = img.with_suffix("." + ext)
            if side.is_file():
                parts[ext] = side.read_bytes()
        meta = _json_or_empty(parts.get("json"))
        _add(inputs, str(img), caption_of(parts), meta.get("url") or str(img.relative_to(directory)))
    return inputs


def _json_or_empty(data: bytes | None) -> dict[str, Any]:
    try:
        value = json.loads(data) if data else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise DataError(f"input file not found: {path}")
    return path.read_text(encoding="utf-8")


def dedupe(inputs: Inputs) -> Inputs:
    """Drop repeated (image, caption) pairs (image = path, tar member or source URL), keeping the first."""
    seen: set[tuple[Any, str]] = set()
    out = Inputs(skipped=list(inputs.skipped))
    for rec in inputs.records:
        ident = (rec.source if "://" in rec.source else rec.image, rec.caption)
        if ident in seen:
            out.skip(rec.source, "duplicate")
            continue
        seen.add(ident)
        out.records.append(rec)
    return out


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
    stats = {"shard": f"{job.name}.tar", "samples": written, "bytes": tmp.stat().st_size,
             "inputs_digest": job.digest(), "skipped": skipped}
    _atomic_write_text(out / f"{job.name}_stats.json", json.dumps(stats, indent=1))
    os.replace(tmp, out / f"{job.name}.tar")
    return stats


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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


def _plan_jobs(records: Sequence[Record], out: Path, image_size: int, quality: int,
               samples_per_shard: int, shard_sizes: Sequence[int] | None, key_prefix: str = "") -> list[_ShardJob]:
    sizes = list(shard_sizes) if shard_sizes else []
    jobs, start = [], 0
    while start < len(records):
        size = sizes[len(jobs)] if len(jobs) < len(sizes) else samples_per_shard
        chunk = tuple(records[start:start + size])
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
        raise DataError(f"key prefix {key_prefix!r} may hold only letters, digits, '_' and '-' (at most 64): "
                        "webdataset splits keys at the first dot")
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
    bar = tqdm(total=len(inputs.records), unit="sample", desc=f"shards → {out}", disable=not progress,
               initial=sum(len(j.records) for j in jobs if j.index in results))
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
    _atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def _remove_stale(out: Path, n_shards: int) -> None:
    """Remove shards of an earlier, larger build (only ones with our stats file beside them)."""
    (out / MANIFEST).unlink(missing_ok=True)  # rewritten last: a missing manifest = build incomplete
    for stats in out.glob("*_stats.json"):
        stem = stats.name[: -len("_stats.json")]
        if stem.isdigit() and int(stem) >= n_shards:
            (out / f"{stem}.tar").unlink(missing_ok=True)
            stats.unlink()


def _manifest(jobs: list[_ShardJob], results: dict[int, dict[str, Any]], input_skips: list[dict[str, str]],
              image_size: int, reused: int, key_prefix: str = "") -> dict[str, Any]:
    skipped = list(input_skips)
    for job in jobs:
        skipped.extend(results[job.index]["skipped"])
    return {
        "format": "gaudi_pretrain webdataset shards v1",
        "image_size": image_size,
        "key_prefix": key_prefix,
        "total": sum(r["samples"] for r in results.values()),
        "shards": [{"name": results[j.index]["shard"], "samples": results[j.index]["samples"],
                    "bytes": results[j.index]["bytes"]} for j in jobs],
        "reused_shards": reused,
        "skipped": {
            "count": len(skipped),
            "by_reason": dict(Counter(s["reason"] for s in skipped)),
            "items": skipped[:MANIFEST_ITEMS_LIMIT],
        },
    }
