"""Intel Gaudi (HPU) backend, written against the documented habana_frameworks API (Gaudi software 1.2x).

What it does, in the order it happens:
- `prepare_environment()` sets PT_HPU_LAZY_MODE (1 = lazy graphs, 0 = eager + torch.compile) BEFORE the
  first `import habana_frameworks`, DS_ACCELERATOR=hpu for DeepSpeed, PT_HPU_METRICS_FILE /
  PT_HPU_METRICS_DUMP_TRIGGERS=process_exit,metric_change (graph-compile counting; existing values win),
  and the autocast op lists of the gaudi_config; then imports `habana_frameworks.torch.core`.
- `dist_backend` imports `habana_frameworks.torch.distributed.hccl` (registers the "hccl" backend) and
  returns "hccl".
- Lazy mode: `after_backward()` and `after_optimizer_step()` each call `htcore.mark_step()` (one graph
  for forward+backward, one for the optimizer). Eager mode: both are no-ops and `compile()` wraps the
  model in `torch.compile(backend="hpu_backend")`. In lazy mode `compile()` returns the model unchanged:
  lazy mode already builds graphs, and HPU graphs (`wrap_in_hpu_graph`) are not used for training here.
- Optimizer: `hpex.optimizers.FusedAdamW` with eps passed explicitly (its default is 1e-6, torch's 1e-8).
- Clipping: `hpex.normalization.FusedClipNorm(params, max_norm).clip_norm(params)`.
- Attention: `hpex.kernels.FusedSDPA.apply` behind torch SDPA's signature.
- RNG: `torch.hpu.random.get_rng_state` / `set_rng_state`, saved per rank in checkpoints (dropout masks
  of a resumed run equal the uninterrupted run's).

gaudi_config.json (optimum-habana's GaudiConfig keys) is honoured:
- use_fused_adam: FusedAdamW (true) or torch.optim.AdamW (false).
- use_fused_clip_norm: FusedClipNorm (true) or torch.nn.utils.clip_grad_norm_ (false). It also decides
  who clips: the backend (loop calls clip_grad_norm, DeepSpeed gradient_clipping 0) only when precision
  is fp32 and ZeRO stage is 0; otherwise DeepSpeed clips its own fp32/partitioned gradients.
- use_torch_autocast: bf16 `torch.autocast("hpu")` around forward+loss when precision is bf16.
- autocast_bf16_ops / autocast_fp32_ops: written one op per line to files named by
  PT_HPU_AUTOCAST_LOWER_PRECISION_OPS_LIST / PT_HPU_AUTOCAST_FP32_OPS_LIST before the import (the bridge
  reads them then), replacing Habana's default autocast lists; null keeps the defaults.
Other GaudiConfig keys are ignored (listed in `ignored_keys`).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ContextManager

import torch

from gaudi_pretrain.backends.base import AttentionFn, Backend, optimizer_kwargs
from gaudi_pretrain.config import BackendConfig
from gaudi_pretrain.errors import ConfigError

LAZY_MODE_ENV = "PT_HPU_LAZY_MODE"
METRICS_FILE_ENV = "PT_HPU_METRICS_FILE"
METRICS_TRIGGERS_ENV = "PT_HPU_METRICS_DUMP_TRIGGERS"
BF16_OPS_ENV = "PT_HPU_AUTOCAST_LOWER_PRECISION_OPS_LIST"
FP32_OPS_ENV = "PT_HPU_AUTOCAST_FP32_OPS_LIST"

# Peak dense bf16 FLOP/s (matrix engines). Gaudi2: our estimate from public material (~432 TFLOP/s);
# Gaudi3: Intel's published 1835 TFLOP/s. Used only for MFU; None for other generations / fp32.
_PEAK_BF16_FLOPS = {"GAUDI3": 1835e12, "GAUDI2": 432e12}


def habana_installed() -> bool:
    """True when `habana_frameworks` can be imported. Only the top-level name is looked up: finding a
    submodule's spec would import the parent package before PT_HPU_LAZY_MODE is set."""
    try:
        return importlib.util.find_spec("habana_frameworks") is not None
    except (ImportError, ValueError):
        return False


@dataclass(frozen=True)
class GaudiConfig:
    """The subset of optimum-habana's gaudi_config.json this project acts on."""

    use_fused_adam: bool = True
    use_fused_clip_norm: bool = True
    use_torch_autocast: bool = True
    autocast_bf16_ops: tuple[str, ...] | None = None
    autocast_fp32_ops: tuple[str, ...] | None = None
    ignored_keys: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def load(cls, path: str | os.PathLike | None) -> "GaudiConfig":
        if path is None:
            return cls()
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"backend.gaudi_config file not found: {path}")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"backend.gaudi_config {path} is not valid JSON (line {exc.lineno})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"backend.gaudi_config {path} must hold a JSON object")
        known = {"use_fused_adam", "use_fused_clip_norm", "use_torch_autocast", "autocast_bf16_ops",
                 "autocast_fp32_ops"}
        values: dict[str, Any] = {}
        for key in ("use_fused_adam", "use_fused_clip_norm", "use_torch_autocast"):
            if key in raw:
                if not isinstance(raw[key], bool):
                    raise ConfigError(f"backend.gaudi_config {path}: '{key}' must be true or false")
                values[key] = raw[key]
        for key in ("autocast_bf16_ops", "autocast_fp32_ops"):
            ops = raw.get(key)
            if ops is not None:
                if not isinstance(ops, list) or not all(isinstance(op, str) and op for op in ops):
                    raise ConfigError(f"backend.gaudi_config {path}: '{key}' must be null or a list of op names")
                values[key] = tuple(ops)
        return cls(**values, ignored_keys=tuple(sorted(set(raw) - known)))


def make_fused_sdpa(fused_sdpa_cls: Any) -> AttentionFn:
    """Adapt `FusedSDPA.apply` to torch's `scaled_dot_product_attention(q, k, v, attn_mask, dropout_p,
    is_causal, scale)`. Boolean masks (True = attend, torch's convention) become additive float masks."""

    def fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None):
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            blocked = torch.finfo(query.dtype).min
            attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                attn_mask.logical_not(), blocked
            )
        return fused_sdpa_cls.apply(query, key, value, attn_mask, dropout_p, is_causal, scale)

    return fused_sdpa


class HpuBackend(Backend):
    name = "hpu"

    def __init__(self, cfg: BackendConfig | None = None, precision: str = "bf16", zero_stage: int = 0):
        super().__init__(cfg, precision, zero_stage)
        self.gaudi = GaudiConfig.load(self.cfg.gaudi_config)
        self._htcore: Any = None
        self._clippers: dict[float, Any] = {}
        self._warned_compile = False

    @property
    def lazy(self) -> bool:
        return self.cfg.hpu_lazy_mode

    # ------------------------------------------------------------------ environment

    def set_environment(self) -> None:
        """Environment only (no import). Refuses when habana_frameworks was imported under another mode."""
        wanted = "1" if self.lazy else "0"
        if "habana_frameworks.torch" in sys.modules and os.environ.get(LAZY_MODE_ENV, wanted) != wanted:
            raise ConfigError(
                f"habana_frameworks was imported with {LAZY_MODE_ENV}={os.environ.get(LAZY_MODE_ENV)} but the "
                f"config asks for {wanted}: select and prepare the backend before importing it"
            )
        os.environ[LAZY_MODE_ENV] = wanted
        os.environ["DS_ACCELERATOR"] = "hpu"
        os.environ.setdefault(METRICS_FILE_ENV, str(Path(tempfile.gettempdir()) / f"gaudi_pretrain_hpu_metrics_{os.getpid()}.json"))
        os.environ.setdefault(METRICS_TRIGGERS_ENV, "process_exit,metric_change")
        ops_dir: Path | None = None
        for ops, env in ((self.gaudi.autocast_bf16_ops, BF16_OPS_ENV), (self.gaudi.autocast_fp32_ops, FP32_OPS_ENV)):
            if ops is None:
                continue
            ops_dir = ops_dir or Path(tempfile.mkdtemp(prefix="gaudi_pretrain_autocast_"))
            path = ops_dir / f"{env.lower()}.txt"
            path.write_text("".join(op + "\n" for op in ops))
            os.environ[env] = str(path)

    def prepare_environment(self) -> None:
        if self._htcore is not None:
            return
        self.set_environment()
        self._htcore = importlib.import_module("habana_frameworks.torch.core")

    def _core(self) -> Any:
        if self._htcore is None:
            self.prepare_environment()
        return self._htcore

    def _hpu(self) -> Any:
        self._core()
        return importlib.import_module("habana_frameworks.torch.hpu")

    @classmethod
    def available(cls, cfg: BackendConfig | None = None) -> bool:
        """habana_frameworks importable and at least one HPU present. Sets the env first (import order)."""
        if not habana_installed():
            return False
        probe = cls(cfg)
        probe.set_environment()
        try:
            return bool(importlib.import_module("habana_frameworks.torch.hpu").is_available())
        except Exception:  # a broken install counts as "no HPU", auto selection then falls through
            return False

    @property
    def device(self) -> torch.device:
        return torch.device("hpu")  # the runtime binds each process to its own card

    @property
    def dist_backend(self) -> str:
        self._core()
        importlib.import_module("habana_frameworks.torch.distributed.hccl")  # registers "hccl"
        return "hccl"

    # ------------------------------------------------------------------ numerics

    def autocast(self) -> ContextManager[Any]:
        if self.precision == "bf16" and self.gaudi.use_torch_autocast:
            return torch.autocast(device_type="hpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def make_optimizer(self, param_groups, optim=None, *, lr=None, betas=None, eps=None, weight_decay=None):
        kwargs = optimizer_kwargs(optim, lr, betas, eps, weight_decay)
        groups = list(param_groups)
        if not self.gaudi.use_fused_adam:
            return torch.optim.AdamW(groups, **kwargs)
        self._core()
        fused = importlib.import_module("habana_frameworks.torch.hpex.optimizers").FusedAdamW
        # eps explicitly: FusedAdamW's default (1e-6) differs from the recipe's and torch's 1e-8.
        return fused(groups, lr=kwargs["lr"], betas=kwargs["betas"], eps=kwargs["eps"],
                     weight_decay=kwargs["weight_decay"])

    def clip_grad_norm(self, params, max_norm: float) -> torch.Tensor:
        params = list(params)
        if not self.gaudi.use_fused_clip_norm:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        clipper = self._clippers.get(max_norm)
        if clipper is None:
            self._core()
            fused_clip = importlib.import_module("habana_frameworks.torch.hpex.normalization").FusedClipNorm
            clipper = self._clippers[max_norm] = fused_clip(params, max_norm)
        return clipper.clip_norm(params)

    # ------------------------------------------------------------------ step hooks

    def after_backward(self) -> None:
        if self.lazy:
            self._core().mark_step()  # cut the graph: forward + backward run here

    def after_optimizer_step(self) -> None:
        if self.lazy:
            self._core().mark_step()  # cut the graph: the optimizer update runs here

    # ------------------------------------------------------------------ model transforms

    def compile(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.lazy:
            if self.cfg.compile and not self._warned_compile:
                warnings.warn("backend.compile is ignored in HPU lazy mode (graphs are built lazily); "
                              "set backend.hpu_lazy_mode=false for torch.compile(backend='hpu_backend')",
                              stacklevel=2)
                self._warned_compile = True
            return model
        self._core()  # registers the "hpu_backend" dynamo backend
        return torch.compile(model, backend="hpu_backend")

    def attention_fn(self) -> AttentionFn | None:
        self._core()
        return make_fused_sdpa(importlib.import_module("habana_frameworks.torch.hpex.kernels").FusedSDPA)

    # ------------------------------------------------------------------ measurements

    def graph_compile_count(self) -> int | None:
        """Graph compilations so far: the live metric if the bridge exposes it, else the metrics file."""
        try:
            metrics = importlib.import_module("habana_frameworks.torch.hpu.metrics")
            metric = metrics.metric_global("graph_compilation")
            if metric is not None:
                return int(dict(metric.stats())["TotalNumber"])
        except Exception:
            pass
        return read_metrics_file_compiles(os.environ.get(METRICS_FILE_ENV), os.environ.get("RANK"))

    def memory_stats(self) -> int:
        return int(self._hpu().max_memory_allocated())

    def synchronize(self) -> None:
        self._hpu().synchronize()

    def set_seed(self, seed: int) -> None:
        super().set_seed(seed)
        seed_hpu = getattr(self._hpu(), "manual_seed", None)
        if seed_hpu is not None:
            seed_hpu(seed)

    def _random(self) -> Any:
        self._core()
        return importlib.import_module("habana_frameworks.torch.hpu.random")

    def rng_state(self) -> torch.Tensor:
        return self._random().get_rng_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        self._random().set_rng_state(state)

    def peak_flops(self) -> float | None:
        if self.precision != "bf16":
            return None
        try:
            name = str(self._hpu().get_device_name()).upper()
        except Exception:
            return None
        for key, flops in _PEAK_BF16_FLOPS.items():
            if key in name:
                return flops
        return None

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.update(lazy_mode=self.lazy, fused_adam=self.gaudi.use_fused_adam,
                    fused_clip_norm=self.gaudi.use_fused_clip_norm, torch_autocast=self.gaudi.use_torch_autocast)
        return info


def metrics_file_candidates(path: str, rank: str | None) -> list[Path]:
    """The bridge writes `<stem>-rank<N><.json>` when RANK is set (e.g. metrics.json -> metrics-rank0.json)."""
    base = Path(path)
    out = []
    if rank is not None:
        if base.suffix == ".json":
            out.append(base.with_name(f"{base.stem}-rank{rank}.json"))
        else:
            out.append(base.with_name(f"{base.name}-rank{rank}"))
    out.append(base)
    return out


def read_metrics_file_compiles(path: str | None, rank: str | None = None) -> int | None:
    """TotalNumber of the last `graph_compilation` record in a PT_HPU_METRICS_FILE JSON dump, or None."""
    if not path:
        return None
    for candidate in metrics_file_candidates(path, rank):
        try:
            records = json.loads(candidate.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(records, dict):
            records = [records]
        counts = [
            int(r["statistics"]["TotalNumber"])
            for r in records
            if isinstance(r, dict) and r.get("metric_name") == "graph_compilation"
        ]
        if counts:
            return counts[-1]
    return None
