"""CPU backend: gloo, fp32 by default (bf16 autocast when precision is bf16), plain torch AdamW."""

from __future__ import annotations

import os

import torch

from gaudi_pretrain.backends.base import Backend


class CpuBackend(Backend):
    name = "cpu"

    def prepare_environment(self) -> None:
        os.environ["DS_ACCELERATOR"] = "cpu"  # DeepSpeed's CPU accelerator; falls back to gloo without oneCCL
        if self.cfg.cpu_threads:
            os.environ["OMP_NUM_THREADS"] = str(self.cfg.cpu_threads)
            torch.set_num_threads(self.cfg.cpu_threads)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dist_backend(self) -> str:
        return "gloo"
