"""The per-rank sample log (`logging.sample_log`): which sample keys each step used, for accounting."""

from __future__ import annotations

from pathlib import Path

from gaudi_pretrain.paths import confined


def path_for(run_dir: Path, rank: int) -> Path:
    return confined(run_dir, "samples", f"rank_{rank:05d}.log")


def append(run_dir: Path, rank: int, step: int, keys: list[str]) -> None:
    """One line per step: `<step>\t<key> <key> …` (0-based step; padding rows left out). Keys hold no
    control characters (unsafe keys are never used); `%` and spaces are written as %25 / %20."""
    path = path_for(run_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(f"{step}\t" + " ".join(k.replace("%", "%25").replace(" ", "%20") for k in keys if k) + "\n")


def truncate(run_dir: Path, rank: int, step: int) -> None:
    """After a resume, forget the keys of steps that the checkpoint does not contain (they rerun)."""
    path = path_for(run_dir, rank)
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and int(line.split("\t", 1)[0]) < step]
    path.write_text("".join(line + "\n" for line in kept))
