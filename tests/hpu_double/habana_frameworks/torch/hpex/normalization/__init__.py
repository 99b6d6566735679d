"""FusedClipNorm(parameters, max_norm).clip_norm(parameters): a plain class; clips the gradients in place to
a global L2 norm and returns the norm before clipping (gaudi-pytorch-bridge v1.19.0
hpex/normalization/FusedClipNorm.py). The double computes it with torch."""

import torch
from _hpu_double import record, record_import

record_import(__name__)


class FusedClipNorm:
    def __init__(self, parameters, max_norm):
        self.max_norm = float(max_norm)
        record("FusedClipNorm", self.max_norm)

    def clip_norm(self, parameters):
        record("FusedClipNorm.clip_norm", self.max_norm)
        params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
        return torch.nn.utils.clip_grad_norm_(params, self.max_norm)
