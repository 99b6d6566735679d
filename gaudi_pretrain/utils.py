"""Small helpers several packages need, kept once: wrapper-free names and durable file writes."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

WRAPPER_PREFIXES = ("module.",)  # DeepSpeed / DDP wrap the model as `module`
COMPILED_INFIX = "_orig_mod."  # torch.compile's OptimizedModule keeps the model as `_orig_mod`


def unwrapped_name(name: str) -> str:
    """A parameter or state-dict key without DeepSpeed / DDP / torch.compile wrapper prefixes."""
    name = name.replace(COMPILED_INFIX, "")
    for prefix in WRAPPER_PREFIXES:
        name = name.removeprefix(prefix)
    return name


def unwrapped_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """`state` with every key unwrapped (checkpoints carry transformers' names, never wrapper prefixes)."""
    return {unwrapped_name(k): v for k, v in state.items()}


def unwrap_model(model: Any) -> Any:
    """The plain module under a DeepSpeed engine, DDP or torch.compile wrapper (timm's unwrap_model)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None or inner is model:
            return model
        model = inner


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` so that `path` holds either the old or the whole new content after any crash: a
    temporary sibling, flushed and fsynced, then renamed over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
