"""Fake FusedAdamW: records its constructor arguments and steps; torch's AdamW does the math.
Signature and defaults follow the documented one: FusedAdamW(params, lr=1e-3, betas=(0.9, 0.999),
eps=1e-6, weight_decay=0.0)."""
import torch

from hpu_recorder import record, record_import

record_import(__name__)


class FusedAdamW(torch.optim.AdamW):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0):
        record("FusedAdamW", {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    def step(self, closure=None):
        record("FusedAdamW.step")
        return super().step(closure)
