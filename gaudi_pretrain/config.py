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
    """RoBERTa text tower (transformers' BridgeTowerTextConfig fields)."""

    vocab_size: int = Field(50265, gt=0, description="embedding rows and MLM decoder outputs")
    hidden_size: int = Field(1024, gt=0, description="must equal `model.hidden_size`")
    num_hidden_layers: int = Field(24, gt=0, description="text layers (must equal `vision.num_hidden_layers`)")
    num_attention_heads: int = Field(16, gt=0, description="heads of the text and the cross-modal layers")
    intermediate_size: int = Field(4096, gt=0, description="FFN width of the text and the cross-modal layers")
    max_position_embeddings: int = Field(
        514, gt=2, description="RoBERTa positions start at pad + 1: `data.max_text_len` ≤ this − 2"
    )
    layer_norm_eps: float = Field(1e-5, description="text-tower LayerNorms")
    pad_token_id: int = Field(1, description="RoBERTa's pad id")
    bos_token_id: int = Field(0, description="RoBERTa's `<s>` id")
    eos_token_id: int = Field(2, description="RoBERTa's `</s>` id")


class VisionTowerConfig(_Section):
    """CLIP ViT visual tower (transformers' BridgeTowerVisionConfig fields)."""

    hidden_size: int = Field(1024, gt=0, description="a multiple of 64: heads = hidden // 64, FFN = 4 × hidden")
    num_hidden_layers: int = Field(24, gt=0, description="must equal `text.num_hidden_layers`")
    patch_size: int = Field(14, gt=0, description="square patch side in pixels")
    image_size: int = Field(294, gt=0, description="a multiple of `patch_size`: (image / patch)² + 1 tokens")
    layer_norm_eps: float = Field(1e-5, description="vision-tower LayerNorms")

    @model_validator(mode="after")
    def _check_shapes(self) -> VisionTowerConfig:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % 64:
            raise ValueError(f"hidden_size {self.hidden_size} must be a multiple of 64 (heads = hidden // 64)")
        return self


class ModelConfig(_Section):
    """BridgeTower: two towers and `num_hidden_layers` bridged cross-modal layers. Defaults are
    BridgeTower-large. When the model is built: `num_hidden_layers` ≤ `text.num_hidden_layers`, and
    `num_attention_heads` = `text.num_attention_heads` (transformers builds the cross-modal layers from
    the text config)."""

    hidden_size: int = Field(1024, gt=0, description="width of the cross-modal layers")
    num_hidden_layers: int = Field(
        6, gt=0, description="cross-modal layers per modality; uni-modal layers T − C + 1 … T feed them"
    )
    num_attention_heads: int = Field(16, gt=0, description="heads of the cross-modal layers")
    layer_norm_eps: float = Field(1e-5, description="cross-modal and head LayerNorms")
    text: TextTowerConfig = Field(TextTowerConfig(), description="the RoBERTa text tower")
    vision: VisionTowerConfig = Field(VisionTowerConfig(), description="the CLIP ViT visual tower")
    itc_heads: bool = Field(
        False, description="add the -itm-mlm-itc contrastive heads (weights only: no ITC loss is trained)"
    )
    contrastive_hidden_size: int = Field(512, gt=0, description="output width of the ITC heads")
    activation_checkpointing: bool = Field(
        False, description="recompute every uni-modal and cross-modal layer in backward"
    )
    attention: Literal["sdpa", "eager"] = Field(
        "sdpa",
        description="`sdpa`: the backend's fused kernel (torch SDPA; FusedSDPA on HPU); "
        "`eager`: matmul + fp32 softmax (the reference path)",
    )
    dropout: float = Field(
        0.1, ge=0, lt=1, description="text-tower and cross-modal dropout (the vision tower has none)"
    )
    from_pretrained: str | None = Field(
        None, description="a transformers BridgeTower checkpoint (Hub name or directory) to start from"
    )
    init_vision_from: str | None = Field(
        None, description="CLIP checkpoint for the vision tower (CLIPModel / CLIPVisionModel layout)"
    )
    init_text_from: str | None = Field(
        None, description="RoBERTa checkpoint for the text tower (RobertaModel / RobertaForMaskedLM layout)"
    )

    @model_validator(mode="after")
    def _check_towers(self) -> ModelConfig:
        if self.text.hidden_size != self.hidden_size:
            raise ValueError(
                f"text.hidden_size {self.text.hidden_size} must equal hidden_size {self.hidden_size} "
                "(cross-modal layers are built from the text config)"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads")
        return self


class DataConfig(_Section):
    """Shards, tokenizer and the per-rank loaders (docs/data.md)."""

    train_shards: list[str] = Field(
        [], description="directories, globs, brace patterns, tar paths or URLs of the training shards"
    )
    eval_shards: list[str] = Field([], description="held-out shards; empty: no evaluation during training")
    tokenizer: str = Field(
        "roberta-large", description="Hub name or directory for AutoTokenizer (must have pad and mask tokens)"
    )
    max_text_len: int = Field(50, gt=2, description="every caption is padded or truncated to this many tokens")
    num_workers: int = Field(
        2, ge=0, description="DataLoader processes per rank (0: in-process; 0 and 1 give the same stream)"
    )
    shuffle_buffer: int = Field(
        1000,
        ge=0,
        description="block of the seeded shuffle inside each worker's range (≤ 1: none; shard order is still permuted)",
    )
    mlm_probability: float = Field(0.15, gt=0, lt=1, description="fraction of non-special tokens selected for MLM")
    itm_negative_prob: float = Field(0.5, ge=0, le=1, description="fraction of rows given another row's image")
    itm_hard_negatives: float = Field(
        0.0,
        ge=0,
        le=1,
        description="fraction of training negatives drawn from the rows whose captions share the most words "
        "with the row's own (the rest: any other caption; eval stays random)",
    )
    itm_hard_negatives_ramp_epochs: int = Field(
        0, ge=0, description="reach `itm_hard_negatives` linearly over this many epochs, from 0 at epoch 0 (0: at once)"
    )
    resampled: bool = Field(
        False, description="draw shards with replacement each epoch (same total; no longer exactly once)"
    )
    allow_pipe_urls: bool = Field(
        False, description="allow webdataset `pipe:` URLs, which run shell commands (trusted configs only)"
    )
    prefetch_factor: int = Field(2, ge=1, description="batches prefetched per DataLoader worker")


class OptimConfig(_Section):
    """AdamW with the recipe's parameter groups and a linear warm-up / decay schedule."""

    lr: float = Field(1e-5, gt=0, description="base learning rate")
    betas: tuple[float, float] = Field((0.9, 0.98), description="AdamW betas")
    eps: float = Field(1e-8, gt=0, description="AdamW eps (passed explicitly: FusedAdamW's default is 1e-6)")
    weight_decay: float = Field(
        0.01, ge=0, description="not applied to biases, norm parameters (CLIP's ln_* too) and logit_scale"
    )
    lr_multiplier: float = Field(
        5.0, gt=0, description="lr × this for parameters whose name contains `cross_modal` and for the heads"
    )
    warmup_ratio: float = Field(
        0.1, ge=0, le=1, description="linear warm-up from 0 over this fraction of `train.max_steps`"
    )
    end_lr_ratio: float = Field(
        0.0, ge=0, le=1, description="lr at `max_steps` as a fraction of each group's lr (linear decay to it)"
    )


class TrainConfig(_Section):
    """Batch geometry, length, precision and the run directory."""

    micro_batch_size: int = Field(16, gt=0, description="samples per device per micro-step")
    gradient_accumulation_steps: int = Field(1, gt=0, description="micro-steps per optimizer step")
    global_batch_size: int | None = Field(
        None,
        gt=0,
        description="when set, must equal micro × accumulation × world size (checked before anything is written)",
    )
    max_steps: int = Field(
        100_000,
        gt=0,
        description="optimizer steps of the run's first global batch (a resume with another global batch ends "
        "after as many samples)",
    )
    precision: Literal["bf16", "fp32"] = Field(
        "bf16",
        description="bf16: DeepSpeed bf16 (bf16 parameters, fp32 master weights in its optimizer) + bf16 autocast",
    )
    zero_stage: Literal[0, 1, 2, 3] = Field(0, description="DeepSpeed ZeRO stage")
    grad_clip: float = Field(1.0, ge=0, description="global L2 norm clip; 0 disables")
    seed: int = Field(42, description="model init, data order, masks and negatives")
    output_dir: str = Field("runs/default", description="the run directory (checked writable at start)")
    max_consecutive_nonfinite: int = Field(
        5, gt=0, description="consecutive skipped (non-finite) optimizer steps before the run stops"
    )
    collective_timeout_s: float = Field(
        600.0,
        ge=10,
        description="a collective waiting longer than this fails the run (a dead peer): the survivors exit non-zero "
        "naming the last checkpoint, for the launcher to relaunch with `--resume auto`",
    )


class BackendConfig(_Section):
    """The device seam (docs/architecture.md, "The device seam")."""

    name: Literal["auto", "hpu", "cuda", "cpu"] = Field(
        "auto", description="`auto`: HPU if the Gaudi bridge is installed and sees a card, else CUDA, else CPU"
    )
    hpu_lazy_mode: bool = Field(
        True,
        description='PT_HPU_LAZY_MODE=1 (lazy graphs + mark_step); false: eager + torch.compile(backend="hpu_backend")',
    )
    compile: bool = Field(
        False, description="torch.compile the model on CPU / CUDA (ignored with a warning in HPU lazy mode)"
    )
    gaudi_config: str | None = Field(None, description="an optimum-habana style gaudi_config.json (HPU only)")
    cpu_threads: int | None = Field(None, gt=0, description="CPU backend: OMP_NUM_THREADS and torch's intra-op threads")

    def launch_environment(self) -> dict[str, str]:
        """The variables a launcher must export before Python starts: the Gaudi bridge, which `import torch`
        loads by itself, reads them then (`gaudi-pretrain launch-env`; backends/hpu.py checks them)."""
        if self.name not in ("auto", "hpu"):
            return {}
        return {"PT_HPU_LAZY_MODE": "1" if self.hpu_lazy_mode else "0"}


class CheckpointConfig(_Section):
    """Resumable checkpoints (docs/checkpoints.md)."""

    every_steps: int = Field(1000, gt=0, description="save every N steps, and always at the last step")
    keep_last: int = Field(3, gt=0, description="complete checkpoints kept (older ones are pruned after each save)")
    resume: str | None = Field(
        None,
        description="`auto`: this run's latest (a fresh start if none); a path: that checkpoint (`--resume` sets it)",
    )
    export_hf: bool = Field(
        True, description="rank 0 writes a transformers export to `<output_dir>/hf` at the end of `train`"
    )
    preemption_check_steps: int = Field(
        10,
        gt=0,
        description="every N steps the ranks agree on whether any got SIGTERM (one scalar all-reduce); if so they "
        "save a checkpoint and exit 0",
    )


class LoggingConfig(_Section):
    """metrics.jsonl, TensorBoard and the progress bar (docs/performance.md, "Metrics")."""

    every_steps: int = Field(
        50, gt=0, description="reduce metrics and write a metrics.jsonl record every N steps (and at the last)"
    )
    tensorboard: bool = Field(True, description="also write TensorBoard scalars to `<output_dir>/tensorboard`")
    progress_bar: bool = Field(True, description="tqdm bar on rank 0 (stderr)")
    sample_log: bool = Field(False, description="per-rank log of every step's sample keys (accounting; costs I/O)")


class EvalConfig(_Section):
    """Held-out ITM / MLM accuracy and retrieval recall, when `data.eval_shards` is set."""

    every_steps: int = Field(5000, gt=0, description="evaluate every N steps (and at the last)")
    max_samples: int = Field(
        1000, gt=0, description="held-out samples for ITM / MLM accuracy, rounded up to whole batches of micro × world"
    )
    retrieval_samples: int = Field(
        100, ge=0, description="N pairs ranked for IR / TR recall (N² cross-encoder pairs); ≤ 1 disables retrieval"
    )
    batch_size: int = Field(32, gt=0, description="pairs per cross-encoder forward when scoring retrieval")


class RunConfig(_Section):
    """One run: every section is strict (an unknown key or a wrong type is an error naming it)."""

    model: ModelConfig = Field(ModelConfig(), description="the architecture and its initialisation")
    data: DataConfig = Field(DataConfig(), description="shards, tokenizer and loaders")
    optim: OptimConfig = Field(OptimConfig(), description="AdamW and the learning-rate schedule")
    train: TrainConfig = Field(TrainConfig(), description="batch geometry, length, precision, run directory")
    backend: BackendConfig = Field(BackendConfig(), description="the device")
    checkpoint: CheckpointConfig = Field(CheckpointConfig(), description="checkpoints and resume")
    logging: LoggingConfig = Field(LoggingConfig(), description="metrics and progress")
    eval: EvalConfig = Field(EvalConfig(), description="held-out evaluation")

    @model_validator(mode="after")
    def _check_cross_sections(self) -> RunConfig:
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


def fit_batch_geometry(cfg: RunConfig, world_size: int) -> RunConfig:
    """`cfg` with `train.gradient_accumulation_steps` derived from `train.global_batch_size` when that is set
    (so a relaunch on another world size keeps the global batch and the schedule); unchanged otherwise.
    Raises when micro × world does not divide the global batch, naming the nearest feasible ones."""
    t = cfg.train
    if t.global_batch_size is None:
        return cfg
    per_step = t.micro_batch_size * world_size
    if t.global_batch_size % per_step:
        options = ", ".join(
            f"{g} (micro {m} x accumulation {a})"
            for g, m, a in _nearest_batches(t.global_batch_size, world_size, t.micro_batch_size)
        )
        raise ConfigError(
            f"train.global_batch_size {t.global_batch_size} is not divisible by micro_batch_size "
            f"{t.micro_batch_size} x world size {world_size} = {per_step}; nearest feasible on {world_size} "
            f"ranks: {options} (set train.global_batch_size and train.micro_batch_size)"
        )
    accumulation = t.global_batch_size // per_step
    if accumulation == t.gradient_accumulation_steps:
        return cfg
    return cfg.model_copy(update={"train": t.model_copy(update={"gradient_accumulation_steps": accumulation})})


def _nearest_batches(target: int, world_size: int, max_micro: int, count: int = 3) -> list[tuple[int, int, int]]:
    found: dict[int, tuple[int, int, int]] = {}
    for micro in range(max_micro, max(1, max_micro // 2) - 1, -1):  # micro batches near the configured one
        base = max(1, target // (micro * world_size))
        for acc in (base, base + 1):
            g = micro * acc * world_size
            found.setdefault(g, (g, micro, acc))  # the largest micro batch for each global batch
    return sorted(found.values(), key=lambda c: (abs(c[0] - target), -c[1]))[:count]


def check_batch_geometry(cfg: RunConfig, world_size: int) -> int:
    """Return the global batch; raise if the configured one disagrees with micro × accum × world
    (`fit_batch_geometry` first derives the accumulation from it)."""
    t = cfg.train
    derived = t.micro_batch_size * t.gradient_accumulation_steps * world_size
    fit_batch_geometry(cfg, world_size)  # raises when no accumulation fits
    if t.global_batch_size is not None and t.global_batch_size != derived:
        raise ConfigError(
            f"train.global_batch_size {t.global_batch_size} != micro_batch_size {t.micro_batch_size} "
            f"x gradient_accumulation_steps {t.gradient_accumulation_steps} x world size {world_size} = {derived} "
            f"(use gradient_accumulation_steps {t.global_batch_size // (t.micro_batch_size * world_size)})"
        )
    return derived


def deepspeed_config(
    cfg: RunConfig, world_size: int, clip_in_engine: bool = True, optimizer_known_to_deepspeed: bool = True
) -> dict[str, Any]:
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
