"""The training loop: DeepSpeed engine + backend seam + data cursor + checkpoints + metrics.

The step reads top to bottom; device differences live in `gaudi_pretrain.backends`, data order and
resume in `gaudi_pretrain.data.pipeline`, the objective in `gaudi_pretrain.model.pretraining`.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from gaudi_pretrain.config import RunConfig, check_batch_geometry, deepspeed_config, save_config
from gaudi_pretrain.errors import CheckpointError, ConfigError, TrainingError
from gaudi_pretrain.train.faults import maybe_crash


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
    state: dict[str, Any] = field(default_factory=dict)


def _check_output_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_probe_{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"train.output_dir {path} is not writable: {exc.strerror}") from None


def setup(cfg: RunConfig) -> RunContext:
    """Backend, distributed init, model, optimizer, DeepSpeed engine and data, in the order they need."""
    from gaudi_pretrain.backends import select_backend
    from gaudi_pretrain.distributed import discover

    backend = select_backend(cfg.backend, cfg.train.precision, cfg.train.zero_stage)
    backend.prepare_environment()  # before torch device libraries / deepspeed are imported
    info = discover()
    check_batch_geometry(cfg, info.world_size)  # fail before anything heavy or written
    run_dir = Path(cfg.train.output_dir)
    _check_output_dir(run_dir)

    import deepspeed

    from gaudi_pretrain.data.pipeline import build_loader
    from gaudi_pretrain.data.tokenizer import load_tokenizer
    from gaudi_pretrain.distributed import init_distributed
    from gaudi_pretrain.model import flops_per_sample, set_attention_fn
    from gaudi_pretrain.model.hf_io import build_model
    from gaudi_pretrain.train.optim import make_scheduler, param_groups

    init_distributed(info, backend.dist_backend)
    backend.set_seed(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    loader = build_loader(cfg, tokenizer, rank=info.rank, world_size=info.world_size, split="train")

    set_attention_fn(backend.attention_fn())
    model = build_model(cfg.model)
    model = backend.compile(model)
    optimizer = backend.make_optimizer(param_groups(model, cfg.optim), cfg.optim)
    scheduler = make_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
    ds_config = deepspeed_config(cfg, info.world_size, clip_in_engine=not backend.clips_gradients)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False
    )
    if info.rank == 0:
        save_config(cfg, run_dir / "config.yaml")
    return RunContext(
        cfg=cfg,
        backend=backend,
        dist=info,
        engine=engine,
        loader=loader,
        run_dir=run_dir,
        tokenizer=tokenizer,
        flops_per_sample=flops_per_sample(cfg.model, cfg.data.max_text_len),
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
    from gaudi_pretrain.train.checkpoint import (
        ClientState,
        checkpoints_dir,
        publish,
        tag_for,
        weights_digest,
        write_rank_state,
        write_run_files,
    )
    from gaudi_pretrain.distributed import barrier

    s, cfg = ctx.state, ctx.cfg
    root, tag = checkpoints_dir(ctx.run_dir), tag_for(s["step"])
    ctx.engine.save_checkpoint(str(root), tag=tag, client_state={}, save_latest=False)
    weights = unwrapped_state_dict(ctx.engine, cfg.train.zero_stage)
    write_rank_state(root / tag, ctx.dist.rank, ctx.loader.state_dict(), weights_digest(ctx.engine.module))
    maybe_crash("mid_save", s["step"], ctx.dist.rank)
    barrier()  # every rank's files are on disk before rank 0 declares the checkpoint complete
    if ctx.dist.rank == 0:
        client = ClientState(
            step=s["step"],
            samples_seen=s["samples_seen"],
            config_fingerprint=cfg.fingerprint(),
            world_size=ctx.dist.world_size,
            extra={"skipped_samples": s["skipped_samples"], "nonfinite_steps": s["nonfinite_steps"]},
        )
        write_run_files(root / tag, cfg, client, weights)
        publish(root, tag, cfg.checkpoint.keep_last)
    barrier()
    return root / tag


def restore_checkpoint(ctx: RunContext) -> None:
    from gaudi_pretrain.train.checkpoint import (
        read_client_state,
        read_rank_state,
        resolve_checkpoint,
        set_rng_state,
    )

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
    load_path, _ = ctx.engine.load_checkpoint(str(path.parent), tag=path.name)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load {path}")
    rank_state = read_rank_state(path, ctx.dist.rank)
    ctx.loader.load_state_dict(rank_state["data"])
    set_rng_state(rank_state["rng"])
    ctx.state.update(
        step=client.step,
        samples_seen=client.samples_seen,
        skipped_samples=client.extra.get("skipped_samples", 0),
        nonfinite_steps=client.extra.get("nonfinite_steps", 0),
        resumed_from=str(path),
    )
    _truncate_sample_log(ctx, client.step)
    if ctx.dist.rank == 0:
        print(f"resumed from {path} at step {client.step}", flush=True)


# -------------------------------------------------------------------------------- sample log


def _sample_log_path(ctx: RunContext) -> Path:
    return ctx.run_dir / "samples" / f"rank_{ctx.dist.rank:05d}.log"


def _truncate_sample_log(ctx: RunContext, step: int) -> None:
    """After a resume, forget the keys of steps that the checkpoint does not contain (they rerun)."""
    path = _sample_log_path(ctx)
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and int(line.split("\t", 1)[0]) < step]
    path.write_text("".join(line + "\n" for line in kept))


def _log_samples(ctx: RunContext, step: int, keys: list[str]) -> None:
    path = _sample_log_path(ctx)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(f"{step}\t" + " ".join(k for k in keys if k) + "\n")


# -------------------------------------------------------------------------------------- loop


def _to_device(batch: dict[str, Any], device: Any, float_dtype: Any) -> dict[str, Any]:
    out = {}
    for key, value in batch.items():
        value = value.to(device, non_blocking=True)
        out[key] = value.to(float_dtype) if value.is_floating_point() else value
    return out


def _all_finite(loss: Any) -> bool:
    import torch
    import torch.distributed as dist

    flag = torch.isfinite(loss.detach()).to(torch.int32)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)  # every rank skips the same micro-steps
    return bool(flag.item())


def _next_batch(ctx: RunContext, data_iter: Iterator[dict[str, Any]], timer: Any) -> dict[str, Any]:
    start = time.perf_counter()
    batch = next(data_iter)
    timer.data_wait += time.perf_counter() - start
    keys = batch.pop("keys")
    ctx.state["skipped_samples"] += int(batch.pop("skipped"))
    if ctx.cfg.logging.sample_log:
        _log_samples(ctx, ctx.state["step"], keys)
    return batch


def train_step(ctx: RunContext, data_iter: Iterator[dict[str, Any]], acc: Any, timer: Any) -> None:
    """One optimizer step = gradient_accumulation_steps micro-steps (DeepSpeed steps on the boundary)."""
    engine, backend, cfg = ctx.engine, ctx.backend, ctx.cfg
    for _ in range(cfg.train.gradient_accumulation_steps):
        batch = _to_device(_next_batch(ctx, data_iter, timer), backend.device, ctx.state["float_dtype"])
        with backend.autocast():
            out = engine(batch)
        if not _all_finite(out.loss):
            _count_nonfinite(ctx)
            continue  # nothing was backpropagated: the step is skipped cleanly
        ctx.state["consecutive_nonfinite"] = 0
        engine.backward(out.loss)
        backend.after_backward()
        if backend.clips_gradients and engine.is_gradient_accumulation_boundary():
            max_norm = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
            ctx.state["grad_norm"] = backend.clip_grad_norm(engine.module.parameters(), max_norm)
        engine.step()
        backend.after_optimizer_step()
        acc.add(out)
    ctx.state["step"] += 1
    maybe_crash("after_step", ctx.state["step"], ctx.dist.rank)
    ctx.state["samples_seen"] += cfg.train.micro_batch_size * cfg.train.gradient_accumulation_steps * ctx.dist.world_size


def _count_nonfinite(ctx: RunContext) -> None:
    s = ctx.state
    s["nonfinite_steps"] += 1
    s["consecutive_nonfinite"] += 1
    limit = ctx.cfg.train.max_consecutive_nonfinite
    if s["consecutive_nonfinite"] >= limit:
        path = save_checkpoint(ctx)
        raise TrainingError(
            f"{limit} consecutive micro-steps with non-finite loss at step {s['step']}; "
            f"last good state saved to {path}"
        )


def _log(ctx: RunContext, acc: Any, timer: Any, steps_since: int, writer: Any, bar: Any) -> dict[str, Any]:
    from gaudi_pretrain.train.metrics import all_reduce_sum

    s, cfg, world = ctx.state, ctx.cfg, ctx.dist.world_size
    means = acc.reduce()
    elapsed, wait = timer.reset()
    wait_total, skipped = all_reduce_sum([wait, s["skipped_samples"]], ctx.backend.device)
    samples = steps_since * cfg.train.micro_batch_size * cfg.train.gradient_accumulation_steps * world
    per_device = samples / max(elapsed, 1e-9) / world
    peak = ctx.backend.peak_flops()
    record = {
        "kind": "train",
        "step": s["step"],
        **means,
        "lr": ctx.engine.get_lr()[0],
        "grad_norm": _grad_norm(ctx),
        "samples_per_s": per_device * world,
        "samples_per_s_per_device": per_device,
        "data_wait_frac": min(1.0, wait_total / world / max(elapsed, 1e-9)),
        "mfu": (per_device * ctx.flops_per_sample / peak) if peak else None,
        "memory_gib": ctx.backend.memory_stats() / 2**30,
        "skipped_samples": int(skipped),
        "nonfinite_steps": s["nonfinite_steps"],
        "samples_seen": s["samples_seen"],
        "graph_compiles": ctx.backend.graph_compile_count(),
    }
    writer.write(record)
    if bar is not None:
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
    from gaudi_pretrain.train.evaluate import evaluate
    from gaudi_pretrain.train.metrics import MetricsWriter, StepAccumulator, Throughput

    ctx = setup(cfg)
    ctx.state = {"step": 0, "samples_seen": 0, "skipped_samples": 0, "nonfinite_steps": 0, "consecutive_nonfinite": 0}
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
    if rank0:
        (ctx.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _progress_bar(ctx: RunContext) -> Any:
    from tqdm import tqdm

    return tqdm(total=ctx.cfg.train.max_steps, initial=ctx.state["step"], desc="train", unit="step",
                dynamic_ncols=True, mininterval=1.0)
