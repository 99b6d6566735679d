"""What a training run carries from step to step: its typed live state and the objects setup built."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # type names only: importing them here would import torch and DeepSpeed
    import torch

    from gaudi_pretrain.backends.base import Backend
    from gaudi_pretrain.config import RunConfig
    from gaudi_pretrain.data.pipeline import PretrainLoader
    from gaudi_pretrain.distributed import DistInfo
    from gaudi_pretrain.train.nonfinite import GradientCheck, NonfiniteCounter


@dataclass
class TrainState:
    """Host-side counters; what resumes from a checkpoint is written by checkpoint.save_checkpoint."""

    step: int = 0  # optimizer steps done
    samples_seen: int = 0  # global samples drawn (skipped steps included)
    skipped_samples: int = 0  # this rank's corrupt / missing samples, cumulative
    skipped_logged: int = 0  # this rank's count at the last log record
    skipped_global: int = 0  # every rank's, cumulative (reduced a logging window at a time)
    nonfinite_steps: int = 0  # skipped non-finite steps, cumulative (read from the device at log steps)
    consecutive_nonfinite: int = 0  # the current run of them
    longest_nonfinite: int = 0  # the longest run since the previous read
    grad_norm: Any = None  # the last pre-clip norm where the loop clips (a device tensor)
    resumed_from: str | None = None
    best_score: float | None = None  # the best held-out ITM + MLM accuracy so far (checkpoints/best)
    best_step: int | None = None
    # the global batch whose steps train.max_steps and the lr schedule count: the run's first (checkpoints
    # carry it), so a resume with another global batch continues both by samples seen
    schedule_batch: int = 0


@dataclass
class RunContext:
    """What the loop needs besides the config, built once by `train.setup.setup()`."""

    cfg: RunConfig
    backend: Backend
    dist: DistInfo
    engine: Any  # deepspeed.DeepSpeedEngine
    optimizer: Any  # the optimizer the backend built (engine.optimizer may wrap it)
    loader: PretrainLoader | None
    run_dir: Path
    tokenizer: Any  # a transformers tokenizer
    flops_per_sample: float
    float_dtype: torch.dtype  # the parameters' dtype (bf16 under DeepSpeed's bf16): batches are cast to it
    nonfinite: NonfiniteCounter
    grad_check: GradientCheck | None = None  # where DeepSpeed holds the gradients (bf16 or ZeRO >= 1)
    skip_on_device: bool = False  # a non-finite step is cancelled without a host read
    state: TrainState = field(default_factory=TrainState)

    @property
    def global_batch(self) -> int:
        t = self.cfg.train
        return t.micro_batch_size * t.gradient_accumulation_steps * self.dist.world_size

    def end_step(self) -> int:
        """The step at which the run has drawn train.max_steps x schedule_batch samples."""
        s = self.state
        remaining = self.cfg.train.max_steps * (s.schedule_batch or self.global_batch) - s.samples_seen
        return s.step + max(0, -(-remaining // self.global_batch))
