"""Elastic resume through the real CLI: a 2-rank run killed mid-epoch continues on other world sizes,
workers and ZeRO stages, with every sample of the interrupted epoch used exactly once."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, cli_env, read_jsonl, run_cli, tiny_overrides, torchrun

SHARD = "00003.tar"  # 180 samples: 15 steps of 12 per epoch
SAMPLES = 180
RESUME_STEP = 3
COMMON = {
    "train.micro_batch_size": 3,
    "train.global_batch_size": 12,
    "train.max_steps": 34,  # the rest of epoch 0 and all of epoch 1 at any of the geometries below
    "logging.every_steps": 1,
    "logging.sample_log": "true",
    "checkpoint.every_steps": 3,
    "checkpoint.export_hf": "false",
    "eval.every_steps": 1000,
    "eval.max_samples": 24,
    "eval.retrieval_samples": 0,
}


def _train(shards, run_dir, *extra, env=None, launcher=None, **overrides):
    over = tiny_overrides(shards, run_dir, **{"data.train_shards": f"['{shards}/train/{SHARD}']", **overrides})
    return run_cli(["train", "--config", "configs/tiny.yaml", *over, *extra], env=env, launcher=launcher)


def _launcher(world: int):
    return torchrun(world) if world > 1 else None


def killed_run(shards: Path, run_dir: Path, **overrides) -> Path:
    """2 ranks, SIGKILLed after step 4: `latest` names step 3, steps 4 were logged and must be forgotten."""
    env = cli_env()
    env["GAUDI_PRETRAIN_CRASH"] = "after_step:4"
    result = _train(shards, run_dir, env=env, launcher=torchrun(2), **{**COMMON, **overrides})
    assert result.returncode != 0
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{RESUME_STEP:08d}"
    return run_dir


def _log_lines(run_dir: Path, rank: int) -> list[tuple[int, list[str]]]:
    """The rank's sample log in order: one (step, keys) line per micro-batch."""
    path = run_dir / "samples" / f"rank_{rank:05d}.log"
    lines = []
    for line in path.read_text().splitlines():
        step, _, keys = line.partition("\t")
        lines.append((int(step), keys.split()))
    return lines


def _resume_step(stdout: str) -> int:
    found = re.findall(r"resumed from \S+ at step (\d+)", stdout)
    assert found, stdout[-2000:]
    return int(found[-1])


def _covering_prefix(old: list[str], lines: list[list[list[str]]], start: int) -> tuple[int, list[str]]:
    """The fewest micro-batches per rank, from `start`, that together with `old` cover all the keys."""
    n = 0
    while True:
        keys = old + [k for rank_lines in lines for line in rank_lines[start : start + n] for k in line]
        if len(set(keys)) == SAMPLES:
            return n, keys
        n += 1
        assert all(start + n <= len(r) for r in lines), f"the logs end before the epoch is whole: {len(set(keys))}"


def assert_epochs_exact(run_dir: Path, old_world: int, new_world: int, resume_step: int = RESUME_STEP) -> None:
    """Over all ranks' sample logs: the interrupted epoch (the old ranks' steps before the checkpoint plus
    the new ranks' first micro-batches) holds every key exactly once, and so does the next epoch."""
    old = [k for r in range(old_world) for step, keys in _log_lines(run_dir, r) if step < resume_step for k in keys]
    new = [[keys for step, keys in _log_lines(run_dir, r) if step >= resume_step] for r in range(new_world)]
    assert len({len(lines) for lines in new}) == 1, "ranks ran different numbers of micro-batches"
    rest, epoch0 = _covering_prefix(old, new, 0)
    assert len(epoch0) == SAMPLES, f"interrupted epoch: {len(epoch0)} keys used, {len(set(epoch0))} distinct"
    _, epoch1 = _covering_prefix([], new, rest)
    assert len(epoch1) == SAMPLES, f"next epoch: {len(epoch1)} keys used, {len(set(epoch1))} distinct"


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if r["kind"] == "train"}


@pytest.fixture(scope="module")
def killed_fp32(demo_shards, tmp_path_factory) -> Path:
    return killed_run(demo_shards, tmp_path_factory.mktemp("elastic") / "killed")


@pytest.mark.parametrize(
    "world, overrides",
    [(3, {"train.micro_batch_size": 2, "data.num_workers": 2})],
    ids=["2to3_workers2"],
)
def test_killed_run_resumes_on_another_world_size_with_every_sample_once(
    demo_shards, killed_fp32, tmp_path, world, overrides
):
    run_dir = tmp_path / "run"
    shutil.copytree(killed_fp32, run_dir)
    result = _train(demo_shards, run_dir, "--resume", "auto", launcher=_launcher(world), **{**COMMON, **overrides})
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"elastic resume: 2 -> {world} ranks" in result.stdout, result.stdout[-2000:]
    assert_epochs_exact(run_dir, old_world=2, new_world=world)
    losses = _losses(run_dir)
    assert sorted(losses) == list(range(1, COMMON["train.max_steps"] + 1))


def _args(shards, run_dir, *extra, **overrides) -> list[str]:
    over = tiny_overrides(shards, run_dir, **{"data.train_shards": f"['{shards}/train/{SHARD}']", **overrides})
    return ["-m", "gaudi_pretrain", "train", "--config", "configs/tiny.yaml", *over, *extra]


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [r["step"] for r in read_jsonl(path) if r["kind"] == "train"]
    return max(steps, default=0)


def test_sigterm_to_every_rank_saves_within_the_bound_and_exits_0(demo_shards, tmp_path):
    """As Slurm and Kubernetes preempt: SIGTERM to every process of the job (ranks and loader workers).
    The ranks agree at the next multiple of checkpoint.preemption_check_steps, save, and exit 0; the
    run then resumes from that checkpoint."""
    import psutil

    run_dir, check = tmp_path / "run", 4
    over = {
        **COMMON,
        "train.max_steps": 400,
        "checkpoint.every_steps": 1000,
        "checkpoint.preemption_check_steps": check,
    }
    cmd = [sys.executable, *torchrun(2)[1:-2], *_args(demo_shards, run_dir, **over)]
    with subprocess.Popen(
        cmd, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as agent:
        _wait_for(lambda: _last_step(run_dir) >= 5, 120, "step 5")
        ranks = psutil.Process(agent.pid).children()
        assert len(ranks) == 2, ranks
        signalled_at = _last_step(run_dir)
        for proc in [p for rank in ranks for p in [rank, *rank.children(recursive=True)]]:
            proc.send_signal(signal.SIGTERM)
        out, err = agent.communicate(timeout=120)
    assert agent.returncode == 0, err[-3000:]
    (saved,) = re.findall(r"SIGTERM: saved \S+ at step (\d+)", out)
    # the steps logged when the signal went out, one step in flight, then the next agreement point
    assert signalled_at < int(saved) <= signalled_at + 1 + check, (signalled_at, saved)
    assert int(saved) % check == 0
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{int(saved):08d}"
    assert not (run_dir / "hf").exists(), "a preempted run is not finished: no final export"
    result = _train(demo_shards, run_dir, "--resume", "auto", **{**over, "train.max_steps": int(saved) + 2})
    assert result.returncode == 0, result.stderr[-3000:]
    assert _resume_step(result.stdout) == int(saved)


BF16 = {**COMMON, "train.precision": "bf16", "train.zero_stage": 1, "train.max_steps": 8, "checkpoint.every_steps": 4}


def test_bf16_zero1_resumes_on_one_rank_through_a_universal_checkpoint(demo_shards, tmp_path):
    """bf16 ZeRO-1, 2 ranks killed after step 8 before its save (`latest` = step 4; steps 1-7 logged are
    the uninterrupted run's). Resumed on 1 rank: a kill between DeepSpeed's conversion and the publishing
    rename leaves a partial directory that is never used; the next resume converts again, loads the
    universal checkpoint (weights digest checked), and each resumed loss is closer to the uninterrupted
    run's than to the step-1 loss (no reset, DeepSpeed 5405 / LlamaFactory 8295)."""
    run_dir = tmp_path / "run"
    env = {**cli_env(), "GAUDI_PRETRAIN_CRASH": "after_step:8"}
    assert _train(demo_shards, run_dir, env=env, launcher=torchrun(2), **BF16).returncode != 0
    straight = _losses(run_dir)
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000004"
    crash = {**cli_env(), "GAUDI_PRETRAIN_CRASH": "universal_convert:4"}
    assert _train(demo_shards, run_dir, "--resume", "auto", env=crash, **BF16).returncode != 0
    assert list(ckpts.glob(".step_00000004.universal.partial-*")) and not (ckpts / "step_00000004.universal").exists()
    result = _train(demo_shards, run_dir, "--resume", "auto", **BF16)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "elastic resume: 2 -> 1 ranks, ZeRO 1 -> 1" in result.stdout and "converting" in result.stdout
    assert not list(ckpts.glob(".*partial*"))
    losses = _losses(run_dir)
    for step in (5, 6, 7):
        assert abs(losses[step] - straight[step]) < abs(losses[step] - straight[1]), (step, losses, straight)
