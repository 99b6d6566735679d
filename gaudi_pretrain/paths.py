"""Paths a run writes or follows, confined to the directory they belong to.

Every file a training run writes lives under `train.output_dir` (config.yaml, metrics.jsonl, tensorboard/,
samples/, summary.json, checkpoints/); the writers build their paths with `confined(run_dir, ...)`, which
refuses a result outside the root. Names read from files are validated before they are followed: the tag
in `checkpoints/latest` must be a plain `step_<digits>` name (`checkpoint_tag`), shard names listed in a
manifest must stay in their directory (`data.shards`), and sample keys that look like paths leaving the
shard (absolute, `..`) or that hold whitespace are never used (`data.shards.reader.is_safe_key`).

The check is lexical (normalised path, no symlink resolution), so a run directory whose `checkpoints/` is a
symlink to another disk keeps working; what is refused is a name that climbs out with `..` or is absolute.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from gaudi_pretrain.errors import PathError

_TAG = re.compile(r"step_[0-9]{8,}")


def is_inside(root: str | os.PathLike, path: str | os.PathLike) -> bool:
    """Whether `path` (relative paths are taken relative to `root`) lies in `root`, lexically."""
    base = os.path.normpath(os.path.abspath(root))
    full = os.path.normpath(os.path.join(base, path))
    return full == base or full.startswith(base.rstrip(os.sep) + os.sep)


def confined(root: str | os.PathLike, *parts: str | os.PathLike) -> Path:
    """`root / parts…`, refused (PathError) when the parts are absolute or climb out of `root` with `..`."""
    rel = os.path.join(*[str(p) for p in parts]) if parts else ""
    if not is_inside(root, rel):
        raise PathError(f"path '{rel}' would leave {root}: refused")
    return Path(root, *parts)


def checkpoint_tag(tag: str, source: str | os.PathLike) -> str:
    """A checkpoint tag read from `source` (a `latest` file): must be `step_<digits>`, nothing else."""
    tag = tag.strip()
    if not _TAG.fullmatch(tag):
        raise PathError(f"{source} names '{tag[:80]}', which is not a checkpoint tag (step_NNNNNNNN)")
    return tag


def check_writable(path: Path, what: str) -> None:
    """Fail before anything is written: the nearest existing ancestor of `path` must be a writable directory."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise PathError(f"{what} {path} is not writable: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PathError(f"{what} {path} is not writable: no write permission on {existing}")


def make_writable_dir(path: Path, what: str) -> None:
    """Create `path` and prove it writable; on failure remove the directories this call created."""
    created = [p for p in (path, *path.parents) if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_probe_{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        for p in created:  # innermost first; only directories this call made, and only if still empty
            try:
                p.rmdir()
            except OSError:
                break
        raise PathError(f"{what} {path} is not writable: {exc.strerror}") from None
