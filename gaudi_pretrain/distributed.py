"""Who am I in the job: rank / world discovery from any launcher, and process-group initialisation.

`discover()` reads, in order (the first that is complete wins):
1. torchrun / deepspeed launcher / a prepared env: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE;
2. Open MPI (mpirun): OMPI_COMM_WORLD_RANK / _SIZE / _LOCAL_RANK / _LOCAL_SIZE;
3. MPICH / Intel MPI (Hydra): PMI_RANK / PMI_SIZE, MPI_LOCALRANKID / MPI_LOCALNRANKS;
4. Slurm (srun): SLURM_PROCID, SLURM_LOCALID, SLURM_STEP_NUM_TASKS (or SLURM_NTASKS), tasks per node;
5. mpi4py, only when an MPI launch is evident from the env (PMIX_RANK, OMPI_*, PMI_*, I_MPI_*, HYDRA_*)
   and mpi4py is importable;
otherwise a single process (world 1).

MASTER_ADDR / MASTER_PORT: the env wins; else the first host of the Slurm node list; else 127.0.0.1 when
all ranks share one node; else rank 0's address broadcast over MPI (mpi4py); else a ConfigError.
The port defaults to 29500.

`init_distributed(info, backend)` writes RANK/LOCAL_RANK/WORLD_SIZE/LOCAL_WORLD_SIZE/MASTER_* into the env
(DeepSpeed reads them) and initialises torch.distributed through DeepSpeed (so DeepSpeed's comm layer
knows the group) — also for world 1, because `deepspeed.initialize(dist_init_required=False)` needs a
group; a world-1 group uses an in-memory store, so no port is taken. Calling it twice is harmless.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

from gaudi_pretrain.errors import ConfigError

DEFAULT_MASTER_PORT = 29500
_MPI_HINTS = (
    "PMIX_RANK",
    "OMPI_COMM_WORLD_RANK",
    "PMI_RANK",
    "PMI_SIZE",
    "I_MPI_HYDRA_HOST_FILE",
    "HYDRA_CONTROL_FD",
    "MPI_LOCALRANKID",
)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    source: str  # "torchrun" | "openmpi" | "pmi" | "slurm" | "mpi4py" | "single"

    @classmethod
    def single(cls) -> DistInfo:
        return cls(0, 0, 1, 1, "127.0.0.1", DEFAULT_MASTER_PORT, "single")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def num_nodes(self) -> int:
        return max(1, -(-self.world_size // max(1, self.local_world_size)))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------ discovery


def _int(env: Mapping[str, str], *names: str) -> int | None:
    for name in names:
        value = env.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None
    return None


def _slurm_tasks_per_node(env: Mapping[str, str]) -> int | None:
    """Tasks on this node: SLURM_NTASKS_PER_NODE, else the first entry of e.g. '8(x2),4'."""
    direct = _int(env, "SLURM_NTASKS_PER_NODE")
    if direct:
        return direct
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    match = re.match(r"\s*(\d+)", spec or "")
    return int(match.group(1)) if match else None


def _scontrol_hostnames(nodelist: str) -> list[str]:
    scontrol = shutil.which("scontrol")
    if not scontrol:
        return []
    try:
        return subprocess.run(
            [scontrol, "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30, check=True
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return []


def first_host(nodelist: str) -> str:
    """First host of a Slurm node list: `scontrol show hostnames` when present, else a small parser
    ('gaudi[003-010,012],other' -> 'gaudi003')."""
    hosts = _scontrol_hostnames(nodelist)
    if hosts:
        return hosts[0]
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):  # first top-level comma ends the first entry
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            end = i
            break
    entry = nodelist[:end].strip()
    match = re.fullmatch(r"([^\[]*)\[([^\]]+)\](.*)", entry)
    if not match:
        return entry
    prefix, ranges, suffix = match.groups()
    first = ranges.split(",")[0].split("-")[0]
    return f"{prefix}{first}{suffix}"


def _mpi_launch_evident(env: Mapping[str, str]) -> bool:
    return any(name in env for name in _MPI_HINTS)


def _mpi4py_comm() -> Any | None:
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    return MPI.COMM_WORLD


def _own_address() -> str:
    """This host's address for other nodes: a non-loopback address of the hostname, else the address of the
    interface holding the default route (a UDP connect sends nothing), else the hostname itself."""
    hostname = socket.gethostname()
    try:
        addrs = [a for a in socket.gethostbyname_ex(hostname)[2] if not a.startswith("127.")]
        if addrs:
            return addrs[0]
    except OSError:
        pass
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("10.255.255.255", 1))
            addr = probe.getsockname()[0]
            if not addr.startswith(("127.", "0.")):
                return addr
    except OSError:
        pass
    return hostname


def _ranks(env: Mapping[str, str]) -> tuple[int, int, int, int | None, str] | None:
    """(rank, world, local_rank, local_world or None, source) from launcher variables, or None."""
    flavours = [
        ("torchrun", ("RANK",), ("WORLD_SIZE",), ("LOCAL_RANK",), ("LOCAL_WORLD_SIZE",)),
        (
            "openmpi",
            ("OMPI_COMM_WORLD_RANK",),
            ("OMPI_COMM_WORLD_SIZE",),
            ("OMPI_COMM_WORLD_LOCAL_RANK",),
            ("OMPI_COMM_WORLD_LOCAL_SIZE",),
        ),
        (
            "pmi",
            ("PMI_RANK",),
            ("PMI_SIZE",),
            ("MPI_LOCALRANKID", "PMI_LOCAL_RANK"),
            ("MPI_LOCALNRANKS", "PMI_LOCAL_SIZE"),
        ),
        ("slurm", ("SLURM_PROCID",), ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"), ("SLURM_LOCALID",), ()),
    ]
    for source, rank_vars, world_vars, local_vars, local_world_vars in flavours:
        rank, world = _int(env, *rank_vars), _int(env, *world_vars)
        if rank is None or world is None:
            continue
        local = _int(env, *local_vars)
        local_world = _int(env, *local_world_vars) if local_world_vars else _slurm_tasks_per_node(env)
        if local is None:
            local = rank if world == (local_world or world) else None
        if local is None:
            raise ConfigError(
                f"{source} launch gives rank {rank} of {world} but no local rank ({' / '.join(local_vars)} unset)"
            )
        return rank, world, local, local_world, source
    return None


def discover(env: Mapping[str, str] | None = None) -> DistInfo:
    """Rank, world and rendezvous address of this process (see the module docstring for the order)."""
    env = os.environ if env is None else env
    found = _ranks(env)
    comm = None
    if found is None and _mpi_launch_evident(env):
        comm = _mpi4py_comm()
        if comm is not None and comm.Get_size() > 1:
            local_comm = comm.Split_type(_split_type_shared())
            found = (comm.Get_rank(), comm.Get_size(), local_comm.Get_rank(), local_comm.Get_size(), "mpi4py")
    if found is None:
        return DistInfo(
            0, 0, 1, 1, env.get("MASTER_ADDR", "127.0.0.1"), _int(env, "MASTER_PORT") or DEFAULT_MASTER_PORT, "single"
        )
    rank, world, local, local_world, source = found
    if not 0 <= rank < world:
        raise ConfigError(f"{source} launch gives rank {rank} outside world size {world}")
    local_world = local_world or (world if local == rank else None) or 1
    port = _int(env, "MASTER_PORT") or DEFAULT_MASTER_PORT
    addr = env.get("MASTER_ADDR") or _master_addr(env, source, world, local_world, comm)
    return DistInfo(rank, local, world, local_world, addr, port, source)


def _split_type_shared() -> Any:
    from mpi4py import MPI

    return MPI.COMM_TYPE_SHARED


def _master_addr(env: Mapping[str, str], source: str, world: int, local_world: int, comm: Any) -> str:
    if world == 1 or local_world >= world:
        return "127.0.0.1"  # every rank on this node
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if source == "slurm" and nodelist:
        return first_host(nodelist)
    if source in ("openmpi", "pmi", "mpi4py"):
        comm = comm or _mpi4py_comm()
        if comm is not None:
            return comm.bcast(_own_address() if comm.Get_rank() == 0 else None, root=0)
    raise ConfigError(
        f"{world} ranks across nodes but no MASTER_ADDR: export MASTER_ADDR=<rank-0 host> "
        "(mpirun: -x MASTER_ADDR) or install mpi4py so rank 0 can announce it"
    )


# ------------------------------------------------------------------------------- initialisation


def export_env(info: DistInfo) -> None:
    """Write the torch.distributed / DeepSpeed env contract for this process."""
    os.environ.update(
        RANK=str(info.rank),
        LOCAL_RANK=str(info.local_rank),
        WORLD_SIZE=str(info.world_size),
        LOCAL_WORLD_SIZE=str(info.local_world_size),
        MASTER_ADDR=info.master_addr,
        MASTER_PORT=str(info.master_port),
    )


def init_distributed(
    info: DistInfo, backend: str, timeout: timedelta | float | None = None, use_deepspeed: bool = True
) -> None:
    """Initialise the default process group (idempotent). `backend`: "hccl", "nccl" or "gloo" — on HPU take
    it from `Backend.dist_backend`, which imports the hccl module that registers it."""
    import torch.distributed as dist

    export_env(info)
    if not isinstance(timeout, timedelta):
        timeout = timedelta(seconds=timeout if timeout is not None else 1800)
    if not dist.is_initialized():
        if info.world_size == 1:
            # In-memory store: a world of one needs no rendezvous and takes no port.
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        elif not use_deepspeed:
            dist.init_process_group(
                backend, init_method="env://", rank=info.rank, world_size=info.world_size, timeout=timeout
            )
    if use_deepspeed:
        import deepspeed

        if backend == "gloo" or os.environ.get("DS_ACCELERATOR") == "cpu":
            _skip_deepspeed_cpu_shm_build()
        # Creates the group for world > 1, or adopts the existing one (DeepSpeed's comm layer must know it).
        deepspeed.init_distributed(
            dist_backend=backend,
            auto_mpi_discovery=False,
            timeout=timeout,
            rank=info.rank,
            world_size=info.world_size,
            verbose=False,
        )


def _skip_deepspeed_cpu_shm_build() -> None:
    """DeepSpeed's comm layer JIT-compiles a shared-memory all-reduce on a CPU accelerator at init. Training
    on CPU tensors (gloo, or the HPU test double's hccl over gloo) never uses it (it serves inference all-reduce), yet the build needs a C++ toolchain, takes
    minutes on a small box and, if a rank is killed mid-build, leaves a lock every later run waits on
    forever. Marking the op incompatible (DeepSpeed keeps one cached dict for this) makes init skip it."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def is_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if is_initialized():
        import torch.distributed as dist

        dist.barrier()


def destroy() -> None:
    if is_initialized():
        import torch.distributed as dist

        dist.destroy_process_group()
