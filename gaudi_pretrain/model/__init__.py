"""BridgeTower for ITM+MLM pretraining: fast, static-shape, weight-compatible with transformers.

Importing this package loads nothing heavy: the names below are resolved on first use (PEP 562), so the
CLI (which imports `gaudi_pretrain.model.commands`) answers `--help` and config errors without importing
torch. No transformers (imported lazily by `hf_io`), no DeepSpeed, no device library. Entry points:
`pretraining.BridgeTowerForPretraining`, `hf_io.build_model`, `hf_io.export_hf` / `export_checkpoint`,
`attention.set_attention_fn`, `flops.flops_per_sample`.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "get_attention_fn": "gaudi_pretrain.model.attention",
    "set_attention_fn": "gaudi_pretrain.model.attention",
    "flops_per_sample": "gaudi_pretrain.model.flops",
    "forward_flops": "gaudi_pretrain.model.flops",
}

__all__ = ["flops_per_sample", "forward_flops", "get_attention_fn", "set_attention_fn"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
