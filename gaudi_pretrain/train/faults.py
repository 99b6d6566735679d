"""Crash injection for the reliability tests: `GAUDI_PRETRAIN_CRASH=<point>:<step>` kills the process
(SIGKILL, as a preempted node would die) when the run reaches that point at that step.

Points: `after_step` (after the optimizer step), `mid_save` (DeepSpeed files written, our files not).
Unset in normal runs, where `maybe_crash` costs one dict lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "GAUDI_PRETRAIN_CRASH"


def maybe_crash(point: str, step: int, rank: int = 0) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    want_point, _, want = spec.partition(":")
    want_step, _, want_rank = want.partition("@")
    if want_point == point and int(want_step) == step and (not want_rank or int(want_rank) == rank):
        os.kill(os.getpid(), signal.SIGKILL)
