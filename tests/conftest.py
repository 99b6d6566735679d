"""Shared fixtures: a small embedded demo dataset, and a helper to run the real CLI in a subprocess."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> Path:
    """Demo dataset (train/eval tar shards + tokenizer), built once per session through the real builder."""
    from gaudi_pretrain.data.synthetic import build_demo_dataset

    out = tmp_path_factory.mktemp("demo") / "shards"
    build_demo_dataset(out, seed=0, train_samples=1200, eval_samples=256)
    return out


def tiny_overrides(shards: Path, run_dir: Path, **extra) -> list[str]:
    values = {
        "data.train_shards": f"['{shards}/train/*.tar']",
        "data.eval_shards": f"['{shards}/eval/*.tar']",
        "data.tokenizer": str(shards / "tokenizer"),
        "train.output_dir": str(run_dir),
        "logging.progress_bar": "false",
        "logging.tensorboard": "false",
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("GAUDI_PRETRAIN_CRASH", None)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")
    return env


def free_port() -> int:
    """A TCP port nobody listens on now (each launch takes its own: no two tests share a rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int = 2) -> list[str]:
    """Launcher prefix for `run_cli`: `nproc` ranks of `python -m gaudi_pretrain` under torchrun (gloo), on a
    free port."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
        "-m",
        "gaudi_pretrain",
    ]


def run_cli(args: list[str], env: dict[str, str] | None = None, timeout: int = 600, launcher: list[str] | None = None):
    cmd = (launcher or [sys.executable, "-m", "gaudi_pretrain"]) + args
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env or cli_env(), cwd=REPO)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def sample_log(run_dir: Path, rank: int) -> dict[int, list[str]]:
    """step → sample keys used at that step by `rank` (from the per-rank sample log)."""
    steps: dict[int, list[str]] = {}
    path = run_dir / "samples" / f"rank_{rank:05d}.log"
    for line in path.read_text().splitlines():
        step, _, keys = line.partition("\t")
        steps.setdefault(int(step), []).extend(keys.split())
    return steps


def assert_ranks_disjoint_and_in_sync(
    run_dir: Path, steps: int, micro_batch: int, world: int = 2, partitioned: bool = False
) -> None:
    """Every rank trained `steps` steps on its own samples (no key seen by two ranks) and all ranks ended
    with the same weights (checkpoint digests written by each rank). `partitioned` (ZeRO-3): only rank 0
    holds the gathered weights, so only it writes a digest. `micro_batch` counts the samples
    of one optimizer step per rank (micro batch x accumulation)."""
    logs = [sample_log(run_dir, r) for r in range(world)]
    for rank, log in enumerate(logs):
        assert sorted(log) == list(range(steps)), f"rank {rank} ran steps {sorted(log)}"
        assert sum(len(keys) for keys in log.values()) == steps * micro_batch, f"rank {rank} sample count"
    key_sets = [{k for keys in log.values() for k in keys} for log in logs]
    assert sum(len(s) for s in key_sets) == len(set().union(*key_sets)), "ranks saw overlapping samples"
    ckpt = run_dir / "checkpoints" / f"step_{steps:08d}"
    digests = [json.loads((ckpt / f"rank_{r:05d}.json").read_text())["weights_sha256"] for r in range(world)]
    if partitioned:  # only rank 0 holds the gathered model
        assert digests[0] and digests[1:] == [None] * (world - 1), digests
    else:
        assert digests[0] and len(set(digests)) == 1, "replicas diverged"


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]], gnu: bool = False) -> Path:
    """A plain tar written with tarfile (not our builder): `samples` = [(key, {ext: bytes})]."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT if gnu else tarfile.DEFAULT_FORMAT) as tf:
        for key, parts in samples:
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path
