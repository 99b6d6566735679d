"""Resumable checkpoints: DeepSpeed layout + our client state, with an atomic `latest` pointer.

Layout under `<output_dir>/checkpoints/`:
    step_00000300/                  DeepSpeed's files (module + optimizer + scheduler, per rank)
        rank_00000.json             that rank's data cursor, RNG states and weights digest (one per rank)
        model.safetensors           consolidated, unwrapped weights with transformers' BridgeTower names
        config.yaml                 the resolved run config
        client_state.json           step, samples seen, config fingerprint, world size and the size of
                                    every other file of the directory; written last: its presence = complete
    latest                          names the newest COMPLETE checkpoint; replaced atomically, last

Crash safety. A save writes, in order: DeepSpeed's files, each rank's json, (barrier) model.safetensors,
config.yaml, client_state.json, `latest`. A crash at any point leaves `latest` naming the previous
complete checkpoint, and a directory without client_state.json is never picked (`resolve_checkpoint`
refuses it, `publish` prunes it). Re-saving a tag that already exists (after resuming from an earlier
checkpoint) first moves `latest` off it and deletes it (`prepare_tag`), so a crash cannot leave a
directory that mixes two saves under a complete-looking name.

Trust boundary. model.safetensors and our json files cannot execute anything. DeepSpeed's own files are
pickles, and DeepSpeed's `load_checkpoint` reads them with torch.load(weights_only=False), which runs
whatever a crafted file asks. Resume therefore (1) checks that the directory holds exactly the files and
sizes recorded in client_state.json (`verify_files`), (2) runs DeepSpeed's load inside
`weights_only_torch_load()`, where every torch.load is weights_only=True with only DeepSpeed's own
checkpoint classes allowed (a foreign object is refused with a CheckpointError, never constructed), and
(3) compares the loaded weights with the digest each rank wrote at save time (`weights_match`).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import pickle
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors.torch import save_file

from gaudi_pretrain.config import RunConfig, save_config
from gaudi_pretrain.errors import CheckpointError, PathError
from gaudi_pretrain.paths import checkpoint_tag
from gaudi_pretrain.train.faults import maybe_crash

LATEST = "latest"
CLIENT_STATE = "client_state.json"
# Classes DeepSpeed pickles into its own checkpoint files besides tensors and plain containers (ZeRO
# optimizer states: loss scaler, stage enum, fragment addresses). Allowed by name for weights_only loads;
# a name the installed DeepSpeed lacks is left out.
DEEPSPEED_SAFE_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


@dataclass
class ClientState:
    step: int = 0
    samples_seen: int = 0
    config_fingerprint: str = ""
    world_size: int = 1
    extra: dict[str, Any] = field(default_factory=dict)
    files: dict[str, int] = field(default_factory=dict)  # every other file of the directory → size in bytes


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
    try:
        tag = checkpoint_tag(pointer.read_text(), pointer)
    except PathError as exc:
        raise CheckpointError(str(exc)) from None
    path = root / tag
    if not (path / CLIENT_STATE).is_file():
        raise CheckpointError(f"{pointer} names '{tag}', which is not a complete checkpoint")
    return path


def resolve_checkpoint(spec: str, output_dir: str | Path) -> Path | None:
    """`auto` → latest under the run's checkpoints (None if none); a directory → that checkpoint.

    A run directory (holding checkpoints/latest) is accepted too.
    """
    if spec == "auto":
        return read_latest(checkpoints_dir(output_dir))
    path = Path(spec)
    if (path / CLIENT_STATE).is_file():
        return path
    for root in (path, checkpoints_dir(path)):
        if (root / LATEST).is_file():
            return read_latest(root)
    if path.is_dir() and path.name.startswith("step_"):
        raise CheckpointError(f"{spec} is an incomplete checkpoint (no {CLIENT_STATE}: its save was interrupted)")
    raise CheckpointError(f"no complete checkpoint at {spec}")


def rng_state(backend: Any = None) -> dict[str, Any]:
    """Python, NumPy and torch CPU generator states, plus the device generator's (CUDA / HPU: dropout on
    the device) under the backend's name when `backend` has one."""
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
    }
    device_state = backend.rng_state() if backend is not None else None
    if device_state is not None:
        state["device"] = {"backend": backend.name, "state": device_state.to("cpu").tolist()}
    return state


def set_rng_state(state: dict[str, Any], backend: Any = None) -> str | None:
    """Restore what `rng_state` saved. Returns a warning when the checkpoint's device generator state
    cannot be restored (saved on another kind of device): data order stays exact, dropout masks differ."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    saved = state.get("device")
    if saved is None:
        return None
    here = getattr(backend, "name", None)
    if saved["backend"] != here:
        return (f"the checkpoint's {saved['backend']} RNG state is not restored on {here}: "
                "data order is exact, dropout masks differ from an uninterrupted run")
    backend.set_rng_state(torch.tensor(saved["state"], dtype=torch.uint8))
    return None


def weights_digest(weights: dict[str, torch.Tensor]) -> str | None:
    """SHA-256 of a rank's unwrapped weights (name + raw bytes): replicas that trained in lockstep have
    equal digests. None for an empty dict: under ZeRO-3 only rank 0 holds the gathered weights, and the
    digest of the whole model is the only one that does not depend on how DeepSpeed partitions it."""
    if not weights:
        return None
    h = hashlib.sha256()
    for name, p in sorted(weights.items()):
        h.update(name.encode())
        h.update(p.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def write_rank_state(ckpt_dir: Path, rank: int, data_state: dict[str, Any], digest: str,
                     counters: dict[str, int] | None = None, backend: Any = None) -> None:
    """This rank's data cursor, RNG states, weights digest and its own counters (e.g. skipped samples)."""
    payload = {"data": data_state, "rng": rng_state(backend), "weights_sha256": digest,
               "counters": dict(counters or {})}
    _atomic_write_text(ckpt_dir / f"rank_{rank:05d}.json", json.dumps(payload))


def read_rank_state(ckpt_dir: Path, rank: int) -> dict[str, Any]:
    path = ckpt_dir / f"rank_{rank:05d}.json"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: was the checkpoint written with another world size?")
    return json.loads(path.read_text())


def write_run_files(ckpt_dir: Path, cfg: RunConfig, client: ClientState, state_dict: dict[str, torch.Tensor]) -> None:
    """Rank 0's part of a save (after every rank's files are on disk): consolidated weights, config, and
    last the client state, which records the size of every other file of the directory."""
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(ckpt_dir / "model.safetensors"), metadata={"format": "pt"})
    save_config(cfg, ckpt_dir / "config.yaml")
    maybe_crash("save_weights", client.step)
    client.files = list_files(ckpt_dir)
    _atomic_write_text(ckpt_dir / CLIENT_STATE, json.dumps(asdict(client), indent=1))


def list_files(ckpt_dir: Path) -> dict[str, int]:
    """Relative path → size of every file in a checkpoint directory except client_state.json."""
    out = {}
    for path in sorted(ckpt_dir.rglob("*")):
        rel = path.relative_to(ckpt_dir).as_posix()
        if path.is_file() and rel != CLIENT_STATE:
            out[rel] = path.stat().st_size
    return out


def verify_files(ckpt_dir: Path, client: ClientState) -> None:
    """The directory holds exactly the files and sizes its save recorded (nothing truncated, swapped in
    or added). Checkpoints written before the record existed (empty `files`) are not checked."""
    if not client.files:
        return
    found = list_files(ckpt_dir)
    for name, size in client.files.items():
        if name not in found:
            raise CheckpointError(f"{ckpt_dir / name} is missing: the checkpoint is incomplete")
        if found[name] != size:
            raise CheckpointError(
                f"{ckpt_dir / name} has {found[name]} bytes, its save wrote {size}: refusing to load it")
    extra = sorted(set(found) - set(client.files))
    if extra:
        raise CheckpointError(f"{ckpt_dir / extra[0]} was not written by this checkpoint's save: refusing to load it")


def weights_match(weights: dict[str, torch.Tensor], rank_state: dict[str, Any]) -> bool:
    """After loading: this rank's weights are bit-identical to the ones whose digest it wrote at save time
    (True when there is nothing to compare: no digest recorded, or a ZeRO-3 rank other than 0)."""
    want = rank_state.get("weights_sha256")
    have = weights_digest(weights)
    return not want or have is None or have == want


def _safe_globals() -> list[Any]:
    found = []
    for name in DEEPSPEED_SAFE_GLOBALS:
        module, _, attr = name.rpartition(".")
        try:
            found.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):
            continue
    return found


@contextlib.contextmanager
def weights_only_torch_load() -> Iterator[None]:
    """Within the block every `torch.load` runs with weights_only=True, allowing only DeepSpeed's own
    checkpoint classes (DEEPSPEED_SAFE_GLOBALS): DeepSpeed's load_checkpoint asks for weights_only=False.

    A file holding anything else (a crafted pickle that would run code) raises a one-line CheckpointError
    instead of being unpickled. Used around `engine.load_checkpoint` only, before the data loader starts."""
    original = torch.load
    allowed = _safe_globals()

    def load(f: Any, map_location: Any = None, pickle_module: Any = None, **kwargs: Any) -> Any:
        kwargs.pop("weights_only", None)
        with torch.serialization.safe_globals(allowed):
            try:
                return original(f, map_location=map_location, weights_only=True, **kwargs)
            except pickle.UnpicklingError as exc:
                found = re.search(r"GLOBAL ([\w.]+)", str(exc))
                what = f"it pickles {found.group(1)}" if found else "it holds more than tensors"
                raise CheckpointError(f"refusing to load {f}: {what} (only tensors and DeepSpeed's "
                                      "checkpoint classes are loaded)") from None

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def read_client_state(ckpt_dir: Path) -> ClientState:
    try:
        return ClientState(**json.loads((ckpt_dir / CLIENT_STATE).read_text()))
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{ckpt_dir / CLIENT_STATE} is not a valid client state: {exc}") from None


def prepare_tag(ckpt_root: Path, tag: str) -> None:
    """Rank 0, before saving `tag`: if a directory of that name exists (a run resumed from an earlier
    checkpoint reaches the step again), move `latest` off it and delete it, so that no crash can leave a
    mix of two saves under a name `latest` or a complete-looking client state points at."""
    target = ckpt_root / tag
    if not target.exists():
        return
    pointer = ckpt_root / LATEST
    if pointer.is_file() and pointer.read_text().strip() == tag:
        older = sorted(p.name for p in ckpt_root.glob("step_*") if p.name < tag and (p / CLIENT_STATE).is_file())
        if older:
            _atomic_write_text(pointer, older[-1] + "\n")
        else:
            pointer.unlink()
    shutil.rmtree(target)


def publish(ckpt_root: Path, tag: str, keep_last: int) -> None:
    """Point `latest` at `tag` (atomic), then prune older checkpoints beyond `keep_last`."""
    maybe_crash("before_latest", int(tag.removeprefix("step_")))
    _atomic_write_text(ckpt_root / LATEST, tag + "\n")
    steps = sorted(p for p in ckpt_root.glob("step_*") if p.is_dir() and p.name != tag)
    complete = [p for p in steps if (p / CLIENT_STATE).is_file()]
    for old in complete[: max(0, len(complete) - (keep_last - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    # directories left by a crash mid-save, older than the one just published
    for partial in set(steps) - set(complete):
        if partial.name < tag:
            shutil.rmtree(partial, ignore_errors=True)
