"""FusedAdamW as DeepSpeed sees it: a plain torch.optim.Optimizer subclass (not torch's AdamW, so not in
DeepSpeed's ZERO_SUPPORTED_OPTIMIZERS), modelled on gaudi-pytorch-bridge v1.19.0
hpex/optimizers/FusedAdamW.py:
* FusedAdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, bias_correction=True,
  moments_dtype=None); per-group defaults lr, betas, eps, weight_decay, bias_correction;
* each group keeps a Python step count (`group["step"]`) and the lr is a Python float used on the host
  (step size lr * sqrt(1 - b2^t) / (1 - b1^t), weight decay as the factor 1 - wd * lr), so a step cannot
  be cancelled on the device;
* `step()` calls mark_step (lazy mode) before each group and after the step.
The fused kernel's arithmetic is not published: the double applies the decay factor, then the Adam update
w += -step_size * m / (sqrt(v) + eps), and records each constructor call and step."""

import math

import torch
from _hpu_double import record, record_import
from torch.optim import Optimizer

from habana_frameworks.torch.core import step_closure

record_import(__name__)


class FusedAdamW(Optimizer):
    def __init__(
        self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, bias_correction=True, moments_dtype=None
    ):
        record("FusedAdamW", {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        super().__init__(
            params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, bias_correction=bias_correction)
        )
        self.moments_dtype = moments_dtype

    @torch.no_grad()
    def step(self, closure=None):
        record("FusedAdamW.step")
        for group in self.param_groups:
            step_closure._mark_step_if_lazy()
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            group["step"] = group.get("step", 0) + 1
            beta1, beta2 = group["betas"]
            step_size = group["lr"]
            if group["bias_correction"]:
                step_size *= math.sqrt(1.0 - beta2 ** group["step"]) / (1.0 - beta1 ** group["step"])
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=self.moments_dtype or p.dtype)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.moments_dtype or p.dtype)
                m, v, g = state["exp_avg"], state["exp_avg_sq"], p.grad
                p.mul_(1.0 - group["weight_decay"] * group["lr"])
                m.mul_(beta1).add_(g, alpha=1.0 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
                p.addcdiv_(m, v.sqrt().add_(group["eps"]), value=-step_size)
        step_closure._mark_step_if_lazy()
        return None
