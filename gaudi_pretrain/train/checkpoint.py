"""Resumable checkpoints: DeepSpeed layout + our client state, with an atomic `latest` pointer.

Layout under `<output_dir>/checkpoints/`:
    step_00000300/                  DeepSpeed's files (module + optimizer + scheduler, per rank)
        model.safetensors           consolidated, unwrapped weights with transformers' BridgeTower names
        config.yaml                 the resolved run config
        client_state.json           step, samples seen, config fingerprint, world size
        rank_00000.json             that rank's data cursor and RNG states (one file per rank)
    latest                          names the newest COMPLETE checkpoint; replaced atomically, last

A crash at any point of a save leaves `latest` naming the previous complete checkpoint, so a partially
written directory is never picked.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from gaudi_pretrain.config import RunConfig, save_config
from gaudi_pretrain.errors import CheckpointError

LATEST = "latest"


@dataclass
class ClientState:
    step: int = 0
    samples_seen: int = 0
    config_fingerprint: str = ""
    world_size: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_latest(ckpt_root: str | Path) -> Path | None:
    """The newest complete checkpoint directory, or None when there is none."""
    root = Path(ckpt_root)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    path = root / tag
    if not tag or not (path / "client_state.json").is_file():
        raise CheckpointError(f"{pointer} names '{tag}', which is not a complete checkpoint")
    return path


def resolve_checkpoint(spec: str, output_dir: str | Path) -> Path | None:
    """`auto` → latest under the run's checkpoints (None if none); a directory → that checkpoint.

    A run directory (holding checkpoints/latest) is accepted too.
    """
    if spec == "auto":
        return read_latest(checkpoints_dir(output_dir))
    path = Path(spec)
    if (path / "client_state.json").is_file():
        return path
    for root in (path, checkpoints_dir(path)):
        if (root / LATEST).is_file():
            return read_latest(root)
    raise CheckpointError(f"no complete checkpoint at {spec}")


def rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 of this rank's parameter bytes: replicas that trained in lockstep have equal digests."""
    h = hashlib.sha256()
    for name, p in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def write_rank_state(ckpt_dir: Path, rank: int, data_state: dict[str, Any], digest: str) -> None:
    payload = {"data": data_state, "rng": rng_state(), "weights_sha256": digest}
    _atomic_write_text(ckpt_dir / f"rank_{rank:05d}.json", json.dumps(payload))


def read_rank_state(ckpt_dir: Path, rank: int) -> dict[str, Any]:
    path = ckpt_dir / f"rank_{rank:05d}.json"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: was the checkpoint written with another world size?")
    return json.loads(path.read_text())


def write_run_files(ckpt_dir: Path, cfg: RunConfig, client: ClientState, state_dict: dict[str, torch.Tensor]) -> None:
    """Rank 0's part of a save: consolidated weights, config, client state (written last)."""
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(ckpt_dir / "model.safetensors"), metadata={"format": "pt"})
    save_config(cfg, ckpt_dir / "config.yaml")
    _atomic_write_text(ckpt_dir / "client_state.json", json.dumps(asdict(client), indent=1))


def read_client_state(ckpt_dir: Path) -> ClientState:
    return ClientState(**json.loads((ckpt_dir / "client_state.json").read_text()))


def publish(ckpt_root: Path, tag: str, keep_last: int) -> None:
    """Point `latest` at `tag` (atomic), then prune older checkpoints beyond `keep_last`."""
    _atomic_write_text(ckpt_root / LATEST, tag + "\n")
    steps = sorted(p for p in ckpt_root.glob("step_*") if p.is_dir() and p.name != tag)
    complete = [p for p in steps if (p / "client_state.json").is_file()]
    for old in complete[: max(0, len(complete) - (keep_last - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    # directories left by a crash mid-save, older than the one just published
    for partial in set(steps) - set(complete):
        if partial.name < tag:
            shutil.rmtree(partial, ignore_errors=True)
