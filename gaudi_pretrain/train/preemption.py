"""SIGTERM (preemption: Slurm and Kubernetes signal every rank) → a checkpoint at a step all ranks agree on."""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

import torch

from gaudi_pretrain.train.metrics import all_reduce_sum


class Preemption:
    """Records SIGTERM in a flag; `agreed()` is a collective (every rank calls it at the same step)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True

    def agreed(self, device: torch.device) -> bool:
        """True on every rank when any rank got SIGTERM."""
        (votes,) = all_reduce_sum([float(self.requested)], device)
        return votes > 0

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
