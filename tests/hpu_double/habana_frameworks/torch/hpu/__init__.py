"""habana_frameworks.torch.hpu: device queries, memory figures and synchronize (gaudi-pytorch-bridge v1.19.0
python_packages/habana_frameworks/torch/hpu/__init__.py and memory.py; the random functions are
re-exported here, as the real module does with `from .random import *`). Answers come from
_hpu_double.STATE; synchronize is recorded (a host wait for the device queue)."""

from _hpu_double import STATE, caller, record, record_import

record_import(__name__)

HLS_MODULE_ID_VAR = "HLS_MODULE_ID"
HABANA_VISIBLE_MODULES_VAR = "HABANA_VISIBLE_MODULES"

from habana_frameworks.torch.hpu.random import (  # noqa: E402,F401
    get_rng_state,
    initial_seed,
    manual_seed,
    manual_seed_all,
    seed,
    set_rng_state,
)


def is_available() -> bool:
    return bool(STATE["available"])


def device_count() -> int:
    return 8 if STATE["available"] else 0


def current_device() -> int:
    return 0


def get_device_name(device=None) -> str:
    return STATE["device_name"] if STATE["available"] else ""


def max_memory_allocated(device=None) -> int:
    return int(STATE["max_memory"])


def memory_stats(device=None) -> dict:
    return {"MaxInUse": int(STATE["max_memory"])}


def reset_peak_memory_stats(device=None) -> None:
    record("reset_peak_memory_stats")


def synchronize() -> None:
    who, fn = caller()
    record("synchronize", who, fn)
