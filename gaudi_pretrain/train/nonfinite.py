"""Non-finite steps are skipped by the loop, whichever DeepSpeed runs the optimizer.

DeepSpeed 0.19 skips a step with non-finite bf16 gradients by itself. 0.16.1, the version Habana's fork for
Gaudi SW 1.21 is based on (checked against the fork's source), does not: its bf16 ZeRO-0 optimizer fails
`assert all_groups_norm > 0.` and its ZeRO-1/2/3 optimizers apply the NaN update, so the weights are lost.
So the loop decides itself: `GradientCheck` sums every gradient as autograd produces it (before DeepSpeed's
reduction hooks take it), and `skip_step` drops a bad step the way DeepSpeed's own overflow path does.
"""

from __future__ import annotations

from typing import Any

import torch


class GradientCheck:
    """A running fp32 sum of all gradients on the device: NaN or inf in any gradient makes it non-finite
    (finite gradients sum to values far inside fp32's range). Costs one read of each gradient, no sync."""

    def __init__(self, module: torch.nn.Module, device: torch.device):
        self.total = torch.zeros((), dtype=torch.float32, device=device)
        for p in module.parameters():
            if p.requires_grad:
                p.register_hook(self._add)

    def _add(self, grad: torch.Tensor) -> None:
        self.total.add_(grad.sum(dtype=torch.float32))

    def finite(self) -> torch.Tensor:
        """Whether every gradient since the last call was finite (a device bool); starts a new sum."""
        ok = torch.isfinite(self.total)
        self.total.zero_()
        return ok


def gradient_check_for(module: torch.nn.Module, backend: Any) -> GradientCheck | None:
    """A GradientCheck where DeepSpeed holds the gradients (bf16 or ZeRO >= 1); None where the loop clips
    `param.grad` itself and the pre-clip norm already tells."""
    return None if backend.clips_gradients else GradientCheck(module, backend.device)


def skip_step(engine: Any) -> None:
    """Drop the accumulated gradients and leave weights, optimizer moments and the lr schedule untouched,
    advancing DeepSpeed's step counters as its own skipped step does (the accumulation boundary stays put)."""
    optimizer = getattr(engine, "optimizer", None)
    if hasattr(optimizer, "clear_hp_grads"):  # bf16 ZeRO-0 (BF16_Optimizer): no overflow path in 0.16
        optimizer.clear_lp_grads()
        optimizer.clear_hp_grads()
    elif hasattr(optimizer, "overflow"):  # ZeRO 1-3 optimizers: step() honours the flag, cleans up, counts
        optimizer.overflow = True
        try:
            engine.step()
        finally:
            optimizer.overflow = False
        return
    engine.zero_grad()
    engine.skipped_steps += 1
    engine.global_steps += 1
    engine.global_samples += engine.train_batch_size()
    engine.micro_steps += 1
