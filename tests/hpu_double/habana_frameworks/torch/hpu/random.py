"""habana_frameworks.torch.hpu.random (gaudi-pytorch-bridge v1.19.0 hpu/random.py `__all__`): the device
generator's state, seeding. The state lives in _hpu_double.STATE["rng"]."""

import torch
from _hpu_double import STATE, record, record_import

record_import(__name__)


def get_rng_state(device="hpu") -> torch.Tensor:
    record("get_rng_state")
    return STATE["rng"].clone()


def set_rng_state(new_state: torch.Tensor, device="hpu") -> None:
    record("set_rng_state", new_state.dtype, tuple(new_state.shape))
    STATE["rng"] = new_state.clone()


def manual_seed(seed: int):
    record("manual_seed", int(seed))
    STATE["seed"] = int(seed)


def manual_seed_all(seed: int) -> None:
    manual_seed(seed)


def seed() -> None:
    record("seed")


def initial_seed() -> int:
    return STATE.get("seed", 0)
