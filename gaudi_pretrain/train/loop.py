"""The training loop: DeepSpeed engine + backend seam + data cursor + checkpoints + metrics.

The step reads top to bottom; device differences live in `gaudi_pretrain.backends`, data order and
resume in `gaudi_pretrain.data.pipeline`, the objective in `gaudi_pretrain.model.pretraining`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from gaudi_pretrain import launch_env
from gaudi_pretrain.config import RunConfig, check_batch_geometry, deepspeed_config, save_config
from gaudi_pretrain.errors import CheckpointError, ConfigError, TrainingError
from gaudi_pretrain.paths import confined
from gaudi_pretrain.train.faults import apply_numeric_faults, maybe_crash


@dataclass
class RunContext:
    """What the loop needs besides the config, built once by `setup()`."""

    cfg: RunConfig
    backend: Any
    dist: Any  # DistInfo
    engine: Any
    loader: Any
    run_dir: Path
    tokenizer: Any
    flops_per_sample: float
    optimizer: Any = None  # the optimizer the backend built (DeepSpeed may wrap it: engine.optimizer)
    grad_check: Any = None  # GradientCheck where DeepSpeed holds the gradients (bf16 or ZeRO >= 1)
    skip_on_device: bool = False  # whether a non-finite step is cancelled without a host read
    nonfinite: Any = None  # NonfiniteCounter
    state: dict[str, Any] = field(default_factory=dict)


def _check_output_dir(path: Path) -> None:
    """Fail before anything is written: the nearest existing ancestor must be a writable directory."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"train.output_dir {path} is not writable: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"train.output_dir {path} is not writable: no write permission on {existing}")


def _make_output_dir(path: Path) -> None:
    """Create the run directory and prove it writable; on failure remove what was created."""
    created = [p for p in (path, *path.parents) if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_probe_{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        for p in created:  # innermost first; only directories this call made, and only if still empty
            try:
                p.rmdir()
            except OSError:
                break
        raise ConfigError(f"train.output_dir {path} is not writable: {exc.strerror}") from None


def setup(cfg: RunConfig) -> RunContext:
    """Backend, distributed init, model, optimizer, DeepSpeed engine and data, in the order they need.

    Everything that checks the user's input (batch geometry, output directory, shard specs, tokenizer)
    runs before the first byte is written, so bad input leaves no run directory behind."""
    from gaudi_pretrain.distributed import discover, export_env

    # Who we are comes first, from the launcher's variables, and goes into the environment before torch is
    # imported: torch autoloads the Gaudi bridge, whose hccl module fills in RANK / MASTER_ADDR=localhost /
    # HLS_MODULE_ID from what it finds then (see backends/hpu.py).
    info = discover()
    export_env(info)
    launch_env.apply(cfg.backend, can_set="torch" not in sys.modules)  # PT_HPU_LAZY_MODE before `import torch`
    from gaudi_pretrain.backends import select_backend

    backend = select_backend(cfg.backend, cfg.train.precision, cfg.train.zero_stage)
    backend.prepare_environment()  # before deepspeed is imported
    check_batch_geometry(cfg, info.world_size)
    run_dir = Path(cfg.train.output_dir)
    _check_output_dir(run_dir)

    from gaudi_pretrain.data.pipeline import build_loader, resolve_split
    from gaudi_pretrain.data.tokenizer import load_tokenizer

    if cfg.data.eval_shards:
        resolve_split(cfg, "eval")
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    loader = build_loader(cfg, tokenizer, rank=info.rank, world_size=info.world_size, split="train")
    _make_output_dir(run_dir)

    import deepspeed

    from gaudi_pretrain.distributed import init_distributed
    from gaudi_pretrain.model import flops_per_sample, set_attention_fn
    from gaudi_pretrain.model.hf_io import build_model
    from deepspeed.runtime.zero.utils import is_zero_supported_optimizer

    from gaudi_pretrain.train.nonfinite import NonfiniteCounter, decides_on_device, gradient_check_for
    from gaudi_pretrain.train.optim import make_scheduler, param_groups

    init_distributed(info, backend.dist_backend)
    if info.rank == 0:
        print(f"rendezvous {info.master_addr}:{info.master_port}, {info.world_size} ranks ({info.source})", flush=True)
    backend.set_seed(cfg.train.seed)

    set_attention_fn(backend.attention_fn())
    model = build_model(cfg.model)
    model = backend.compile(model)
    optimizer = backend.make_optimizer(param_groups(model, cfg.optim), cfg.optim)
    scheduler = make_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
    ds_config = deepspeed_config(cfg, info.world_size, clip_in_engine=not backend.clips_gradients,
                                 optimizer_known_to_deepspeed=is_zero_supported_optimizer(optimizer))
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False
    )
    if info.rank == 0:
        save_config(cfg, confined(run_dir, "config.yaml"))
    return RunContext(
        cfg=cfg,
        backend=backend,
        dist=info,
        engine=engine,
        loader=loader,
        run_dir=run_dir,
        tokenizer=tokenizer,
        flops_per_sample=flops_per_sample(cfg.model, cfg.data.max_text_len),
        optimizer=optimizer,
        grad_check=gradient_check_for(engine.module, backend),
        skip_on_device=decides_on_device(engine, optimizer),
        nonfinite=NonfiniteCounter(backend.device),
    )


# ------------------------------------------------------------------------------- checkpoints


def unwrapped_state_dict(engine: Any, zero_stage: int) -> dict[str, Any]:
    """Weights with transformers' names: no `module.` / `_orig_mod.` prefixes (all ranks call this)."""
    if zero_stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # collective; full dict on rank 0
    else:
        state = engine.module.state_dict()
    return {k.replace("_orig_mod.", "").removeprefix("module."): v for k, v in (state or {}).items()}


def save_checkpoint(ctx: RunContext) -> Path:
    """A complete checkpoint of the current state, published by `latest` last (see checkpoint.py)."""
    from gaudi_pretrain.distributed import barrier
    from gaudi_pretrain.train.checkpoint import (
        ClientState,
        checkpoints_dir,
        prepare_tag,
        publish,
        tag_for,
        weights_digest,
        write_rank_state,
        write_run_files,
    )

    s, cfg, rank = ctx.state, ctx.cfg, ctx.dist.rank
    _read_nonfinite(ctx)
    root, tag = checkpoints_dir(ctx.run_dir), tag_for(s["step"])
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        prepare_tag(root, tag)
    barrier()  # an old directory of this tag is gone before anyone writes into it
    ctx.engine.save_checkpoint(str(root), tag=tag, client_state={}, save_latest=False)
    maybe_crash("save_engine", s["step"], rank)
    weights = unwrapped_state_dict(ctx.engine, cfg.train.zero_stage)
    write_rank_state(root / tag, rank, ctx.loader.state_dict(), weights_digest(weights),
                     counters={"skipped_samples": s["skipped_samples"]}, backend=ctx.backend)
    maybe_crash("mid_save", s["step"], rank)
    barrier()  # every rank's files are on disk before rank 0 declares the checkpoint complete
    if rank == 0:
        client = ClientState(
            step=s["step"],
            samples_seen=s["samples_seen"],
            config_fingerprint=cfg.fingerprint(),
            world_size=ctx.dist.world_size,
            extra={"nonfinite_steps": s["nonfinite_steps"], "skipped_samples_global": s["skipped_global"],
                   **_optimizer_layout(cfg)},
        )
        write_run_files(root / tag, cfg, client, weights)
        publish(root, tag, cfg.checkpoint.keep_last)
    barrier()
    return root / tag


def _optimizer_layout(cfg: Any) -> dict[str, Any]:
    """The settings that shape DeepSpeed's saved optimizer state: a resume must keep them."""
    return {"zero_stage": cfg.train.zero_stage, "precision": cfg.train.precision}


def restore_checkpoint(ctx: RunContext) -> None:
    """Resume from `checkpoint.resume`: verify the directory, load it without unpickling anything but
    tensors, and check that the weights are the saved ones (the trust boundary is in checkpoint.py)."""
    import torch

    from gaudi_pretrain.train.checkpoint import (
        read_client_state,
        read_rank_state,
        resolve_checkpoint,
        set_rng_state,
        verify_files,
        weights_match,
        weights_only_torch_load,
    )
    from gaudi_pretrain.train.nonfinite import NonfiniteCounter, all_ranks

    spec = ctx.cfg.checkpoint.resume
    path = resolve_checkpoint(spec, ctx.run_dir) if spec else None
    if path is None:
        return
    client = read_client_state(path)
    if client.config_fingerprint != ctx.cfg.fingerprint():
        raise CheckpointError(f"{path} was written for a different model/data layout (config fingerprint differs)")
    if client.world_size != ctx.dist.world_size:
        raise CheckpointError(
            f"{path} was written by {client.world_size} ranks, this run has {ctx.dist.world_size}: "
            "the per-rank data cursors cannot be re-split exactly"
        )
    for key, now in _optimizer_layout(ctx.cfg).items():
        saved = client.extra.get(key, now)  # absent in checkpoints written before this was recorded
        if saved != now:
            raise CheckpointError(
                f"{path} was saved with train.{key}={saved}, this run has {now}: DeepSpeed cannot convert its "
                f"optimizer state; resume with train.{key}={saved}, or export the weights (gaudi-pretrain "
                "export-hf) and start a new run from them with model.from_pretrained"
            )
    verify_files(path, client)
    with weights_only_torch_load():
        load_path, _ = ctx.engine.load_checkpoint(str(path.parent), tag=path.name)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load {path}")
    rank_state = read_rank_state(path, ctx.dist.rank)
    weights = unwrapped_state_dict(ctx.engine, ctx.cfg.train.zero_stage)  # a collective under ZeRO-3
    match = torch.tensor(weights_match(weights, rank_state), device=ctx.backend.device)
    if not bool(all_ranks(match)):
        raise CheckpointError(f"weights loaded from {path} differ from the ones saved there (sha256 mismatch)")
    ctx.loader.load_state_dict(rank_state["data"])
    rng_warning = set_rng_state(rank_state["rng"], ctx.backend)
    counters = rank_state.get("counters", {})
    skipped = counters.get("skipped_samples", client.extra.get("skipped_samples", 0))
    ctx.state.update(
        step=client.step,
        samples_seen=client.samples_seen,
        skipped_samples=skipped,
        skipped_logged=skipped,
        skipped_global=client.extra.get("skipped_samples_global", 0),
        nonfinite_steps=client.extra.get("nonfinite_steps", 0),
        resumed_from=str(path),
    )
    ctx.nonfinite = NonfiniteCounter(ctx.backend.device, total=ctx.state["nonfinite_steps"])
    _truncate_sample_log(ctx, client.step)
    if ctx.dist.rank == 0:
        print(f"resumed from {path} at step {client.step}", flush=True)
        if rng_warning:
            print(f"warning: {rng_warning}", flush=True)


# -------------------------------------------------------------------------------- sample log


def _sample_log_path(ctx: RunContext) -> Path:
    return confined(ctx.run_dir, "samples", f"rank_{ctx.dist.rank:05d}.log")


def _truncate_sample_log(ctx: RunContext, step: int) -> None:
    """After a resume, forget the keys of steps that the checkpoint does not contain (they rerun)."""
    path = _sample_log_path(ctx)
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and int(line.split("\t", 1)[0]) < step]
    path.write_text("".join(line + "\n" for line in kept))


def _log_samples(ctx: RunContext, step: int, keys: list[str]) -> None:
    """One line per step: `<step>\t<key> <key> …` (0-based step; padding rows left out). Keys hold no
    control characters (unsafe keys are never used); `%` and spaces are written as %25 / %20."""
    path = _sample_log_path(ctx)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(f"{step}\t" + " ".join(k.replace("%", "%25").replace(" ", "%20") for k in keys if k) + "\n")


# -------------------------------------------------------------------------------------- loop


def _to_device(batch: dict[str, Any], device: Any, float_dtype: Any) -> dict[str, Any]:
    out = {}
    for key, value in batch.items():
        value = value.to(device, non_blocking=True)
        out[key] = value.to(float_dtype) if value.is_floating_point() else value
    return out


def _next_batch(ctx: RunContext, data_iter: Iterator[dict[str, Any]], timer: Any) -> dict[str, Any]:
    start = time.perf_counter()
    batch = next(data_iter)
    timer.data_wait += time.perf_counter() - start
    keys = batch.pop("keys")
    ctx.state["skipped_samples"] += batch.pop("skipped")  # a host int: no device read
    if ctx.cfg.logging.sample_log:
        _log_samples(ctx, ctx.state["step"], keys)
    return batch


def train_step(ctx: RunContext, data_iter: Iterator[dict[str, Any]], acc: Any, timer: Any) -> None:
    """One optimizer step = gradient_accumulation_steps micro-steps (DeepSpeed steps on the boundary).

    A step whose loss or gradients are not finite on any rank is cancelled on every rank: no weight,
    optimizer moment, step count or learning-rate update happens and its metrics are dropped (its batches
    were drawn all the same: the data cursor and the sample log move past them). Nothing here reads the
    device (see nonfinite.py for the configurations that need one read per step)."""
    import torch

    engine, backend, cfg = ctx.engine, ctx.backend, ctx.cfg
    step = ctx.state["step"] + 1  # the step being run, as logged
    finite = torch.ones((), dtype=torch.bool, device=backend.device)
    for _ in range(cfg.train.gradient_accumulation_steps):
        batch = _to_device(_next_batch(ctx, data_iter, timer), backend.device, ctx.state["float_dtype"])
        with backend.autocast():
            out = engine(batch)
        loss = apply_numeric_faults(out.loss, step, ctx.dist.rank)
        finite &= torch.isfinite(loss.detach())
        acc.add(out, loss)
        engine.backward(loss)
        backend.after_backward()
        if engine.is_gradient_accumulation_boundary():
            finite = _optimizer_step(ctx, finite)
        else:
            engine.step()  # between boundaries DeepSpeed only counts the micro-step
        backend.after_optimizer_step()
    acc.commit(finite)
    ctx.nonfinite.add(finite)
    ctx.state["step"] = step
    maybe_crash("after_step", step, ctx.dist.rank)
    ctx.state["samples_seen"] += cfg.train.micro_batch_size * cfg.train.gradient_accumulation_steps * ctx.dist.world_size


def _optimizer_step(ctx: RunContext, finite: Any) -> Any:
    """The boundary micro-step: clip (when the loop clips), agree across ranks, step or cancel the step.
    Returns the all-ranks decision (a device bool).

    When the loop clips (fp32, ZeRO 0: gradients are param.grad) the pre-clip global norm tells whether
    the gradients are finite; when DeepSpeed holds them (bf16 / ZeRO) `GradientCheck` does, because not
    every DeepSpeed version skips non-finite bf16 steps."""
    import torch

    from gaudi_pretrain.train.nonfinite import all_ranks, step_or_skip

    engine, backend, cfg = ctx.engine, ctx.backend, ctx.cfg
    if backend.clips_gradients:
        max_norm = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
        norm = backend.clip_grad_norm(engine.module.parameters(), max_norm)
        ctx.state["grad_norm"] = norm
        finite = finite & torch.isfinite(torch.as_tensor(norm, device=finite.device))
    else:
        finite = finite & ctx.grad_check.finite()
    ok = all_ranks(finite)
    step_or_skip(engine, ctx.optimizer, ok, ctx.skip_on_device)
    return ok


def _read_nonfinite(ctx: RunContext) -> int:
    """Bring the device's skip counts to the host (the logging cadence, checkpoints); returns the longest
    run of consecutive skipped steps since the last read."""
    total, run, longest = ctx.nonfinite.read()
    ctx.state.update(nonfinite_steps=total, consecutive_nonfinite=run)
    return longest


def _stop_nonfinite(ctx: RunContext, longest: int) -> None:
    """Save the state and stop the run. The skipped steps changed no weights, so when the run is still
    in its streak the checkpoint holds the weights from before it."""
    s, limit = ctx.state, ctx.cfg.train.max_consecutive_nonfinite
    path = save_checkpoint(ctx)
    if s["consecutive_nonfinite"] >= limit:
        first_bad = s["step"] - s["consecutive_nonfinite"] + 1
        raise TrainingError(
            f"stopping: {s['consecutive_nonfinite']} consecutive steps ({first_bad}-{s['step']}) had a non-finite "
            f"loss or gradients (train.max_consecutive_nonfinite={limit}); the last good weights (after step "
            f"{first_bad - 1}) are saved in {path}"
        )
    raise TrainingError(
        f"stopping: {longest} consecutive steps before step {s['step']} had a non-finite loss or gradients "
        f"(train.max_consecutive_nonfinite={limit}, checked every logging.every_steps); the weights after step "
        f"{s['step']} are saved in {path}"
    )


def _log(ctx: RunContext, acc: Any, timer: Any, steps_since: int, writer: Any, bar: Any) -> dict[str, Any]:
    from gaudi_pretrain.train.metrics import all_reduce_sum, current_rss_bytes

    s, cfg, world = ctx.state, ctx.cfg, ctx.dist.world_size
    means = acc.reduce()
    s["longest_nonfinite"] = _read_nonfinite(ctx)
    elapsed, wait = timer.reset()
    wait_total, skipped = all_reduce_sum([wait, s["skipped_samples"] - s["skipped_logged"]], ctx.backend.device)
    s["skipped_logged"] = s["skipped_samples"]
    s["skipped_global"] += int(round(skipped))
    samples = steps_since * cfg.train.micro_batch_size * cfg.train.gradient_accumulation_steps * world
    per_device = samples / max(elapsed, 1e-9) / world
    peak = ctx.backend.peak_flops()
    record = {
        "kind": "train",
        "step": s["step"],
        **means,
        "lr": float(ctx.engine.get_lr()[0]),
        "grad_norm": _grad_norm(ctx),
        "samples_per_s": per_device * world,
        "samples_per_s_per_device": per_device,
        "data_wait_frac": min(1.0, wait_total / world / max(elapsed, 1e-9)),
        "mfu": (per_device * ctx.flops_per_sample / peak) if peak else None,
        "memory_gib": ctx.backend.memory_stats() / 2**30,
        "rss_gib": current_rss_bytes() / 2**30,
        "rss_with_workers_gib": current_rss_bytes(include_children=True) / 2**30,
        "skipped_samples": s["skipped_global"],
        "nonfinite_steps": s["nonfinite_steps"],
        "samples_seen": s["samples_seen"],
        "graph_compiles": ctx.backend.graph_compile_count(),
    }
    writer.write(record)
    if bar is not None and means["loss"] is not None:
        bar.set_postfix(loss=f"{means['loss']:.3f}", itm=f"{means['itm_acc']:.2f}", mlm=f"{means['mlm_acc']:.2f}",
                        sps=f"{record['samples_per_s']:.0f}")
    return record


def _grad_norm(ctx: RunContext) -> float | None:
    """The last step's global gradient norm (before clipping): ours when the loop clips, else DeepSpeed's."""
    norm = ctx.state.get("grad_norm") if ctx.backend.clips_gradients else ctx.engine.get_global_grad_norm()
    if norm is None:
        return None
    value = float(norm)
    return value if math.isfinite(value) else None


def train(cfg: RunConfig) -> dict[str, Any]:
    """Run (or resume) training; returns the last train record and the final eval record."""
    ctx = setup(cfg)  # first: it prepares the environment torch's first import depends on
    from gaudi_pretrain.train.evaluate import evaluate
    from gaudi_pretrain.train.metrics import MetricsWriter, StepAccumulator, Throughput

    ctx.state = {"step": 0, "samples_seen": 0, "skipped_samples": 0, "skipped_logged": 0, "skipped_global": 0,
                 "nonfinite_steps": 0, "consecutive_nonfinite": 0}
    ctx.state["float_dtype"] = next(ctx.engine.module.parameters()).dtype
    restore_checkpoint(ctx)
    rank0 = ctx.dist.rank == 0
    writer = MetricsWriter(ctx.run_dir, enabled=rank0, tensorboard=cfg.logging.tensorboard)
    bar = _progress_bar(ctx) if rank0 and cfg.logging.progress_bar else None
    acc, timer = StepAccumulator(ctx.backend.device), Throughput()
    data_iter = iter(ctx.loader)
    last_train: dict[str, Any] = {}
    last_eval: dict[str, Any] = {}
    steps_since_log, start_step = 0, ctx.state["step"]
    ctx.engine.train()
    try:
        while ctx.state["step"] < cfg.train.max_steps:
            train_step(ctx, data_iter, acc, timer)
            steps_since_log += 1
            step = ctx.state["step"]
            if bar is not None:
                bar.update(1)
            final = step == cfg.train.max_steps
            if step % cfg.logging.every_steps == 0 or final:
                last_train = _log(ctx, acc, timer, steps_since_log, writer, bar)
                steps_since_log = 0
                if ctx.state["longest_nonfinite"] >= cfg.train.max_consecutive_nonfinite:
                    _stop_nonfinite(ctx, ctx.state["longest_nonfinite"])
            if cfg.data.eval_shards and (step % cfg.eval.every_steps == 0 or final):
                last_eval = evaluate(ctx, step)
                writer.write(last_eval)
                ctx.engine.train()
                timer.reset()
            if step % cfg.checkpoint.every_steps == 0 or final:
                save_checkpoint(ctx)
    finally:
        if bar is not None:
            bar.close()
        writer.close()
    summary = {"train": last_train, "eval": last_eval, "steps_run": ctx.state["step"] - start_step,
               "run_dir": str(ctx.run_dir)}
    if rank0 and cfg.checkpoint.export_hf:
        from gaudi_pretrain.model.hf_io import export_checkpoint

        summary["hf_dir"] = str(export_checkpoint(ctx.run_dir, confined(ctx.run_dir, "hf"), overwrite=True))
    if rank0:
        confined(ctx.run_dir, "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _progress_bar(ctx: RunContext) -> Any:
    from tqdm import tqdm

    return tqdm(total=ctx.cfg.train.max_steps, initial=ctx.state["step"], desc="train", unit="step",
                dynamic_ncols=True, mininterval=1.0)
