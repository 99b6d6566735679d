"""habana_frameworks.torch.hpu.metrics: metric_global("graph_compilation").stats() -> [(name, value)]
(gaudi-pytorch-bridge v1.19.0 hpu/metrics/metrics.py: TotalNumber, TotalTime, AvgTime)."""

from _hpu_double import STATE, record_import

record_import(__name__)


class _Metric:
    def __init__(self, name: str):
        self._name = name

    def name(self) -> str:
        return self._name

    def stats(self):
        return [("TotalNumber", STATE["compiles"]), ("TotalTime", 10 * STATE["compiles"]), ("AvgTime", 10)]


def metric_global(name: str):
    return _Metric(name) if name in ("graph_compilation", "cpu_fallback", "memory_defragmentation") else None
