"""Analytic matmul FLOPs (2·m·n·k per matmul, attention score/value products included) for MFU.

Backward costs twice the forward (gradients w.r.t. inputs and weights), except for the patch
convolution whose input (the pixels) needs no gradient. Embedding lookups, norms and activations are
not matmuls and are not counted, as in the usual MFU convention.
"""

from __future__ import annotations

from gaudi_pretrain.config import ModelConfig


def _attention(lq: int, lk: int, dim: int) -> int:
    """Q·Kᵀ and P·V for one sequence."""
    return 4 * lq * lk * dim


def _self_block(n: int, dim: int, ffn: int) -> int:
    """q/k/v + out projections, attention, FFN for n tokens."""
    return 8 * n * dim * dim + _attention(n, n, dim) + 4 * n * dim * ffn


def _cross_layer(lq: int, lk: int, dim: int, ffn: int) -> int:
    """Self-attention block + cross-attention (q/out on lq tokens, k/v on lk) + FFN."""
    cross = 4 * lq * dim * dim + 4 * lk * dim * dim + _attention(lq, lk, dim)
    return _self_block(lq, dim, ffn) + cross


def image_tokens(cfg: ModelConfig) -> int:
    return (cfg.vision.image_size // cfg.vision.patch_size) ** 2 + 1


def patch_embed_flops(cfg: ModelConfig) -> int:
    v = cfg.vision
    return 2 * (image_tokens(cfg) - 1) * 3 * v.patch_size**2 * v.hidden_size


def vision_flops(cfg: ModelConfig) -> int:
    """Forward of the vision tower + image bridge transforms for one image."""
    v, n = cfg.vision, image_tokens(cfg)
    layers = cfg.text.num_hidden_layers  # bridges use vision layers 1..T
    bridges = cfg.num_hidden_layers * 2 * n * v.hidden_size * cfg.hidden_size
    return patch_embed_flops(cfg) + layers * _self_block(n, v.hidden_size, 4 * v.hidden_size) + bridges


def text_flops(cfg: ModelConfig, text_len: int) -> int:
    """Forward of the text tower + text bridge transforms for one sequence."""
    t = cfg.text
    bridges = cfg.num_hidden_layers * 2 * text_len * t.hidden_size * cfg.hidden_size
    return t.num_hidden_layers * _self_block(text_len, t.hidden_size, t.intermediate_size) + bridges


def cross_flops(cfg: ModelConfig, text_len: int) -> int:
    """Forward of the cross-modal encoder (both streams) for one pair, poolers excluded."""
    n, h, f = image_tokens(cfg), cfg.hidden_size, cfg.text.intermediate_size
    return cfg.num_hidden_layers * (_cross_layer(text_len, n, h, f) + _cross_layer(n, text_len, h, f))


def head_flops(cfg: ModelConfig, text_len: int) -> dict[str, int]:
    h = cfg.hidden_size
    return {
        "pool": 2 * 2 * h * h,
        "mlm": 2 * text_len * h * h + 2 * text_len * h * cfg.text.vocab_size,
        "itm": 2 * 2 * h * 2,
    }


def forward_flops(cfg: ModelConfig, text_len: int) -> int:
    """One whole-model forward of one (image, text) pair with both heads (like one HF forward)."""
    heads = head_flops(cfg, text_len)
    return vision_flops(cfg) + text_flops(cfg, text_len) + cross_flops(cfg, text_len) + sum(heads.values())


def flops_per_sample(cfg: ModelConfig, text_len: int) -> int:
    """fwd+bwd matmul FLOPs of one sample of `BridgeTowerForPretraining.forward`: one shared vision pass,
    two text + cross-modal passes (MLM and ITM), MLM head on the MLM pass, poolers + ITM head on the ITM pass."""
    heads = head_flops(cfg, text_len)
    fwd = vision_flops(cfg) + 2 * (text_flops(cfg, text_len) + cross_flops(cfg, text_len)) + sum(heads.values())
    return 3 * fwd - patch_embed_flops(cfg)  # the pixels need no gradient: conv backward is weight-only


def train_flops_per_pair(cfg: ModelConfig, text_len: int) -> int:
    """fwd+bwd of one full forward (no vision sharing): the RECIPE's "one fwd+bwd of the whole model"."""
    return 3 * forward_flops(cfg, text_len) - patch_embed_flops(cfg)
