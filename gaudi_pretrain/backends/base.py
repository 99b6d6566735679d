"""The backend seam: everything that differs between Gaudi (HPU), CUDA and CPU lives behind `Backend`.

The training loop calls these methods in a fixed order and never tests the device itself:

    backend = select_backend(cfg.backend, cfg.train.precision, cfg.train.zero_stage)
    backend.prepare_environment()        # env that must exist before device libraries / deepspeed import
    init_distributed(info, backend.dist_backend)
    model = backend.compile(model.to(backend.device))
    optimizer = backend.make_optimizer(param_groups(model, cfg.optim), cfg.optim)
    for each micro-step:
        with backend.autocast():         # forward + loss only
            loss = model(batch).loss
        loss.backward();          backend.after_backward()        # mark_step in HPU lazy mode
        if backend.clips_gradients: backend.clip_grad_norm(params, max_norm)
        optimizer.step();         backend.after_optimizer_step()  # mark_step in HPU lazy mode

Who clips gradients: with bf16 or ZeRO >= 1 the gradients that count live in DeepSpeed's fp32 /
partitioned buffers, not in `param.grad`, so DeepSpeed clips (config `gradient_clipping`). With fp32 and
ZeRO stage 0 `param.grad` is the real gradient and the loop clips through the backend (`clips_gradients`
True): FusedClipNorm on HPU, torch's clip elsewhere, and the returned norm is logged.
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import Any

import torch

from gaudi_pretrain.config import BackendConfig, OptimConfig

# An attention function with torch.nn.functional.scaled_dot_product_attention's leading signature:
# fn(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None) -> Tensor
AttentionFn = Callable[..., torch.Tensor]


def optimizer_kwargs(
    optim: OptimConfig | None,
    lr: float | None = None,
    betas: tuple[float, float] | None = None,
    eps: float | None = None,
    weight_decay: float | None = None,
) -> dict[str, Any]:
    """AdamW hyper-parameters from an OptimConfig, each overridable by an explicit keyword."""
    base = optim or OptimConfig()
    return {
        "lr": base.lr if lr is None else lr,
        "betas": tuple(base.betas if betas is None else betas),
        "eps": base.eps if eps is None else eps,
        "weight_decay": base.weight_decay if weight_decay is None else weight_decay,
    }


class Backend(ABC):
    """One device family. Subclasses override what differs; the defaults are the plain-PyTorch behaviour."""

    name: str = "base"

    def __init__(self, cfg: BackendConfig | None = None, precision: str = "bf16", zero_stage: int = 0):
        self.cfg = cfg or BackendConfig()
        self.precision = precision
        self.zero_stage = zero_stage

    # ------------------------------------------------------------------ environment and placement

    @abstractmethod
    def prepare_environment(self) -> None:
        """Set environment variables that must exist before device libraries or DeepSpeed are imported."""

    @property
    def local_rank(self) -> int:
        return int(os.environ.get("LOCAL_RANK", "0"))

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """The torch.device this process computes on (the local rank's device)."""

    @property
    @abstractmethod
    def dist_backend(self) -> str:
        """torch.distributed backend name: "hccl", "nccl" or "gloo"."""

    def to_device(self, batch: dict[str, Any], float_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """A batch's tensors on this device (other values are left out), floating ones cast to
        `float_dtype` (the parameters' dtype) when given."""
        out = {}
        for key, value in batch.items():
            if isinstance(value, torch.Tensor):
                value = value.to(self.device, non_blocking=True)
                out[key] = value.to(float_dtype) if float_dtype is not None and value.is_floating_point() else value
        return out

    # ------------------------------------------------------------------ numerics

    def autocast(self) -> AbstractContextManager[Any]:
        """Mixed-precision context for forward + loss (never around backward or the optimizer step)."""
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def make_optimizer(
        self,
        param_groups: Iterable[Any],
        optim: OptimConfig | None = None,
        *,
        lr: float | None = None,
        betas: tuple[float, float] | None = None,
        eps: float | None = None,
        weight_decay: float | None = None,
    ) -> torch.optim.Optimizer:
        """AdamW over `param_groups` (per-group lr / weight_decay win over the defaults given here) that can
        skip a non-finite step on the device (`train.optim.GuardedAdamW`)."""
        from gaudi_pretrain.train.optim import GuardedAdamW

        return GuardedAdamW(list(param_groups), **optimizer_kwargs(optim, lr, betas, eps, weight_decay))

    @property
    def clips_gradients(self) -> bool:
        """True when the loop must call `clip_grad_norm` itself and DeepSpeed must not clip (see module doc)."""
        return self.precision == "fp32" and self.zero_stage == 0

    def clip_grad_norm(self, params: Iterable[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
        """Clip gradients in place to a global L2 norm of `max_norm`; returns the norm before clipping."""
        return torch.nn.utils.clip_grad_norm_(list(params), max_norm)

    # ------------------------------------------------------------------ step hooks

    def after_backward(self) -> None:
        """Called right after loss.backward() (HPU lazy mode: mark_step)."""

    def after_optimizer_step(self) -> None:
        """Called right after optimizer.step() (HPU lazy mode: mark_step)."""

    # ------------------------------------------------------------------ model transforms

    def compile(self, model: torch.nn.Module) -> torch.nn.Module:
        """torch.compile the model when `backend.compile` is set; the module is returned unchanged otherwise."""
        return torch.compile(model) if self.cfg.compile else model

    def attention_fn(self) -> AttentionFn | None:
        """A replacement for torch's SDPA (same signature), or None to use torch's own."""
        return None

    # ------------------------------------------------------------------ measurements

    def graph_compile_count(self) -> int | None:
        """Graphs compiled so far: torch.compile's (dynamo's unique graphs; a count that grows after the
        first steps means recompiles) when `backend.compile` is set, else None."""
        if not self.cfg.compile:
            return None
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])

    def memory_stats(self) -> int:
        """Peak memory in bytes: device allocator peak on accelerators, process peak RSS on CPU."""
        return peak_rss_bytes()

    def synchronize(self) -> None:
        """Wait for queued device work (for honest timings)."""

    def set_seed(self, seed: int) -> None:
        """Seed Python, NumPy and torch (all devices torch knows about)."""
        random.seed(seed)
        try:
            import numpy as np

            np.random.seed(seed % 2**32)
        except ImportError:  # pragma: no cover - numpy is a dependency
            pass
        torch.manual_seed(seed)

    def rng_state(self) -> torch.Tensor | None:
        """The device generator's state (drives dropout on the device), saved per rank for exact resume;
        None where torch's CPU generator, which checkpoints always save, is the only one."""
        return None

    def set_rng_state(self, state: torch.Tensor) -> None:
        """Restore a state returned by `rng_state` on the same kind of device."""

    def peak_flops(self) -> float | None:
        """Peak dense FLOP/s of one device at the run's precision, for MFU; None when unknown."""
        return None

    def describe(self) -> dict[str, Any]:
        """What was chosen, for the run log."""
        return {
            "backend": self.name,
            "device": str(self.device),
            "dist_backend": self.dist_backend,
            "precision": self.precision,
            "clips_gradients": self.clips_gradients,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(precision={self.precision!r}, zero_stage={self.zero_stage})"


def peak_rss_bytes() -> int:
    """Peak resident set size of this process in bytes (ru_maxrss is KiB on Linux, bytes on macOS)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
