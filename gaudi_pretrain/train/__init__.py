"""Training: `train(cfg)` runs or resumes a pretraining run (docs/architecture.md, "Setup order")."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gaudi_pretrain import launch_env

if TYPE_CHECKING:
    from gaudi_pretrain.config import RunConfig


def train(cfg: RunConfig) -> dict[str, Any]:
    """Run (or resume) training; returns the last train record and the final eval record."""
    info = launch_env.prepare(cfg.backend)
    # torch is first imported here, after the rank and Gaudi variables it reads on import are in place
    from gaudi_pretrain.train.loop import run

    return run(cfg, info)
