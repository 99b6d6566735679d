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
DeepSpeed steps the scheduler once per optimizer step. Both schedules count steps of the global batch the
run started with: after a resume with another `train.global_batch_size` each optimizer step advances them
by new / original batch (`set_units_per_step`), so the schedule continues by samples seen.

A non-finite step must change nothing (weights, moments, step counts, the schedule) on every rank, and the
loop must not read the device to decide it (a host read drains HPU lazy mode's queue every step).
`GuardedAdamW` and `DeviceSchedule` take the decision as a device tensor (`found_inf`, the attribute
torch's fused AdamW honours for GradScaler) and cancel the step on the device. Habana's FusedAdamW keeps
its step count and lr on the host, so with it (gaudi_config `use_fused_adam`) the loop decides on the host
and the schedule is a plain LambdaLR.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from gaudi_pretrain.config import OptimConfig
from gaudi_pretrain.utils import unwrapped_name

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


def is_no_decay(name: str, norm_params: set[str] = frozenset()) -> bool:
    return name in norm_params or any(key in name for key in NO_DECAY_NAMES)


def is_lr_multiplied(name: str) -> bool:
    return any(key in name for key in CROSS_MODAL_NAMES + HEAD_NAMES)


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    """AdamW parameter groups with BridgeTower's weight-decay exemptions and lr multipliers."""
    norm_params = {unwrapped_name(n) for n in _norm_parameter_names(model)}
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
        name = unwrapped_name(raw_name)
        key = "no_decay" if is_no_decay(name, norm_params) else "decay"
        if is_lr_multiplied(name):
            key += "_mult"
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    return [group for group in groups.values() if group["params"]]


def schedule_factor(step: float, warmup: int, max_steps: int, end: float) -> float:
    """lr factor at `step`: 0 at step 0, 1 at the end of warm-up, `end` at and after `max_steps`."""
    if step < warmup:
        return step / max(1, warmup)
    if step >= max_steps:
        return end
    progress = (step - warmup) / max(1, max_steps - warmup)
    return end + (1.0 - end) * (1.0 - progress)


def lr_lambda(cfg: OptimConfig, max_steps: int) -> Callable[[float], float]:
    """step -> lr factor, warm-up over `warmup_ratio * max_steps`, decay to `end_lr_ratio` at `max_steps`."""
    warmup = int(cfg.warmup_ratio * max_steps)
    return lambda step: schedule_factor(step, warmup, max_steps, cfg.end_lr_ratio)


class ScheduleClock:
    """LambdaLR's lambda: scheduler steps → schedule steps, `units_per_step` of them per step since
    `base_step`. A callable object, so LambdaLR's state_dict carries its `STATE` (`HostSchedule`); the
    warm-up and length come from the config of the run that loads it (a resume may extend max_steps)."""

    STATE = ("base_step", "base_units", "units_per_step")

    def __init__(self, cfg: OptimConfig, max_steps: int):
        self.warmup, self.max_steps, self.end = int(cfg.warmup_ratio * max_steps), max_steps, cfg.end_lr_ratio
        self.base_step, self.base_units, self.units_per_step = 0, 0.0, 1.0

    def units(self, step: int) -> float:
        return self.base_units + (step - self.base_step) * self.units_per_step

    def __call__(self, step: int) -> float:
        return schedule_factor(self.units(step), self.warmup, self.max_steps, self.end)


class HostSchedule(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR over `ScheduleClock`s whose saved state is the clocks' position only."""

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["lr_lambdas"] = [{k: clock[k] for k in ScheduleClock.STATE} for clock in state["lr_lambdas"]]
        return state


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int) -> Any:
    """The schedule over every group (each group's own lr, multiplier included, is the 1.0 point): on the
    device for an optimizer that skips on the device, else a torch LambdaLR."""
    if getattr(optimizer, "supports_device_skip", False):
        return DeviceSchedule(optimizer, cfg, max_steps)
    return HostSchedule(optimizer, ScheduleClock(cfg, max_steps))


def set_units_per_step(scheduler: Any, units: float) -> None:
    """From now on each optimizer step advances `scheduler` (made by `make_scheduler`) by `units` of its
    steps: new global batch / the one `train.max_steps` counts."""
    if isinstance(scheduler, DeviceSchedule):
        scheduler.rebase(units)
        return
    step = scheduler.last_epoch
    for clock in scheduler.lr_lambdas:
        clock.base_units, clock.base_step, clock.units_per_step = clock.units(step), step, units
    lrs = [base * clock(step) for base, clock in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs


class GuardedAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias correction; torch.optim.AdamW's arithmetic) whose step a device
    flag cancels: set `found_inf` (a 0-dim tensor, 1 = skip) before `step()` and a skipped step leaves every
    parameter, moment and step count as it was, NaN gradients included, without a host read. Learning rates
    may be device tensors (`DeviceSchedule`). State per parameter as torch's AdamW (`step`, `exp_avg`,
    `exp_avg_sq`), so DeepSpeed's ZeRO wrappers and checkpoint tools see the usual layout."""

    supports_device_skip = True

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.found_inf: torch.Tensor | None = None

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> None:
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._update(group, params)

    def _update(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        beta1, beta2 = group["betas"]
        device = params[0].device
        keep = torch.ones((), device=device) if self.found_inf is None else 1.0 - self.found_inf.to(device).float()
        grads, exp_avg, exp_avg_sq, steps = [], [], [], []
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            # a skipped step's NaN / inf gradients never enter the arithmetic (0 * NaN is NaN)
            grads.append(p.grad if self.found_inf is None else torch.where(keep > 0, p.grad, 0.0))
            exp_avg.append(state["exp_avg"])
            exp_avg_sq.append(state["exp_avg_sq"])
            steps.append(state["step"])
        n = len(params)

        def each(t: torch.Tensor) -> list[torch.Tensor]:  # the List overloads: a 0-dim Tensor scalar may be read
            return [t] * n  # on the host by the Tensor-scalar overloads (seen on CPU for _foreach_add_)

        lr = keep * group["lr"]  # 0 on a skipped step, and every update below is proportional to it
        torch._foreach_add_(steps, each(keep))
        torch._foreach_mul_(params, each(1.0 - lr * group["weight_decay"]))
        delta = torch._foreach_sub(grads, exp_avg)  # m += (1 - b1) * keep * (g - m)
        torch._foreach_mul_(delta, each((1.0 - beta1) * keep))
        torch._foreach_add_(exp_avg, delta)
        torch._foreach_mul_(exp_avg_sq, each(1.0 - (1.0 - beta2) * keep))  # v = v (1 - w) + w g^2, w = (1 - b2) keep
        squares = torch._foreach_mul(grads, grads)
        torch._foreach_mul_(squares, each((1.0 - beta2) * keep))
        torch._foreach_add_(exp_avg_sq, squares)
        # From here torch's capturable AdamW arithmetic, with step counts clamped to >= 1 (a skip at step 0)
        counted = torch._foreach_clamp_min(steps, 1.0)
        neg_step_size = torch._foreach_pow(beta1, counted)
        torch._foreach_sub_(neg_step_size, 1.0)
        torch._foreach_div_(neg_step_size, each(lr))  # (b1^t - 1) / lr: -inf when lr is 0
        torch._foreach_reciprocal_(neg_step_size)  # -lr / (1 - b1^t), -0 when skipped
        bias2 = torch._foreach_pow(beta2, counted)
        torch._foreach_sub_(bias2, 1.0)
        torch._foreach_neg_(bias2)
        torch._foreach_sqrt_(bias2)
        denom = torch._foreach_sqrt(exp_avg_sq)
        torch._foreach_div_(denom, bias2)
        torch._foreach_add_(denom, group["eps"])
        torch._foreach_div_(denom, neg_step_size)
        torch._foreach_addcdiv_(params, exp_avg, denom)  # p - lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps)


class DeviceSchedule:
    """`lr_lambda`'s schedule kept on the device: group lr = base lr x factor(applied steps), where a step
    with the optimizer's `found_inf` set does not count. DeepSpeed calls `step()` once per optimizer step
    and saves / loads `state_dict()` (the only host read, at checkpoint time)."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int):
        self.optimizer = optimizer
        self.base_lrs = [float(group["lr"]) for group in optimizer.param_groups]
        self.warmup, self.max_steps, self.end = int(cfg.warmup_ratio * max_steps), max_steps, cfg.end_lr_ratio
        device = next(p.device for group in optimizer.param_groups for p in group["params"])
        # schedule steps = base + counted x units_per_step: the applied optimizer steps are counted exactly
        # (float32 integers) and scaled once, so a fractional rate does not accumulate rounding over a run
        self.base = torch.zeros((), dtype=torch.float32, device=device)
        self.counted = torch.zeros((), dtype=torch.float32, device=device)
        self.units_per_step = 1.0
        self._set_lrs()

    def units(self) -> torch.Tensor:
        return self.base + self.counted * self.units_per_step

    def rebase(self, units_per_step: float) -> None:
        """From here on `units_per_step` schedule steps per applied optimizer step."""
        self.base, self.units_per_step = self.units(), units_per_step
        self.counted.zero_()

    def factor(self) -> torch.Tensor:
        a, warmup, end = self.units(), self.warmup, self.end
        decay = end + (1.0 - end) * (1.0 - (a - warmup) / max(1, self.max_steps - warmup))
        f = torch.where(a < warmup, a / max(1, warmup), decay)
        return torch.where(a >= self.max_steps, torch.full_like(a, end), f)

    def _set_lrs(self) -> None:
        f = self.factor()
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = f * base

    def step(self, *args: Any, **kwargs: Any) -> None:
        found_inf = getattr(self.optimizer, "found_inf", None)
        self.counted += 1.0 if found_inf is None else 1.0 - found_inf.to(self.counted.device).float()
        self._set_lrs()

    def get_last_lr(self) -> list[torch.Tensor]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"applied_steps": float(self.units())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base.fill_(float(state["applied_steps"]))
        self.counted.zero_()
        self._set_lrs()
