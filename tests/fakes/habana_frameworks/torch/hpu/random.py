"""Fake habana_frameworks.torch.hpu.random: the device generator's state, kept in hpu_recorder.STATE."""
import torch

from hpu_recorder import STATE, record, record_import

record_import(__name__)


def get_rng_state() -> torch.Tensor:
    record("get_rng_state")
    return STATE["rng"].clone()


def set_rng_state(state: torch.Tensor) -> None:
    record("set_rng_state", state.dtype, tuple(state.shape))
    STATE["rng"] = state.clone()
