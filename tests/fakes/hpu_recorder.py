"""Shared event log of the habana_frameworks test double (kept outside the fake package, so that reading
it never imports habana_frameworks itself)."""

from __future__ import annotations

import os

EVENTS: list[tuple] = []
STATE: dict = {}


def record(*event) -> None:
    EVENTS.append(tuple(event))


def record_import(module_name: str) -> None:
    """Every fake module logs its import together with PT_HPU_LAZY_MODE as it was at that moment."""
    record("import", module_name, os.environ.get("PT_HPU_LAZY_MODE"))


def reset() -> None:
    import torch

    EVENTS.clear()
    STATE.clear()
    STATE.update(available=True, device_name="GAUDI2", compiles=0, max_memory=123456,
                 rng=torch.arange(16, dtype=torch.uint8))


reset()


def names(kind: str | None = None) -> list:
    """Event kinds in order (or, with `kind`, the full events of that kind)."""
    if kind is None:
        return [e[0] for e in EVENTS]
    return [e for e in EVENTS if e[0] == kind]
