"""CUDA backend: nccl, bf16 autocast, torch.compile on request."""

from __future__ import annotations

import os

import torch

from gaudi_pretrain.backends.base import Backend

# Peak dense tensor-core FLOP/s per device: (bf16, fp32 without TF32). Vendor datasheet numbers; the first
# substring that occurs in torch.cuda.get_device_name() wins, so more specific names come first.
_PEAK_FLOPS: list[tuple[str, float, float]] = [
    ("H100 PCIe", 756e12, 51e12),
    ("H100 NVL", 835e12, 60e12),
    ("H200", 989e12, 67e12),
    ("H100", 989e12, 67e12),
    ("GH200", 989e12, 67e12),
    ("B200", 2250e12, 75e12),
    ("A100", 312e12, 19.5e12),
    ("L40S", 362e12, 91.6e12),
    ("A10G", 70e12, 31.2e12),
    ("L4", 121e12, 30.3e12),
]


def cuda_peak_flops(device_name: str, precision: str) -> float | None:
    for key, bf16, fp32 in _PEAK_FLOPS:
        if key in device_name:
            return bf16 if precision == "bf16" else fp32
    return None


class CudaBackend(Backend):
    name = "cuda"

    def prepare_environment(self) -> None:
        os.environ["DS_ACCELERATOR"] = "cuda"

    @property
    def device(self) -> torch.device:
        index = self.local_rank % max(torch.cuda.device_count(), 1)
        if torch.cuda.current_device() != index:
            torch.cuda.set_device(index)  # nccl and DeepSpeed allocate on the current device
        return torch.device("cuda", index)

    @property
    def dist_backend(self) -> str:
        return "nccl"

    def memory_stats(self) -> int:
        return int(torch.cuda.max_memory_allocated(self.device))

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def set_seed(self, seed: int) -> None:
        super().set_seed(seed)
        torch.cuda.manual_seed_all(seed)

    def rng_state(self) -> torch.Tensor:
        return torch.cuda.get_rng_state(self.device)

    def set_rng_state(self, state: torch.Tensor) -> None:
        torch.cuda.set_rng_state(state, self.device)

    def peak_flops(self) -> float | None:
        return cuda_peak_flops(torch.cuda.get_device_name(self.device), self.precision)
