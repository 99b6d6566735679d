"""Fake hccl module. The real import registers the "hccl" torch.distributed backend and maps
OMPI_COMM_WORLD_{RANK,LOCAL_RANK,SIZE} to RANK/LOCAL_RANK/WORLD_SIZE when those are unset."""
import os

from hpu_recorder import record_import

record_import(__name__)

for _src, _dst in (("OMPI_COMM_WORLD_RANK", "RANK"), ("OMPI_COMM_WORLD_LOCAL_RANK", "LOCAL_RANK"),
                   ("OMPI_COMM_WORLD_SIZE", "WORLD_SIZE")):
    if _src in os.environ and _dst not in os.environ:
        os.environ[_dst] = os.environ[_src]
