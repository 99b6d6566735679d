"""Training metrics are global: step sums are reduced across ranks, skipped steps never reach the log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, os, sys
import torch
from gaudi_pretrain.distributed import destroy, discover, init_distributed
from gaudi_pretrain.model.pretraining import PretrainingOutput
from gaudi_pretrain.train.metrics import StepAccumulator, all_reduce_sum

info = discover()
init_distributed(info, "gloo", timeout=120, use_deepspeed=False)
r = info.rank


def out(loss, mlm_correct, mlm_count, itm_correct, itm_count):
    t = lambda v: torch.tensor(float(v))
    return PretrainingOutput(t(loss), t(0.75 * loss), t(0.25 * loss), None, None, t(mlm_correct), t(mlm_count),
                             t(itm_correct), t(itm_count))


acc = StepAccumulator(torch.device("cpu"))
acc.add(out(1.0 + r, 3 + r, 10, 1, 2))      # an applied step of two micro-steps
acc.add(out(2.0 + r, 5, 10 + r, 2, 2))
acc.commit()
acc.add(out(float("nan"), 9, 9, 9, 9))      # a skipped (non-finite) step
acc.discard()
result = {"means": acc.reduce(), "sums": all_reduce_sum([0.5 * (r + 1), 7 * r], torch.device("cpu")),
          "next": acc.reduce()}
with open(os.path.join(sys.argv[1], f"rank{r}.json"), "w") as fh:
    json.dump(result, fh)
destroy()
"""


def test_step_metrics_are_reduced_over_ranks_and_skipped_steps_are_dropped(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        str(script),
        str(tmp_path),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert results[0] == results[1]  # every rank logs the same numbers
    # 4 applied micro-steps over both ranks: losses 1, 2 (rank 0) and 2, 3 (rank 1); the NaN step is gone
    assert results[0]["means"] == pytest.approx(
        {"loss": 2.0, "mlm_loss": 1.5, "itm_loss": 0.5, "mlm_acc": 17 / 41, "itm_acc": 6 / 8}
    )
    assert results[0]["sums"] == [1.5, 7.0]
    assert results[0]["next"] == {k: None for k in ("loss", "mlm_loss", "itm_loss", "mlm_acc", "itm_acc")}
