"""Device backends: the only place where HPU, CUDA and CPU differ (see base.py for the contract).

`select_backend(cfg, precision, zero_stage)` turns `backend.name` (auto|hpu|cuda|cpu) into a Backend:
auto = hpu if habana_frameworks is importable and an HPU is present, else cuda if torch.cuda.is_available(),
else cpu. Nothing here imports habana_frameworks at module import time.
"""

from __future__ import annotations

from gaudi_pretrain.backends.base import Backend
from gaudi_pretrain.backends.cpu import CpuBackend
from gaudi_pretrain.backends.cuda import CudaBackend
from gaudi_pretrain.backends.hpu import GaudiConfig, HpuBackend, habana_installed
from gaudi_pretrain.config import BackendConfig
from gaudi_pretrain.errors import ConfigError

__all__ = ["Backend", "CpuBackend", "CudaBackend", "GaudiConfig", "HpuBackend", "detect_backend", "select_backend"]


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def detect_backend(cfg: BackendConfig | None = None) -> str:
    """The backend name `auto` resolves to on this machine."""
    if HpuBackend.available(cfg):
        return "hpu"
    if _cuda_available():
        return "cuda"
    return "cpu"


def select_backend(cfg: BackendConfig | None = None, precision: str = "bf16", zero_stage: int = 0) -> Backend:
    """Build the backend named by `cfg.name` (resolving `auto`); a requested but absent device is a ConfigError."""
    cfg = cfg or BackendConfig()
    name = detect_backend(cfg) if cfg.name == "auto" else cfg.name
    if name == "hpu":
        if not habana_installed():
            raise ConfigError(
                "backend.name=hpu but habana_frameworks is not installed (use the Gaudi image, see Dockerfile)"
            )
        if cfg.name == "hpu" and not HpuBackend.available(cfg):
            raise ConfigError("backend.name=hpu but no Gaudi device is visible (check HABANA_VISIBLE_DEVICES / hl-smi)")
        return HpuBackend(cfg, precision, zero_stage)
    if name == "cuda":
        if not _cuda_available():
            raise ConfigError("backend.name=cuda but torch.cuda.is_available() is False")
        return CudaBackend(cfg, precision, zero_stage)
    return CpuBackend(cfg, precision, zero_stage)
