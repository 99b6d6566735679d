"""Intel Gaudi (HPU) backend, written against the Intel Gaudi PyTorch bridge (`habana_frameworks`, Gaudi
software 1.2x; checked against Intel's published bridge source, HabanaAI/gaudi-pytorch-bridge v1.19.0, and
docs.habana.ai). Launch and mode rules, and what was verified how: docs/launching.md "Running on Gaudi".

Since software 1.18 a bare `import torch` loads the bridge through torch's device-backend autoload
(docs.habana.ai "PyTorch Autoloading"; bridge `autoload/__init__.py`: skipped in lazy mode unless
PT_HPU_AUTOLOAD=1). The bridge reads PT_HPU_LAZY_MODE once, when it loads (`utils/internal.py is_lazy`), so
the mode is fixed before our code runs whenever torch was imported first: the launchers export it from the
config (`gaudi-pretrain launch-env`), the process sets it when the bridge is not loaded yet, and after the
import it asks the bridge which mode it really runs in and refuses a mismatch in one line.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import sys
import warnings
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from gaudi_pretrain.backends.base import AttentionFn, Backend, optimizer_kwargs
from gaudi_pretrain.config import BackendConfig
from gaudi_pretrain.errors import ConfigError

LAZY_MODE_ENV = "PT_HPU_LAZY_MODE"
METRICS_FILE_ENV = "PT_HPU_METRICS_FILE"
# The one test seam: tensors (and DeepSpeed's accelerator) on this device instead of "hpu". Only the
# habana_frameworks test double (tests/hpu_double) sets it, because a CPU build of torch has no HPU tensors.
DEVICE_ENV = "GAUDI_PRETRAIN_HPU_DEVICE"
# Lazy mode is a legacy fallback from this release on: eager + torch.compile became the default in 1.21
# (HabanaAI/Gaudi-tutorials PR 131; docs.habana.ai "PyTorch Gaudi Theory of Operations": "Lazy mode is a
# legacy fallback that is no longer developed and will be deprecated in subsequent releases").
LAZY_LEGACY_SINCE = (1, 21)

# Peak dense bf16 FLOP/s (matrix engines). Gaudi2: our estimate from public material (~432 TFLOP/s);
# Gaudi3: Intel's published 1835 TFLOP/s. Used only for MFU; None for other generations / fp32.
_PEAK_BF16_FLOPS = {"GAUDI3": 1835e12, "GAUDI2": 432e12}


def habana_installed() -> bool:
    """True when `habana_frameworks` can be imported. Only the top-level name is looked up: finding a
    submodule's spec would import the parent package."""
    try:
        return importlib.util.find_spec("habana_frameworks") is not None
    except (ImportError, ValueError):
        return False


def bridge_version() -> tuple[int, ...] | None:
    """The installed bridge's release (the `habana-torch-plugin` wheel), e.g. (1, 22, 0), or None."""
    try:
        text = importlib.metadata.version("habana-torch-plugin")
    except importlib.metadata.PackageNotFoundError:
        return None
    return tuple(int(part) for part in text.split(".")[:3] if part.isdigit())


class GaudiConfig(BaseModel):
    """The part of optimum-habana's gaudi_config.json this project acts on; its other keys are ignored
    (kept in `model_extra`)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    use_fused_adam: bool = False
    use_fused_clip_norm: bool = True
    use_torch_autocast: bool = True
    autocast_bf16_ops: None = None
    autocast_fp32_ops: None = None

    @property
    def ignored_keys(self) -> tuple[str, ...]:
        return tuple(sorted(self.model_extra or {}))

    @classmethod
    def load(cls, path: str | os.PathLike | None) -> GaudiConfig:
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
        try:
            return cls.model_validate(raw, strict=True)
        except ValidationError as exc:
            error = exc.errors()[0]
            key = ".".join(str(p) for p in error["loc"])
            if key in ("autocast_bf16_ops", "autocast_fp32_ops"):
                raise ConfigError(
                    f"backend.gaudi_config {path}: '{key}' is not supported (the bridge reads autocast op lists "
                    "from PT_HPU_AUTOCAST_LOWER_PRECISION_OPS_LIST / PT_HPU_AUTOCAST_FP32_OPS_LIST files when torch "
                    "is first imported: export those instead; LayerNorm, softmax and the losses already run in "
                    "fp32 regions)"
                ) from None
            raise ConfigError(f"backend.gaudi_config {path}: '{key}' must be true or false") from None


def make_fused_sdpa(fused_sdpa_cls: Any) -> AttentionFn:
    """Adapt `FusedSDPA.apply` (an autograd Function: positional arguments only) to torch's
    `scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale)`. Boolean masks (True =
    attend, torch's convention) become additive float masks."""

    def fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None):
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            blocked = torch.finfo(query.dtype).min
            attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                attn_mask.logical_not(), blocked
            )
        return fused_sdpa_cls.apply(query, key, value, attn_mask, dropout_p, is_causal, scale)

    return fused_sdpa


def _mode(lazy: bool) -> str:
    return "lazy" if lazy else "eager (+ torch.compile)"


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
        """Before the bridge loads: the config's mode, unless the launcher already exported another one."""
        from gaudi_pretrain import launch_env

        launch_env.apply(
            self.cfg.model_copy(update={"name": "hpu"}), can_set="habana_frameworks.torch" not in sys.modules
        )
        os.environ["DS_ACCELERATOR"] = "hpu" if self.device.type == "hpu" else self.device.type

    def prepare_environment(self) -> None:
        if self._htcore is not None:
            return
        self.set_environment()
        self._htcore = importlib.import_module("habana_frameworks.torch.core")
        self._check_mode()

    def _check_mode(self) -> None:
        """The bridge's own answer (read once when it loaded) must be the config's mode."""
        actual = bool(importlib.import_module("habana_frameworks.torch.utils.internal").is_lazy())
        if actual != self.lazy:
            raise ConfigError(
                f"the Gaudi bridge runs in {_mode(actual)} mode ({LAZY_MODE_ENV}="
                f"{os.environ.get(LAZY_MODE_ENV, 'unset')} when torch was first imported) but the config asks for "
                f"{_mode(self.lazy)} (backend.hpu_lazy_mode={str(self.lazy).lower()}): export "
                f"{LAZY_MODE_ENV}={'1' if self.lazy else '0'} before Python starts (launch/*.sh do it)"
            )
        version = bridge_version()
        if self.lazy and version and version[:2] >= LAZY_LEGACY_SINCE:
            warnings.warn(
                f"Gaudi software {'.'.join(map(str, version))} runs lazy mode as a legacy fallback (its default is "
                "eager + torch.compile: backend.hpu_lazy_mode=false)",
                stacklevel=2,
            )

    def _core(self) -> Any:
        if self._htcore is None:
            self.prepare_environment()
        return self._htcore

    def _hpu(self) -> Any:
        self._core()
        return importlib.import_module("habana_frameworks.torch.hpu")

    @classmethod
    def available(cls, cfg: BackendConfig | None = None) -> bool:
        """habana_frameworks importable and at least one HPU present (prepares the environment first)."""
        if not habana_installed():
            return False
        probe = cls(cfg)
        probe.prepare_environment()
        try:
            return bool(probe._hpu().is_available())
        except Exception:  # a broken install counts as "no HPU", auto selection then falls through
            return False

    @property
    def device(self) -> torch.device:
        return torch.device(os.environ.get(DEVICE_ENV, "hpu"))  # the runtime binds each process to its card

    @property
    def dist_backend(self) -> str:
        self._core()
        importlib.import_module("habana_frameworks.torch.distributed.hccl")  # registers "hccl"
        return "hccl"

    # ------------------------------------------------------------------ numerics

    def autocast(self) -> AbstractContextManager[Any]:
        if self.precision == "bf16" and self.gaudi.use_torch_autocast:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def make_optimizer(self, param_groups, optim=None, *, lr=None, betas=None, eps=None, weight_decay=None):
        if not self.gaudi.use_fused_adam:
            return super().make_optimizer(param_groups, optim, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        kwargs = optimizer_kwargs(optim, lr, betas, eps, weight_decay)
        self._core()
        fused = importlib.import_module("habana_frameworks.torch.hpex.optimizers").FusedAdamW
        # eps explicitly: FusedAdamW's default (1e-6) differs from the recipe's and torch's 1e-8.
        return fused(
            list(param_groups),
            lr=kwargs["lr"],
            betas=kwargs["betas"],
            eps=kwargs["eps"],
            weight_decay=kwargs["weight_decay"],
        )

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
                warnings.warn(
                    "backend.compile is ignored in HPU lazy mode (graphs are built lazily); "
                    "set backend.hpu_lazy_mode=false for torch.compile(backend='hpu_backend')",
                    stacklevel=2,
                )
                self._warned_compile = True
            return model
        self._core()  # registers the "hpu_backend" dynamo backend
        # static shapes, as Intel's reference models compile (Model-References 1.23 PyTorch/nlp/bert/run_squad.py)
        return torch.compile(model, backend="hpu_backend", dynamic=False)

    def attention_fn(self) -> AttentionFn | None:
        self._core()
        return make_fused_sdpa(importlib.import_module("habana_frameworks.torch.hpex.kernels").FusedSDPA)

    # ------------------------------------------------------------------ measurements

    def graph_compile_count(self) -> int | None:
        """Graph compilations so far: the bridge's live metric, else a PT_HPU_METRICS_FILE dump if one is set."""
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
        self._random().manual_seed_all(seed)  # hpu/random.py; an AttributeError here is a real API change

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
        info.update(
            lazy_mode=self.lazy,
            fused_adam=self.gaudi.use_fused_adam,
            fused_clip_norm=self.gaudi.use_fused_clip_norm,
            torch_autocast=self.gaudi.use_torch_autocast,
        )
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
