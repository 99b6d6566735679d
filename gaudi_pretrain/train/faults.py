"""Fault injection for the reliability tests, driven by one environment variable:

    GAUDI_PRETRAIN_CRASH=<point>:<steps>[@rank][,<point>:<steps>[@rank] ...]

`<steps>` is a step (`4`), an inclusive range (`4-6`) or an open range (`4-`); without `@rank` every rank
is affected. Points:

* kills (SIGKILL, as a preempted node dies; `maybe_crash`):
  `after_step` (after the optimizer step), and inside a checkpoint save, in write order:
  `save_engine` (DeepSpeed's files written), `mid_save` (+ this rank's cursor/RNG file),
  `save_weights` (+ rank 0's model.safetensors and config.yaml), `before_latest` (+ client_state.json,
  the checkpoint is complete but not yet published by `latest`);
* numeric faults (`apply_numeric_faults`, on the loss the step backpropagates): `nan_loss` (the loss
  is NaN, so are the gradients) and `nan_grad` (finite loss, NaN gradients).

Example: `GAUDI_PRETRAIN_CRASH=nan_grad:2,nan_loss:5-` skips step 2 and stops the run after
`train.max_consecutive_nonfinite` bad steps from step 5 on; `after_step:4@1` kills rank 1 after step 4.

Unset in normal runs, where each call costs one dict lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "GAUDI_PRETRAIN_CRASH"


def _matches(point: str, step: int, rank: int) -> bool:
    spec = os.environ.get(ENV)
    if not spec:
        return False
    for item in spec.split(","):
        want_point, _, want = item.strip().partition(":")
        steps, _, want_rank = want.partition("@")
        lo, dash, hi = steps.partition("-")
        first = int(lo)
        last = (int(hi) if hi else None) if dash else first
        if (
            want_point == point
            and first <= step
            and (last is None or step <= last)
            and (not want_rank or int(want_rank) == rank)
        ):
            return True
    return False


def maybe_crash(point: str, step: int, rank: int = 0) -> None:
    """SIGKILL this process when `point` at `step` is requested for this rank."""
    if _matches(point, step, rank):
        os.kill(os.getpid(), signal.SIGKILL)


def apply_numeric_faults(loss, step: int, rank: int = 0):
    """The loss the step backpropagates: unchanged unless `nan_loss` / `nan_grad` is injected at `step`
    (1-based, the step being run) on `rank`."""
    if not os.environ.get(ENV):
        return loss
    if _matches("nan_loss", step, rank):
        return loss * float("nan")  # NaN loss, NaN gradients
    if _matches("nan_grad", step, rank):
        return _nan_gradient(loss)  # finite loss, NaN gradients (through DeepSpeed's reduction)
    return loss


def _nan_gradient(loss):
    import torch

    class _NanGradient(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * float("nan")

    return _NanGradient.apply(loss)
