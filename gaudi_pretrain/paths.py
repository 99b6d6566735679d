"""Paths a run writes or follows, confined to the directory they belong to.

Every file a training run writes lives under `train.output_dir` (config.yaml, metrics.jsonl, tensorboard/,
samples/, summary.json, checkpoints/); the writers build their paths with `confined(run_dir, ...)`, which
refuses a result outside the root. Names read from files are validated before they are followed: the tag
in `checkpoints/latest` must be a plain `step_<digits>` name (`checkpoint_tag`), shard names listed in a
manifest must stay in their directory (`data.shards`), and sample keys that look like paths leaving the
shard (absolute, `..`) or that hold whitespace are never used (`data.shards.is_safe_key`).

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
