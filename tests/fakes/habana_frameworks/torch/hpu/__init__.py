"""Fake habana_frameworks.torch.hpu: availability, memory and device queries from hpu_recorder.STATE."""
from hpu_recorder import STATE, record, record_import

record_import(__name__)


def is_available() -> bool:
    return bool(STATE["available"])


def device_count() -> int:
    return 8 if STATE["available"] else 0


def get_device_name() -> str:
    return STATE["device_name"]


def max_memory_allocated() -> int:
    return int(STATE["max_memory"])


def synchronize() -> None:
    record("synchronize")


def manual_seed(seed: int) -> None:
    record("manual_seed", seed)


def wrap_in_hpu_graph(module):
    record("wrap_in_hpu_graph")
    return module
