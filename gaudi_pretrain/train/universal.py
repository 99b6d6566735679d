"""DeepSpeed universal checkpoints: a checkpoint's partitioned ZeRO state, re-cut for another world size
or ZeRO stage (docs/checkpoints.md, "Elastic resume").

`<root>/step_N.universal/` sits beside the checkpoint it was converted from and is published by renaming
a finished temporary directory whose marker records the source: a kill during conversion leaves only a
`.partial` directory, which is never loaded and is removed by the next conversion; a published one whose
files differ from the marker's list (truncated, lost) is converted again.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import shutil
import time
from pathlib import Path

from gaudi_pretrain.errors import CheckpointError
from gaudi_pretrain.train.checkpoint_dirs import CLIENT_STATE, UNIVERSAL_SUFFIX, list_files
from gaudi_pretrain.train.faults import maybe_crash
from gaudi_pretrain.utils import atomic_write_text

MARKER = "universal_complete.json"
TAG = "universal"  # the tag inside the directory: engine.load_checkpoint(<dir>, tag=TAG)


def universal_dir(ckpt: Path) -> Path:
    return ckpt.parent / f"{ckpt.name}{UNIVERSAL_SUFFIX}"


def _source_digest(ckpt: Path) -> str:
    return hashlib.sha256((ckpt / CLIENT_STATE).read_bytes()).hexdigest()


def is_complete_universal(ckpt: Path) -> bool:
    """The universal directory of `ckpt` exists, finished, and was converted from this very save."""
    folder = universal_dir(ckpt)
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (
        marker.get("source") == ckpt.name
        and marker.get("client_state_sha256") == _source_digest(ckpt)
        and marker.get("files") == list_files(folder, but=MARKER)  # nothing truncated, lost or added since
    )


def convert_to_universal(ckpt: Path, step: int = 0) -> Path:
    """Convert the complete checkpoint `ckpt` (rank 0 only); returns the directory to load from.

    DeepSpeed's converter (deepspeed/checkpoint/ds_to_universal.py `main`) reads the zero_pp_rank_* optimizer
    shards and writes one fp32 master / exp_avg / exp_avg_sq file per parameter under `<out>/zero/`; it
    also writes `latest_universal` beside its output, so the output sits one level inside our temporary
    directory. Workers = 1: its process pool would fork the training process."""
    import deepspeed
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    final = universal_dir(ckpt)
    for stale in ckpt.parent.glob(f".{final.name}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if final.exists():
        shutil.rmtree(final)
    partial = ckpt.parent / f".{final.name}.partial-{os.getpid()}"
    partial.mkdir()
    args = argparse.Namespace(
        input_folder=str(ckpt),
        output_folder=str(partial / TAG),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    started = time.perf_counter()
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints every argument and a progress line per file
            ds_to_universal(args)
    except Exception as exc:
        shutil.rmtree(partial, ignore_errors=True)
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise CheckpointError(
            f"DeepSpeed could not convert {ckpt} to a universal checkpoint: {type(exc).__name__}: {first}"
        ) from None
    maybe_crash("universal_convert", step)
    marker = {
        "source": ckpt.name,
        "client_state_sha256": _source_digest(ckpt),
        "deepspeed": deepspeed.__version__,
        "seconds": round(time.perf_counter() - started, 3),
        "files": list_files(partial, but=MARKER),
    }
    atomic_write_text(partial / MARKER, json.dumps(marker, indent=1))
    os.rename(partial, final)
    return final


def wait_for_universal(ckpt: Path, timeout_s: float, poll_s: float = 0.5) -> Path:
    """Ranks other than 0 wait for rank 0's conversion by watching the file system, not in a collective:
    converting a large model can outlast the collective timeout."""
    deadline = time.monotonic() + timeout_s
    while not is_complete_universal(ckpt):
        if time.monotonic() > deadline:
            raise CheckpointError(
                f"no complete universal checkpoint of {ckpt} after {timeout_s:g} s (rank 0 converts it)"
            )
        time.sleep(poll_s)
    return universal_dir(ckpt)
