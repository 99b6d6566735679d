"""Typed run configuration: one YAML file is the single source of truth.

`load_config(path, overrides)` reads YAML, applies dotted `section.key=value` overrides, validates
everything with pydantic (unknown keys and wrong types are errors that name the key), and
`deepspeed_config(cfg, world_size)` derives the DeepSpeed dict from it, so nothing is kept twice.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gaudi_pretrain.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TextTowerConfig(_Section):
    """RoBERTa-style text tower (transformers' BridgeTowerTextConfig fields)."""

    vocab_size: int = Field(50265, gt=0)
    hidden_size: int = Field(1024, gt=0)
    num_hidden_layers: int = Field(24, gt=0)
    num_attention_heads: int = Field(16, gt=0)
    intermediate_size: int = Field(4096, gt=0)
    max_position_embeddings: int = Field(514, gt=2)
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 2


class VisionTowerConfig(_Section):
    """CLIP ViT visual tower (transformers' BridgeTowerVisionConfig fields). Heads = hidden // 64."""

    hidden_size: int = Field(1024, gt=0)
    num_hidden_layers: int = Field(24, gt=0)
    patch_size: int = Field(14, gt=0)
    image_size: int = Field(294, gt=0)
    layer_norm_eps: float = 1e-5

    @model_validator(mode="after")
    def _check_shapes(self) -> "VisionTowerConfig":
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.hidden_size % 64:
            raise ValueError(f"hidden_size {self.hidden_size} must be a multiple of 64 (heads = hidden // 64)")
        return self


class ModelConfig(_Section):
    """BridgeTower: towers + `num_hidden_layers` bridged cross-modal layers of width `hidden_size`."""

    hidden_size: int = Field(1024, gt=0)
    num_hidden_layers: int = Field(6, gt=0)
    num_attention_heads: int = Field(16, gt=0)
    layer_norm_eps: float = 1e-5
    text: TextTowerConfig = TextTowerConfig()
    vision: VisionTowerConfig = VisionTowerConfig()
    itc_heads: bool = False  # add the -itm-mlm-itc contrastive heads
    contrastive_hidden_size: int = 512
    activation_checkpointing: bool = False
    attention: Literal["sdpa", "eager"] = "sdpa"
    dropout: float = Field(0.1, ge=0, lt=1)  # text tower + cross-modal layers (transformers' default 0.1)
    # Initialisation sources (Hub name or local directory); None = random init.
    from_pretrained: str | None = None  # a transformers BridgeTower checkpoint
    init_vision_from: str | None = None  # CLIP (CLIPModel / CLIPVisionModel layout)
    init_text_from: str | None = None  # RoBERTa (RobertaModel layout)

    @model_validator(mode="after")
    def _check_towers(self) -> "ModelConfig":
        if self.text.hidden_size != self.hidden_size:
            raise ValueError(
                f"text.hidden_size {self.text.hidden_size} must equal hidden_size {self.hidden_size} "
                "(cross-modal layers are built from the text config)"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads")
        return self


class DataConfig(_Section):
    train_shards: list[str] = []  # globs, brace patterns or directories of .tar shards
    eval_shards: list[str] = []
    tokenizer: str = "roberta-large"  # Hub name or local directory
    max_text_len: int = Field(50, gt=2)
    num_workers: int = Field(2, ge=0)
    shuffle_buffer: int = Field(1000, ge=0)
    mlm_probability: float = Field(0.15, gt=0, lt=1)
    itm_negative_prob: float = Field(0.5, ge=0, le=1)
    resampled: bool = False  # sample shards with replacement (infinite stream)
    allow_pipe_urls: bool = False  # webdataset `pipe:` URLs run shell commands: trusted configs only
    prefetch_factor: int = Field(2, ge=1)


class OptimConfig(_Section):
    lr: float = Field(1e-5, gt=0)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    lr_multiplier: float = Field(5.0, gt=0)  # for `cross_modal` parameters and the heads
    warmup_ratio: float = Field(0.1, ge=0, le=1)
    end_lr_ratio: float = Field(0.0, ge=0, le=1)


class TrainConfig(_Section):
    micro_batch_size: int = Field(16, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    global_batch_size: int | None = Field(None, gt=0)  # checked = micro × accumulation × world
    max_steps: int = Field(100_000, gt=0)
    precision: Literal["bf16", "fp32"] = "bf16"
    zero_stage: Literal[0, 1, 2, 3] = 0
    grad_clip: float = Field(1.0, ge=0)  # 0 disables clipping
    seed: int = 42
    output_dir: str = "runs/default"
    max_consecutive_nonfinite: int = Field(5, gt=0)


class BackendConfig(_Section):
    name: Literal["auto", "hpu", "cuda", "cpu"] = "auto"
    hpu_lazy_mode: bool = True  # PT_HPU_LAZY_MODE=1; False = eager (+ torch.compile hpu_backend)
    compile: bool = False
    gaudi_config: str | None = None  # optimum-habana style gaudi_config.json
    cpu_threads: int | None = Field(None, gt=0)

    def launch_environment(self) -> dict[str, str]:
        """The variables a launcher must export before Python starts: the Gaudi bridge, which `import torch`
        loads by itself, reads them then (`gaudi-pretrain launch-env`; backends/hpu.py checks them)."""
        if self.name not in ("auto", "hpu"):
            return {}
        return {"PT_HPU_LAZY_MODE": "1" if self.hpu_lazy_mode else "0"}


class CheckpointConfig(_Section):
    every_steps: int = Field(1000, gt=0)
    keep_last: int = Field(3, gt=0)
    resume: str | None = None  # None, "auto" or a checkpoint directory
    export_hf: bool = True  # rank 0 writes a transformers export to <output_dir>/hf at the end of `train`


class LoggingConfig(_Section):
    every_steps: int = Field(50, gt=0)
    tensorboard: bool = True
    progress_bar: bool = True
    sample_log: bool = False  # per-rank log of sample keys (accounting; costs I/O)


class EvalConfig(_Section):
    every_steps: int = Field(5000, gt=0)
    max_samples: int = Field(1000, gt=0)
    retrieval_samples: int = Field(100, ge=0)  # pairs ranked for IR/TR recall (N×N ITM forwards)
    batch_size: int = Field(32, gt=0)


class RunConfig(_Section):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    backend: BackendConfig = BackendConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _check_cross_sections(self) -> "RunConfig":
        limit = self.model.text.max_position_embeddings - 2  # RoBERTa positions start at pad+1
        if self.data.max_text_len > limit:
            raise ValueError(
                f"data.max_text_len {self.data.max_text_len} exceeds model.text.max_position_embeddings - 2 = {limit}"
            )
        return self

    def fingerprint(self) -> str:
        """Hash of the settings that must not change across a resume (model and data layout)."""
        keep = {"model": self.model.model_dump(), "max_text_len": self.data.max_text_len}
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------- loading


def _valid_keys(model_cls: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model_cls.model_fields.items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(_valid_keys(ann, dotted + "."))
    return keys


def _describe(error: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in error["loc"])
    if error["type"] == "extra_forbidden":
        close = difflib.get_close_matches(loc, _valid_keys(RunConfig), n=1, cutoff=0.6)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"unknown config key '{loc}'{hint}"
    value = error.get("input")
    where = f"'{loc}'" if loc else "config"
    if error["type"] == "value_error":
        return f"invalid {where}: {error['msg'].removeprefix('Value error, ')}"
    return f"invalid value {value!r} for {where}: {error['msg']}"


def validate_config(raw: dict[str, Any]) -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        more = len(exc.errors()) - 1
        raise ConfigError(_describe(first) + (f" (+{more} more errors)" if more else "")) from None


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form section.key=value")
    key, _, text = item.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{item}' has an empty key")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{item}': '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return raw


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, not {type(raw).__name__}")
    return raw


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    raw = read_yaml(path) if path is not None else {}
    return validate_config(apply_overrides(raw, list(overrides or [])))


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


# ------------------------------------------------------------------------------------ deepspeed


def check_batch_geometry(cfg: RunConfig, world_size: int) -> int:
    """Return the global batch; raise if the configured one disagrees with micro × accum × world."""
    t = cfg.train
    derived = t.micro_batch_size * t.gradient_accumulation_steps * world_size
    per_step = t.micro_batch_size * world_size
    if t.global_batch_size is not None and t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size {t.global_batch_size} is not divisible by micro_batch_size "
            f"{t.micro_batch_size} x world size {world_size} = {per_step}"
        )
    if t.global_batch_size is not None and t.global_batch_size != derived:
        raise ConfigError(
            f"train.global_batch_size {t.global_batch_size} != micro_batch_size {t.micro_batch_size} "
            f"x gradient_accumulation_steps {t.gradient_accumulation_steps} x world size {world_size} = {derived} "
            f"(use gradient_accumulation_steps {t.global_batch_size // per_step})"
        )
    return derived


def deepspeed_config(cfg: RunConfig, world_size: int, clip_in_engine: bool = True,
                     optimizer_known_to_deepspeed: bool = True) -> dict[str, Any]:
    """The DeepSpeed dict; `clip_in_engine=False` when the backend clips itself (fused clip norm).

    DeepSpeed refuses a ZeRO >= 1 client optimizer whose exact type is not in its tested list
    (runtime/zero/utils.py `is_zero_supported_optimizer`, engine.py `_do_optimizer_sanity_check`; the same
    in 0.16.1, Habana's fork and 0.19) unless the dict allows it: `optimizer_known_to_deepspeed=False`.
    Its throughput timer synchronizes the device in every forward and step, and 0.19 checks bf16 gradients
    for overflow on the host every step: both off, our metrics time the run and the loop skips
    non-finite steps itself."""
    t = cfg.train
    ds: dict[str, Any] = {
        "train_batch_size": check_batch_geometry(cfg, world_size),
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "gradient_clipping": t.grad_clip if clip_in_engine else 0.0,
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": t.precision == "bf16", "check_grad_overflow": False},
        "steps_per_print": 10**9,  # our own metrics do the logging
        "wall_clock_breakdown": False,
        "timers": {"throughput": {"enabled": False}},
    }
    if t.zero_stage > 0 and not optimizer_known_to_deepspeed:
        ds["zero_allow_untested_optimizer"] = True
    return ds
