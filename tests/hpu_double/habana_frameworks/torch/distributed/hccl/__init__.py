"""`import habana_frameworks.torch.distributed.hccl`: the environment side effects of the real module and
the "hccl" process-group backend, modelled on gaudi-pytorch-bridge v1.19.0
python_packages/habana_frameworks/torch/distributed/hccl/__init__.py (`initialize_distributed_hpu()` runs
at import):
* unless RANK, LOCAL_RANK and WORLD_SIZE are all set already, the Open MPI variables are copied to them
  (when all three OMPI_COMM_WORLD_{LOCAL_RANK,SIZE,RANK} exist) and MASTER_ADDR=localhost,
  MASTER_PORT=12345 are set where unset;
* HLS_MODULE_ID (the card this process acquires) is left alone when set; otherwise it becomes
  HABANA_VISIBLE_MODULES[LOCAL_RANK] or LOCAL_RANK, except with no LOCAL_RANK or a world of one, where the
  bridge acquires any free card "by type"; ID = RANK.
The backend the double registers is gloo underneath (CPU tensors stand in for the device), and the
tracking mode refuses 64-bit reductions coming from our code (see _hpu_double)."""

import os

import torch.distributed as dist
from _hpu_double import record, record_import

record_import(__name__)

_OMPI = {
    "OMPI_COMM_WORLD_LOCAL_RANK": "LOCAL_RANK",
    "OMPI_COMM_WORLD_SIZE": "WORLD_SIZE",
    "OMPI_COMM_WORLD_RANK": "RANK",
}


def _environment_from_mpi() -> None:
    if all(name in os.environ for name in _OMPI.values()):
        return
    if all(name in os.environ for name in _OMPI):
        for src, dst in _OMPI.items():
            os.environ[dst] = os.environ[src]
    os.environ.setdefault("MASTER_ADDR", "localhost")
    os.environ.setdefault("MASTER_PORT", "12345")


def _module_id(local_rank: int, world_size: int) -> None:
    if "HLS_MODULE_ID" in os.environ or local_rank == -1 or world_size == 1:
        return
    visible = os.environ.get("HABANA_VISIBLE_MODULES")
    os.environ["HLS_MODULE_ID"] = visible.split(",")[local_rank] if visible else str(local_rank)


def initialize_distributed_hpu(world_size=None, rank=None, local_rank=None):
    if None not in (world_size, rank, local_rank):
        os.environ.update(WORLD_SIZE=str(world_size), RANK=str(rank), LOCAL_RANK=str(local_rank))
    else:
        _environment_from_mpi()
    world_size, rank = int(os.getenv("WORLD_SIZE", 1)), int(os.getenv("RANK", -1))
    local_rank = int(os.getenv("LOCAL_RANK", -1))
    _module_id(local_rank, world_size)
    if rank != -1:
        os.environ["ID"] = str(rank)
    record("hccl_env", os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT"), os.environ.get("HLS_MODULE_ID"))
    return world_size, rank, local_rank


initialize_distributed_hpu()


def _create_process_group_hccl(store, rank, size, timeout):
    record("hccl_group", rank, size)
    return dist.ProcessGroupGloo(store, rank, size, timeout)


if "hccl" not in dist.Backend.backend_list:  # tests re-import the double in one process
    dist.Backend.register_backend("hccl", _create_process_group_hccl, devices=["cpu"])
