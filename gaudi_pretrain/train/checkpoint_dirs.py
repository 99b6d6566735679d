"""A run's checkpoint directories and their pointers: naming, resolving, publishing, pruning.

Torch-free, so commands can find a checkpoint (and its config) before torch is first imported.
Layout and crash-safety rules: docs/checkpoints.md.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from gaudi_pretrain.errors import CheckpointError, PathError
from gaudi_pretrain.paths import checkpoint_tag
from gaudi_pretrain.train.faults import maybe_crash
from gaudi_pretrain.utils import atomic_write_text

LATEST = "latest"
BEST = "best"  # the checkpoint with the best held-out ITM + MLM accuracy (the recipe's metric)
CLIENT_STATE = "client_state.json"  # written last by a save: a directory without it is incomplete
UNIVERSAL_SUFFIX = ".universal"  # `step_N.universal/`: DeepSpeed's re-cut copy of step_N (train/universal.py)


def list_files(directory: Path, but: str) -> dict[str, int]:
    """Relative path → size of every file under `directory` except the one named `but` (its record)."""
    out = {}
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory).as_posix()
        if path.is_file() and rel != but:
            out[rel] = path.stat().st_size
    return out


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def read_pointer(ckpt_root: str | Path, name: str = LATEST) -> Path | None:
    """The complete checkpoint directory a pointer file (`latest` or `best`) names, or None without one."""
    root = Path(ckpt_root)
    pointer = root / name
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


def resolve_checkpoint(spec: str, output_dir: str | Path | None = None, pointer: str = LATEST) -> Path | None:
    """The one rule for naming a checkpoint (resume, export-hf, eval): `auto` → the run's `latest` (None
    when there is none); a complete checkpoint directory; a run or `checkpoints/` directory → the checkpoint
    its `pointer` (`latest` or `best`) names. A directory whose save never completed (no client_state.json)
    is refused, naming the last complete one."""
    if spec == "auto":
        return read_pointer(checkpoints_dir(output_dir), pointer) if output_dir is not None else None
    path = Path(spec)
    if (path / CLIENT_STATE).is_file() and pointer == LATEST:
        return path
    for root in (path, checkpoints_dir(path)):
        if (root / pointer).is_file():
            return read_pointer(root, pointer)
    has_latest = (path / LATEST).is_file() or (checkpoints_dir(path) / LATEST).is_file()
    if pointer != LATEST and has_latest:
        raise CheckpointError(f"{spec} has no `{pointer}` checkpoint (it is written when an evaluation improves)")
    if path.is_dir() and path.name.startswith("step_"):
        complete = sorted(p for p in path.parent.glob("step_*") if (p / CLIENT_STATE).is_file())
        last = f"the last complete one is {complete[-1]}" if complete else "there is no complete one beside it"
        raise CheckpointError(
            f"{spec} is an incomplete checkpoint (no {CLIENT_STATE}: its save was interrupted); {last}"
        )
    raise CheckpointError(f"no complete checkpoint at {spec}")


def prepare_tag(ckpt_root: Path, tag: str) -> None:
    """Rank 0, before saving `tag`: if a directory of that name exists (a run resumed from an earlier
    checkpoint reaches the step again), move `latest` off it (and drop `best` if it names it) and delete
    it, so that no crash can leave a mix of two saves under a name a pointer or a client state points at."""
    target = ckpt_root / tag
    if not target.exists():
        return
    pointer = ckpt_root / LATEST
    if pointer.is_file() and pointer.read_text().strip() == tag:
        older = sorted(p.name for p in ckpt_root.glob("step_*") if p.name < tag and (p / CLIENT_STATE).is_file())
        if older:
            atomic_write_text(pointer, older[-1] + "\n")
        else:
            pointer.unlink()
    best = ckpt_root / BEST
    if best.is_file() and best.read_text().strip() == tag:
        best.unlink()
    shutil.rmtree(target)


def publish(ckpt_root: Path, tag: str, keep_last: int, best: bool = False) -> None:
    """Point `latest` (and `best` when this save holds the best evaluation so far) at `tag`, each
    atomically, then prune older checkpoints beyond `keep_last`; the one `best` names is never pruned."""
    maybe_crash("before_latest", int(tag.removeprefix("step_")))
    atomic_write_text(ckpt_root / LATEST, tag + "\n")
    if best:
        atomic_write_text(ckpt_root / BEST, tag + "\n")
    best_path = ckpt_root / BEST
    kept = {best_path.read_text().strip()} if best_path.is_file() else set()
    steps = sorted(
        p for p in ckpt_root.glob("step_*") if p.is_dir() and p.name != tag and not p.name.endswith(UNIVERSAL_SUFFIX)
    )
    complete = [p for p in steps if (p / CLIENT_STATE).is_file()]
    prunable = [p for p in complete if p.name not in kept]
    for old in prunable[: max(0, len(prunable) - (keep_last - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    # directories left by a crash mid-save, older than the one just published
    for partial in set(steps) - set(complete):
        if partial.name < tag:
            shutil.rmtree(partial, ignore_errors=True)
    # universal copies (finished or interrupted) of older saves: a resume converts `latest` again if needed
    for derived in [
        *ckpt_root.glob(f"step_*{UNIVERSAL_SUFFIX}"),
        *ckpt_root.glob(f".step_*{UNIVERSAL_SUFFIX}.partial-*"),
    ]:
        if derived.name.lstrip(".").split(".")[0] < tag:
            shutil.rmtree(derived, ignore_errors=True)
