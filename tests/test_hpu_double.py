"""The HPU backend and the training loop against the habana_frameworks test double (tests/hpu_double/).

habana_frameworks cannot be installed off Gaudi hardware; the double models the real bridge where our code
depends on it (autoload, the execution mode read once at import, mark_step, the hccl import's side effects,
FusedAdamW as DeepSpeed sees it, dtype limits, autocast lists: see tests/hpu_double/README.md). In-process
tests put the double's sources on sys.path; the training runs are real `gaudi-pretrain train` processes
with the installed double (an overlay `make test` builds) first on PYTHONPATH, under mpirun and DeepSpeed
0.19 and 0.16.1 (the base of Habana's fork).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, cli_env, free_port, tiny_overrides
from torch import nn

from gaudi_pretrain.config import BackendConfig, OptimConfig, load_config
from gaudi_pretrain.errors import ConfigError

DOUBLE_SRC = Path(__file__).resolve().parent / "hpu_double"
OVERLAYS = Path(sys.prefix) / "compat"
HPU_ENV = ("PT_HPU_", "HCCL_", "HABANA_")
HPU_VARS = (
    "DS_ACCELERATOR",
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "HLS_MODULE_ID",
    "ID",
    "GAUDI_PRETRAIN_HPU_DEVICE",
    "HPU_DOUBLE_TRACK",
    "HPU_DOUBLE_LOG",
)


def _purge_double() -> None:
    for name in list(sys.modules):
        if name in ("habana_frameworks", "_hpu_double") or name.startswith("habana_frameworks."):
            del sys.modules[name]


@pytest.fixture
def double(monkeypatch):
    """The double's sources on sys.path, a clean HPU environment, an empty event log; all undone after."""
    saved_env = dict(os.environ)
    for var in [v for v in os.environ if v.startswith(HPU_ENV) or v in HPU_VARS]:
        del os.environ[var]
    os.environ.update(GAUDI_PRETRAIN_HPU_DEVICE="cpu", DS_ACCELERATOR="cpu")  # tensors, DeepSpeed on the CPU
    monkeypatch.syspath_prepend(str(DOUBLE_SRC))
    _purge_double()
    import _hpu_double

    yield _hpu_double
    _hpu_double.stop_tracking()
    _purge_double()
    os.environ.clear()
    os.environ.update(saved_env)


def _backend(lazy=True, precision="bf16", zero_stage=0, gaudi_config=None, compile=False):
    from gaudi_pretrain.backends import select_backend

    cfg = BackendConfig(name="hpu", hpu_lazy_mode=lazy, gaudi_config=gaudi_config, compile=compile)
    return select_backend(cfg, precision, zero_stage)


def _gaudi_config(tmp_path, **values) -> str:
    path = tmp_path / "gaudi_config.json"
    path.write_text(json.dumps(values))
    return str(path)


# ---------------------------------------------------------------------------------- execution mode


def test_the_mode_is_set_before_the_bridge_loads(double):
    del os.environ["GAUDI_PRETRAIN_HPU_DEVICE"]  # the real device: DeepSpeed's HPU accelerator
    backend = _backend(lazy=True)
    backend.prepare_environment()
    assert backend.dist_backend == "hccl"
    imports = double.names("import")
    assert imports[0][1] == "habana_frameworks"
    assert all(e[2] == "1" for e in imports), imports  # PT_HPU_LAZY_MODE was already "1" at every import
    from habana_frameworks.torch.utils.internal import is_lazy

    assert is_lazy() is True and os.environ["DS_ACCELERATOR"] == "hpu"
    assert "PT_HPU_METRICS_FILE" not in os.environ  # debug dumps stay off unless asked for


def test_a_bridge_loaded_in_another_mode_is_refused_in_one_line(double):
    """`import torch` autoloads the bridge before our code runs; unset, PT_HPU_LAZY_MODE means eager on
    1.21 and later, so a lazy config must see that the bridge is in eager mode and stop."""
    import habana_frameworks.torch  # noqa: F401  (what autoload does on `import torch`)

    with pytest.raises(ConfigError) as err:
        _backend(lazy=True).prepare_environment()
    assert str(err.value) == (
        "the Gaudi bridge runs in eager (+ torch.compile) mode (PT_HPU_LAZY_MODE=unset when torch was first "
        "imported) but the config asks for lazy (backend.hpu_lazy_mode=true): export PT_HPU_LAZY_MODE=1 before "
        "Python starts (launch/*.sh do it)"
    )
    _backend(lazy=False).prepare_environment()  # the mode the bridge is in: fine


def test_an_exported_mode_that_contradicts_the_config_is_refused(double):
    os.environ["PT_HPU_LAZY_MODE"] = "0"
    with pytest.raises(
        ConfigError,
        match="PT_HPU_LAZY_MODE=0 was set before Python started but the config needs "
        r"PT_HPU_LAZY_MODE=1 \(backend.hpu_lazy_mode\)",
    ):
        _backend(lazy=True).prepare_environment()
    assert "habana_frameworks.torch" not in sys.modules  # refused before the bridge loaded


def test_eager_mode_compiles_with_hpu_backend_static_shapes_and_never_marks_steps(double, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compiled.append(kw) or model)
    backend = _backend(lazy=False)
    backend.prepare_environment()
    backend.compile(nn.Linear(2, 2))
    assert compiled == [{"backend": "hpu_backend", "dynamic": False}]
    backend.after_backward()
    backend.after_optimizer_step()
    assert double.names("mark_step") == [] and os.environ["PT_HPU_LAZY_MODE"] == "0"


def test_lazy_mode_marks_steps_and_compile_is_a_noop(double, monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("torch.compile called in lazy mode"))
    model = nn.Linear(2, 2)
    with pytest.warns(UserWarning, match="ignored in HPU lazy mode"):
        assert _backend(lazy=True, compile=True).compile(model) is model
    backend = _backend(lazy=True)
    backend.after_backward()
    backend.after_optimizer_step()
    assert [(e[1], e[2]) for e in double.names("mark_step")] == [
        ("gaudi_pretrain", "after_backward"),
        ("gaudi_pretrain", "after_optimizer_step"),
    ]


# ---------------------------------------------------------------------------------- optimizer, clip, seed


def test_fused_adamw_is_an_optimizer_deepspeed_does_not_know(double, tmp_path):
    """Habana's FusedAdamW subclasses torch.optim.Optimizer, not AdamW: DeepSpeed's exact-type check
    (runtime/zero/utils.py) refuses it under ZeRO >= 1 unless the DeepSpeed dict allows it; ours too."""
    from deepspeed.runtime.zero.utils import ZERO_SUPPORTED_OPTIMIZERS

    from gaudi_pretrain.config import deepspeed_config
    from gaudi_pretrain.train.optim import GuardedAdamW, param_groups

    model = nn.Linear(4, 4)
    fused = _backend(gaudi_config=_gaudi_config(tmp_path, use_fused_adam=True)).make_optimizer(
        param_groups(model, OptimConfig()), OptimConfig()
    )
    assert type(fused).__name__ == "FusedAdamW" and not isinstance(fused, torch.optim.AdamW)
    (ctor,) = double.names("FusedAdamW")
    assert ctor[1] == {"lr": 1e-5, "betas": (0.9, 0.98), "eps": 1e-8, "weight_decay": 0.01}  # eps passed explicitly
    default = _backend().make_optimizer(param_groups(model, OptimConfig()), OptimConfig())
    assert type(default) is GuardedAdamW
    cfg = load_config("configs/bridgetower_large.yaml")
    for optimizer in (fused, default):
        assert type(optimizer) not in ZERO_SUPPORTED_OPTIMIZERS  # is_zero_supported_optimizer's exact-type test
        assert deepspeed_config(cfg, 64, optimizer_known_to_deepspeed=False)["zero_allow_untested_optimizer"] is True
    assert "zero_allow_untested_optimizer" not in deepspeed_config(cfg, 64)


def test_fused_clip_norm_clips_where_the_loop_clips(double, tmp_path):
    backend = _backend(precision="fp32")
    params = [nn.Parameter(torch.ones(4))]
    params[0].grad = torch.full((4,), 10.0)
    backend.clip_grad_norm(params, 1.0)
    assert double.names("FusedClipNorm") == [("FusedClipNorm", 1.0)]
    assert double.names("FusedClipNorm.clip_norm") == [("FusedClipNorm.clip_norm", 1.0)]
    plain = _backend(precision="fp32", gaudi_config=_gaudi_config(tmp_path, use_fused_clip_norm=False))
    plain.clip_grad_norm(params, 1.0)
    assert len(double.names("FusedClipNorm.clip_norm")) == 1


@pytest.mark.parametrize(
    "precision,zero,fused_clip,expected",
    [("fp32", 0, True, True), ("bf16", 0, True, False), ("fp32", 1, True, False), ("fp32", 0, False, True)],
)
def test_who_clips(double, tmp_path, precision, zero, fused_clip, expected):
    path = _gaudi_config(tmp_path, use_fused_clip_norm=fused_clip)
    assert _backend(precision=precision, zero_stage=zero, gaudi_config=path).clips_gradients is expected


def test_seed_goes_through_the_real_api_and_fails_loudly(double, monkeypatch):
    backend = _backend()
    backend.set_seed(3)
    assert ("manual_seed", 3) in double.EVENTS  # hpu.random.manual_seed_all
    import habana_frameworks.torch.hpu.random as hpu_random

    monkeypatch.delattr(hpu_random, "manual_seed_all")
    with pytest.raises(AttributeError, match="manual_seed_all"):
        backend.set_seed(3)


def test_device_rng_state_is_checkpointed_and_restored(double, tmp_path):
    """Each rank's HPU generator state goes into its rank file and comes back on resume; a checkpoint
    resumed on another kind of device says, in one line, that its device state was not restored."""
    from gaudi_pretrain.backends import select_backend
    from gaudi_pretrain.train.checkpoint import read_rank_state, set_rng_state, write_rank_state

    backend = _backend()
    backend.prepare_environment()
    saved = torch.tensor([7, 1, 2, 250], dtype=torch.uint8)
    double.STATE["rng"] = saved.clone()
    write_rank_state(tmp_path, 3, {"cursor": 1}, "digest", backend=backend)
    rank_state = read_rank_state(tmp_path, 3)
    assert rank_state["rng"]["device"] == {"backend": "hpu", "state": [7, 1, 2, 250]}
    double.STATE["rng"] = torch.zeros(4, dtype=torch.uint8)  # the generator moved on after the save
    assert set_rng_state(rank_state["rng"], backend) is None
    assert torch.equal(double.STATE["rng"], saved)
    cpu = select_backend(BackendConfig(name="cpu"), "fp32", 0)
    warning = set_rng_state(rank_state["rng"], cpu)
    assert warning is not None and "hpu RNG state is not restored on cpu" in warning


# ---------------------------------------------------------------------------------- numerics


def test_fused_sdpa_adapter_turns_bool_masks_additive(double):
    fn = _backend().attention_fn()
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 6, 8) for _ in range(3))
    mask = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    mask[..., -2:] = False  # padded keys
    ours = fn(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
    torch.testing.assert_close(ours, torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    assert double.names("FusedSDPA.apply")[-1][1] == torch.float32  # the kernel got an additive float mask


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_layer_norms_softmax_and_losses_stay_fp32_under_hpu_autocast(double, attention):
    """Habana's default bf16 autocast list includes layer_norm, softmax and log_softmax; the double applies
    it on top of CPU autocast (its stand-in for the device). Our LayerNorm statistics, the eager attention
    softmax and both losses must still compute in fp32 there (model/precision.py)."""
    from test_model_bridgetower import model_batch, model_tiny_cfg

    from gaudi_pretrain.model.pretraining import BridgeTowerForPretraining

    os.environ["HPU_DOUBLE_TRACK"] = "1"
    backend = _backend(precision="bf16")
    backend.prepare_environment()  # the bridge loads and starts tracking
    model = BridgeTowerForPretraining(model_tiny_cfg(attention=attention))
    with backend.autocast():
        out = model(model_batch())
    lowered = Counter(e[1] for e in double.names("autocast_bf16"))
    assert lowered["layer_norm"] == lowered["softmax"] == lowered["log_softmax"] == 0, lowered
    assert out.loss.dtype == torch.float32
    with backend.autocast():  # the emulation is on: a plain layer_norm outside our regions runs in bf16
        assert torch.nn.functional.layer_norm(torch.randn(2, 4), (4,)).dtype == torch.bfloat16
    assert double.names("autocast_bf16")[-1][1] == "layer_norm"


# ---------------------------------------------------------------------------------- gaudi_config


def test_gaudi_config_is_validated_and_op_lists_are_refused(tmp_path):
    from gaudi_pretrain.backends.hpu import GaudiConfig

    repo = GaudiConfig.load(REPO / "configs" / "gaudi_config.json")
    assert (repo.use_fused_adam, repo.use_fused_clip_norm, repo.use_torch_autocast) == (False, True, True)
    gc = GaudiConfig.load(_gaudi_config(tmp_path, use_fused_adam=True, use_dynamic_shapes=False))
    assert gc.use_fused_adam and gc.ignored_keys == ("use_dynamic_shapes",)
    for bad, message in (
        ('{"use_fused_adam": "yes"}', "'use_fused_adam' must be true or false"),
        ('{"autocast_bf16_ops": ["mm"]}', "'autocast_bf16_ops' is not supported"),
        ("{not json", "is not valid JSON"),
        ("[]", "must hold a JSON object"),
    ):
        (tmp_path / "g.json").write_text(bad)
        with pytest.raises(ConfigError, match=message):
            GaudiConfig.load(tmp_path / "g.json")
    with pytest.raises(ConfigError, match="not found"):
        GaudiConfig.load(tmp_path / "missing.json")


def test_auto_picks_hpu_when_present_else_falls_back(double):
    from gaudi_pretrain.backends import select_backend

    assert select_backend(BackendConfig(name="auto")).name == "hpu"
    assert os.environ["PT_HPU_LAZY_MODE"] == "1"  # set before the bridge loaded
    double.STATE["available"] = False
    assert select_backend(BackendConfig(name="auto")).name in ("cuda", "cpu")
    with pytest.raises(ConfigError, match="no Gaudi device"):
        select_backend(BackendConfig(name="hpu"))


def test_graph_compiles_from_metrics_file(tmp_path):
    """Without the live metric API, a PT_HPU_METRICS_FILE dump is read (per-rank file name when RANK set)."""
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


# ------------------------------------------------------------------------- real processes, installed double


def _overlay(*names: str) -> str:
    paths = [OVERLAYS / name for name in names]
    missing = [p for p in paths if not p.is_dir()]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{missing[0]} is missing: run the tests through `make test`")
        pytest.skip(f"{missing[0]} not installed (`make test` installs it)")
    return os.pathsep.join(str(p) for p in paths)


def _double_env(tmp_path: Path, *overlays: str, track: bool = True) -> dict[str, str]:
    env = {k: v for k, v in cli_env().items() if not k.startswith(HPU_ENV) and k not in HPU_VARS}
    env["PYTHONPATH"] = os.pathsep.join([_overlay(*overlays, "hpu-double"), str(REPO)])
    env["GAUDI_PRETRAIN_HPU_DEVICE"] = "cpu"
    env["HPU_DOUBLE_LOG"] = str(tmp_path / "events")
    if track:
        env["HPU_DOUBLE_TRACK"] = "1"
    return env


def _events(tmp_path: Path) -> dict[str, list[list[str]]]:
    """rank -> events of that rank's processes (its loader workers included), in order."""
    out: dict[str, list[list[str]]] = {}
    for path in sorted((tmp_path / "events").glob("events-*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if row["rank"] is not None:  # torch's autoload touches the package before our setup exports RANK
                out.setdefault(row["rank"], []).append(row["event"])
    return out


def test_import_torch_autoloads_the_installed_double_unless_lazy(tmp_path):
    code = "import sys, torch; print('habana_frameworks.torch' in sys.modules)"
    env = _double_env(tmp_path, track=False)
    for extra, loaded in (
        ({}, "True"),
        ({"PT_HPU_LAZY_MODE": "1"}, "False"),
        ({"PT_HPU_AUTOLOAD": "0"}, "False"),
        ({"PT_HPU_LAZY_MODE": "1", "PT_HPU_AUTOLOAD": "1"}, "True"),
    ):
        out = subprocess.run([sys.executable, "-c", code], env={**env, **extra}, capture_output=True, text=True)
        assert out.stdout.strip() == loaded, (extra, out.stderr[-2000:])


HPU_RUN = {
    "backend.name": "hpu",
    "backend.gaudi_config": "null",
    "train.precision": "bf16",
    "train.zero_stage": 1,
    "train.micro_batch_size": 8,
    "train.gradient_accumulation_steps": 2,
    "eval.every_steps": 1000,
    "eval.max_samples": 16,
    "eval.retrieval_samples": 0,
    "data.num_workers": 0,
}


def _train_args(shards, run_dir, **overrides) -> list[str]:
    return ["--config", "configs/tiny.yaml", *tiny_overrides(shards, run_dir, **{**HPU_RUN, **overrides})]


def _mpirun(tmp_path, args, env):
    bin_dir = Path(sys.executable).parent
    env = {**env, "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}"}
    cmd = [
        "bash",
        str(REPO / "launch" / "mpirun_gaudi.sh"),
        "--cards-per-node",
        "2",
        "--no-bind",
        "--master-port",
        str(free_port()),
        "--python",
        sys.executable,
        "--",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)


# DeepSpeed's own host reads per optimizer step in these runs, read from its sources and counted here:
# 0.16.1 (the base of Habana's fork for SW 1.21) reads nothing in bf16 ZeRO-1's step; 0.19.8 checks the
# clipping norm of each of the 4 parameter groups on the host (runtime/zero/stage_1_and_2.py
# unscale_and_clip_grads, `is_invalid_grad_norm`), which only `gradient_clipping: 0` avoids.
DEEPSPEED_READS_PER_STEP = {"0.19": (4, ()), "0.16": (0, ("deepspeed-0.16",))}


@pytest.mark.parametrize("deepspeed_version", sorted(DEEPSPEED_READS_PER_STEP))
def test_training_under_mpirun_against_the_double_reads_the_device_only_at_log_steps(
    demo_shards, tmp_path, deepspeed_version
):
    """The production settings (bf16, ZeRO-1, accumulation 2, lazy mode) on 2 ranks through
    launch/mpirun_gaudi.sh: mark_step after every backward and every optimizer micro-step, no float64 or
    64-bit reduction of ours (the double raises), and no host read of ours on non-logging steps: every
    `.item()`-like read of ours happens in logging, checkpointing, eval or the final export. DeepSpeed's
    own are counted."""
    expected_deepspeed_reads, overlays = DEEPSPEED_READS_PER_STEP[deepspeed_version]
    run = tmp_path / "run"
    result = _mpirun(
        tmp_path,
        _train_args(demo_shards, run, **{"train.max_steps": 6, "logging.every_steps": 3, "checkpoint.every_steps": 6}),
        _double_env(tmp_path, *overlays),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "rendezvous 127.0.0.1:" in result.stdout
    events = _events(tmp_path)
    assert sorted(events) == ["0", "1"]
    for rank, rows in events.items():
        ours = [(e[2], e[3]) for e in rows if e[0] == "host_sync" and e[1] == "gaudi_pretrain"]
        in_step = [e for e in ours if "train_step" in e[1].split("/")]
        assert in_step == [], in_step
        allowed = {"_log", "save_checkpoint", "evaluate", "restore_checkpoint", "setup", "export_checkpoint"}
        assert ours and [stack for _, stack in ours if not allowed & set(stack.split("/"))] == []
        marks = [e[2] for e in rows if e[0] == "mark_step" and e[1] == "gaudi_pretrain"]
        assert marks == ["after_backward", "after_optimizer_step"] * (6 * 2), marks[:8]
        deepspeed_in_step = sum(
            1 for e in rows if e[0] == "host_sync" and e[1] == "deepspeed" and "train_step" in e[3].split("/")
        )
        assert deepspeed_in_step == 6 * expected_deepspeed_reads, deepspeed_in_step
        hccl = [e for e in rows if e[0] == "hccl_env"]
        assert hccl and hccl[0][3] == rank  # HLS_MODULE_ID = local rank: the card of this rank
        assert not [e for e in rows if e[0] in ("float64", "wide_collective") and e[1] == "gaudi_pretrain"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [3, 6]
    assert all(r["nonfinite_steps"] == 0 for r in records if r["kind"] == "train")


def _train(env, shards, run_dir, *extra, **overrides):
    return subprocess.run(
        [sys.executable, "-m", "gaudi_pretrain", "train", *_train_args(shards, run_dir, **overrides), *extra],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=600,
    )


@pytest.mark.parametrize("deepspeed_version, stage", [("0.19", 1), ("0.19", 2), ("0.16", 1), ("0.16", 2)])
def test_fused_adamw_under_zero_trains_saves_and_resumes(demo_shards, tmp_path, deepspeed_version, stage):
    """The large preset's DeepSpeed settings (bf16, ZeRO 1 / 2, FusedAdamW, DeepSpeed clips) with the
    tiny model, through the real DeepSpeed engine of 0.19 and of 0.16.1 (Habana's fork base): DeepSpeed
    accepts Habana's FusedAdamW (zero_allow_untested_optimizer), trains, saves and resumes. With FusedAdamW
    the step-or-skip decision is read on the host (one read per step: its lr and step count live there)."""
    _, overlays = DEEPSPEED_READS_PER_STEP[deepspeed_version]
    env = _double_env(tmp_path, *overlays)
    gaudi_config = _gaudi_config(tmp_path, use_fused_adam=True, use_fused_clip_norm=True, use_torch_autocast=True)
    run = tmp_path / "run"
    common = {
        "backend.gaudi_config": gaudi_config,
        "train.zero_stage": stage,
        "train.max_steps": 4,
        "checkpoint.every_steps": 2,
        "logging.every_steps": 1,
    }
    first = _train(env, demo_shards, run, **{**common, "train.max_steps": 2})
    assert first.returncode == 0, first.stderr[-4000:]
    resumed = _train(env, demo_shards, run, "--resume", "auto", **common)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resumed from {run / 'checkpoints' / 'step_00000002'} at step 2" in resumed.stdout
    rows = [e for events in _events(tmp_path).values() for e in events]
    # steps 1-4; DeepSpeed's ZeRO optimizer steps the base optimizer one of the 4 parameter groups at a time
    assert sum(1 for e in rows if e[0] == "FusedAdamW.step") == 4 * 4
    reads = [e for e in rows if e[0] == "host_sync" and e[1] == "gaudi_pretrain" and "train_step" in e[3]]
    assert {e[2] for e in reads} == {"step_or_skip"} and len(reads) == 4  # the host decision, once a step
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]


def test_a_mode_mismatch_stops_train_in_one_line(demo_shards, tmp_path):
    """A lazy config where the bridge is (or will be) in eager mode: exported by hand, or torch imported
    before our code with PT_HPU_LAZY_MODE unset (eager on 1.21+): one line, exit 2, nothing trained."""
    env = _double_env(tmp_path, track=False)
    run = tmp_path / "run"
    exported = _train({**env, "PT_HPU_LAZY_MODE": "0"}, demo_shards, run, **{"train.max_steps": 1})
    assert exported.returncode == 2 and "Traceback" not in exported.stderr
    assert exported.stderr.strip().splitlines()[-1] == (
        "gaudi-pretrain train: error: PT_HPU_LAZY_MODE=0 was set before Python started but the config needs "
        "PT_HPU_LAZY_MODE=1 (backend.hpu_lazy_mode): unset it, or change the config (launch/*.sh export it "
        "from the config)"
    )
    code = "import sys, torch; from gaudi_pretrain.cli import main; sys.exit(main(sys.argv[1:]))"
    torch_first = subprocess.run(
        [sys.executable, "-c", code, "train", *_train_args(demo_shards, run, **{"train.max_steps": 1})],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    assert torch_first.returncode == 2, torch_first.stderr[-3000:]
    assert "the Gaudi bridge runs in eager (+ torch.compile) mode" in torch_first.stderr.strip().splitlines()[-1]
    assert not (run / "checkpoints").exists()


def test_eager_compile_mode_trains_compiled_without_mark_step(demo_shards, tmp_path):
    """backend.hpu_lazy_mode=false: the launcher exports PT_HPU_LAZY_MODE=0, torch autoloads the bridge in
    eager mode, the model is compiled with hpu_backend, no mark_step is issued; the 1.22 bridge's lazy-mode
    warning is not printed (it is in lazy runs: see the mpirun test's stderr)."""
    run = tmp_path / "run"
    result = subprocess.run(
        [
            "bash",
            str(REPO / "launch" / "run.sh"),
            "--python",
            sys.executable,
            "--",
            *_train_args(
                demo_shards,
                run,
                **{
                    "backend.hpu_lazy_mode": "false",
                    "model.dropout": 0,
                    "train.max_steps": 2,
                    "logging.every_steps": 1,
                },
            ),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=_double_env(tmp_path, track=False),
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    rows = [e for events in _events(tmp_path).values() for e in events]
    imports = [e for e in rows if e[0] == "import"]
    assert imports and all(e[2] == "0" for e in imports)
    assert not [e for e in rows if e[0] == "mark_step"]
    assert [e for e in rows if e[0] == "hpu_backend_compile"]  # the double's hpu_backend got graphs
    assert "legacy fallback" not in result.stderr
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["graph_compiles"] for r in records if r["kind"] == "train"][0] >= 1


PRETEND_PMI_NODES = """#!/usr/bin/env bash
# Turn Open MPI's rank variables into Intel MPI / MPICH ones (PMI_*, MPI_LOCAL*), one rank per node.
export PMI_RANK="$OMPI_COMM_WORLD_RANK" PMI_SIZE="$OMPI_COMM_WORLD_SIZE" MPI_LOCALRANKID=0 MPI_LOCALNRANKS=1
unset OMPI_COMM_WORLD_RANK OMPI_COMM_WORLD_SIZE OMPI_COMM_WORLD_LOCAL_RANK OMPI_COMM_WORLD_LOCAL_SIZE
exec "{python}" "$@"
"""


def test_pmi_launch_across_nodes_rendezvous_at_rank_0_and_each_rank_takes_its_card(demo_shards, tmp_path):
    """2 ranks that look like an Intel MPI launch on 2 nodes (PMI variables, one rank per node, no
    MASTER_ADDR): the Gaudi bridge's hccl import would set MASTER_ADDR=localhost and leave the card to
    "any free one" (it knows only Open MPI's variables and LOCAL_RANK). Our rank discovery runs before
    torch loads the bridge: rank 0's address is announced over MPI and LOCAL_RANK is exported, so the
    bridge maps it to HLS_MODULE_ID."""
    wrapper = tmp_path / "pretend_pmi_nodes.sh"
    wrapper.write_text(PRETEND_PMI_NODES.replace("{python}", sys.executable))
    wrapper.chmod(0o755)
    run = tmp_path / "run"
    env = _double_env(tmp_path, track=False)
    env.update(PT_HPU_LAZY_MODE="1", MASTER_PORT=str(free_port()))
    forwarded = [
        arg
        for name in (
            "PYTHONPATH",
            "GAUDI_PRETRAIN_HPU_DEVICE",
            "HPU_DOUBLE_LOG",
            "PT_HPU_LAZY_MODE",
            "MASTER_PORT",
            "OMP_NUM_THREADS",
        )
        for arg in ("-x", name)
    ]
    mpirun = str(Path(sys.executable).parent / "mpirun")
    cmd = [
        mpirun,
        "-n",
        "2",
        "--oversubscribe",
        "--bind-to",
        "none",
        *forwarded,
        *(["--allow-run-as-root"] if os.geteuid() == 0 else []),
        str(wrapper),
        "-m",
        "gaudi_pretrain",
        "train",
        *_train_args(demo_shards, run, **{"train.max_steps": 2, "checkpoint.every_steps": 2}),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("rendezvous "))
    assert "(pmi)" in line and not line.startswith(("rendezvous 127.", "rendezvous localhost")), line
    events = _events(tmp_path)
    assert sorted(events) == ["0", "1"]
    for rows in events.values():
        (hccl,) = [e for e in rows if e[0] == "hccl_env"]
        assert hccl[1] != "localhost" and hccl[3] == "0", hccl  # each rank: local rank 0 of its node, its card


@pytest.mark.parametrize("deepspeed_version", sorted(DEEPSPEED_READS_PER_STEP))
def test_the_large_preset_initializes_trains_and_saves_under_the_double(demo_shards, tmp_path, deepspeed_version):
    """configs/bridgetower_large.yaml as shipped (backend auto → hpu, lazy mode, its gaudi_config.json,
    bf16, ZeRO-1, clipping, its optimizer settings) through deepspeed.initialize of 0.19 and of 0.16.1,
    two steps and a save; the one-line warning that lazy mode is a legacy fallback on this release. Only what a CPU cannot hold or fetch is replaced: the model dimensions and the
    Hub initialisations by tiny.yaml's, the data by the demo set, the batch by 2 x 2."""
    _, overlays = DEEPSPEED_READS_PER_STEP[deepspeed_version]
    env = _double_env(tmp_path, *overlays)
    tiny = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    model = [f"model.{key}={json.dumps(value)}" for key, value in tiny["model"].items()]
    run = tmp_path / "run"
    over = {
        "data.train_shards": f"['{demo_shards}/train/*.tar']",
        "data.eval_shards": f"['{demo_shards}/eval/*.tar']",
        "data.tokenizer": str(demo_shards / "tokenizer"),
        "data.max_text_len": tiny["data"]["max_text_len"],
        "data.num_workers": 0,
        "model.init_vision_from": "null",
        "model.init_text_from": "null",
        "train.micro_batch_size": 2,
        "train.global_batch_size": 4,
        "train.max_steps": 2,
        "train.output_dir": str(run),
        "checkpoint.every_steps": 2,
        "checkpoint.export_hf": "false",
        "eval.every_steps": 1000,
        "eval.max_samples": 8,
        "eval.retrieval_samples": 0,
        "logging.every_steps": 1,
        "logging.progress_bar": "false",
        "logging.tensorboard": "false",
    }
    args = ["--config", "configs/bridgetower_large.yaml", *model, *[f"{k}={v}" for k, v in over.items()]]
    result = subprocess.run(
        [sys.executable, "-m", "gaudi_pretrain", "train", *args],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["backend"]["name"], saved["train"]["precision"], saved["train"]["zero_stage"]) == ("auto", "bf16", 1)
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    rows = [e for events in _events(tmp_path).values() for e in events]
    assert any(e[0] == "hccl_env" for e in rows), "backend auto did not take the (double's) Gaudi"
    # the double is release 1.22 (tests/hpu_double/pyproject.toml): lazy mode is its legacy fallback
    assert "Gaudi software 1.22.0 runs lazy mode as a legacy fallback" in result.stderr, result.stderr[-2000:]
