"""`gaudi-pretrain eval CHECKPOINT`: evaluate saved weights without DeepSpeed or a training state."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from gaudi_pretrain.config import load_config, validate_config, apply_overrides, read_yaml
from gaudi_pretrain.errors import CheckpointError


def load_checkpoint_model(ckpt: Path, model_cfg: Any) -> Any:
    from safetensors.torch import load_file

    from gaudi_pretrain.model.pretraining import BridgeTowerForPretraining

    weights = ckpt / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{weights} is missing")
    model = BridgeTowerForPretraining(model_cfg)
    result = model.load_state_dict(load_file(str(weights)), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{weights} does not match the config: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    return model


def evaluate_checkpoint(spec: str, overrides: list[str], config_path: str | None = None) -> dict[str, Any]:
    from gaudi_pretrain.backends import select_backend
    from gaudi_pretrain.data.tokenizer import load_tokenizer
    from gaudi_pretrain.distributed import DistInfo
    from gaudi_pretrain.model import set_attention_fn
    from gaudi_pretrain.train.checkpoint import read_client_state, resolve_checkpoint
    from gaudi_pretrain.train.evaluate import evaluate

    ckpt = resolve_checkpoint(spec, spec)
    if ckpt is None:
        raise CheckpointError(f"no complete checkpoint at {spec}")
    if config_path is not None:
        cfg = load_config(config_path, overrides)
    else:
        cfg = validate_config(apply_overrides(read_yaml(ckpt / "config.yaml"), overrides))
    if not cfg.data.eval_shards:
        raise CheckpointError("data.eval_shards is empty: nothing to evaluate on")
    backend = select_backend(cfg.backend, cfg.train.precision, cfg.train.zero_stage)
    backend.prepare_environment()
    set_attention_fn(backend.attention_fn())
    model = load_checkpoint_model(ckpt, cfg.model).to(backend.device)
    ctx = SimpleNamespace(
        cfg=cfg,
        backend=backend,
        dist=DistInfo.single(),
        engine=model,
        tokenizer=load_tokenizer(cfg.data.tokenizer),
        state={},
    )
    record = evaluate(ctx, read_client_state(ckpt).step)
    record["checkpoint"] = str(ckpt)
    return record
