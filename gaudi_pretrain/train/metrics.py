"""Training metrics: device-side accumulation, one reduction per log step, JSONL + TensorBoard output.

Per-step `.item()` calls force a host sync (costly in HPU lazy mode), so step results are summed into a
device tensor and read only on the logging cadence. Sums are float32 and reduced as float32: Gaudi has no
FP64 and HCCL reduces only 32-bit floats exactly (other dtypes go through float32), so only a logging
window's counts, far below 2**24, are ever reduced; running totals are kept on the host.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from gaudi_pretrain.paths import confined

# Order of the device-side sums kept between log steps.
SUM_FIELDS = ("loss", "mlm_loss", "itm_loss", "mlm_correct", "mlm_count", "itm_correct", "itm_count", "micro_steps")


class StepAccumulator:
    """Sums a training step's outputs on the device; `reduce()` returns global means and resets.

    `add` stages a micro-step's values; `commit(ok)` keeps the staged values of a step where the device
    flag `ok` says it was applied and drops those of a skipped one (its NaNs never reach the log)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.sums = torch.zeros(len(SUM_FIELDS), dtype=torch.float32, device=device)
        self.pending = torch.zeros_like(self.sums)

    def add(self, out: Any, loss: torch.Tensor | None = None) -> None:
        loss = out.loss if loss is None else loss
        values = [loss, out.mlm_loss, out.itm_loss, out.mlm_correct, out.mlm_count, out.itm_correct, out.itm_count]
        self.pending += torch.stack([v.detach().float() for v in values] + [torch.ones((), device=self.device)])

    def commit(self, ok: torch.Tensor | bool = True) -> None:
        self.sums += torch.where(torch.as_tensor(ok, device=self.device), self.pending, 0.0)
        self.pending.zero_()

    def discard(self) -> None:
        self.commit(False)

    def reduce(self) -> dict[str, float]:
        sums = self.sums.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
        self.sums.zero_()
        s = dict(zip(SUM_FIELDS, sums.tolist()))
        if s["micro_steps"] == 0:  # every step since the last log was skipped (non-finite)
            return {"loss": None, "mlm_loss": None, "itm_loss": None, "mlm_acc": None, "itm_acc": None}
        steps = s["micro_steps"]
        return {
            "loss": s["loss"] / steps,
            "mlm_loss": s["mlm_loss"] / steps,
            "itm_loss": s["itm_loss"] / steps,
            "mlm_acc": s["mlm_correct"] / max(s["mlm_count"], 1.0),
            "itm_acc": s["itm_correct"] / max(s["itm_count"], 1.0),
        }


def current_rss_bytes(include_children: bool = False) -> int:
    """Resident set size of this process now (not the peak, which can only grow): /proc/self/statm on
    Linux, psutil elsewhere. With `include_children`, the data loader workers (child processes) are added."""
    try:
        with open("/proc/self/statm") as fh:
            rss = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        import psutil

        rss = psutil.Process().memory_info().rss
    if include_children:
        try:
            import psutil

            for child in psutil.Process().children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    rss += child.memory_info().rss
        except ImportError:  # pragma: no cover - psutil comes with DeepSpeed
            pass
    return int(rss)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum small host-side numbers across ranks (a window's data-wait seconds and skipped samples: float32,
    exact for counts below 2**24)."""
    t = torch.tensor(values, dtype=torch.float32, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


class Throughput:
    """Wall time, data-wait time and optimizer steps of the current measuring window. `reset()` ends it:
    at a log step (the record is computed from it), and after an evaluation or a checkpoint save (their
    time and the steps before them are left out, so a window never divides more steps by less time)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.data_wait = 0.0
        self.steps = 0

    def add_step(self) -> None:
        self.steps += 1

    def reset(self) -> tuple[float, float, int]:
        now = time.perf_counter()
        elapsed, wait, steps = now - self.start, self.data_wait, self.steps
        self.start, self.data_wait, self.steps = now, 0.0, 0
        return elapsed, wait, steps


class MetricsWriter:
    """Rank 0 writes `<run>/metrics.jsonl` (one JSON object per line) and TensorBoard scalars."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.path = confined(run_dir, "metrics.jsonl")
        self._tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(confined(run_dir, "tensorboard")))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self._tb is not None:
            step = record["step"]
            prefix = record.get("kind", "train")
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._tb.add_scalar(f"{prefix}/{key}", value, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
