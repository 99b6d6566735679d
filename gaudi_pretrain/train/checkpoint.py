"""Resumable checkpoints: DeepSpeed's files plus our client state, published by an atomic `latest`.

Layout, save order, crash safety and the trust boundary of a resume: docs/checkpoints.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import pickle
import random
import re
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from gaudi_pretrain.config import ModelConfig, RunConfig, read_yaml, save_config, validate_config
from gaudi_pretrain.distributed import barrier
from gaudi_pretrain.errors import CheckpointError
from gaudi_pretrain.model.attention import AttentionFn
from gaudi_pretrain.model.hf_convert import export_hf
from gaudi_pretrain.model.pretraining import BridgeTowerForPretraining
from gaudi_pretrain.train import sample_log
from gaudi_pretrain.train.checkpoint_dirs import (
    BEST,
    CLIENT_STATE,
    LATEST,
    checkpoints_dir,
    list_files,
    prepare_tag,
    publish,
    read_pointer,
    resolve_checkpoint,
    tag_for,
)
from gaudi_pretrain.train.faults import maybe_crash
from gaudi_pretrain.train.nonfinite import NonfiniteCounter, all_ranks, read_counts
from gaudi_pretrain.train.optim import set_units_per_step
from gaudi_pretrain.train.state import RunContext
from gaudi_pretrain.train.universal import TAG as UNIVERSAL_TAG
from gaudi_pretrain.train.universal import (
    convert_to_universal,
    is_complete_universal,
    universal_dir,
    wait_for_universal,
)
from gaudi_pretrain.utils import atomic_write_text, unwrapped_name, unwrapped_state

UNIVERSAL_WAIT_S = 4 * 3600.0  # ranks wait this long for rank 0's conversion (the large model: minutes)
WEIGHTS_KIND = {"bf16": "fp32 optimizer master weights", "fp32": "fp32 weights"}
# Classes DeepSpeed pickles into its own checkpoint files besides tensors and plain containers (ZeRO
# optimizer states: loss scaler, stage enum, fragment addresses). Allowed by name for weights_only loads;
# a name the installed DeepSpeed lacks is left out.
DEEPSPEED_SAFE_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


@dataclass
class ClientState:
    step: int = 0
    samples_seen: int = 0
    config_fingerprint: str = ""
    world_size: int = 1
    extra: dict[str, Any] = field(default_factory=dict)
    files: dict[str, int] = field(default_factory=dict)  # every other file of the directory → size in bytes


def rng_state(backend: Any = None) -> dict[str, Any]:
    """Python, NumPy and torch CPU generator states, plus the device generator's (CUDA / HPU: dropout on
    the device) under the backend's name when `backend` has one."""
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
    }
    device_state = backend.rng_state() if backend is not None else None
    if device_state is not None:
        state["device"] = {"backend": backend.name, "state": device_state.to("cpu").tolist()}
    return state


def set_rng_state(state: dict[str, Any], backend: Any = None) -> str | None:
    """Restore what `rng_state` saved. Returns a warning when the checkpoint's device generator state
    cannot be restored (saved on another kind of device): data order stays exact, dropout masks differ."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    saved = state.get("device")
    if saved is None:
        return None
    here = getattr(backend, "name", None)
    if saved["backend"] != here:
        return (
            f"the checkpoint's {saved['backend']} RNG state is not restored on {here}: "
            "data order is exact, dropout masks differ from an uninterrupted run"
        )
    backend.set_rng_state(torch.tensor(saved["state"], dtype=torch.uint8))
    return None


def weights_digest(weights: dict[str, torch.Tensor]) -> str | None:
    """SHA-256 of a rank's unwrapped weights (name + raw bytes): replicas that trained in lockstep have
    equal digests. None for an empty dict: under ZeRO-3 only rank 0 holds the gathered weights, and the
    digest of the whole model is the only one that does not depend on how DeepSpeed partitions it."""
    if not weights:
        return None
    h = hashlib.sha256()
    for name, p in sorted(weights.items()):
        h.update(name.encode())
        h.update(p.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def write_rank_state(
    ckpt_dir: Path,
    rank: int,
    data_state: dict[str, Any],
    digest: str,
    counters: dict[str, int] | None = None,
    backend: Any = None,
) -> None:
    """This rank's data cursor, RNG states, weights digest and its own counters (e.g. skipped samples)."""
    payload = {
        "data": data_state,
        "rng": rng_state(backend),
        "weights_sha256": digest,
        "counters": dict(counters or {}),
    }
    atomic_write_text(ckpt_dir / f"rank_{rank:05d}.json", json.dumps(payload))


def read_rank_state(ckpt_dir: Path, rank: int) -> dict[str, Any]:
    path = ckpt_dir / f"rank_{rank:05d}.json"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: was the checkpoint written with another world size?")
    return json.loads(path.read_text())


def write_run_files(ckpt_dir: Path, cfg: RunConfig, client: ClientState, state_dict: dict[str, torch.Tensor]) -> None:
    """Rank 0's part of a save (after every rank's files are on disk): consolidated weights, config, and
    last the client state, which records the size of every other file of the directory."""
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(ckpt_dir / "model.safetensors"), metadata={"format": "pt"})
    save_config(cfg, ckpt_dir / "config.yaml")
    maybe_crash("save_weights", client.step)
    client.files = list_files(ckpt_dir, but=CLIENT_STATE)
    atomic_write_text(ckpt_dir / CLIENT_STATE, json.dumps(asdict(client), indent=1))


def verify_files(ckpt_dir: Path, client: ClientState) -> None:
    """The directory holds exactly the files and sizes its save recorded (nothing truncated, swapped in
    or added). Checkpoints written before the record existed (empty `files`) are not checked."""
    if not client.files:
        return
    found = list_files(ckpt_dir, but=CLIENT_STATE)
    for name, size in client.files.items():
        if name not in found:
            raise CheckpointError(f"{ckpt_dir / name} is missing: the checkpoint is incomplete")
        if found[name] != size:
            raise CheckpointError(
                f"{ckpt_dir / name} has {found[name]} bytes, its save wrote {size}: refusing to load it"
            )
    extra = sorted(set(found) - set(client.files))
    if extra:
        raise CheckpointError(f"{ckpt_dir / extra[0]} was not written by this checkpoint's save: refusing to load it")


def weights_match(weights: dict[str, torch.Tensor], rank_state: dict[str, Any]) -> bool:
    """After loading: this rank's weights are bit-identical to the ones whose digest it wrote at save time
    (True when there is nothing to compare: no digest recorded, or a ZeRO-3 rank other than 0)."""
    want = rank_state.get("weights_sha256")
    have = weights_digest(weights)
    return not want or have is None or have == want


def _safe_globals() -> list[Any]:
    found = []
    for name in DEEPSPEED_SAFE_GLOBALS:
        module, _, attr = name.rpartition(".")
        try:
            found.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):
            continue
    return found


@contextlib.contextmanager
def weights_only_torch_load() -> Iterator[None]:
    """Within the block every `torch.load` runs with weights_only=True, allowing only DeepSpeed's own
    checkpoint classes (DEEPSPEED_SAFE_GLOBALS): DeepSpeed's load_checkpoint asks for weights_only=False.

    A file holding anything else (a crafted pickle that would run code) raises a one-line CheckpointError
    instead of being unpickled. Used around `engine.load_checkpoint` only, before the data loader starts."""
    original = torch.load
    allowed = _safe_globals()

    def load(f: Any, map_location: Any = None, pickle_module: Any = None, **kwargs: Any) -> Any:
        kwargs.pop("weights_only", None)
        with torch.serialization.safe_globals(allowed):
            try:
                return original(f, map_location=map_location, weights_only=True, **kwargs)
            except pickle.UnpicklingError as exc:
                found = re.search(r"GLOBAL ([\w.]+)", str(exc))
                what = f"it pickles {found.group(1)}" if found else "it holds more than tensors"
                raise CheckpointError(
                    f"refusing to load {f}: {what} (only tensors and DeepSpeed's checkpoint classes are loaded)"
                ) from None

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def read_client_state(ckpt_dir: Path) -> ClientState:
    try:
        return ClientState(**json.loads((ckpt_dir / CLIENT_STATE).read_text()))
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{ckpt_dir / CLIENT_STATE} is not a valid client state: {exc}") from None


# ----------------------------------------------------------------------------- save / restore


def unwrapped_weights(engine: Any, zero_stage: int) -> dict[str, torch.Tensor]:
    """The module's weights with transformers' names (all ranks call this: a collective under ZeRO-3,
    which gathers the full dict on rank 0 only). Their digest is what a resume verifies."""
    state = engine._zero3_consolidated_16bit_state_dict() if zero_stage == 3 else engine.module.state_dict()
    return unwrapped_state(state or {})


def master_weights(engine: Any, rank: int) -> dict[str, torch.Tensor]:
    """A bf16 run's fp32 master weights with transformers' names, on rank 0 (empty elsewhere). The module
    holds bf16 working copies; the masters live in DeepSpeed's optimizer, partitioned under ZeRO. They are
    assembled one parameter at a time (a collective: every rank calls), so rank 0 holds one extra copy of
    the model at most."""
    from deepspeed.utils import safe_get_full_fp32_param

    flat_masters = _flat_fp32_masters(engine.optimizer)
    out: dict[str, torch.Tensor] = {}
    for name, param in engine.module.named_parameters():
        full = safe_get_full_fp32_param(param)
        if full is None:
            full = flat_masters.get(id(param))
        if full is None:
            raise CheckpointError(f"DeepSpeed holds no fp32 master for {unwrapped_name(name)} (a frozen parameter?)")
        if rank == 0:
            out[unwrapped_name(name)] = full.detach().to("cpu", torch.float32).clone()
        del full
    return out


def _flat_fp32_masters(optimizer: Any) -> dict[int, torch.Tensor]:
    """The masters DeepSpeed 0.19 keeps for bf16 without ZeRO, keyed by the id of their bf16 param. Its
    engine wraps the client optimizer in FP16_Optimizer (engine.py `_do_optimizer_sanity_check` →
    DDP_BFLOAT16; 0.16 uses BF16_Optimizer, which `safe_get_full_fp32_param` reads): the unfused one keeps
    `fp32_groups[i]`, one fp32 tensor per bf16 param of `fp16_groups[i]`; the fused one (DeepSpeed's
    FusedAdam) one unpadded flat tensor per group, `fp32_groups_flat[i]`. Empty for any other optimizer."""
    groups = getattr(optimizer, "fp16_groups", None)
    if groups is None:
        return {}
    if hasattr(optimizer, "fp32_groups_flat"):
        masters = []
        for params, flat in zip(groups, optimizer.fp32_groups_flat, strict=True):
            offsets = [0]
            for p in params:
                offsets.append(offsets[-1] + p.numel())
            masters.append([flat.narrow(0, o, p.numel()).view_as(p) for p, o in zip(params, offsets)])
    elif hasattr(optimizer, "fp32_groups"):
        masters = optimizer.fp32_groups
    else:
        return {}
    return {id(p): m for params, group in zip(groups, masters, strict=True) for p, m in zip(params, group, strict=True)}


def optimizer_layout(cfg: RunConfig) -> dict[str, Any]:
    """The settings that shape DeepSpeed's saved optimizer state (a resume converts or refuses a change)."""
    return {"zero_stage": cfg.train.zero_stage, "precision": cfg.train.precision}


def save_checkpoint(ctx: RunContext, best: bool = False, evaluation: dict[str, Any] | None = None) -> Path:
    """A complete checkpoint of the current state, published by `latest` last (and `best`, when `best`).
    `evaluation`: the held-out record of this step, kept in the client state (it ranks `best`)."""
    s, cfg, rank = ctx.state, ctx.cfg, ctx.dist.rank
    read_counts(s, ctx.nonfinite)
    root, tag = checkpoints_dir(ctx.run_dir), tag_for(s.step)
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        prepare_tag(root, tag)
    barrier()  # an old directory of this tag is gone before anyone writes into it
    ctx.engine.save_checkpoint(str(root), tag=tag, client_state={}, save_latest=False)
    maybe_crash("save_engine", s.step, rank)
    weights = unwrapped_weights(ctx.engine, cfg.train.zero_stage)  # what a resume loads and verifies
    digest = weights_digest(weights)
    write_rank_state(
        root / tag,
        rank,
        ctx.loader.state_dict(),
        digest,
        counters={"skipped_samples": s.skipped_samples},
        backend=ctx.backend,
    )
    maybe_crash("mid_save", s.step, rank)
    if cfg.train.precision == "bf16":  # model.safetensors carries what the optimizer holds: the fp32 masters
        del weights
        weights = master_weights(ctx.engine, rank)
    barrier()  # every rank's files are on disk before rank 0 declares the checkpoint complete
    if rank == 0:
        client = ClientState(
            step=s.step,
            samples_seen=s.samples_seen,
            config_fingerprint=cfg.fingerprint(),
            world_size=ctx.dist.world_size,
            extra={
                "nonfinite_steps": s.nonfinite_steps,
                "skipped_samples_global": s.skipped_global,
                "weights": WEIGHTS_KIND[cfg.train.precision],
                "global_batch": ctx.global_batch,
                "schedule_batch": s.schedule_batch,
                **({"eval": _ranking(evaluation)} if evaluation else {}),
                **optimizer_layout(cfg),
            },
        )
        write_run_files(root / tag, cfg, client, weights)
        publish(root, tag, cfg.checkpoint.keep_last, best=best)
    barrier()
    return root / tag


def _ranking(evaluation: dict[str, Any]) -> dict[str, float]:
    keys = ("itm_acc", "mlm_acc")
    return {**{k: evaluation[k] for k in keys}, "score": best_score(evaluation)}


def best_score(evaluation: dict[str, Any]) -> float:
    """The recipe's checkpoint metric: held-out ITM accuracy + MLM accuracy."""
    return float(evaluation["itm_acc"]) + float(evaluation["mlm_acc"])


_START_OVER = "export the weights (gaudi-pretrain export-hf) and start a new run from them with model.from_pretrained"


def _check_resumable(path: Path, client: ClientState, ctx: RunContext) -> None:
    """What a resume may not change (one line each); world size, loader workers, micro batch and ZeRO stage
    may change (docs/checkpoints.md, "Elastic resume")."""
    if client.config_fingerprint != ctx.cfg.fingerprint():
        raise CheckpointError(
            f"{path} was written for a different model or data.max_text_len (config fingerprint differs): "
            "start a new run from its export with model.from_pretrained"
        )
    saved = client.extra.get("precision", ctx.cfg.train.precision)  # absent in checkpoints older than the record
    if saved != ctx.cfg.train.precision:
        raise CheckpointError(
            f"{path} was saved with train.precision={saved}, this run has {ctx.cfg.train.precision}: resume with "
            f"train.precision={saved}, or {_START_OVER}"
        )
    layout = _engine_layout(client, ctx)
    if 0 in (layout.old_stage, layout.new_stage) and layout.old_stage != layout.new_stage:
        raise CheckpointError(
            f"{path} was saved with train.zero_stage={layout.old_stage}, this run has {layout.new_stage}: DeepSpeed "
            f"converts optimizer state between ZeRO stages 1-3 only; resume with train.zero_stage={layout.old_stage}, "
            f"or {_START_OVER}"
        )


@dataclass(frozen=True)
class EngineLayout:
    old_world: int
    new_world: int
    old_stage: int
    new_stage: int

    @property
    def changed(self) -> bool:
        return (self.old_world, self.old_stage) != (self.new_world, self.new_stage)

    @property
    def needs_universal(self) -> bool:
        """ZeRO ≥ 1 partitions the optimizer state by data-parallel rank: another world size or stage needs
        DeepSpeed's universal checkpoint. ZeRO-0 state is whole in every rank's load."""
        return self.changed and self.old_stage > 0


def _engine_layout(client: ClientState, ctx: RunContext) -> EngineLayout:
    old_stage = int(client.extra.get("zero_stage", ctx.cfg.train.zero_stage))
    return EngineLayout(client.world_size, ctx.dist.world_size, old_stage, ctx.cfg.train.zero_stage)


def universal_for(ctx: RunContext, path: Path, step: int) -> tuple[str, str]:
    """(load_dir, tag) of the universal checkpoint of `path`: rank 0 converts it unless a complete one
    from this very save exists; the other ranks wait for it."""
    if is_complete_universal(path):
        return str(universal_dir(path)), UNIVERSAL_TAG
    if ctx.dist.rank == 0:
        print(f"converting {path} to a DeepSpeed universal checkpoint in {universal_dir(path)}", flush=True)
        out = convert_to_universal(path, step)
    else:
        out = wait_for_universal(path, timeout_s=UNIVERSAL_WAIT_S)
    return str(out), UNIVERSAL_TAG


def _load_engine(ctx: RunContext, path: Path, layout: EngineLayout, step: int) -> None:
    universal = layout.needs_universal
    load_dir, tag = universal_for(ctx, path, step) if universal else (str(path.parent), path.name)
    # what `"checkpoint": {"load_universal": true}` sets: engine.load_checkpoint then loads the per-parameter
    # fp32 / moment files and, below ZeRO-3, copies the masters into the bf16 weights (`update_lp_params`)
    ctx.engine._config.load_universal_checkpoint = universal
    with weights_only_torch_load():
        load_path, _ = ctx.engine.load_checkpoint(load_dir, tag=tag)
    ctx.engine._config.load_universal_checkpoint = False  # later saves are ordinary checkpoints
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load {path}")


def restore_checkpoint(ctx: RunContext) -> None:
    """Resume from `checkpoint.resume`: verify the directory, load it without unpickling anything but
    tensors, check that the weights are the saved ones, and continue the data stream (re-split over this
    run's ranks and workers when they changed)."""
    spec = ctx.cfg.checkpoint.resume
    path = resolve_checkpoint(spec, ctx.run_dir) if spec else None
    if path is None:
        return
    client = read_client_state(path)
    _check_resumable(path, client, ctx)
    verify_files(path, client)
    layout = _engine_layout(client, ctx)
    rank = ctx.dist.rank
    old_states = [read_rank_state(path, r) for r in range(client.world_size)]
    _load_engine(ctx, path, layout, client.step)
    same_ranks = layout.old_world == layout.new_world
    own = old_states[rank] if same_ranks else old_states[0]  # replicas in lockstep: rank 0's digest is everyone's
    weights = unwrapped_weights(ctx.engine, ctx.cfg.train.zero_stage)  # a collective under ZeRO-3
    match = torch.tensor(weights_match(weights, own), device=ctx.backend.device)
    if not bool(all_ranks(match)):
        raise CheckpointError(f"weights loaded from {path} differ from the ones saved there (sha256 mismatch)")
    resplit = ctx.loader.resume([state["data"] for state in old_states])
    s = ctx.state
    s.step, s.samples_seen, s.resumed_from = client.step, client.samples_seen, str(path)
    old_batch = _continue_schedule(ctx, client)
    if same_ranks:
        rng_warning = set_rng_state(own["rng"], ctx.backend)
        s.skipped_samples = own.get("counters", {}).get("skipped_samples", client.extra.get("skipped_samples", 0))
    else:  # no old rank's generators belong to a new rank: seeded from (seed, step, rank) instead
        ctx.backend.set_seed(ctx.cfg.train.seed + 1_000_003 * client.step + rank)
        rng_warning = None
        s.skipped_samples = 0  # per-rank counts do not map; the global count below carries on
    s.skipped_logged = s.skipped_samples
    s.skipped_global = client.extra.get("skipped_samples_global", 0)
    s.nonfinite_steps = client.extra.get("nonfinite_steps", 0)
    ctx.nonfinite = NonfiniteCounter(ctx.backend.device, total=s.nonfinite_steps)
    _restore_best(ctx, path.parent)
    sample_log.truncate(ctx.run_dir, rank, client.step)
    if rank == 0:
        for gone in range(layout.new_world, layout.old_world):  # ranks this run no longer has
            sample_log.truncate(ctx.run_dir, gone, client.step)
        print(f"resumed from {path} at step {client.step}", flush=True)
        if layout.changed or resplit:
            print(
                f"elastic resume: {layout.old_world} -> {layout.new_world} ranks, ZeRO {layout.old_stage} -> "
                f"{layout.new_stage}; the epoch's remaining samples re-split over this run's ranks and workers",
                flush=True,
            )
        if old_batch != ctx.global_batch:
            print(
                f"global batch {old_batch} -> {ctx.global_batch}: train.max_steps and the lr schedule count steps "
                f"of {s.schedule_batch} samples and continue by samples seen ({s.samples_seen} of "
                f"{ctx.cfg.train.max_steps * s.schedule_batch}: {ctx.end_step() - s.step} more steps)",
                flush=True,
            )
        if rng_warning:
            print(f"warning: {rng_warning}", flush=True)


def _continue_schedule(ctx: RunContext, client: ClientState) -> int:
    """Adopt the checkpoint's schedule batch (older checkpoints: this run's) and step the loaded lr schedule
    by this run's share of it; returns the global batch the checkpoint was saved with."""
    saved = int(client.extra.get("global_batch", ctx.global_batch))
    ctx.state.schedule_batch = int(client.extra.get("schedule_batch", saved))
    set_units_per_step(ctx.engine.lr_scheduler, ctx.global_batch / ctx.state.schedule_batch)
    return saved


def _restore_best(ctx: RunContext, root: Path) -> None:
    """The best evaluation of the resumed history. A `best` saved after the checkpoint resumed from belongs
    to an abandoned continuation: rank 0 drops the pointer (its directory is pruned like any other)."""
    best = read_pointer(root, BEST) if (root / BEST).is_file() else None
    if best is None:
        return
    saved = read_client_state(best)
    if saved.step <= ctx.state.step and "eval" in saved.extra:
        ctx.state.best_score, ctx.state.best_step = float(saved.extra["eval"]["score"]), saved.step
    elif ctx.dist.rank == 0:
        (root / BEST).unlink()


# ------------------------------------------------------------------------------ saved weights


def load_checkpoint_model(
    ckpt: Path, model_cfg: ModelConfig, attention_fn: AttentionFn | None = None
) -> BridgeTowerForPretraining:
    """The model of a complete checkpoint, from its model.safetensors; every key must match `model_cfg`."""
    weights = ckpt / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{weights} is missing")
    model = BridgeTowerForPretraining(model_cfg, attention_fn)
    result = model.load_state_dict(load_file(str(weights)), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{weights} does not match the config: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    return model


def export_checkpoint(
    checkpoint: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False, best: bool = False
) -> Path:
    """`gaudi-pretrain export-hf CHECKPOINT OUT`: a complete checkpoint (or a run's `latest`, or with
    `best` its `best`) → a transformers directory, from its model.safetensors (fp32 masters) and
    config.yaml, with the training precision recorded; the tokenizer named by `data.tokenizer` is saved
    alongside when it can be loaded (a warning, not an error, when it cannot: e.g. an offline Hub name)."""
    ckpt = resolve_checkpoint(str(checkpoint), pointer=BEST if best else LATEST)
    cfg = validate_config(read_yaml(ckpt / "config.yaml"))
    client = read_client_state(ckpt)
    tokenizer = None
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(cfg.data.tokenizer)
    except Exception as exc:
        warnings.warn(f"tokenizer '{cfg.data.tokenizer}' not exported: {type(exc).__name__}", stacklevel=2)
    provenance = {
        "trained_precision": cfg.train.precision,
        # checkpoints saved before masters were recorded hold the module's (bf16 in a bf16 run) weights upcast
        "weights": client.extra.get("weights", "module weights, upcast to fp32"),
        "step": client.step,
    }
    state = load_file(str(ckpt / "model.safetensors"))
    return export_hf(state, cfg.model, out_dir, tokenizer, overwrite, provenance=provenance)
