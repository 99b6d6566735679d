"""transformers' BridgeTower format, both ways: config mapping, checkpoint import, export.

Our parameter names ARE transformers' names, so import and export move state dicts without a key map.
transformers is imported lazily (it is slow to import) and only through stable public classes, so 4.55.x
and 5.x both work. Import rules (`load_state_dict_into`): every backbone weight must be present with the
right shape; a head the source lacks keeps its fresh init; a tied MLM decoder is untied; ITC heads our
config does not use and stale buffers are ignored; anything else unexpected is an error. Weight files are
read with safetensors or torch.load(weights_only=True), nothing else.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gaudi_pretrain.config import ModelConfig
from gaudi_pretrain.errors import CheckpointError
from gaudi_pretrain.model.bridgetower import DROPOUT
from gaudi_pretrain.model.pretraining import LOGIT_SCALE_INIT, BridgeTowerForPretraining
from gaudi_pretrain.utils import unwrapped_name

ARCHITECTURES = ["BridgeTowerForMaskedLM", "BridgeTowerForImageAndTextRetrieval"]
HEAD_PREFIXES = ("mlm_score.", "itm_score.", "itc_text_head.", "itc_image_head.", "itc_cross_modal_head.")
ITC_KEYS = ("itc_text_head.", "itc_image_head.", "itc_cross_modal_head.", "logit_scale")
BUFFER_SUFFIXES = (".position_ids", ".token_type_ids")  # persistent buffers in old transformers checkpoints
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


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
    text_keys = (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "max_position_embeddings",
        "layer_norm_eps",
        "pad_token_id",
        "bos_token_id",
        "eos_token_id",
    )
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

    for index_name, loader in (
        ("model.safetensors.index.json", load_file),
        ("pytorch_model.bin.index.json", _torch_load),
    ):
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


def short_list(keys: list[str], n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def load_state_dict_into(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> LoadReport:
    """Copy `state` (transformers names) into `model` under the rules in the module docstring."""
    ours = model.state_dict()
    report = LoadReport()
    keep: dict[str, torch.Tensor] = {}
    unexpected = []
    for k, v in state.items():
        k = unwrapped_name(k)
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
            f"{source} does not match the model: missing keys [{short_list(fatal_missing)}], "
            f"unexpected keys [{short_list(unexpected)}]"
        )
    bad_shapes = [
        f"{k} {tuple(v.shape)} vs {tuple(ours[k].shape)}" for k, v in keep.items() if v.shape != ours[k].shape
    ]
    if bad_shapes:
        raise CheckpointError(f"{source} has weights of the wrong shape: {short_list(bad_shapes, 4)}")
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
            raise CheckpointError(f"{source} is a different architecture than model config: {short_list(diff, 4)}")
    report = load_state_dict_into(model, read_state_dict(d), str(source))
    if report.fresh:
        warnings.warn(
            f"{source}: heads initialised fresh (not in the checkpoint): {short_list(report.fresh)}", stacklevel=2
        )
    return report


def model_config_from_pretrained(source: str | os.PathLike, **overrides: Any) -> ModelConfig:
    """ModelConfig read from a BridgeTower checkpoint's config.json (with `from_pretrained` set to it)."""
    d = _resolve_dir(source)
    if not (d / "config.json").is_file():
        raise CheckpointError(f"no config.json in {d}")
    return from_hf_config(json.loads((d / "config.json").read_text()), from_pretrained=str(source), **overrides)


# ------------------------------------------------------------------------------------ export


def _plain_state(model_or_state: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Unwrapped fp32 CPU tensors with transformers' names (no `module.` / `_orig_mod.` prefixes)."""
    if isinstance(model_or_state, nn.Module):
        model_or_state = model_or_state.state_dict()
    out = {}
    for k, v in model_or_state.items():
        k = unwrapped_name(k)
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
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Write a transformers checkpoint dir that BridgeTowerForMaskedLM and BridgeTowerForImageAndTextRetrieval
    load with no missing keys: config.json, model.safetensors, preprocessor_config.json, and the tokenizer
    (a name/path for AutoTokenizer, or an object with save_pretrained) when given.

    `provenance` (how the weights were trained: precision, which copy, step) goes into config.json under
    `gaudi_pretrain`; transformers keeps it as a config attribute. Written into a temporary sibling
    directory and renamed at the end: never a half-written `out_dir`."""
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
            f"weights do not match the model config: missing [{short_list(missing)}], unexpected [{short_list(unexpected)}]"
        )

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        hf_cfg = to_hf_config(model_cfg)
        if provenance:
            hf_cfg.gaudi_pretrain = dict(provenance)
        hf_cfg.save_pretrained(str(tmp))
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
