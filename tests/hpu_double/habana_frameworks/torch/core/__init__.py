"""htcore: `mark_step` (lazy mode: cut and run the accumulated graph; eager mode: a no-op, decided at
import by @lazy_only: gaudi-pytorch-bridge v1.19.0 torch/core/step_closure.py), and the "hpu_backend"
torch.compile backend, registered on import (torch/dynamo/compile_backend/backends.py). The double's
backend compiles nothing (it hands the graph back to run eagerly) and counts the graphs it is given."""

import torch
from _hpu_double import STATE, caller, record, record_import

from habana_frameworks.torch.utils.internal import is_lazy, lazy_only

record_import(__name__)


@lazy_only
def mark_step(device_str="", sync=False):
    who, fn = caller()
    record("mark_step", who, fn)


class step_closure:  # noqa: N801 - the real one is a module; hpex optimizers call this
    @staticmethod
    def _mark_step_if_lazy():
        if is_lazy():
            mark_step()


def hpu_backend(graph_module, example_inputs, **kwargs):
    STATE["compiles"] += 1
    record("hpu_backend_compile", len(list(graph_module.graph.nodes)))
    return graph_module.forward


if "hpu_backend" not in torch._dynamo.list_backends(exclude_tags=()):  # tests re-import the double
    torch._dynamo.register_backend(hpu_backend, name="hpu_backend")
