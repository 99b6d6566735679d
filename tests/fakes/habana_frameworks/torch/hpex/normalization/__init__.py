"""Fake FusedClipNorm(parameters, max_norm).clip_norm(parameters): records, clips with torch."""
import torch

from hpu_recorder import record, record_import

record_import(__name__)


class FusedClipNorm:
    def __init__(self, parameters, max_norm):
        self.max_norm = float(max_norm)
        record("FusedClipNorm", self.max_norm)

    def clip_norm(self, parameters):
        record("FusedClipNorm.clip_norm", self.max_norm)
        return torch.nn.utils.clip_grad_norm_(list(parameters), self.max_norm)
