"""The backend seam on this machine (CPU), selection rules, and the line that keeps devices behind it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from gaudi_pretrain.config import BackendConfig, OptimConfig
from gaudi_pretrain.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def clean_env():
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def test_device_code_lives_only_in_backends():
    """`torch.cuda` and `habana_frameworks` appear nowhere in the package outside gaudi_pretrain/backends/."""
    pattern = re.compile(r"torch\.cuda|habana_frameworks|\.cuda\(")
    offenders = []
    for path in sorted((REPO / "gaudi_pretrain").rglob("*.py")):
        if "backends" in path.relative_to(REPO / "gaudi_pretrain").parts:
            continue
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{lineno}: {line.strip()}")
    assert not offenders, "device code outside the backend seam:\n" + "\n".join(offenders)


def test_importing_backends_imports_no_device_library():
    code = (
        "import sys, gaudi_pretrain.backends, gaudi_pretrain.distributed, gaudi_pretrain.train.optim; "
        "print(any(m.startswith('habana_frameworks') for m in sys.modules), 'deepspeed' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.stdout.split() == ["False", "False"], out.stderr


def test_auto_is_cpu_here_and_explicit_devices_are_checked(clean_env):
    from gaudi_pretrain.backends import select_backend

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert select_backend(BackendConfig(name="auto")).name == "cpu"
    with pytest.raises(ConfigError, match="habana_frameworks is not installed"):
        select_backend(BackendConfig(name="hpu"))
    with pytest.raises(ConfigError, match="cuda"):
        select_backend(BackendConfig(name="cuda"))


def test_cpu_backend_surface(clean_env):
    from gaudi_pretrain.backends import select_backend

    threads = torch.get_num_threads()
    try:
        _check_cpu_backend(select_backend)
    finally:
        torch.set_num_threads(threads)


def _check_cpu_backend(select_backend):

    backend = select_backend(BackendConfig(name="cpu", cpu_threads=1), precision="fp32")
    backend.prepare_environment()
    assert os.environ["DS_ACCELERATOR"] == "cpu" and os.environ["OMP_NUM_THREADS"] == "1"
    assert torch.get_num_threads() == 1
    assert backend.device == torch.device("cpu") and backend.dist_backend == "gloo"
    assert backend.attention_fn() is None and backend.graph_compile_count() is None
    assert backend.peak_flops() is None and backend.clips_gradients is True  # fp32, ZeRO 0
    assert backend.memory_stats() > 10 * 2**20  # peak RSS of a process holding torch
    with backend.autocast():
        assert not torch.is_autocast_enabled("cpu")
    model = nn.Linear(4, 2)
    assert backend.compile(model) is model
    opt = backend.make_optimizer(model.parameters(), OptimConfig(lr=2e-4, eps=1e-8, betas=(0.9, 0.98)))
    from gaudi_pretrain.train.optim import GuardedAdamW

    assert type(opt) is GuardedAdamW  # skips a non-finite step on the device
    assert opt.defaults["eps"] == 1e-8 and opt.defaults["betas"] == (0.9, 0.98) and opt.defaults["lr"] == 2e-4
    opt = backend.make_optimizer(model.parameters(), OptimConfig(), lr=1.0, weight_decay=0.5)
    assert opt.defaults["lr"] == 1.0 and opt.defaults["weight_decay"] == 0.5
    model(torch.randn(3, 4)).sum().mul(100).backward()
    backend.after_backward()
    before = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])))
    norm = backend.clip_grad_norm(model.parameters(), 0.5)
    backend.after_optimizer_step()
    assert before > 0.5 and float(norm) == pytest.approx(before, rel=1e-6)  # the norm before clipping
    total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert total.item() == pytest.approx(0.5, rel=1e-4)
    backend.set_seed(5)
    a = torch.rand(2)
    backend.set_seed(5)
    assert torch.equal(a, torch.rand(2))
    backend.synchronize()
    assert backend.describe()["backend"] == "cpu"


def test_cpu_bf16_autocast_and_compile_switch(clean_env, monkeypatch):
    from gaudi_pretrain.backends import select_backend

    backend = select_backend(BackendConfig(name="cpu", compile=True), precision="bf16")
    with backend.autocast():
        assert torch.is_autocast_enabled("cpu")
        assert nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.bfloat16
    calls = []
    monkeypatch.setattr(torch, "compile", lambda m, **kw: calls.append(kw) or m)
    backend.compile(nn.Linear(2, 2))
    assert calls == [{}]


def test_cuda_peak_flops_table():
    from gaudi_pretrain.backends.cuda import cuda_peak_flops

    assert cuda_peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert cuda_peak_flops("NVIDIA H100 PCIe", "bf16") == 756e12
    assert cuda_peak_flops("NVIDIA A100-SXM4-80GB", "fp32") == 19.5e12
    assert cuda_peak_flops("Some Future GPU", "bf16") is None
