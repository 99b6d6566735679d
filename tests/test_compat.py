"""The library versions Gaudi images bring, which the main test venv does not have.

- transformers 4.55: optimum-habana pins it (pyproject allows >=4.55,<6; the venv gets 5.x). The model,
  HF conversion, optimizer grouping and transform tests rerun under it. It caught two real differences: 4.x ties
  the MLM decoder to the word embeddings unless the text config says not to, and 4.x's
  CLIPModel.vision_model is a CLIPVisionTransformer (no `vision_model.` prefix).
- DeepSpeed 0.16.1: Habana's fork for SW 1.21 is based on it (the venv gets 0.19). The non-finite step
  tests (bf16, ZeRO 0/1/3), 2-rank training and a ZeRO 2 -> 1 elastic resume rerun under it. It caught
  that 0.16 does not skip non-finite bf16 steps (ZeRO-0 fails an assertion, ZeRO-1/3 apply the NaN update;
  see train/nonfinite.py), and that its universal converter fails on our ZeRO-3 checkpoints.

`make test` installs each into <venv>/compat/<name> (pins in tests/compat/); the tests run pytest in a
subprocess with that overlay first on PYTHONPATH and check the version it imported.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _collect(args: list[str], env: dict[str, str] | None = None) -> list[str]:
    """The node ids pytest collects for `args` (the selection the rerun must run in full)."""
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m", "not slow", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    ids = [line for line in out.stdout.splitlines() if "::" in line]
    assert out.returncode == 0 and ids, out.stdout[-3000:] + out.stderr[-2000:]
    return ids


def _rerun_under(overlay_name: str, module: str, version_prefix: str, node_ids: list[str]) -> None:
    """Run exactly `node_ids` with the overlay first on PYTHONPATH: all of them must pass, none skipped."""
    overlay = Path(sys.prefix) / "compat" / overlay_name
    if not overlay.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"{overlay} is missing: run the tests through `make test`")
        pytest.skip(f"{overlay} not installed (`make test` installs it)")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(overlay), env.get("PYTHONPATH")]))
    version = subprocess.run(
        [sys.executable, "-c", f"import {module}; print({module}.__version__)"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()[-1]
    assert version.startswith(version_prefix), version
    assert _collect(node_ids, env) == node_ids  # the overlay changes nothing about which tests exist
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *node_ids],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=800,
    )
    last = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert re.fullmatch(rf"{len(node_ids)} passed(, \d+ warnings?)? in .*", last), run.stdout[-500:]


def test_model_and_hf_convert_pass_under_transformers_4_55():
    _rerun_under(
        "transformers-4.55",
        "transformers",
        "4.55.",
        _collect(
            [
                "tests/test_model_bridgetower.py",
                "tests/test_model_hf_convert.py",
                "tests/test_optim.py",
                "tests/test_data_transforms.py",
            ]
        ),
    )


# The non-finite step tests where DeepSpeed clips (bf16), 2-rank training, and an elastic resume.
DEEPSPEED_016_TESTS = [
    *(
        f"tests/test_reliability.py::test_nonfinite_steps_are_skipped_counted_and_stop_the_run_with_the_last_good_state"
        f"[bf16-{stage}]"
        for stage in (0, 1, 3)
    ),
    "tests/test_reliability.py::test_nonfinite_gradient_on_one_rank_skips_the_step_on_every_rank",
    "tests/test_train.py::test_two_ranks_torchrun_disjoint_data_identical_weights",
    # the universal checkpoint path: ZeRO-2 on 2 ranks -> ZeRO-1 on 1 (0.16.1's converter fails on ZeRO-3)
    "tests/test_elastic.py::test_bf16_zero_state_loads_exactly_on_another_world_size_and_stage[zero2to1_2to1]",
]


def test_training_passes_under_deepspeed_0_16():
    _rerun_under("deepspeed-0.16", "deepspeed", "0.16.", DEEPSPEED_016_TESTS)
