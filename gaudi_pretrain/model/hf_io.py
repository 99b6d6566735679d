"""Weights in and out: transformers BridgeTower checkpoints, CLIP / RoBERTa tower init, HF export.

Our parameter names ARE transformers' names, so import and export move state dicts without a key map.
transformers is imported lazily (it is slow to import) and only through stable public classes
(BridgeTowerConfig, CLIPVisionModel, RobertaModel, AutoTokenizer), so 4.55.x and 5.x both work.

Loading a BridgeTower checkpoint (`load_pretrained`), the rules are:
  * every backbone (`bridgetower.*`) weight must be present with the right shape, else CheckpointError
    naming the missing / mismatched keys;
  * a head the source lacks (ForMaskedLM has no `itm_score`, ForImageAndTextRetrieval no `mlm_score`, most
    checkpoints no ITC heads) keeps its fresh init and is reported as "initialised fresh";
  * a checkpoint saved with a tied MLM decoder (no `mlm_score.decoder.weight` but the rest of the MLM head)
    gets the word embeddings copied into our untied decoder (reported as "tied");
  * contrastive heads in the source that our config does not use, and stale buffers of old transformers
    versions (`*.position_ids`), are ignored and reported; any other unexpected key is a CheckpointError.
Weight files are read with safetensors or torch.load(weights_only=True), nothing else (transformers'
from_pretrained is called with weights_only=True too): a crafted pytorch_model.bin is refused, not run.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from gaudi_pretrain.config import ModelConfig
from gaudi_pretrain.errors import CheckpointError, ConfigError, PathError
from gaudi_pretrain.model.bridgetower import DROPOUT
from gaudi_pretrain.model.pretraining import LOGIT_SCALE_INIT, BridgeTowerForPretraining
from gaudi_pretrain.paths import checkpoint_tag

ARCHITECTURES = ["BridgeTowerForMaskedLM", "BridgeTowerForImageAndTextRetrieval"]
HEAD_PREFIXES = ("mlm_score.", "itm_score.", "itc_text_head.", "itc_image_head.", "itc_cross_modal_head.")
ITC_KEYS = ("itc_text_head.", "itc_image_head.", "itc_cross_modal_head.", "logit_scale")
BUFFER_SUFFIXES = (".position_ids", ".token_type_ids")  # persistent buffers in old transformers checkpoints
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# ------------------------------------------------------------------------------------ configs


def hf_config_dict(cfg: ModelConfig) -> dict[str, Any]:
    """transformers' BridgeTowerConfig fields for `cfg` (share flags as released: True / False)."""
    t, v = cfg.text, cfg.vision
    d: dict[str, Any] = {
        "architectures": ARCHITECTURES + (["BridgeTowerForContrastiveLearning"] if cfg.itc_heads else []),
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "layer_norm_eps": cfg.layer_norm_eps,
        "hidden_act": "gelu",
        "initializer_factor": 1,
        "share_cross_modal_transformer_layers": True,
        "share_link_tower_layers": False,
        "link_tower_type": "add",
        "init_layernorm_from_vision_encoder": False,
        "tie_word_embeddings": False,
        "text_config": {
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "intermediate_size": t.intermediate_size,
            "hidden_act": "gelu",
            "hidden_dropout_prob": cfg.dropout,
            "attention_probs_dropout_prob": cfg.dropout,
            "max_position_embeddings": t.max_position_embeddings,
            "type_vocab_size": 1,
            "layer_norm_eps": t.layer_norm_eps,
            "pad_token_id": t.pad_token_id,
            "bos_token_id": t.bos_token_id,
            "eos_token_id": t.eos_token_id,
            # transformers 4.x ties the MLM decoder to the word embeddings when the *text* config says
            # so (its default is True); BridgeTower's decoder is a separate matrix.
            "tie_word_embeddings": False,
        },
        "vision_config": {
            "hidden_size": v.hidden_size,
            "num_hidden_layers": v.num_hidden_layers,
            "num_channels": 3,
            "patch_size": v.patch_size,
            "image_size": v.image_size,
            "layer_norm_eps": v.layer_norm_eps,
            "stop_gradient": False,
            "share_layernorm": True,
            "remove_last_layer": False,
        },
    }
    if cfg.itc_heads:
        d.update(contrastive_hidden_size=cfg.contrastive_hidden_size, logit_scale_init_value=LOGIT_SCALE_INIT)
    return d


def to_hf_config(cfg: ModelConfig):
    """A transformers.BridgeTowerConfig that builds the same network as `cfg`."""
    from transformers import BridgeTowerConfig

    return BridgeTowerConfig(**hf_config_dict(cfg))


def _unsupported(d: Mapping[str, Any]) -> list[str]:
    v, t = d.get("vision_config") or {}, d.get("text_config") or {}
    checks = [
        (d.get("share_cross_modal_transformer_layers", True), True, "share_cross_modal_transformer_layers"),
        (d.get("share_link_tower_layers", False), False, "share_link_tower_layers"),
        (d.get("link_tower_type", "add"), "add", "link_tower_type"),
        (d.get("hidden_act", "gelu"), "gelu", "hidden_act"),
        (v.get("share_layernorm", True), True, "vision_config.share_layernorm"),
        (v.get("remove_last_layer", False), False, "vision_config.remove_last_layer"),
        (v.get("num_channels", 3), 3, "vision_config.num_channels"),
        (t.get("type_vocab_size", 1), 1, "text_config.type_vocab_size"),
        (t.get("hidden_act", "gelu"), "gelu", "text_config.hidden_act"),
        (t.get("is_decoder", False), False, "text_config.is_decoder"),
    ]
    return [f"{name}={got!r} (need {want!r})" for got, want, name in checks if got != want]


def from_hf_config(hf_cfg: Any, **overrides: Any) -> ModelConfig:
    """ModelConfig from a BridgeTowerConfig (or its dict / config.json contents)."""
    d = hf_cfg if isinstance(hf_cfg, Mapping) else hf_cfg.to_dict()
    bad = _unsupported(d)
    if bad:
        raise CheckpointError("unsupported BridgeTower config: " + ", ".join(bad))
    t, v = d.get("text_config") or {}, d.get("vision_config") or {}
    text_keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                 "max_position_embeddings", "layer_norm_eps", "pad_token_id", "bos_token_id", "eos_token_id")
    vision_keys = ("hidden_size", "num_hidden_layers", "patch_size", "image_size", "layer_norm_eps")
    archs = d.get("architectures") or []
    raw = {
        "hidden_size": d.get("hidden_size", 768),
        "num_hidden_layers": d.get("num_hidden_layers", 6),
        "num_attention_heads": d.get("num_attention_heads", 12),
        "layer_norm_eps": d.get("layer_norm_eps", 1e-5),
        "text": {k: t[k] for k in text_keys if t.get(k) is not None},
        "vision": {k: v[k] for k in vision_keys if v.get(k) is not None},
        "itc_heads": "BridgeTowerForContrastiveLearning" in archs,
        "contrastive_hidden_size": d.get("contrastive_hidden_size", 512),
        "dropout": t.get("hidden_dropout_prob", DROPOUT),
    }
    raw.update(overrides)
    try:
        return ModelConfig.model_validate(raw)
    except Exception as exc:  # pydantic ValidationError → one line
        raise CheckpointError(f"BridgeTower config is not usable: {exc}".splitlines()[0]) from None


ARCH_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "layer_norm_eps", "text", "vision")


def architecture_diff(a: ModelConfig, b: ModelConfig) -> list[str]:
    """Dotted names of the architecture fields where `a` and `b` differ."""
    da, db = a.model_dump(include=set(ARCH_FIELDS)), b.model_dump(include=set(ARCH_FIELDS))
    out = []
    for k in ARCH_FIELDS:
        if isinstance(da[k], dict):
            out += [f"{k}.{s}: {da[k][s]} vs {db[k][s]}" for s in da[k] if da[k][s] != db[k][s]]
        elif da[k] != db[k]:
            out.append(f"{k}: {da[k]} vs {db[k]}")
    return out


# -------------------------------------------------------------------------------- weight files


def _resolve_dir(source: str | os.PathLike) -> Path:
    """A local directory, else a Hub repo fetched (or found in the cache) with huggingface_hub."""
    path = Path(source)
    if path.is_dir():
        return path
    if path.exists() or str(source).startswith((".", "/")):
        raise CheckpointError(f"checkpoint directory not found: {source}")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(source), allow_patterns=["*.json", "*.safetensors", "*.bin", "*.txt"]))
    except Exception as exc:
        raise CheckpointError(f"cannot fetch '{source}' from the Hugging Face Hub: {type(exc).__name__}") from None


def read_state_dict(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Weights of a transformers checkpoint dir: model.safetensors, sharded safetensors, or pytorch_model.bin."""
    d = Path(directory)
    from safetensors.torch import load_file

    for index_name, loader in (("model.safetensors.index.json", load_file), ("pytorch_model.bin.index.json", _torch_load)):
        if (d / index_name).is_file():
            files = sorted(set(json.loads((d / index_name).read_text())["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for f in files:
                state.update(loader(str(d / f)))
            return state
    if (d / "model.safetensors").is_file():
        return load_file(str(d / "model.safetensors"))
    if (d / "pytorch_model.bin").is_file():
        return _torch_load(str(d / "pytorch_model.bin"))
    raise CheckpointError(f"no model.safetensors or pytorch_model.bin in {d}")


def _torch_load(path: str) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path} is not a plain tensor checkpoint: {type(exc).__name__}") from None


# ------------------------------------------------------------------------- BridgeTower import


@dataclass
class LoadReport:
    fresh: list[str] = field(default_factory=list)  # our keys the source lacks (heads only)
    ignored: list[str] = field(default_factory=list)  # source keys we do not use
    tied: list[str] = field(default_factory=list)  # our keys filled from the word embeddings


def _short(keys: list[str], n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def load_state_dict_into(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> LoadReport:
    """Copy `state` (transformers names) into `model` under the rules in the module docstring."""
    ours = model.state_dict()
    report = LoadReport()
    keep: dict[str, torch.Tensor] = {}
    unexpected = []
    for k, v in state.items():
        k = k.replace("_orig_mod.", "").removeprefix("module.")
        if k in ours:
            keep[k] = v
        elif k.endswith(BUFFER_SUFFIXES) or k.startswith(ITC_KEYS):
            report.ignored.append(k)
        else:
            unexpected.append(k)
    report.tied = _untie_decoder(keep)
    missing = [k for k in ours if k not in keep]
    fatal_missing = [k for k in missing if not k.startswith(HEAD_PREFIXES + ("logit_scale",))]
    if fatal_missing or unexpected:
        raise CheckpointError(
            f"{source} does not match the model: missing keys [{_short(fatal_missing)}], "
            f"unexpected keys [{_short(unexpected)}]"
        )
    bad_shapes = [f"{k} {tuple(v.shape)} vs {tuple(ours[k].shape)}" for k, v in keep.items() if v.shape != ours[k].shape]
    if bad_shapes:
        raise CheckpointError(f"{source} has weights of the wrong shape: {_short(bad_shapes, 4)}")
    model.load_state_dict(keep, strict=False)
    report.fresh = missing
    return report


def _untie_decoder(state: dict[str, torch.Tensor]) -> list[str]:
    decoder, words = "mlm_score.decoder.weight", "bridgetower.text_model.embeddings.word_embeddings.weight"
    if decoder not in state and "mlm_score.bias" in state and words in state:
        state[decoder] = state[words].clone()
        return [decoder]
    return []


def load_pretrained(model: BridgeTowerForPretraining, source: str | os.PathLike) -> LoadReport:
    """Load a transformers BridgeTower checkpoint (directory or Hub name) into `model`.

    Its config.json must describe the same architecture as `model.cfg` (else CheckpointError naming the
    differing fields)."""
    d = _resolve_dir(source)
    if (d / "config.json").is_file():
        theirs = from_hf_config(json.loads((d / "config.json").read_text()))
        diff = architecture_diff(model.cfg, theirs)
        if diff:
            raise CheckpointError(f"{source} is a different architecture than model config: {_short(diff, 4)}")
    report = load_state_dict_into(model, read_state_dict(d), str(source))
    if report.fresh:
        warnings.warn(f"{source}: heads initialised fresh (not in the checkpoint): {_short(report.fresh)}", stacklevel=2)
    return report


def model_config_from_pretrained(source: str | os.PathLike, **overrides: Any) -> ModelConfig:
    """ModelConfig read from a BridgeTower checkpoint's config.json (with `from_pretrained` set to it)."""
    d = _resolve_dir(source)
    if not (d / "config.json").is_file():
        raise CheckpointError(f"no config.json in {d}")
    return from_hf_config(json.loads((d / "config.json").read_text()), from_pretrained=str(source), **overrides)


# --------------------------------------------------------------------------- tower initialisation


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
    _require_fit(f"CLIP model {source}", "model.vision", (
        ("hidden_size", c.hidden_size, v.hidden_size),
        ("num_hidden_layers", c.num_hidden_layers, v.num_hidden_layers),
        ("patch_size", c.patch_size, v.patch_size),
        ("num_attention_heads", c.num_attention_heads, v.hidden_size // 64),
        ("intermediate_size", c.intermediate_size, 4 * v.hidden_size),
        ("hidden_act", c.hidden_act, "quick_gelu"),
        ("layer_norm_eps", c.layer_norm_eps, v.layer_norm_eps),
    ))
    # transformers 5 flattens CLIPVisionModel; 4.x nests it under `vision_model.` (stripped by the converter)
    state = clip_to_visual_state(clip.state_dict(), v.num_hidden_layers, v.image_size // v.patch_size)
    model.bridgetower.vision_model.visual.load_state_dict(state, strict=True)


def init_text_from(model: BridgeTowerForPretraining, source: str) -> None:
    """Text tower ← RoBERTa (RobertaModel or RobertaForMaskedLM checkpoint; `roberta.` prefix handled)."""
    from transformers import RobertaModel

    t = model.cfg.text
    rob = RobertaModel.from_pretrained(source, weights_only=True)
    c = rob.config
    _require_fit(f"RoBERTa model {source}", "model.text", (
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
    ))
    state = {k: v for k, v in rob.state_dict().items() if not k.endswith(BUFFER_SUFFIXES)}
    text_model = model.bridgetower.text_model
    missing, unexpected = text_model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.startswith("pooler.")]:  # the pooler is unused
        raise CheckpointError(f"RoBERTa {source}: missing {_short(missing)}, unexpected {_short(unexpected)}")


def build_model(cfg: ModelConfig) -> BridgeTowerForPretraining:
    """The pretraining model with `cfg`'s initialisation: a BridgeTower checkpoint, or CLIP/RoBERTa towers
    (each optional), on top of the fresh normal(0, 0.02) init."""
    if cfg.from_pretrained and (cfg.init_vision_from or cfg.init_text_from):
        raise ConfigError("set either model.from_pretrained or model.init_vision_from/init_text_from, not both")
    model = BridgeTowerForPretraining(cfg)
    if cfg.from_pretrained:
        load_pretrained(model, cfg.from_pretrained)
    if cfg.init_vision_from:
        init_vision_from(model, cfg.init_vision_from)
    if cfg.init_text_from:
        init_text_from(model, cfg.init_text_from)
    return model


# ------------------------------------------------------------------------------------ export


def _plain_state(model_or_state: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Unwrapped fp32 CPU tensors with transformers' names (no `module.` / `_orig_mod.` prefixes)."""
    if isinstance(model_or_state, nn.Module):
        model_or_state = model_or_state.state_dict()
    out = {}
    for k, v in model_or_state.items():
        k = k.replace("_orig_mod.", "").removeprefix("module.")
        v = v.detach().to("cpu")
        out[k] = (v.float() if v.is_floating_point() else v).contiguous().clone()
    return out


def preprocessor_config(cfg: ModelConfig) -> dict[str, Any]:
    """BridgeTowerImageProcessor settings equal to our transform: shorter side → S (bicubic), centre crop
    S×S, CLIP mean/std, no padding. (Its 1333/800 cap on the longer side only bites beyond 5:3 aspect.)"""
    s = cfg.vision.image_size
    return {
        "image_processor_type": "BridgeTowerImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": s},
        "size_divisor": 1,
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"shortest_edge": s},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "do_pad": False,
    }


def export_hf(
    model_or_state: nn.Module | Mapping[str, torch.Tensor],
    model_cfg: ModelConfig,
    out_dir: str | os.PathLike,
    tokenizer: Any = None,
    overwrite: bool = False,
) -> Path:
    """Write a transformers checkpoint dir that BridgeTowerForMaskedLM and BridgeTowerForImageAndTextRetrieval
    load with no missing keys: config.json, model.safetensors, preprocessor_config.json, and the tokenizer
    (a name/path for AutoTokenizer, or an object with save_pretrained) when given.

    Written into a temporary sibling directory and renamed at the end: never a half-written `out_dir`."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise CheckpointError(f"{out} exists and is not empty (pass overwrite to replace it)")
    state = _plain_state(model_or_state)
    with torch.device("meta"):
        expected = BridgeTowerForPretraining(model_cfg).state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise CheckpointError(
            f"weights do not match the model config: missing [{_short(missing)}], unexpected [{_short(unexpected)}]"
        )

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        to_hf_config(model_cfg).save_pretrained(str(tmp))
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(model_cfg), indent=2) + "\n")
        if tokenizer is not None:
            if isinstance(tokenizer, (str, os.PathLike)):
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
            tokenizer.save_pretrained(str(tmp))
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def resolve_checkpoint_dir(path: str | os.PathLike) -> Path:
    """A checkpoint dir (holds model.safetensors), a checkpoints dir or a run dir (→ its `latest`)."""
    p = Path(path)
    if (p / "model.safetensors").is_file():
        return p
    for root in (p / "checkpoints", p):
        latest = root / "latest"
        if latest.is_file():
            try:
                ckpt = root / checkpoint_tag(latest.read_text(), latest)  # never follows `..` or an absolute path
            except PathError as exc:
                raise CheckpointError(str(exc)) from None
            if (ckpt / "model.safetensors").is_file():
                return ckpt
            raise CheckpointError(f"{latest} names {ckpt}, which has no model.safetensors")
    raise CheckpointError(f"no checkpoint at {p} (expected model.safetensors or checkpoints/latest)")


def export_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """`gaudi-pretrain export-hf CHECKPOINT OUT`: a training checkpoint (or run dir) → transformers dir.

    Reads `<ckpt>/model.safetensors` and `<ckpt>/config.yaml`; the tokenizer named by `data.tokenizer` is
    saved alongside when it can be loaded (a warning, not an error, when it cannot: e.g. offline Hub name)."""
    from safetensors.torch import load_file

    from gaudi_pretrain.config import read_yaml, validate_config

    ckpt = resolve_checkpoint_dir(checkpoint)
    if not (ckpt / "config.yaml").is_file():
        raise CheckpointError(f"{ckpt} has no config.yaml")
    cfg = validate_config(read_yaml(ckpt / "config.yaml"))
    tokenizer = None
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(cfg.data.tokenizer)
    except Exception as exc:
        warnings.warn(f"tokenizer '{cfg.data.tokenizer}' not exported: {type(exc).__name__}", stacklevel=2)
    return export_hf(load_file(str(ckpt / "model.safetensors")), cfg.model, out_dir, tokenizer, overwrite)
