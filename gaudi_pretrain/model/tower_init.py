"""Tower initialisation from foreign checkpoints: CLIP's vision tower, RoBERTa's text tower."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from gaudi_pretrain.errors import CheckpointError, ConfigError
from gaudi_pretrain.model.hf_convert import BUFFER_SUFFIXES, short_list
from gaudi_pretrain.model.pretraining import BridgeTowerForPretraining


def interpolate_pos_embed(weight: torch.Tensor, grid: int) -> torch.Tensor:
    """[1 + g0², D] CLIP position table → [1 + grid², D]: bicubic on the patch grid, CLS row kept."""
    cls, patches = weight[:1], weight[1:]
    g0 = int(round(patches.shape[0] ** 0.5))
    if g0 * g0 != patches.shape[0]:
        raise CheckpointError(f"position embedding of {patches.shape[0]} patches is not a square grid")
    if g0 == grid:
        return weight.clone()
    dim = patches.shape[1]
    x = patches.float().reshape(1, g0, g0, dim).permute(0, 3, 1, 2)  # [1, D, g0, g0]
    x = F.interpolate(x, size=(grid, grid), mode="bicubic", align_corners=False)
    x = x.permute(0, 2, 3, 1).reshape(grid * grid, dim).to(weight.dtype)
    return torch.cat([cls, x])


def clip_to_visual_state(clip_state: Mapping[str, torch.Tensor], layers: int, grid: int) -> dict[str, torch.Tensor]:
    """CLIPVisionModel `vision_model.*` state → our `visual.*` state (OpenAI names, fused q/k/v)."""
    s = {k.removeprefix("vision_model."): v for k, v in clip_state.items()}
    out = {
        "embeddings.class_embedding": s["embeddings.class_embedding"],
        "embeddings.patch_embedding.weight": s["embeddings.patch_embedding.weight"],
        "embeddings.position_embedding.weight": interpolate_pos_embed(s["embeddings.position_embedding.weight"], grid),
        "ln_pre.weight": s["pre_layrnorm.weight"],  # sic: transformers' CLIP spells it "layrnorm"
        "ln_pre.bias": s["pre_layrnorm.bias"],
        "ln_post.weight": s["post_layernorm.weight"],
        "ln_post.bias": s["post_layernorm.bias"],
    }
    for i in range(layers):
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for p in ("weight", "bias"):
            qkv = [s[f"{src}self_attn.{n}_proj.{p}"] for n in ("q", "k", "v")]
            out[f"{dst}attn.in_proj_{p}"] = torch.cat(qkv)
            out[f"{dst}attn.out_proj.{p}"] = s[f"{src}self_attn.out_proj.{p}"]
            out[f"{dst}ln_1.{p}"] = s[f"{src}layer_norm1.{p}"]
            out[f"{dst}ln_2.{p}"] = s[f"{src}layer_norm2.{p}"]
            out[f"{dst}mlp.c_fc.{p}"] = s[f"{src}mlp.fc1.{p}"]
            out[f"{dst}mlp.c_proj.{p}"] = s[f"{src}mlp.fc2.{p}"]
    return out


def _require_fit(what: str, section: str, checks: tuple[tuple[str, Any, Any], ...]) -> None:
    """(name, checkpoint value, our value) triples → one ConfigError listing every mismatch."""
    problems = [f"{name} {got} != {want}" for name, got, want in checks if got != want]
    if problems:
        raise ConfigError(f"{what} does not fit {section}: " + "; ".join(problems))


def init_vision_from(model: BridgeTowerForPretraining, source: str) -> None:
    """Vision tower ← CLIP (CLIPModel or CLIPVisionModel checkpoint; Hub name or directory)."""
    from transformers import CLIPVisionModel

    v = model.cfg.vision
    clip = CLIPVisionModel.from_pretrained(source, weights_only=True)
    c = clip.config
    _require_fit(
        f"CLIP model {source}",
        "model.vision",
        (
            ("hidden_size", c.hidden_size, v.hidden_size),
            ("num_hidden_layers", c.num_hidden_layers, v.num_hidden_layers),
            ("patch_size", c.patch_size, v.patch_size),
            ("num_attention_heads", c.num_attention_heads, v.hidden_size // 64),
            ("intermediate_size", c.intermediate_size, 4 * v.hidden_size),
            ("hidden_act", c.hidden_act, "quick_gelu"),
            ("layer_norm_eps", c.layer_norm_eps, v.layer_norm_eps),
        ),
    )
    # transformers 5 flattens CLIPVisionModel; 4.x nests it under `vision_model.` (stripped by the converter)
    state = clip_to_visual_state(clip.state_dict(), v.num_hidden_layers, v.image_size // v.patch_size)
    model.bridgetower.vision_model.visual.load_state_dict(state, strict=True)


def init_text_from(model: BridgeTowerForPretraining, source: str) -> None:
    """Text tower ← RoBERTa (RobertaModel or RobertaForMaskedLM checkpoint; `roberta.` prefix handled)."""
    from transformers import RobertaModel

    t = model.cfg.text
    rob = RobertaModel.from_pretrained(source, weights_only=True)
    c = rob.config
    _require_fit(
        f"RoBERTa model {source}",
        "model.text",
        (
            ("vocab_size", c.vocab_size, t.vocab_size),
            ("hidden_size", c.hidden_size, t.hidden_size),
            ("num_hidden_layers", c.num_hidden_layers, t.num_hidden_layers),
            ("num_attention_heads", c.num_attention_heads, t.num_attention_heads),
            ("intermediate_size", c.intermediate_size, t.intermediate_size),
            ("max_position_embeddings", c.max_position_embeddings, t.max_position_embeddings),
            ("type_vocab_size", c.type_vocab_size, 1),
            ("pad_token_id", c.pad_token_id, t.pad_token_id),
            ("hidden_act", c.hidden_act, "gelu"),
            ("layer_norm_eps", c.layer_norm_eps, t.layer_norm_eps),
        ),
    )
    state = {k: v for k, v in rob.state_dict().items() if not k.endswith(BUFFER_SUFFIXES)}
    text_model = model.bridgetower.text_model
    missing, unexpected = text_model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.startswith("pooler.")]:  # the pooler is unused
        raise CheckpointError(f"RoBERTa {source}: missing {short_list(missing)}, unexpected {short_list(unexpected)}")
