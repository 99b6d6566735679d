"""The HPU backend against a recording test double of habana_frameworks (tests/fakes/).

habana_frameworks cannot be installed off Gaudi hardware. These tests prove what the backend asks of the
documented API — import order against PT_HPU_LAZY_MODE, mark_step placement, FusedAdamW / FusedClipNorm /
FusedSDPA arguments, the hccl backend — not Gaudi numerics or speed.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from gaudi_pretrain.config import BackendConfig, OptimConfig
from gaudi_pretrain.errors import ConfigError

FAKES = Path(__file__).resolve().parent / "fakes"


def _purge_habana() -> None:
    for name in list(sys.modules):
        if name == "habana_frameworks" or name.startswith("habana_frameworks."):
            del sys.modules[name]


@pytest.fixture
def rec(monkeypatch):
    """Put the double on sys.path with an empty event log and a clean HPU environment; undo everything after."""
    saved_env = dict(os.environ)
    for var in [v for v in os.environ if v.startswith("PT_HPU_")] + ["DS_ACCELERATOR", "RANK"]:
        os.environ.pop(var, None)
    monkeypatch.syspath_prepend(str(FAKES))
    _purge_habana()
    import hpu_recorder

    hpu_recorder.reset()
    yield hpu_recorder
    _purge_habana()
    os.environ.clear()
    os.environ.update(saved_env)


def _backend(lazy=True, precision="bf16", zero_stage=0, gaudi_config=None, compile=False):
    from gaudi_pretrain.backends import select_backend

    cfg = BackendConfig(name="hpu", hpu_lazy_mode=lazy, gaudi_config=gaudi_config, compile=compile)
    return select_backend(cfg, precision, zero_stage)


class TinyBridge(nn.Module):
    """A few BridgeTower-like names: a tower, a cross-modal layer and a head."""

    def __init__(self):
        super().__init__()
        self.text_encoder = nn.Linear(8, 8)
        self.LayerNorm = nn.LayerNorm(8)
        self.cross_modal_text_layers = nn.Linear(8, 8)
        self.itm_score = nn.Linear(8, 2)

    def forward(self, x):
        return self.itm_score(self.cross_modal_text_layers(self.LayerNorm(self.text_encoder(x))))


def _train(backend, steps=2, max_norm=1.0, clip=True):
    """The plain loop the trainer runs, through the backend seam only."""
    from gaudi_pretrain.train.optim import param_groups

    torch.manual_seed(0)
    model = TinyBridge()
    optim_cfg = OptimConfig()
    optimizer = backend.make_optimizer(param_groups(model, optim_cfg), optim_cfg)
    x, y = torch.randn(4, 8), torch.tensor([0, 1, 1, 0])
    losses = []
    for _ in range(steps):
        with backend.autocast():
            loss = nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        backend.after_backward()
        if clip:
            backend.clip_grad_norm(model.parameters(), max_norm)
        optimizer.step()
        backend.after_optimizer_step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return model, optimizer, losses


# ------------------------------------------------------------------------------------- lazy mode


def test_lazy_step_marks_after_backward_and_after_optimizer_step(rec):
    backend = _backend(lazy=True)
    backend.prepare_environment()
    rec.EVENTS.clear()  # only what the training steps do
    _train(backend, steps=3)
    step_events = [e for e in rec.names() if e in ("mark_step", "FusedClipNorm.clip_norm", "FusedAdamW.step")]
    # per step: backward -> mark_step, fused clip, fused AdamW step -> mark_step
    assert step_events == ["mark_step", "FusedClipNorm.clip_norm", "FusedAdamW.step", "mark_step"] * 3
    assert len(rec.names("mark_step")) == 2 * 3


def test_lazy_mode_is_set_before_any_habana_import(rec):
    assert "PT_HPU_LAZY_MODE" not in os.environ
    backend = _backend(lazy=True)
    backend.prepare_environment()
    backend.dist_backend
    backend.make_optimizer([nn.Parameter(torch.zeros(2))], OptimConfig())
    backend.attention_fn()
    imports = rec.names("import")
    imported = {e[1] for e in imports}
    assert {"habana_frameworks", "habana_frameworks.torch.core", "habana_frameworks.torch.distributed.hccl",
            "habana_frameworks.torch.hpex.optimizers", "habana_frameworks.torch.hpex.kernels"} <= imported
    assert imports[0][1] == "habana_frameworks"
    assert all(e[2] == "1" for e in imports), imports  # PT_HPU_LAZY_MODE was already "1" at every import
    assert os.environ["DS_ACCELERATOR"] == "hpu"
    assert os.environ["PT_HPU_METRICS_DUMP_TRIGGERS"] == "process_exit,metric_change"
    assert os.environ["PT_HPU_METRICS_FILE"]


def test_fused_adamw_gets_explicit_eps_and_config_values(rec):
    backend = _backend()
    _, optimizer, _ = _train(backend, steps=1)
    (ctor,) = rec.names("FusedAdamW")
    assert ctor[1] == {"lr": 1e-5, "betas": (0.9, 0.98), "eps": 1e-8, "weight_decay": 0.01}
    # per-group settings from param_groups reach the optimizer
    by_name = {g["group_name"]: g for g in optimizer.param_groups}
    assert by_name["decay"]["weight_decay"] == 0.01 and by_name["no_decay"]["weight_decay"] == 0.0
    assert by_name["decay_mult"]["lr"] == pytest.approx(5e-5)


def test_fused_clip_norm_is_used_and_clips(rec):
    backend = _backend()
    params = [nn.Parameter(torch.ones(4))]
    params[0].grad = torch.full((4,), 10.0)
    norm = backend.clip_grad_norm(params, 1.0)
    assert rec.names("FusedClipNorm") == [("FusedClipNorm", 1.0)]
    assert rec.names("FusedClipNorm.clip_norm") == [("FusedClipNorm.clip_norm", 1.0)]
    assert float(norm) == pytest.approx(20.0)
    assert params[0].grad.norm().item() == pytest.approx(1.0, rel=1e-4)


def test_hccl_requested_after_importing_its_module(rec):
    backend = _backend()
    backend.prepare_environment()
    assert backend.dist_backend == "hccl"
    hccl = [i for i, e in enumerate(rec.EVENTS) if e[:2] == ("import", "habana_frameworks.torch.distributed.hccl")]
    assert len(hccl) == 1
    assert backend.device == torch.device("hpu")


def test_autocast_is_bf16_on_hpu_for_forward_only(rec):
    backend = _backend(precision="bf16")
    with backend.autocast():
        assert torch.is_autocast_enabled("hpu")
        assert torch.get_autocast_dtype("hpu") == torch.bfloat16
    assert not torch.is_autocast_enabled("hpu")
    with _backend(precision="fp32").autocast():
        assert not torch.is_autocast_enabled("hpu")


# ------------------------------------------------------------------------------------ eager mode


def test_eager_mode_no_mark_step_and_compiles_with_hpu_backend(rec, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compiled.append(kw) or model)
    backend = _backend(lazy=False)
    backend.prepare_environment()
    model = backend.compile(TinyBridge())
    assert isinstance(model, TinyBridge)
    assert compiled == [{"backend": "hpu_backend"}]
    _train(backend, steps=2)
    assert rec.names("mark_step") == []
    assert all(e[2] == "0" for e in rec.names("import"))
    assert os.environ["PT_HPU_LAZY_MODE"] == "0"


def test_lazy_mode_compile_is_a_noop(rec, monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("torch.compile called in lazy mode"))
    model = TinyBridge()
    with pytest.warns(UserWarning, match="ignored in HPU lazy mode"):
        assert _backend(lazy=True, compile=True).compile(model) is model
    assert _backend(lazy=True).compile(model) is model


def test_mode_conflict_with_an_earlier_import_is_refused(rec):
    _backend(lazy=True).prepare_environment()
    with pytest.raises(ConfigError, match="PT_HPU_LAZY_MODE=1"):
        _backend(lazy=False).prepare_environment()


# --------------------------------------------------------------------------------- other surface


def test_fused_sdpa_adapter_matches_torch_sdpa(rec):
    fn = _backend().attention_fn()
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 6, 8) for _ in range(3))
    mask = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    mask[..., -2:] = False  # padded keys
    ours = fn(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    (call,) = rec.names("FusedSDPA.apply")
    assert call[1] == torch.float32  # bool mask became additive
    fn(q, k, v)  # no mask
    assert rec.names("FusedSDPA.apply")[-1][1] is None


def test_gaudi_config_switches_and_autocast_op_lists(rec, tmp_path):
    path = tmp_path / "gaudi_config.json"
    path.write_text(json.dumps({"use_fused_adam": False, "use_fused_clip_norm": False, "use_torch_autocast": False,
                                "autocast_bf16_ops": ["matmul", "linear"], "autocast_fp32_ops": ["softmax"],
                                "use_dynamic_shapes": False}))
    backend = _backend(gaudi_config=str(path))
    assert backend.gaudi.ignored_keys == ("use_dynamic_shapes",)
    backend.prepare_environment()
    lower = Path(os.environ["PT_HPU_AUTOCAST_LOWER_PRECISION_OPS_LIST"]).read_text().split()
    fp32 = Path(os.environ["PT_HPU_AUTOCAST_FP32_OPS_LIST"]).read_text().split()
    assert (lower, fp32) == (["matmul", "linear"], ["softmax"])
    _, optimizer, _ = _train(backend, steps=1)
    assert type(optimizer) is torch.optim.AdamW
    assert rec.names("FusedAdamW") == [] and rec.names("FusedClipNorm") == []
    with backend.autocast():
        assert not torch.is_autocast_enabled("hpu")


def test_repo_gaudi_config_loads():
    from gaudi_pretrain.backends.hpu import GaudiConfig

    gc = GaudiConfig.load(Path(__file__).resolve().parents[1] / "configs" / "gaudi_config.json")
    assert (gc.use_fused_adam, gc.use_fused_clip_norm, gc.use_torch_autocast) == (True, True, True)


@pytest.mark.parametrize("bad", ["{not json", "[]", '{"use_fused_adam": "yes"}', '{"autocast_bf16_ops": "mm"}'])
def test_bad_gaudi_config_is_a_config_error(tmp_path, bad):
    from gaudi_pretrain.backends.hpu import GaudiConfig

    path = tmp_path / "g.json"
    path.write_text(bad)
    with pytest.raises(ConfigError, match="gaudi_config"):
        GaudiConfig.load(path)
    with pytest.raises(ConfigError, match="not found"):
        GaudiConfig.load(tmp_path / "missing.json")


@pytest.mark.parametrize(
    "precision,zero,fused_clip,expected",
    [("fp32", 0, True, True), ("bf16", 0, True, False), ("fp32", 1, True, False), ("fp32", 0, False, True)],
)
def test_who_clips(rec, tmp_path, precision, zero, fused_clip, expected):
    path = tmp_path / "g.json"
    path.write_text(json.dumps({"use_fused_clip_norm": fused_clip}))
    assert _backend(precision=precision, zero_stage=zero, gaudi_config=str(path)).clips_gradients is expected


def test_auto_picks_hpu_when_present_else_falls_back(rec):
    from gaudi_pretrain.backends import select_backend

    assert select_backend(BackendConfig(name="auto")).name == "hpu"
    assert os.environ["PT_HPU_LAZY_MODE"] == "1"  # probing set the mode before importing
    rec.STATE["available"] = False
    assert select_backend(BackendConfig(name="auto")).name in ("cuda", "cpu")
    with pytest.raises(ConfigError, match="no Gaudi device"):
        select_backend(BackendConfig(name="hpu"))


def test_graph_compiles_memory_peak_and_seed(rec, tmp_path):
    backend = _backend()
    backend.prepare_environment()
    rec.STATE["compiles"] = 7
    assert backend.graph_compile_count() == 7
    assert backend.memory_stats() == 123456
    assert backend.peak_flops() == pytest.approx(432e12)
    rec.STATE["device_name"] = "GAUDI3"
    assert backend.peak_flops() == pytest.approx(1835e12)
    assert _backend(precision="fp32").peak_flops() is None
    backend.set_seed(3)
    assert ("manual_seed", 3) in rec.EVENTS
    backend.synchronize()
    assert ("synchronize",) in rec.EVENTS


def test_graph_compiles_from_metrics_file(tmp_path):
    """Without the live metric API, the PT_HPU_METRICS_FILE dump is read (per-rank file name when RANK set)."""
    from gaudi_pretrain.backends.hpu import read_metrics_file_compiles

    records = [
        {"metric_name": "graph_compilation", "triggered_by": "metric_change", "statistics": {"TotalNumber": 1}},
        {"metric_name": "cpu_fallback", "triggered_by": "metric_change", "statistics": {"TotalNumber": 0}},
        {"metric_name": "graph_compilation", "triggered_by": "metric_change", "statistics": {"TotalNumber": "4"}},
    ]
    (tmp_path / "metrics-rank1.json").write_text(json.dumps(records))
    assert read_metrics_file_compiles(str(tmp_path / "metrics.json"), "1") == 4
    assert read_metrics_file_compiles(str(tmp_path / "metrics.json"), None) is None
    (tmp_path / "metrics.json").write_text(json.dumps(records[:1]))
    assert read_metrics_file_compiles(str(tmp_path / "metrics.json"), None) == 1
    assert read_metrics_file_compiles(None) is None


def test_device_rng_state_is_checkpointed_and_restored(rec, tmp_path):
    """Each rank's HPU generator state goes into its rank file and comes back on resume; a checkpoint
    resumed on another kind of device says, in one line, that its device state was not restored."""
    from gaudi_pretrain.backends import select_backend
    from gaudi_pretrain.train.checkpoint import read_rank_state, set_rng_state, write_rank_state

    backend = _backend()
    backend.prepare_environment()
    saved = torch.tensor([7, 1, 2, 250], dtype=torch.uint8)
    rec.STATE["rng"] = saved.clone()
    write_rank_state(tmp_path, 3, {"cursor": 1}, "digest", backend=backend)
    rank_state = read_rank_state(tmp_path, 3)
    assert rank_state["rng"]["device"] == {"backend": "hpu", "state": [7, 1, 2, 250]}

    rec.STATE["rng"] = torch.zeros(4, dtype=torch.uint8)  # the generator moved on after the save
    assert set_rng_state(rank_state["rng"], backend) is None
    assert torch.equal(rec.STATE["rng"], saved)
    assert ("set_rng_state", torch.uint8, (4,)) in rec.EVENTS

    cpu = select_backend(BackendConfig(name="cpu"), "fp32", 0)
    warning = set_rng_state(rank_state["rng"], cpu)
    assert warning is not None and "hpu RNG state is not restored on cpu" in warning
    write_rank_state(tmp_path, 0, {}, "digest", backend=cpu)
    assert "device" not in read_rank_state(tmp_path, 0)["rng"]  # CPU: torch's CPU state only
