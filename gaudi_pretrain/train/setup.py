"""Everything a training run needs, built in the order it needs it (docs/architecture.md, "Setup order").

Input is checked (batch geometry, output directory, shard specs, tokenizer) before the first byte is
written, so bad input leaves no run directory behind. `launch_env.prepare` must have run before torch
was imported (`gaudi_pretrain.train.train` does it first); `make_backend` before DeepSpeed is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from gaudi_pretrain.backends import Backend, select_backend
from gaudi_pretrain.config import RunConfig, deepspeed_config, fit_batch_geometry, save_config
from gaudi_pretrain.data.pipeline import build_loader, resolve_split
from gaudi_pretrain.data.tokenizer import load_tokenizer
from gaudi_pretrain.distributed import DistInfo, init_distributed
from gaudi_pretrain.model.factory import build_model
from gaudi_pretrain.model.flops import flops_per_sample
from gaudi_pretrain.paths import check_writable, confined, make_writable_dir
from gaudi_pretrain.train.nonfinite import NonfiniteCounter, decides_on_device, gradient_check_for
from gaudi_pretrain.train.optim import make_scheduler, param_groups
from gaudi_pretrain.train.state import RunContext


def make_backend(cfg: RunConfig) -> Backend:
    backend = select_backend(cfg.backend, cfg.train.precision, cfg.train.zero_stage)
    backend.prepare_environment()
    return backend


def build_engine(
    cfg: RunConfig,
    backend: Backend,
    info: DistInfo,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
) -> tuple[Any, Any]:
    """(DeepSpeed engine, optimizer) for `model`, which is on the device and compiled as wanted: the
    optimizer groups, the schedule and the DeepSpeed dict derived from the config. `optimizer`: instead of
    the backend's (benchmarks compare implementations)."""
    # DeepSpeed picks its accelerator when first imported: after backend.prepare_environment set DS_ACCELERATOR
    import deepspeed
    from deepspeed.runtime.zero.utils import is_zero_supported_optimizer

    if optimizer is None:
        optimizer = backend.make_optimizer(param_groups(model, cfg.optim), cfg.optim)
    scheduler = make_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
    ds_config = deepspeed_config(
        cfg,
        info.world_size,
        clip_in_engine=not backend.clips_gradients,
        optimizer_known_to_deepspeed=is_zero_supported_optimizer(optimizer),
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False
    )
    return engine, optimizer


def make_context(
    cfg: RunConfig,
    backend: Backend,
    info: DistInfo,
    engine: Any,
    optimizer: Any,
    loader: Any,
    run_dir: Path,
    tokenizer: Any,
) -> RunContext:
    return RunContext(
        cfg=cfg,
        backend=backend,
        dist=info,
        engine=engine,
        optimizer=optimizer,
        loader=loader,
        run_dir=run_dir,
        tokenizer=tokenizer,
        flops_per_sample=flops_per_sample(cfg.model, cfg.data.max_text_len),
        float_dtype=next(engine.module.parameters()).dtype,
        nonfinite=NonfiniteCounter(backend.device),
        grad_check=gradient_check_for(engine.module, backend),
        skip_on_device=decides_on_device(engine, optimizer),
    )


def setup(cfg: RunConfig, info: DistInfo) -> RunContext:
    """Backend, data, run directory, process group, model, DeepSpeed engine."""
    backend = make_backend(cfg)
    fitted = fit_batch_geometry(cfg, info.world_size)
    if fitted is not cfg and info.rank == 0:
        print(
            f"train.gradient_accumulation_steps {cfg.train.gradient_accumulation_steps} -> "
            f"{fitted.train.gradient_accumulation_steps}: keeps train.global_batch_size "
            f"{cfg.train.global_batch_size} on {info.world_size} ranks",
            flush=True,
        )
    cfg = fitted
    run_dir = Path(cfg.train.output_dir)
    check_writable(run_dir, "train.output_dir")
    if cfg.data.eval_shards:
        resolve_split(cfg, "eval")
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    loader = build_loader(cfg, tokenizer, rank=info.rank, world_size=info.world_size, split="train")
    make_writable_dir(run_dir, "train.output_dir")

    init_distributed(info, backend.dist_backend, timeout=cfg.train.collective_timeout_s)
    if info.rank == 0:
        print(f"rendezvous {info.master_addr}:{info.master_port}, {info.world_size} ranks ({info.source})", flush=True)
    backend.set_seed(cfg.train.seed)
    model = backend.compile(build_model(cfg.model, backend.attention_fn()))
    engine, optimizer = build_engine(cfg, backend, info, model)
    if info.rank == 0:
        save_config(cfg, confined(run_dir, "config.yaml"))
    ctx = make_context(cfg, backend, info, engine, optimizer, loader, run_dir, tokenizer)
    ctx.state.schedule_batch = ctx.global_batch  # a resume replaces it by the checkpoint's
    return ctx
