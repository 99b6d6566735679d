"""AdamW parameter groups and the learning-rate schedule of BridgeTower pretraining.

Groups (microsoft/BridgeTower `set_schedule`, names matched as substrings of the parameter name):
- no weight decay: biases and normalisation parameters — the original's `bias`, `LayerNorm.*`, `norm.*`,
  `norm1.*`, `norm2.*`, plus every parameter owned by an nn.LayerNorm / GroupNorm / BatchNorm module,
  which covers CLIP's `ln_1`, `ln_2`, `ln_pre`, `ln_post` and the cross-modal `*_layernorm` (the original
  code decayed CLIP's ln_* weights because their names hold no "norm"; we do not), and `logit_scale`.
  Embeddings (word / position / class / token-type) keep weight decay, as in the original.
- lr x `lr_multiplier`: every parameter whose name contains `cross_modal`, and the heads (`mlm_score`,
  `itm_score`, `itc_text_head`, `itc_image_head`, `itc_cross_modal_head`, `logit_scale`).
Four groups: decay, no_decay, decay_mult, no_decay_mult (empty ones are dropped); each carries
`group_name` and `names` (parameter names) so the split is inspectable and testable.

Schedule: linear warm-up from 0 over `warmup_ratio * max_steps` steps, then linear decay to
`end_lr_ratio * lr` at `max_steps` (transformers' polynomial schedule with power 1, as the original).
`make_scheduler` returns a torch LambdaLR, which DeepSpeed steps once per optimizer step.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from gaudi_pretrain.config import OptimConfig

NO_DECAY_NAMES = (
    "bias",
    "LayerNorm.bias",
    "LayerNorm.weight",
    "norm.bias",
    "norm.weight",
    "norm1.bias",
    "norm1.weight",
    "norm2.bias",
    "norm2.weight",
    "logit_scale",
)
HEAD_NAMES = ("mlm_score", "itm_score", "itc_text_head", "itc_image_head", "itc_cross_modal_head", "logit_scale")
CROSS_MODAL_NAMES = ("cross_modal",)
_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


def _norm_parameter_names(model: nn.Module) -> set[str]:
    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, _NORM_TYPES) or type(module).__name__.endswith(("LayerNorm", "RMSNorm")):
            for param_name, _ in module.named_parameters(recurse=False):
                names.add(f"{module_name}.{param_name}" if module_name else param_name)
    return names


def _strip_wrappers(name: str) -> str:
    return name.replace("_orig_mod.", "").removeprefix("module.")


def is_no_decay(name: str, norm_params: set[str] = frozenset()) -> bool:
    return name in norm_params or any(key in name for key in NO_DECAY_NAMES)


def is_lr_multiplied(name: str) -> bool:
    return any(key in name for key in CROSS_MODAL_NAMES + HEAD_NAMES)


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    """AdamW parameter groups with BridgeTower's weight-decay exemptions and lr multipliers."""
    norm_params = {_strip_wrappers(n) for n in _norm_parameter_names(model)}
    groups: dict[str, dict[str, Any]] = {
        "decay": {"weight_decay": cfg.weight_decay, "lr": cfg.lr},
        "no_decay": {"weight_decay": 0.0, "lr": cfg.lr},
        "decay_mult": {"weight_decay": cfg.weight_decay, "lr": cfg.lr * cfg.lr_multiplier},
        "no_decay_mult": {"weight_decay": 0.0, "lr": cfg.lr * cfg.lr_multiplier},
    }
    for group_name, group in groups.items():
        group.update(group_name=group_name, params=[], names=[])
    for raw_name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        name = _strip_wrappers(raw_name)
        key = "no_decay" if is_no_decay(name, norm_params) else "decay"
        if is_lr_multiplied(name):
            key += "_mult"
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    return [group for group in groups.values() if group["params"]]


def lr_lambda(cfg: OptimConfig, max_steps: int) -> Callable[[int], float]:
    """step -> lr factor: 0 at step 0, 1 at the end of warm-up, `end_lr_ratio` at and after `max_steps`."""
    warmup = int(cfg.warmup_ratio * max_steps)
    end = cfg.end_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        if step >= max_steps:
            return end
        progress = (step - warmup) / max(1, max_steps - warmup)
        return end + (1.0 - end) * (1.0 - progress)

    return factor


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over every group (each group's own lr, multiplier included, is the 1.0 point)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, max_steps))
