"""The training loop: one step top to bottom, logging at its cadence, evaluation and checkpoints.

Device differences live in `gaudi_pretrain.backends`, data order and resume in `data.pipeline`, the
objective in `model.pretraining`, setup in `train.setup`, save/restore in `train.checkpoint`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from typing import Any

import torch

from gaudi_pretrain.config import RunConfig
from gaudi_pretrain.distributed import DistInfo
from gaudi_pretrain.errors import TrainingError
from gaudi_pretrain.paths import confined
from gaudi_pretrain.train import sample_log
from gaudi_pretrain.train.checkpoint import best_score, export_checkpoint, restore_checkpoint, save_checkpoint
from gaudi_pretrain.train.checkpoint_dirs import checkpoints_dir, read_pointer, tag_for
from gaudi_pretrain.train.evaluate import eval_loaders, evaluate
from gaudi_pretrain.train.faults import apply_numeric_faults, maybe_crash
from gaudi_pretrain.train.metrics import MetricsWriter, StepAccumulator, Throughput, all_reduce_sum, current_rss_bytes
from gaudi_pretrain.train.nonfinite import all_ranks, read_counts, step_or_skip
from gaudi_pretrain.train.preemption import Preemption
from gaudi_pretrain.train.setup import setup
from gaudi_pretrain.train.state import RunContext


def _next_batch(ctx: RunContext, data_iter: Iterator[dict[str, Any]], timer: Throughput) -> dict[str, Any]:
    start = time.perf_counter()
    batch = next(data_iter)
    timer.data_wait += time.perf_counter() - start
    keys = batch.pop("keys")
    ctx.state.skipped_samples += batch.pop("skipped")  # a host int: no device read
    if ctx.cfg.logging.sample_log:
        sample_log.append(ctx.run_dir, ctx.dist.rank, ctx.state.step, keys)
    return batch


def train_step(ctx: RunContext, data_iter: Iterator[dict[str, Any]], acc: StepAccumulator, timer: Throughput) -> None:
    """One optimizer step = gradient_accumulation_steps micro-steps (DeepSpeed steps on the boundary).

    A step whose loss or gradients are not finite on any rank is cancelled on every rank: no weight,
    optimizer moment, step count or learning-rate update happens and its metrics are dropped (its batches
    were drawn all the same: the data cursor and the sample log move past them). Nothing here reads the
    device (docs/reliability.md, "Non-finite steps", names the configurations that need one read per step)."""
    engine, backend, cfg = ctx.engine, ctx.backend, ctx.cfg
    step = ctx.state.step + 1  # the step being run, as logged
    finite = torch.ones((), dtype=torch.bool, device=backend.device)
    for _ in range(cfg.train.gradient_accumulation_steps):
        batch = backend.to_device(_next_batch(ctx, data_iter, timer), ctx.float_dtype)
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
    ctx.state.step = step
    maybe_crash("after_step", step, ctx.dist.rank)
    ctx.state.samples_seen += ctx.global_batch


def _optimizer_step(ctx: RunContext, finite: torch.Tensor) -> torch.Tensor:
    """The boundary micro-step: clip (when the loop clips), agree across ranks, step or cancel the step.
    Returns the all-ranks decision (a device bool).

    When the loop clips (fp32, ZeRO 0: gradients are param.grad) the pre-clip global norm tells whether
    the gradients are finite; when DeepSpeed holds them (bf16 / ZeRO) `GradientCheck` does, because not
    every DeepSpeed version skips non-finite bf16 steps."""
    engine, backend, cfg = ctx.engine, ctx.backend, ctx.cfg
    if backend.clips_gradients:
        max_norm = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
        norm = backend.clip_grad_norm(engine.module.parameters(), max_norm)
        ctx.state.grad_norm = norm
        finite = finite & torch.isfinite(torch.as_tensor(norm, device=finite.device))
    else:
        finite = finite & ctx.grad_check.finite()
    ok = all_ranks(finite)
    step_or_skip(engine, ctx.optimizer, ok, ctx.skip_on_device)
    return ok


def _stop_nonfinite(ctx: RunContext) -> None:
    """Save the state and stop the run. The skipped steps changed no weights, so when the run is still
    in its streak the checkpoint holds the weights from before it."""
    s, limit = ctx.state, ctx.cfg.train.max_consecutive_nonfinite
    longest = s.longest_nonfinite
    path = save_checkpoint(ctx)
    if s.consecutive_nonfinite >= limit:
        first_bad = s.step - s.consecutive_nonfinite + 1
        raise TrainingError(
            f"stopping: {s.consecutive_nonfinite} consecutive steps ({first_bad}-{s.step}) had a non-finite "
            f"loss or gradients (train.max_consecutive_nonfinite={limit}); the last good weights (after step "
            f"{first_bad - 1}) are saved in {path}"
        )
    raise TrainingError(
        f"stopping: {longest} consecutive steps before step {s.step} had a non-finite loss or gradients "
        f"(train.max_consecutive_nonfinite={limit}, checked every logging.every_steps); the weights after step "
        f"{s.step} are saved in {path}"
    )


def _log(ctx: RunContext, acc: StepAccumulator, timer: Throughput, writer: MetricsWriter, bar: Any) -> dict[str, Any]:
    s, world = ctx.state, ctx.dist.world_size
    means = acc.reduce()
    read_counts(s, ctx.nonfinite)
    elapsed, wait, window_steps = timer.reset()
    wait_total, skipped = all_reduce_sum([wait, s.skipped_samples - s.skipped_logged], ctx.backend.device)
    s.skipped_logged = s.skipped_samples
    s.skipped_global += int(round(skipped))
    samples = window_steps * ctx.global_batch
    per_device = samples / max(elapsed, 1e-9) / world
    peak = ctx.backend.peak_flops()
    record = {
        "kind": "train",
        "step": s.step,
        **means,
        "lr": float(ctx.engine.get_lr()[0]),
        "grad_norm": _grad_norm(ctx),
        "samples_per_s": per_device * world,
        "samples_per_s_per_device": per_device,
        "window_steps": window_steps,  # the steps the throughput was measured over (since the last log or pause)
        "data_wait_frac": min(1.0, wait_total / world / max(elapsed, 1e-9)),
        "mfu": (per_device * ctx.flops_per_sample / peak) if peak else None,
        "memory_gib": ctx.backend.memory_stats() / 2**30,
        "rss_gib": current_rss_bytes() / 2**30,
        "rss_with_workers_gib": current_rss_bytes(include_children=True) / 2**30,
        "skipped_samples": s.skipped_global,
        "nonfinite_steps": s.nonfinite_steps,
        "samples_seen": s.samples_seen,
        "graph_compiles": ctx.backend.graph_compile_count(),
    }
    writer.write(record)
    if bar is not None and means["loss"] is not None:
        bar.set_postfix(
            loss=f"{means['loss']:.3f}",
            itm=f"{means['itm_acc']:.2f}",
            mlm=f"{means['mlm_acc']:.2f}",
            sps=f"{record['samples_per_s']:.0f}",
        )
    return record


def _grad_norm(ctx: RunContext) -> float | None:
    """The last step's global gradient norm (before clipping): ours when the loop clips, else DeepSpeed's."""
    norm = ctx.state.grad_norm if ctx.backend.clips_gradients else ctx.engine.get_global_grad_norm()
    if norm is None:
        return None
    value = float(norm)
    return value if math.isfinite(value) else None


def _evaluate(ctx: RunContext, step: int) -> dict[str, Any]:
    loader, retrieval = eval_loaders(ctx.cfg, ctx.tokenizer, ctx.dist)
    record = evaluate(ctx.engine, ctx.backend, loader, retrieval, ctx.cfg.eval, step, ctx.float_dtype)
    ctx.engine.train()
    return record


def _evaluate_and_rank(ctx: RunContext, writer: MetricsWriter) -> tuple[dict[str, Any], bool]:
    """Evaluate at this step; True when it beats the best so far (the same decision on every rank: the
    metrics are reduced over all of them)."""
    record = _evaluate(ctx, ctx.state.step)
    writer.write(record)
    score, s = best_score(record), ctx.state
    improved = s.best_score is None or score > s.best_score
    if improved:
        s.best_score, s.best_step = score, s.step
    return record, improved


def run(cfg: RunConfig, info: DistInfo) -> dict[str, Any]:
    """Run (or resume) training; returns the last train record and the final eval record. Call it through
    `gaudi_pretrain.train.train`, which prepares the environment torch's first import depends on."""
    ctx = setup(cfg, info)
    restore_checkpoint(ctx)
    s, rank0 = ctx.state, ctx.dist.rank == 0
    writer = MetricsWriter(ctx.run_dir, enabled=rank0, tensorboard=cfg.logging.tensorboard)
    bar = _progress_bar(ctx) if rank0 and cfg.logging.progress_bar else None
    acc, timer = StepAccumulator(ctx.backend.device), Throughput()
    data_iter = iter(ctx.loader)
    last_train: dict[str, Any] = {}
    last_eval: dict[str, Any] = {}
    start_step, end_step = s.step, ctx.end_step()
    preemption, preempted = Preemption(), False
    ctx.engine.train()
    try:
        while s.step < end_step:
            train_step(ctx, data_iter, acc, timer)
            timer.add_step()
            if bar is not None:
                bar.update(1)
            final = s.step == end_step
            if s.step % cfg.logging.every_steps == 0 or final:
                last_train = _log(ctx, acc, timer, writer, bar)
                if s.longest_nonfinite >= cfg.train.max_consecutive_nonfinite:
                    _stop_nonfinite(ctx)
            evaluation, improved = None, False
            if cfg.data.eval_shards and (s.step % cfg.eval.every_steps == 0 or final):
                evaluation, improved = _evaluate_and_rank(ctx, writer)
                last_eval = evaluation
                timer.reset()  # the evaluation's time is not training throughput
            saved = None
            if improved or s.step % cfg.checkpoint.every_steps == 0 or final:
                saved = save_checkpoint(ctx, best=improved, evaluation=evaluation)
                timer.reset()
            if (
                not final
                and s.step % cfg.checkpoint.preemption_check_steps == 0
                and preemption.agreed(ctx.backend.device)
            ):
                path = saved or save_checkpoint(ctx)
                if rank0:
                    print(f"SIGTERM: saved {path} at step {s.step}; continue with --resume auto", flush=True)
                preempted = True
                break
    except Exception as exc:
        failure = _peer_failure(ctx, exc)
        if failure is None:
            raise
        raise failure from None
    finally:
        data_iter.close()  # the loader workers exit now, also on an error (see PretrainLoader.__iter__)
        preemption.close()
        if bar is not None:
            bar.close()
        writer.close()
    summary = {
        "train": last_train,
        "eval": last_eval,
        "steps_run": s.step - start_step,
        "run_dir": str(ctx.run_dir),
        "preempted": preempted,
    }
    if s.best_step is not None:
        summary["best"] = {
            "step": s.best_step,
            "score": s.best_score,
            "checkpoint": str(checkpoints_dir(ctx.run_dir) / tag_for(s.best_step)),
        }
    if rank0 and cfg.checkpoint.export_hf and not preempted:
        summary["hf_dir"] = str(export_checkpoint(ctx.run_dir, confined(ctx.run_dir, "hf"), overwrite=True))
    if rank0:
        confined(ctx.run_dir, "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _peer_failure(ctx: RunContext, exc: Exception) -> TrainingError | None:
    """A collective that failed because a peer died or stopped answering (gloo: the connection closes;
    NCCL / HCCL: `train.collective_timeout_s` expires), as one line naming what to resume from."""
    if ctx.dist.world_size == 1 or isinstance(exc, TrainingError):
        return None
    text = f"{type(exc).__name__}: {exc}"
    markers = (
        "DistError",
        "DistBackendError",
        "DistNetworkError",
        "Connection closed",
        "Connection reset",
        "timed out",
    )
    if not any(m.lower() in text.lower() for m in markers):
        return None
    latest = read_pointer(checkpoints_dir(ctx.run_dir))
    first_line = text.splitlines()[0][:200]
    return TrainingError(
        f"rank {ctx.dist.rank}: a collective failed at step {ctx.state.step + 1} (a peer died or timed out after "
        f"train.collective_timeout_s={ctx.cfg.train.collective_timeout_s:g}: {first_line}); the last complete "
        f"checkpoint is {latest or 'none'}: relaunch with --resume auto"
    )


def _progress_bar(ctx: RunContext) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=ctx.end_step(),
        initial=ctx.state.step,
        desc="train",
        unit="step",
        dynamic_ncols=True,
        mininterval=1.0,
    )
