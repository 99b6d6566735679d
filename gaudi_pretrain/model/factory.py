"""Build the pretraining model with its initialisation (the one place the trainer asks for a model)."""

from __future__ import annotations

from gaudi_pretrain.config import ModelConfig
from gaudi_pretrain.errors import ConfigError
from gaudi_pretrain.model.attention import AttentionFn
from gaudi_pretrain.model.hf_convert import load_pretrained
from gaudi_pretrain.model.pretraining import BridgeTowerForPretraining
from gaudi_pretrain.model.tower_init import init_text_from, init_vision_from


def build_model(cfg: ModelConfig, attention_fn: AttentionFn | None = None) -> BridgeTowerForPretraining:
    """The pretraining model with `cfg`'s initialisation: a BridgeTower checkpoint, or CLIP/RoBERTa towers
    (each optional), on top of the fresh init (transformers' BridgeTower scheme, `bridgetower.init_weights`). `attention_fn`: the backend's fused
    attention kernel (None: torch's SDPA), used where `model.attention` is sdpa."""
    if cfg.from_pretrained and (cfg.init_vision_from or cfg.init_text_from):
        raise ConfigError("set either model.from_pretrained or model.init_vision_from/init_text_from, not both")
    model = BridgeTowerForPretraining(cfg, attention_fn)
    if cfg.from_pretrained:
        load_pretrained(model, cfg.from_pretrained)
    if cfg.init_vision_from:
        init_vision_from(model, cfg.init_vision_from)
    if cfg.init_text_from:
        init_text_from(model, cfg.init_text_from)
    return model
