"""Inputs for `shards build`: (image, caption) records from img2dataset output, JSON lines, CSV or COCO."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gaudi_pretrain.data.shards.reader import (
    IMAGE_EXTS,
    ReadReport,
    caption_of,
    iter_samples,
)
from gaudi_pretrain.errors import DataError

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
