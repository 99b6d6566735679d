"""State of the habana_frameworks test double: its event log, its knobs, and the device tracking mode.

Kept outside the fake `habana_frameworks` package so that reading it never imports the bridge. Events are
tuples (kind, ...); with HPU_DOUBLE_LOG=<dir> each process also appends them as JSON lines to
<dir>/events-<pid>.jsonl (with its RANK), so tests can read what subprocesses and launcher ranks did.

The device: a CPU build of torch cannot hold tensors on "hpu", so where the double is asked to stand in for
the device (HPU_DOUBLE_TRACK=1, set together with GAUDI_PRETRAIN_HPU_DEVICE=cpu for the backend) the
tensors stay on the CPU and `DeviceTracker`, a TorchDispatchMode pushed when the bridge is imported, stands
in for what the real device would do with our code:
* every `aten._local_scalar_dense` (`.item()`, `bool(t)`, `float(t)`: a device->host read, which drains the
  lazy-mode queue) is recorded with who asked for it (gaudi_pretrain, deepspeed or other) and the function;
* float64 tensors made by gaudi_pretrain code raise (Gaudi has no FP64 compute; the bridge silently computes
  double as float32: docs.habana.ai "PyTorch Support Matrix", Float64 = No; gaudi-pytorch-bridge v1.19.0
  habana_kernels/kernel_utils.cpp getInternalDtype), DeepSpeed's are recorded (its ZeRO norms use .double());
* 64-bit all-reduces from gaudi_pretrain code raise (HCCL reduces fp32/bf16 only; the PyTorch process
  group casts other dtypes to float32 and back, so int64 sums above 2**24 come back wrong:
  gaudi-pytorch-bridge v1.19.0 distributed/hccl/process_group_hccl_base.cpp allreduce);
* under autocast, the ops of Habana's default bf16 list that CPU autocast would leave in fp32 (layer_norm,
  softmax, log_softmax, mean, mul: docs.habana.ai "Mixed Precision Training with PyTorch Autocast",
  default lists; hpu_ops/autocast_helpers.h default_lower_ops) get bf16 inputs, as they would on Gaudi
  (a TorchFunctionMode `HpuAutocast`: below it, in dispatch, the autocast state is no longer visible).
"""

from __future__ import annotations

import json
import os
import traceback

EVENTS: list[tuple] = []
STATE: dict = {}
_LOG_FILE = None


def reset() -> None:
    import torch

    EVENTS.clear()
    STATE.clear()
    STATE.update(
        available=True, device_name="GAUDI2", compiles=0, max_memory=123456, rng=torch.arange(16, dtype=torch.uint8)
    )


def record(*event) -> None:
    EVENTS.append(tuple(event))
    path = os.environ.get("HPU_DOUBLE_LOG")
    if path:
        global _LOG_FILE
        if _LOG_FILE is None:
            os.makedirs(path, exist_ok=True)
            _LOG_FILE = open(os.path.join(path, f"events-{os.getpid()}.jsonl"), "a", buffering=1)
        _LOG_FILE.write(json.dumps({"rank": os.environ.get("RANK"), "event": [str(e) for e in event]}) + "\n")


def record_import(module_name: str) -> None:
    """Every fake module logs its import together with PT_HPU_LAZY_MODE as it was at that moment."""
    record("import", module_name, os.environ.get("PT_HPU_LAZY_MODE"))


def names(kind: str | None = None) -> list:
    """Event kinds in order (or, with `kind`, the full events of that kind)."""
    if kind is None:
        return [e[0] for e in EVENTS]
    return [e for e in EVENTS if e[0] == kind]


def caller() -> tuple[str, str]:
    """(who, function): the innermost frame of gaudi_pretrain or deepspeed code on the stack."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        path = frame.filename.replace(os.sep, "/")
        for who in ("gaudi_pretrain", "deepspeed"):
            if f"/{who}/" in path:
                return who, frame.name
    return "other", ""


def our_stack_functions() -> list[str]:
    """Names of the gaudi_pretrain functions on the stack, outermost first."""
    return [f.name for f in traceback.extract_stack() if "/gaudi_pretrain/" in f.filename.replace(os.sep, "/")]


def _lower_precision_functions():
    """Habana's default bf16 ("lower precision") autocast ops that CPU autocast does not already run in
    bf16, as the torch functions that reach them."""
    import torch
    import torch.nn.functional as F

    return {
        F.layer_norm: "layer_norm",
        torch.layer_norm: "layer_norm",
        F.softmax: "softmax",
        torch.softmax: "softmax",
        torch.Tensor.softmax: "softmax",
        F.log_softmax: "log_softmax",
        torch.log_softmax: "log_softmax",
        torch.Tensor.log_softmax: "log_softmax",
        torch.mean: "mean",
        torch.Tensor.mean: "mean",
        torch.mul: "mul",
        torch.Tensor.mul: "mul",
        torch.Tensor.__mul__: "mul",
    }


def _make_modes():
    import torch
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    lower = _lower_precision_functions()

    def to_bf16(a):
        return a.to(torch.bfloat16) if isinstance(a, torch.Tensor) and a.dtype == torch.float32 else a

    class HpuAutocast(TorchFunctionMode):
        """At the torch-function level, where the autocast state is the caller's."""

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = lower.get(func)
            if (
                name
                and torch.is_autocast_enabled("cpu")
                and any(isinstance(a, torch.Tensor) and a.dtype == torch.float32 for a in args)
            ):
                args = tuple(to_bf16(a) for a in args)
                kwargs = {k: to_bf16(v) for k, v in kwargs.items()}
                record("autocast_bf16", name, "/".join(our_stack_functions()[-2:]))
            return func(*args, **kwargs)

    class DeviceTracker(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = func.overloadpacket.__name__
            if name == "_local_scalar_dense":
                who, fn = caller()
                record("host_sync", who, fn, "/".join(our_stack_functions()))
            if name in ("allreduce_", "reduce_", "reduce_scatter_", "_reduce_scatter_base_"):
                tensors = [
                    t for a in args for t in (a if isinstance(a, (list, tuple)) else [a]) if isinstance(t, torch.Tensor)
                ]
                wide = [t.dtype for t in tensors if t.dtype in (torch.float64, torch.int64)]
                if wide:
                    who, fn = caller()
                    record("wide_collective", who, fn, str(wide[0]))
                    if who == "gaudi_pretrain":
                        raise RuntimeError(f"hccl reduces no {wide[0]} (it would come back through float32): {fn}")
            out = func(*args, **kwargs)
            if isinstance(out, torch.Tensor) and out.dtype == torch.float64:
                who, fn = caller()
                record("float64", who, fn, name)
                if who == "gaudi_pretrain":
                    raise RuntimeError(f"float64 tensor on the HPU (Gaudi has no FP64): {name} in {fn}")
            return out

    return HpuAutocast(), DeviceTracker()


def start_tracking() -> None:
    """Push the tracking modes for the rest of this process (once)."""
    if STATE.get("tracker") is None and os.environ.get("HPU_DOUBLE_TRACK") == "1":
        modes = _make_modes()
        for mode in modes:
            mode.__enter__()
        STATE["tracker"] = modes


def stop_tracking() -> None:
    for mode in reversed(STATE.pop("tracker", None) or ()):
        mode.__exit__(None, None, None)


reset()
