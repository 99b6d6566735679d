"""Regions that compute in float32 whatever autocast is active.

Autocast's op lists differ between devices: CUDA and CPU keep layer_norm, softmax and log_softmax in fp32,
while Gaudi's default bf16 list includes layer_norm, softmax, log_softmax, mean and mul (docs.habana.ai
"Mixed Precision Training with PyTorch Autocast"). LayerNorm statistics, the eager attention softmax and
the losses therefore run with autocast off for their device, on fp32 inputs, on every backend alike.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch


def fp32_region(x: torch.Tensor) -> AbstractContextManager[None]:
    """Autocast off for `x`'s device: what runs inside computes in the dtypes it is given."""
    return torch.autocast(device_type=x.device.type, enabled=False)
