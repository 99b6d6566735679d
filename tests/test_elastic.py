"""Elastic resume through the real CLI: a 2-rank run killed mid-epoch continues on other world sizes,
workers and ZeRO stages, with every sample of the interrupted epoch used exactly once."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, cli_env, free_port, read_jsonl, run_cli, tiny_overrides, torchrun
from safetensors.torch import load_file

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
    [(3, {"train.micro_batch_size": 2, "data.num_workers": 2}), (1, {"train.global_batch_size": 6})],
    ids=["2to3_workers2", "2to1_global_batch6"],
)
def test_killed_run_resumes_on_another_world_size_with_every_sample_once(
    demo_shards, killed_fp32, tmp_path, world, overrides
):
    """The global batch 12 may change too (given on the resume command line): train.max_steps and the lr
    schedule then continue by samples seen, counted in steps of 12."""
    run_dir = tmp_path / "run"
    shutil.copytree(killed_fp32, run_dir)
    straight = _records(run_dir)
    result = _train(demo_shards, run_dir, "--resume", "auto", launcher=_launcher(world), **{**COMMON, **overrides})
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"elastic resume: 2 -> {world} ranks" in result.stdout, result.stdout[-2000:]
    assert_epochs_exact(run_dir, old_world=2, new_world=world)
    batch, old_batch = overrides.get("train.global_batch_size", 12), 12
    total = COMMON["train.max_steps"] * old_batch  # samples
    end = RESUME_STEP + (total - RESUME_STEP * old_batch) // batch
    records = _records(run_dir)
    assert sorted(records) == list(range(1, end + 1))
    assert records[end]["samples_seen"] == total
    if batch != old_batch:
        assert f"global batch {old_batch} -> {batch}" in result.stdout, result.stdout[-2000:]
        # tiny.yaml: warm-up to the full lr over int(0.1 x 34) = 3 steps (the straight run's step 3), then
        # linear decay to 0 at 34 steps of 12 samples: each resumed step of 6 advances it by half a step
        peak, warmup = straight[RESUME_STEP]["lr"], 3
        for step in range(RESUME_STEP + 1, end + 1):
            units = RESUME_STEP + (step - RESUME_STEP) * batch / old_batch
            expected = peak * (1 - (units - warmup) / (COMMON["train.max_steps"] - warmup))
            assert records[step]["lr"] == pytest.approx(expected, rel=1e-5, abs=1e-9), (step, records[step])


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


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def test_two_torchrun_agents_one_dies_and_the_other_restarts_alone_with_every_sample_once(demo_shards, tmp_path):
    """torchrun's elastic agent as the relaunch engine: two agents (c10d rendezvous on 127.0.0.1, --nnodes
    1:2, one worker each, --max-restarts 1). Agent B and its worker are SIGKILLed mid-epoch, as a node
    dies; A's worker fails its collective in one line, A re-rendezvouses alone and restarts it, and
    `--resume auto` continues on 1 rank: the interrupted epoch and the next hold every key once. A hosts the
    rendezvous store (B starts once A listens): the agent serving the store must be one that survives."""
    import psutil

    run_dir, port = tmp_path / "run", free_port()
    agent = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1:2", "--nproc_per_node=1", "--max-restarts=1",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=elastic-test",
        "--rdzv-conf=last_call_timeout=10", *_args(demo_shards, run_dir, "--resume", "auto", **COMMON),
    ]  # fmt: skip
    logs = {name: (tmp_path / f"{name}.log").open("w") for name in ("a", "b")}
    a = subprocess.Popen(agent, cwd=REPO, env=cli_env(), stdout=logs["a"], stderr=subprocess.STDOUT, text=True)
    b = None
    try:
        _wait_for(lambda: _listening(port), 60, "agent A's rendezvous store")
        b = subprocess.Popen(agent, cwd=REPO, env=cli_env(), stdout=logs["b"], stderr=subprocess.STDOUT, text=True)
        _wait_for(lambda: _last_step(run_dir) >= 5, 120, "step 5 on 2 ranks")
        node = psutil.Process(b.pid)
        for proc in [*node.children(recursive=True), node]:
            proc.kill()
        assert a.wait(timeout=180) == 0, (tmp_path / "a.log").read_text()[-3000:]
    finally:  # the agents and whatever they left running (a hung worker outlives its killed agent)
        for agent_proc in filter(None, (a, b)):
            with contextlib.suppress(psutil.NoSuchProcess):
                tree = psutil.Process(agent_proc.pid)
                for proc in [*tree.children(recursive=True), tree]:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        proc.kill()
            agent_proc.wait()
        for log in logs.values():
            log.close()
    out = (tmp_path / "a.log").read_text()
    assert "a collective failed at step" in out and "elastic resume: 2 -> 1 ranks" in out, out[-3000:]
    assert "rendezvous" in out and out.count("ranks (torchrun)") == 2, out[-3000:]
    assert_epochs_exact(run_dir, old_world=2, new_world=1, resume_step=_resume_step(out))


BF16 = {**COMMON, "train.precision": "bf16", "train.max_steps": 8, "checkpoint.every_steps": 4}
SOURCE_STEP = 4


@pytest.fixture(scope="module")
def bf16_killed(demo_shards, tmp_path_factory):
    """bf16 runs on 2 ranks at a ZeRO stage, killed after step 8 before its save (`latest` = step 4; the
    losses and lrs logged for steps 1-7 are the uninterrupted run's). One per stage, built when first used;
    tests copy the run directory."""
    runs: dict[int, Path] = {}

    def get(stage: int) -> Path:
        if stage not in runs:
            run_dir = tmp_path_factory.mktemp(f"bf16_zero{stage}") / "run"
            env = {**cli_env(), "GAUDI_PRETRAIN_CRASH": "after_step:8"}
            result = _train(demo_shards, run_dir, env=env, launcher=torchrun(2), **BF16, **{"train.zero_stage": stage})
            assert result.returncode != 0, "the crash point did not fire"
            assert (run_dir / "checkpoints" / "latest").read_text().strip() == tag(SOURCE_STEP)
            runs[stage] = run_dir
        return runs[stage]

    return get


def tag(step: int) -> str:
    return f"step_{step:08d}"


def _records(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_jsonl(run_dir / "metrics.jsonl") if r["kind"] == "train"}


def assert_continues(run_dir: Path, straight: dict[int, dict]) -> None:
    """Steps 5-8 ran after the resume: the lr continues the schedule exactly, and each of the first 3
    losses is closer to the uninterrupted run's at that step than to the step-1 loss (no reset: DeepSpeed
    5405, LlamaFactory 8295)."""
    resumed = _records(run_dir)
    assert sorted(resumed) == list(range(1, 9))
    for step in (5, 6, 7):
        assert resumed[step]["lr"] == straight[step]["lr"], (step, resumed[step], straight[step])
        loss, ref, first = resumed[step]["loss"], straight[step]["loss"], straight[1]["loss"]
        assert abs(loss - ref) < abs(loss - first), (step, loss, ref, first)


def universal_state(folder: Path) -> dict[tuple[str, str], torch.Tensor]:
    """(parameter, fp32 | exp_avg | exp_avg_sq | step) → tensor, from a DeepSpeed universal checkpoint."""
    state = {}
    for param in (p for p in (folder / "zero").iterdir() if p.is_dir()):
        for key in ("fp32", "exp_avg", "exp_avg_sq", "step"):
            if key == "step" and not (param / "step.pt").is_file():
                continue  # ZeRO-3 conversions keep the step in the common optimizer_state.pt only
            value = torch.load(param / f"{key}.pt", weights_only=True)
            state[param.name, key] = torch.as_tensor(value["param"] if isinstance(value, dict) else value).detach()
    return state


def probe_launcher(world: int, probe: Path) -> list[str]:
    """Like `python -m gaudi_pretrain` (torchrun for world > 1), through tests/elastic_probe.py: right after
    the restore, before the first resumed step, every rank saves the loaded engine to `probe`/probe."""
    script = [str(REPO / "tests" / "elastic_probe.py"), str(probe)]
    if world == 1:
        return [sys.executable, *script]
    return [*torchrun(world)[:-2], *script]


def assert_state_loaded_exactly(ckpt: Path, probe: Path, tmp_path: Path) -> None:
    """The fp32 masters, both Adam moments and the step count of every parameter, gathered by DeepSpeed's
    converter from the source checkpoint (its partitions at the old world size and stage) and from the
    probe (the resumed engine's, at the new ones), agree to 1e-7; the source's masters also equal the
    checkpoint's model.safetensors (our own gathering)."""
    converted = run_cli(["checkpoint", "universal", str(ckpt)])
    assert converted.returncode == 0, converted.stderr[-2000:]
    source = universal_state(Path(json.loads(converted.stdout.splitlines()[-1])["universal"]) / "universal")
    out = tmp_path / "probe_universal" / "universal"
    args = ["--input_folder", str(probe / "probe"), "--output_folder", str(out), "--inject_missing_state"]
    args += ["--num_extract_workers", "1", "--num_merge_workers", "1"]
    result = subprocess.run(
        [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", *args],
        capture_output=True, text=True, env=cli_env(), cwd=REPO, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = universal_state(out)
    assert sorted(loaded) == sorted(source)
    worst = max((float((loaded[k].double() - source[k].double()).abs().max()), k) for k in source)
    assert worst[0] <= 1e-7, worst
    params = {name for name, _ in source}
    moving = [name for name in params if source[name, "exp_avg_sq"].abs().max() > 0]
    assert len(moving) > 0.9 * len(params), "the checkpoint's second moments are (mostly) zero: nothing tested"
    masters = load_file(str(ckpt / "model.safetensors"))
    assert params == set(masters)
    for name, tensor in masters.items():
        # ZeRO-3 conversions keep each parameter flat
        assert torch.allclose(source[name, "fp32"].flatten(), tensor.flatten(), rtol=0, atol=1e-7), name


@pytest.mark.parametrize(
    "stage, new_stage, new_world",
    [(2, 2, 1), (2, 1, 1), (1, 2, 1), (3, 3, 3)],
    ids=["zero2_2to1", "zero2to1_2to1", "zero1to2_2to1", "zero3_2to3"],
)
def test_bf16_zero_state_loads_exactly_on_another_world_size_and_stage(
    demo_shards, bf16_killed, tmp_path, stage, new_stage, new_world
):
    run_dir, probe = tmp_path / "run", tmp_path / "probe"
    shutil.copytree(bf16_killed(stage), run_dir)
    straight = _records(run_dir)
    over = {**BF16, "train.zero_stage": new_stage, "train.micro_batch_size": 12 // (new_world * 2)}
    result = _train(demo_shards, run_dir, "--resume", "auto", launcher=probe_launcher(new_world, probe), **over)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"elastic resume: 2 -> {new_world} ranks, ZeRO {stage} -> {new_stage}" in result.stdout
    ckpts = run_dir / "checkpoints"
    assert not list(ckpts.glob("*.universal*")), "the step-8 save prunes the universal copy of step 4"
    assert_continues(run_dir, straight)
    assert_state_loaded_exactly(ckpts / tag(SOURCE_STEP), probe, tmp_path)


def test_bf16_zero1_resumes_on_one_rank_through_a_universal_checkpoint(demo_shards, bf16_killed, tmp_path):
    """bf16 ZeRO-1 from 2 ranks to 1: a kill between DeepSpeed's conversion and the publishing rename
    leaves a partial directory that is never used, and so is a complete one with a truncated file; the
    resume converts again, loads the universal checkpoint (weights digest checked) and continues (no
    reset); the state it loaded is the checkpoint's."""
    run_dir, probe = tmp_path / "run", tmp_path / "probe"
    shutil.copytree(bf16_killed(1), run_dir)
    straight = _records(run_dir)
    ckpts = run_dir / "checkpoints"
    over = {**BF16, "train.zero_stage": 1}
    crash = {**cli_env(), "GAUDI_PRETRAIN_CRASH": f"universal_convert:{SOURCE_STEP}"}
    assert _train(demo_shards, run_dir, "--resume", "auto", env=crash, **over).returncode != 0
    assert list(ckpts.glob(f".{tag(SOURCE_STEP)}.universal.partial-*"))
    assert not (ckpts / f"{tag(SOURCE_STEP)}.universal").exists()
    # converted ahead by the command, then one moment file truncated: not used, converted again
    converted = run_cli(["checkpoint", "universal", str(run_dir)])
    assert converted.returncode == 0, converted.stderr[-2000:]
    assert json.loads(converted.stdout.splitlines()[-1])["converted"] is True
    moments = sorted((ckpts / f"{tag(SOURCE_STEP)}.universal").rglob("exp_avg.pt"))
    moments[0].write_bytes(moments[0].read_bytes()[:100])
    result = _train(demo_shards, run_dir, "--resume", "auto", launcher=probe_launcher(1, probe), **over)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "elastic resume: 2 -> 1 ranks, ZeRO 1 -> 1" in result.stdout and "converting" in result.stdout
    assert not list(ckpts.glob("*universal*")) and not list(ckpts.glob(".*partial*"))
    assert_continues(run_dir, straight)
    assert_state_loaded_exactly(ckpts / tag(SOURCE_STEP), probe, tmp_path)


def test_checkpoint_universal_refuses_a_zero0_checkpoint_in_one_line(killed_fp32):
    result = run_cli(["checkpoint", "universal", str(killed_fp32)])
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "saved with ZeRO 0" in line and tag(RESUME_STEP) in line, line
    assert not list((killed_fp32 / "checkpoints").glob("*universal*"))
