"""Non-finite steps: skipped on every rank alike, changing no weight, moment, step count or lr.

The decision is a device tensor: the loss was finite and so were the gradients (`GradientCheck` sums them as
autograd produces them, before DeepSpeed's hooks take them; or the pre-clip norm when the loop clips), and
it is all-reduced (MIN) so every rank takes the same one. With an optimizer that skips on the device
(`GuardedAdamW`: the flag goes to its `found_inf`, and the device schedule does not advance), the step needs
no host read; the counts are read at the logging cadence (`NonfiniteCounter.read`). Where the optimizer or
DeepSpeed's wrapper cannot take the decision on the device, the loop reads it on the host and skips through
`skip_step`:
* Habana's FusedAdamW keeps its step count and lr on the host;
* DeepSpeed 0.16's bf16 ZeRO-0 optimizer (BF16_Optimizer, also in Habana's fork for SW 1.21) fails
  `assert all_groups_norm > 0.` on a non-finite norm (and reads that norm on the host every step itself);
  its ZeRO-1/2/3 optimizers would apply a NaN update, which the device skip prevents.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


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


def all_ranks(ok: torch.Tensor) -> torch.Tensor:
    """`ok` on every rank (a device int32 MIN all-reduce: HCCL reduces no 64-bit or bool tensors)."""
    value = ok.to(torch.int32)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return value.bool()


class NonfiniteCounter:
    """Skipped steps counted on the device: the total, the current run of consecutive skips and the
    longest run since the last `read`, which is the only host read (at the logging cadence)."""

    def __init__(self, device: torch.device, total: int = 0):
        self.counts = torch.tensor([float(total), 0.0, 0.0], device=device)  # total, run, longest run

    def add(self, ok: torch.Tensor) -> None:
        skipped = (~ok).float()
        total, run, longest = self.counts.unbind()
        run = (run + 1.0) * skipped
        self.counts = torch.stack([total + skipped, run, torch.maximum(longest, run)])

    def read(self) -> tuple[int, int, int]:
        """(total skipped, current run, longest run since the last read)."""
        total, run, longest = (int(v) for v in self.counts.tolist())
        self.counts = torch.stack([self.counts[0], self.counts[1], self.counts[1]])
        return total, run, longest


def read_counts(state: Any, counter: NonfiniteCounter) -> None:
    """Bring the device's skip counts into the host state (the logging cadence, checkpoints)."""
    state.nonfinite_steps, state.consecutive_nonfinite, state.longest_nonfinite = counter.read()


def decides_on_device(engine: Any, optimizer: Any) -> bool:
    """Whether the step can be cancelled on the device (see the module docstring for when it cannot)."""
    return bool(getattr(optimizer, "supports_device_skip", False)) and not hasattr(engine.optimizer, "clear_hp_grads")


def step_or_skip(engine: Any, optimizer: Any, ok: torch.Tensor, on_device: bool) -> None:
    """The optimizer step of an accumulation boundary, cancelled where `ok` (all ranks agreed) is False."""
    if on_device:
        optimizer.found_inf = (~ok).float()
        engine.step()
        return
    if hasattr(optimizer, "found_inf"):
        optimizer.found_inf = None
    if bool(ok):  # a host read: this configuration's one sync per optimizer step
        engine.step()
    else:
        skip_step(engine)


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
