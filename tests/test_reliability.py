"""Reliability (issue 8): bad data, crashes and bad input never lose, repeat or corrupt anything.

Every training run here is the real CLI on CPU (tiny config, micro batch 16, a few steps); faults come from
hand-written tars (`tarfile`) and from the fault hook `GAUDI_PRETRAIN_CRASH` (gaudi_pretrain/train/faults.py).
"""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli_env, read_jsonl, run_cli, sample_log, tiny_overrides, torchrun, write_tar

pytestmark = pytest.mark.timeout(600)

MICRO = 16
QUIET = {"logging.every_steps": 1, "eval.every_steps": 100_000, "checkpoint.every_steps": 100_000}


# --------------------------------------------------------------------------------------- helpers


def _train(shards_root, run_dir, *extra, env=None, ranks=1, **overrides):
    """The real `gaudi_pretrain train` (torchrun with gloo when ranks=2); eval off unless asked for."""
    values = {
        "data.eval_shards": "[]",
        "train.micro_batch_size": MICRO,
        "logging.sample_log": "true",
        **QUIET,
        **overrides,
    }
    args = ["train", "--config", "configs/tiny.yaml", *tiny_overrides(shards_root, run_dir, **values), *extra]
    return run_cli(args, env=env, launcher=torchrun() if ranks == 2 else None, timeout=400)


def _fault_env(spec: str) -> dict[str, str]:
    env = cli_env()
    env["GAUDI_PRETRAIN_CRASH"] = spec
    return env


def _train_records(run_dir: Path) -> list[dict]:
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["kind"] == "train"]


def _demo_samples(demo_shards: Path, n: int) -> list[tuple[str, dict[str, bytes]]]:
    """The first n samples of the demo train shards: (key, {ext: bytes}) in member order jpg, txt, json."""
    out: list[tuple[str, dict[str, bytes]]] = []
    for tar in sorted((demo_shards / "train").glob("*.tar")):
        with tarfile.open(tar) as tf:
            for member in tf:
                key, _, ext = member.name.partition(".")
                if not out or out[-1][0] != key:
                    if len(out) == n:
                        return out
                    out.append((key, {}))
                out[-1][1][ext] = tf.extractfile(member).read()
    assert len(out) == n
    return out


def _write_tar(path: Path, samples) -> Path:
    return write_tar(path, samples, gnu=True)


def _corrupt_image(parts: dict[str, bytes], kind: int) -> dict[str, bytes]:
    """Image bytes no decoder accepts: random bytes, a JPEG cut after its header, an empty member."""
    jpg = parts["jpg"]
    bad = [np.random.default_rng(len(jpg)).bytes(len(jpg)), jpg[: len(jpg) * 2 // 5], b""][kind % 3]
    return {**parts, "jpg": bad}


def _drop_caption(parts: dict[str, bytes], kind: int) -> dict[str, bytes]:
    """No caption anywhere: no .txt and a .json without one / an empty .txt / only the image."""
    meta = {k: v for k, v in json.loads(parts["json"]).items() if k != "caption"}
    return [
        {"jpg": parts["jpg"], "json": json.dumps(meta).encode()},
        {"jpg": parts["jpg"], "txt": b"  \n", "json": json.dumps(meta).encode()},
        {"jpg": parts["jpg"]},
    ][kind % 3]


def _truncated_tar(path: Path, samples, cut_sample: int, metadata: str | None, between_members: bool = False) -> None:
    """`samples` written as one tar, then cut in the middle of sample `cut_sample`'s image data (or, with
    `between_members`, right after its image member, before its caption's header).
    metadata: None, "ours" (our builder's `<stem>_stats.json` with the full byte size) or "img2dataset"."""
    full = _write_tar(path, samples)
    with tarfile.open(full) as tf:
        member = tf.getmember(f"{samples[cut_sample][0]}.jpg")
        cut = member.offset_data + (-(-member.size // 512) * 512 if between_members else member.size // 2)
    size = full.stat().st_size
    full.write_bytes(full.read_bytes()[:cut])
    stats = path.with_name(path.name.removesuffix(".tar") + "_stats.json")
    if metadata == "ours":
        stats.write_text(json.dumps({"shard": path.name, "samples": len(samples), "bytes": size}))
    elif metadata == "img2dataset":
        stats.write_text(json.dumps({"count": len(samples), "successes": len(samples), "failed_to_download": 0}))


def _assert_bad_input(result, run_dir: Path, *needles: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("gaudi-pretrain train: error: "), last
    for needle in needles:
        assert needle in last, (needle, last)
    assert not run_dir.exists() or not any(run_dir.iterdir()), sorted(run_dir.rglob("*"))


# ------------------------------------------------------------------------------- 1. bad data


@pytest.fixture(scope="module")
def faulty_shards(demo_shards, tmp_path_factory):
    """3 shards x 100 samples with 15 corrupt images (5%) and 6 missing captions (2%), a 40-sample
    tar cut inside sample 25's image (our stats file beside it declares 40), an empty tar, a 0-byte tar."""
    root = tmp_path_factory.mktemp("faulty")
    samples = _demo_samples(demo_shards, 340)
    rng = np.random.default_rng(8)
    picked = rng.permutation(300)
    corrupt, captionless = set(picked[:15].tolist()), set(picked[15:21].tolist())
    good_keys = []
    shard: list = []
    for i, (key, parts) in enumerate(samples[:300]):
        if i in corrupt:
            parts = _corrupt_image(parts, i)
        elif i in captionless:
            parts = _drop_caption(parts, i)
        else:
            good_keys.append(key)
        shard.append((key, parts))
        if len(shard) == 100:
            _write_tar(root / f"{i // 100:05d}.tar", shard)
            shard = []
    _truncated_tar(root / "00003.tar", samples[300:340], cut_sample=25, metadata="ours")
    good_keys += [key for key, _ in samples[300:325]]
    _write_tar(root / "00004.tar", [])  # an empty archive
    (root / "00005.tar").write_bytes(b"")  # a 0-byte file
    # skipped = 15 corrupt + 6 captionless + (40 declared - 25 complete) of the truncated tar
    return root, sorted(good_keys), 15 + 6 + 15


def test_fault_injected_shards_train_one_epoch_and_skips_are_counted_exactly(demo_shards, faulty_shards, tmp_path):
    root, good_keys, injected = faulty_shards
    steps = math.ceil(340 / MICRO)  # one epoch of one rank with one loader worker (tiny.yaml)
    run = tmp_path / "run"
    result = _train(demo_shards, run, **{"data.train_shards": f"['{root}']", "train.max_steps": steps})
    assert result.returncode == 0, result.stderr[-3000:]
    last = _train_records(run)[-1]
    assert last["step"] == steps
    assert last["skipped_samples"] == injected == 36
    assert last["nonfinite_steps"] == 0
    assert all(math.isfinite(r["loss"]) for r in _train_records(run))
    used = [k for keys in sample_log(run, 0).values() for k in keys]
    assert sorted(used) == good_keys  # every good sample exactly once, no bad one
    assert sorted(sample_log(run, 0)) == list(range(steps))


@pytest.mark.parametrize(
    "metadata, between_members, planned, skipped",
    [
        # no metadata: the header scan stops where the data ends, like the reader; sample 25, cut inside its
        # image, and everything after it are not in the plan (nothing can be known about them)
        (None, False, 25, 0),
        # no metadata, cut after sample 25's image member: sample 25 is planned, has no caption: skipped
        (None, True, 26, 1),
        # our stats file declares 40 and the full size: 25 read in full, the cut one + 14 lost are skipped
        ("ours", False, 40, 15),
        ("img2dataset", False, 40, 15),  # img2dataset's `successes` is trusted the same way
    ],
)
def test_truncated_tar_counts_follow_its_metadata(demo_shards, tmp_path, metadata, between_members, planned, skipped):
    from gaudi_pretrain.config import load_config
    from gaudi_pretrain.data.pipeline import build_loader
    from gaudi_pretrain.data.tokenizer import load_tokenizer

    samples = _demo_samples(demo_shards, 40)
    _truncated_tar(tmp_path / "00000.tar", samples, cut_sample=25, metadata=metadata, between_members=between_members)
    cfg = load_config(
        "configs/tiny.yaml",
        [f"data.train_shards=['{tmp_path}']", "data.num_workers=0", f"train.micro_batch_size={MICRO}"],
    )
    loader = build_loader(cfg, load_tokenizer(str(demo_shards / "tokenizer")))
    assert loader.samples_per_epoch == planned
    it = iter(loader)
    batches = [next(it) for _ in range(loader.batches_per_epoch)]
    assert sum(int(b["skipped"]) for b in batches) == skipped
    assert sorted(k for b in batches for k in b["keys"] if k) == [k for k, _ in samples[:25]]


def test_rank_whose_shards_are_all_bad_runs_the_same_steps(demo_shards, tmp_path):
    """2 ranks (torchrun, gloo), 2 equal shards, one entirely bad: each epoch one rank gets no good sample
    at all; it trains on padding-only batches (loss 0, not NaN), nothing hangs, both ranks run every step."""
    samples = _demo_samples(demo_shards, 96)
    shards = tmp_path / "shards"
    shards.mkdir()
    _write_tar(shards / "good.tar", samples[:48])
    bad = [
        (key, _corrupt_image(parts, i) if i % 2 else _drop_caption(parts, i))
        for i, (key, parts) in enumerate(samples[48:])
    ]
    _write_tar(shards / "bad.tar", bad)
    run = tmp_path / "run"
    epochs, per_epoch = 2, 48 // MICRO
    result = _train(
        demo_shards,
        run,
        ranks=2,
        **{
            "data.train_shards": f"['{shards}']",
            "train.max_steps": epochs * per_epoch,
            "checkpoint.every_steps": epochs * per_epoch,
        },
    )
    assert result.returncode == 0, result.stderr[-3000:]
    logs = [sample_log(run, r) for r in (0, 1)]
    good = sorted(k for k, _ in samples[:48])
    for log in logs:
        assert sorted(log) == list(range(epochs * per_epoch))
    for epoch in range(epochs):
        steps = range(epoch * per_epoch, (epoch + 1) * per_epoch)
        per_rank = [sorted(k for s in steps for k in log[s]) for log in logs]
        assert sorted(per_rank, key=len) == [[], good], f"epoch {epoch}: one rank all bad, the other all good"
    last = _train_records(run)[-1]
    assert last["skipped_samples"] == 48 * epochs and last["nonfinite_steps"] == 0
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in _train_records(run))
    ckpt = run / "checkpoints" / f"step_{epochs * per_epoch:08d}"
    digests = {json.loads((ckpt / f"rank_{r:05d}.json").read_text())["weights_sha256"] for r in (0, 1)}
    assert len(digests) == 1, "replicas diverged"

    # What the all-bad rank fed its model: padding rows only, no target, so its loss is exactly 0 (not NaN).
    from gaudi_pretrain.config import load_config
    from gaudi_pretrain.data.pipeline import build_loader
    from gaudi_pretrain.data.tokenizer import load_tokenizer
    from gaudi_pretrain.model.pretraining import BridgeTowerForPretraining

    cfg = load_config("configs/tiny.yaml", [f"data.train_shards=['{shards}']", f"train.micro_batch_size={MICRO}"])
    bad_rank = 0 if not [k for s in range(per_epoch) for k in logs[0][s]] else 1  # epoch 0's bad rank
    loader = build_loader(cfg, load_tokenizer(str(demo_shards / "tokenizer")), rank=bad_rank, world_size=2)
    it, model, skipped = iter(loader), BridgeTowerForPretraining(cfg.model), 0
    for _ in range(per_epoch):
        batch = next(it)
        assert not batch["sample_mask"].any()
        skipped += int(batch["skipped"])
        out = model({k: v for k, v in batch.items() if k not in ("keys", "skipped")})
        assert float(out.loss.detach()) == 0.0 and int(out.mlm_count) == int(out.itm_count) == 0
    assert skipped == 48


# ---------------------------------------------------------------------------- 2. kill -9 + resume


def test_kill_9_of_one_rank_mid_epoch_then_resume_uses_every_sample_once(demo_shards, tmp_path):
    shard = demo_shards / "train" / "00003.tar"  # 180 samples: 90 per rank, 6 steps per epoch
    with tarfile.open(shard) as tf:
        keys = sorted({m.name.partition(".")[0] for m in tf})
    steps = math.ceil(len(keys) / 2 / MICRO)
    run = tmp_path / "run"
    common = {"data.train_shards": f"['{shard}']", "train.max_steps": steps, "checkpoint.every_steps": 2}
    killed = _train(demo_shards, run, env=_fault_env("after_step:4@1"), ranks=2, **common)
    assert killed.returncode != 0  # rank 1 was SIGKILLed after step 4; torchrun tore down rank 0
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    before = {r["step"]: r["loss"] for r in _train_records(run)}
    assert 3 in before, before

    resumed = _train(demo_shards, run, "--resume", "auto", ranks=2, **common)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / 'step_00000002'} at step 2" in resumed.stdout
    logs = [sample_log(run, r) for r in (0, 1)]
    for log in logs:
        assert sorted(log) == list(range(steps)), "each rank logs every step once (sample log truncated on resume)"
    used = [k for log in logs for s in sorted(log) for k in log[s]]
    assert sorted(used) == keys, "over the epoch every sample key is used exactly once across ranks"

    records = _train_records(run)
    after = records[len(before) :]
    assert [r["step"] for r in after] == list(range(3, steps + 1)), "step numbering continues from the checkpoint"
    assert all(math.isfinite(r["loss"]) for r in records)
    assert after[0]["loss"] == pytest.approx(before[3], abs=1e-5), "the re-run step 3 is the same step"


# ------------------------------------------------------------------------ 3. crash during a save


SAVE_KILL_CHAINS = {
    # kill point, resumed from, `latest` after the kill, partial directory left behind
    "before_the_barrier": (
        [
            ("save_engine:2", None, None, "step_00000002"),  # DeepSpeed's files only
            ("mid_save:4", None, "step_00000002", "step_00000004"),
        ],  # + the rank json
        "step_00000002",
    ),
    "rank0_files": (
        [
            ("save_weights:4", None, "step_00000002", "step_00000004"),  # + weights, config
            ("before_latest:6", "step_00000002", "step_00000004", None),
        ],  # complete, unpublished
        "step_00000004",
    ),
}


@pytest.mark.parametrize("chain", sorted(SAVE_KILL_CHAINS))
def test_crash_during_checkpoint_save_never_picks_a_partial_directory(demo_shards, tmp_path, chain):
    """Kill the run between two file writes of a save (DeepSpeed files | rank json | weights + config |
    client_state | latest; two points per chain), resuming each time: `latest` always names a complete
    checkpoint, which loads, and a partial directory is never picked (auto, explicit path, export)."""
    from gaudi_pretrain.errors import CheckpointError
    from gaudi_pretrain.train.checkpoint import read_client_state, verify_files
    from gaudi_pretrain.train.checkpoint_dirs import resolve_checkpoint

    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    common = {"train.max_steps": 6, "checkpoint.every_steps": 2, "checkpoint.keep_last": 5}
    kills, final_from = SAVE_KILL_CHAINS[chain]
    for point, resumed_from, latest, partial in kills:
        result = _train(demo_shards, run, "--resume", "auto", env=_fault_env(point), **common)
        assert result.returncode == -signal.SIGKILL, (point, result.stderr[-2000:])
        if resumed_from:
            assert f"resumed from {ckpts / resumed_from} at step" in result.stdout, point
        else:
            assert "resumed from" not in result.stdout, point
        if latest is None:
            assert not (ckpts / "latest").exists() and resolve_checkpoint("auto", run) is None
        else:
            assert (ckpts / "latest").read_text().strip() == latest
            assert resolve_checkpoint("auto", run) == ckpts / latest
            assert resolve_checkpoint(str(run)) == ckpts / latest  # export-hf / eval naming the run
            verify_files(ckpts / latest, read_client_state(ckpts / latest))
        if partial:
            assert (ckpts / partial).is_dir() and not (ckpts / partial / "client_state.json").exists()
            with pytest.raises(CheckpointError, match="incomplete checkpoint"):
                resolve_checkpoint(str(ckpts / partial), run)
    if chain == "rank0_files":  # step 6 was complete but unpublished: not picked, step 4 is
        assert (ckpts / "step_00000006" / "client_state.json").is_file()
    result = _train(demo_shards, run, "--resume", "auto", **common)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {ckpts / final_from} at step" in result.stdout
    assert (ckpts / "latest").read_text().strip() == "step_00000006"
    for tag in ("step_00000004", "step_00000006"):  # re-saved over the partial / unpublished ones
        verify_files(ckpts / tag, read_client_state(ckpts / tag))
    records = _train_records(run)
    assert records[-1]["step"] == 6 and all(math.isfinite(r["loss"]) for r in records)


def test_publish_prunes_and_resaving_a_step_first_unpublishes_it(tmp_path):
    """`publish` points `latest` at the new checkpoint, keeps `keep_last` complete ones and drops older
    partial ones; `prepare_tag` (a resumed run reaching a saved step again) moves `latest` to the previous
    complete checkpoint before it deletes the old directory, so no crash can leave a mixed one published."""
    from gaudi_pretrain.train.checkpoint_dirs import CLIENT_STATE, prepare_tag, publish, read_pointer

    root = tmp_path / "checkpoints"

    def make(step, complete=True):
        d = root / f"step_{step:08d}"
        d.mkdir(parents=True)
        if complete:
            (d / CLIENT_STATE).write_text("{}")

    for step in (2, 4, 6):
        make(step)
    make(5, complete=False)  # a save that died
    make(8, complete=False)  # another one, newer than the published tag: maybe in progress, kept
    publish(root, "step_00000006", keep_last=2)
    assert read_pointer(root) == root / "step_00000006"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000004", "step_00000006", "step_00000008"]
    prepare_tag(root, "step_00000006")
    assert read_pointer(root) == root / "step_00000004" and not (root / "step_00000006").exists()
    prepare_tag(root, "step_00000004")  # nothing complete before it: `latest` goes, nothing names a mix
    assert read_pointer(root) is None and not (root / "step_00000004").exists()

    # `best` is published with its save and never pruned; re-saving its step drops the pointer first
    for step in (10, 12, 14):
        make(step)
        publish(root, f"step_{step:08d}", keep_last=1, best=step == 10)
    assert read_pointer(root, "best") == root / "step_00000010"
    # the partial step 8 is older than the published tags: gone; 12 is pruned by keep_last, 10 kept as best
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000010", "step_00000014"]
    prepare_tag(root, "step_00000010")
    assert not (root / "best").exists() and read_pointer(root) == root / "step_00000014"


# ------------------------------------------------------------------------------- 4. non-finite


# fp32 ZeRO-0: the loop clips and checks; bf16 (ZeRO-0, and ZeRO-1 as in the presets): DeepSpeed clips.
@pytest.mark.parametrize("precision, zero_stage", [("fp32", 0), ("bf16", 0), ("bf16", 1), ("bf16", 3)])
def test_nonfinite_steps_are_skipped_counted_and_stop_the_run_with_the_last_good_state(
    demo_shards, tmp_path, precision, zero_stage
):
    from safetensors.torch import load_file

    run = tmp_path / "run"
    env = _fault_env("nan_grad:2,nan_loss:5-")  # step 2: finite loss, NaN gradients; 5 on: NaN loss
    result = _train(
        demo_shards,
        run,
        env=env,
        **{
            "data.train_shards": f"['{demo_shards}/train/00003.tar']",
            "train.precision": precision,
            "train.zero_stage": zero_stage,
            "train.max_steps": 10,
            "train.max_consecutive_nonfinite": 3,
            "checkpoint.every_steps": 1,
            "checkpoint.keep_last": 10,
        },
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    ckpt7 = run / "checkpoints" / "step_00000007"
    assert last.startswith("gaudi-pretrain train: error: stopping: 3 consecutive steps (5-7)"), last
    assert f"(after step 4) are saved in {ckpt7}" in last, last
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000007"

    records = _train_records(run)
    assert [r["step"] for r in records] == list(range(1, 8))
    assert [r["nonfinite_steps"] for r in records] == [0, 1, 1, 1, 2, 3, 4]
    assert [r["loss"] is None for r in records] == [False, True, False, False, True, True, True]
    weights = {s: load_file(str(run / "checkpoints" / f"step_{s:08d}" / "model.safetensors")) for s in range(1, 8)}

    optim = {s: _optimizer_state(run / "checkpoints" / f"step_{s:08d}") for s in range(1, 8)}

    def same(a, b):
        return (
            all(torch.equal(weights[a][k], weights[b][k]) for k in weights[a])
            and optim[a].keys() == optim[b].keys()
            and all(_equal(optim[a][k], optim[b][k]) for k in optim[a])
        )

    assert same(1, 2), "the skipped step 2 changed a weight, an Adam moment, the step count or the schedule"
    assert not same(2, 3), "step 3 trained again"
    assert same(4, 5) and same(4, 7), "the stop checkpoint holds the state before the bad steps"
    assert all(torch.isfinite(t).all() for t in weights[7].values())
    assert json.loads((ckpt7 / "client_state.json").read_text())["extra"]["nonfinite_steps"] == 4
    # The schedule moves by applied steps only (tiny.yaml: lr 1e-3, 10 steps, 1 warm-up step, linear to 0):
    # after k applied steps the lr is 1e-3 * (1 - (k - 1) / 9); steps 1, 3, 4 were applied.
    applied = [1, 1, 2, 3, 3, 3, 3]
    assert [r["lr"] for r in records] == pytest.approx([1e-3 * (1 - (k - 1) / 9) for k in applied], rel=1e-6)


_OPTIMIZER_KEYS = ("exp_avg", "exp_avg_sq", "step", "applied_steps", "last_epoch", "_step_count", "_last_lr")


def _optimizer_state(ckpt: Path) -> dict[str, object]:
    """Every Adam moment, optimizer step count and lr-schedule position in a DeepSpeed checkpoint, whatever
    its layout (fp32 ZeRO-0: the torch optimizer in the model states; bf16 / ZeRO: the partitioned
    optimizer files), keyed by file and path. These are trusted test files: a plain torch.load."""
    found: dict[str, object] = {}

    def walk(node, path):
        if isinstance(node, dict):
            for key, value in node.items():
                if key in _OPTIMIZER_KEYS and not isinstance(value, (dict, list)) or key == "_last_lr":
                    found[f"{path}/{key}"] = value
                else:
                    walk(value, f"{path}/{key}")
        elif isinstance(node, (list, tuple)):
            for i, value in enumerate(node):
                walk(value, f"{path}[{i}]")

    for file in sorted(ckpt.glob("*.pt")):
        walk(torch.load(file, map_location="cpu", weights_only=False), file.name)
    assert any("exp_avg_sq" in k for k in found), sorted(found)
    assert any(k.endswith(("/applied_steps", "/last_epoch")) for k in found), sorted(found)  # the schedule
    return found


def _equal(a, b) -> bool:
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_nonfinite_gradient_on_one_rank_skips_the_step_on_every_rank(demo_shards, tmp_path):
    """bf16 ZeRO-1 on 2 ranks, NaN gradients on rank 1 only at step 2: both ranks skip step 2 (the
    decision is all-reduced), keep identical weights equal to step 1's, and train on from step 3."""
    from safetensors.torch import load_file

    run = tmp_path / "run"
    result = _train(
        demo_shards,
        run,
        env=_fault_env("nan_grad:2@1"),
        ranks=2,
        **{
            "train.precision": "bf16",
            "train.zero_stage": 1,
            "train.max_steps": 4,
            "checkpoint.every_steps": 1,
            "checkpoint.keep_last": 10,
        },
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = _train_records(run)
    assert [r["nonfinite_steps"] for r in records] == [0, 1, 1, 1]
    assert [r["loss"] is None for r in records] == [False, True, False, False]
    ckpts = run / "checkpoints"
    for step in range(1, 5):
        digests = {
            json.loads((ckpts / f"step_{step:08d}" / f"rank_{r:05d}.json").read_text())["weights_sha256"]
            for r in (0, 1)
        }
        assert len(digests) == 1, f"ranks diverged at step {step}"
    weights = {s: load_file(str(ckpts / f"step_{s:08d}" / "model.safetensors")) for s in (1, 2, 3)}
    assert all(torch.equal(weights[1][k], weights[2][k]) for k in weights[1]), "step 2 changed weights"
    assert not all(torch.equal(weights[2][k], weights[3][k]) for k in weights[2]), "step 3 did not train"
    assert all(torch.isfinite(t).all() for t in weights[3].values())


# ------------------------------------------------------------------------------- 5. bad input


def _bad_inputs(tmp: Path) -> dict[str, tuple[list[str], dict[str, str], tuple[str, ...]]]:
    """id → (extra CLI args, overrides, strings the last stderr line must hold)."""
    (tmp / "afile").write_text("not a directory")
    (tmp / "empty").mkdir()
    (tmp / "bad.yaml").write_text("train: [unclosed\n")
    (tmp / "typo.yaml").write_text("optim:\n  learning_rate: 0.1\n")
    return {
        "missing_shard_path": (
            [],
            {"data.train_shards": f"['{tmp}/nowhere/00000.tar']"},
            ("data.train_shards", f"{tmp}/nowhere/00000.tar"),
        ),
        "empty_glob": (
            [],
            {"data.train_shards": f"['{tmp}/empty/*.tar']"},
            ("data.train_shards", f"{tmp}/empty/*.tar"),
        ),
        "missing_eval_shards": ([], {"data.eval_shards": f"['{tmp}/gone/*.tar']"}, ("data.eval_shards", f"{tmp}/gone")),
        "config_missing": (["--config", f"{tmp}/nope.yaml"], {}, (f"{tmp}/nope.yaml",)),
        "config_unparsable": (["--config", f"{tmp}/bad.yaml"], {}, (f"{tmp}/bad.yaml", "not valid YAML at line")),
        "unknown_key": ([], {"train.micro_bach_size": "8"}, ("train.micro_bach_size", "train.micro_batch_size")),
        "unknown_key_in_file": (["--config", f"{tmp}/typo.yaml"], {}, ("optim.learning_rate",)),
        "wrong_type": ([], {"train.max_steps": "many"}, ("train.max_steps", "'many'")),
        "global_batch_not_divisible": (
            [],
            {"train.global_batch_size": "40"},
            ("train.global_batch_size 40", "micro_batch_size 64 x world size 1"),
        ),
        "image_not_multiple_of_patch": ([], {"model.vision.image_size": "36"}, ("image_size 36", "patch_size 8")),
        "text_longer_than_positions": (
            [],
            {"data.max_text_len": "64"},
            ("data.max_text_len 64", "max_position_embeddings"),
        ),
        "unwritable_output_dir": ([], {"train.output_dir": f"{tmp}/afile/run"}, ("train.output_dir", f"{tmp}/afile")),
        "pipe_url": (
            [],
            {"data.train_shards": f"['pipe:touch {tmp}/pwned']"},
            ("data.train_shards", "pipe:", "allow_pipe_urls"),
        ),
    }


BAD_INPUT_IDS = [
    "missing_shard_path",
    "empty_glob",
    "missing_eval_shards",
    "config_missing",
    "config_unparsable",
    "unknown_key",
    "unknown_key_in_file",
    "wrong_type",
    "global_batch_not_divisible",
    "image_not_multiple_of_patch",
    "text_longer_than_positions",
    "unwritable_output_dir",
    "pipe_url",
]


@pytest.mark.parametrize("case", BAD_INPUT_IDS)
def test_bad_input_is_one_clear_line_exit_2_and_nothing_written(demo_shards, tmp_path, case):
    extra, overrides, needles = _bad_inputs(tmp_path)[case]
    run = tmp_path / "run"
    args = [
        "train",
        "--config",
        "configs/tiny.yaml",
        *tiny_overrides(demo_shards, run, **{"data.eval_shards": "[]", **overrides}),
        *extra,
    ]
    result = run_cli(args, timeout=120)
    _assert_bad_input(result, Path(overrides.get("train.output_dir", run)), *needles)
    assert not (tmp_path / "pwned").exists()


# --------------------------------------------------------------------------------- 6. security


class _RunsShellOnLoad:
    """A pickle payload: unpickling it runs `touch <marker>` (what a crafted checkpoint file can do)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant_pickle(path: Path, marker: Path) -> None:
    """Replace `path` with a pickle that runs code, and prove it does under a plain torch.load."""
    torch.save({"module": _RunsShellOnLoad(marker)}, path)
    torch.load(path, weights_only=False)
    assert marker.exists(), "the payload must really run code, or the refusal below proves nothing"
    marker.unlink()


def _record_size(ckpt: Path, name: str) -> None:
    """Rewrite client_state.json's size record for `name` (an attacker who edits both files)."""
    state = json.loads((ckpt / "client_state.json").read_text())
    state["files"][name] = (ckpt / name).stat().st_size
    (ckpt / "client_state.json").write_text(json.dumps(state))


@pytest.fixture(scope="module")
def finished_run(demo_shards, tmp_path_factory):
    """A 2-step single-rank run with its checkpoint at step 2 (copied by the tests that tamper with it)."""
    run = tmp_path_factory.mktemp("secure") / "run"
    result = _train(
        demo_shards,
        run,
        **{
            "data.train_shards": f"['{demo_shards}/train/00003.tar']",
            "train.max_steps": 2,
            "checkpoint.every_steps": 2,
        },
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run


def _copy_run(finished_run: Path, tmp_path: Path) -> tuple[Path, Path]:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    return run, run / "checkpoints" / "step_00000002"


def _resume(demo_shards, run):
    return _train(
        demo_shards,
        run,
        "--resume",
        "auto",
        **{
            "data.train_shards": f"['{demo_shards}/train/00003.tar']",
            "train.max_steps": 4,
            "checkpoint.every_steps": 2,
        },
    )


def test_export_and_eval_refuse_an_interrupted_save_naming_the_last_complete_one(finished_run, tmp_path, capsys):
    """One checkpoint resolver: a directory whose save died before client_state.json is refused by
    export-hf and eval (not only by resume), in one line naming the last complete checkpoint; nothing is
    written."""
    import shutil

    from gaudi_pretrain.cli import main

    run, ckpt = _copy_run(finished_run, tmp_path)
    partial = run / "checkpoints" / "step_00000004"
    shutil.copytree(ckpt, partial)
    (partial / "client_state.json").unlink()  # model.safetensors and config.yaml are there, as after a crash
    for argv in (["export-hf", str(partial), str(tmp_path / "hf")], ["eval", str(partial)]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert f"{partial} is an incomplete checkpoint" in err and f"the last complete one is {ckpt}" in err, err
    assert not (tmp_path / "hf").exists()
    # the run directory still resolves to its published checkpoint
    assert main(["export-hf", str(run), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def test_resume_never_unpickles_code_from_a_checkpoint(demo_shards, finished_run, tmp_path):
    """DeepSpeed's load_checkpoint asks torch.load for weights_only=False; resume runs it weights-only."""
    run, ckpt = _copy_run(finished_run, tmp_path)
    marker = tmp_path / "pwned"
    _plant_pickle(ckpt / "mp_rank_00_model_states.pt", marker)
    _record_size(ckpt, "mp_rank_00_model_states.pt")
    result = _resume(demo_shards, run)
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "refusing to load" in last and "mp_rank_00_model_states.pt" in last and "system" in last, last
    assert "Traceback" not in result.stderr
    assert not marker.exists(), "the checkpoint's pickle ran code"


@pytest.mark.parametrize("key, value, saved", [("zero_stage", "1", "0"), ("precision", "bf16", "fp32")])
def test_resume_with_another_optimizer_layout_is_one_clear_line(demo_shards, finished_run, tmp_path, key, value, saved):
    """DeepSpeed cannot load a ZeRO-0 fp32 optimizer state into a ZeRO-1 or bf16 engine (it fails with a
    bare assertion deep inside); the resume says which setting changed and what to do instead."""
    run, ckpt = _copy_run(finished_run, tmp_path)
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    result = _train(
        demo_shards,
        run,
        "--resume",
        "auto",
        **{
            "data.train_shards": f"['{demo_shards}/train/00003.tar']",
            "train.max_steps": 4,
            "checkpoint.every_steps": 2,
            f"train.{key}": value,
        },
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert f"{ckpt} was saved with train.{key}={saved}, this run has {value}" in last, last
    assert "model.from_pretrained" in last, last
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before


def test_resume_refuses_weights_that_are_not_the_saved_ones(demo_shards, finished_run, tmp_path):
    """A same-size edit of DeepSpeed's weights file passes the size record; the weights digest catches it."""
    run, ckpt = _copy_run(finished_run, tmp_path)
    path = ckpt / "mp_rank_00_model_states.pt"
    state = torch.load(path, weights_only=True)
    name = next(iter(state["module"]))
    state["module"][name] = state["module"][name] + 1.0
    torch.save(state, path)
    _record_size(ckpt, path.name)
    result = _resume(demo_shards, run)
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert f"weights loaded from {ckpt} differ from the ones saved there" in last, last


def test_checkpoint_files_must_be_exactly_the_ones_written(finished_run, tmp_path):
    from gaudi_pretrain.errors import CheckpointError
    from gaudi_pretrain.train.checkpoint import read_client_state, verify_files

    _, ckpt = _copy_run(finished_run, tmp_path)
    client = read_client_state(ckpt)
    assert set(client.files) == {"config.yaml", "model.safetensors", "mp_rank_00_model_states.pt", "rank_00000.json"}
    verify_files(ckpt, client)
    (ckpt / "extra.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="extra.pt was not written by this checkpoint's save"):
        verify_files(ckpt, client)
    (ckpt / "extra.pt").unlink()
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match=r"model.safetensors has \d+ bytes, its save wrote \d+"):
        verify_files(ckpt, client)
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        verify_files(ckpt, client)


def test_weight_imports_refuse_pickled_code(tmp_path):
    from gaudi_pretrain.errors import CheckpointError
    from gaudi_pretrain.model.hf_convert import read_state_dict

    marker = tmp_path / "pwned"
    _plant_pickle(tmp_path / "pytorch_model.bin", marker)
    with pytest.raises(CheckpointError, match="not a plain tensor checkpoint"):
        read_state_dict(tmp_path)
    assert not marker.exists()


def test_every_weight_load_in_the_package_is_weights_only():
    """Audit: each torch.load call passes weights_only=True, each model from_pretrained too (tokenizers
    excepted), and the DeepSpeed resume path goes through `weights_only_torch_load`."""
    import ast

    package = Path(__file__).resolve().parents[1] / "gaudi_pretrain"
    loads, pretrained = [], []
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            weights_only = any(
                k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                for k in node.keywords
            )
            owner = ast.unparse(node.func.value)
            where = f"{path.relative_to(package)}:{node.lineno}"
            if node.func.attr == "load" and owner == "torch":
                loads.append((where, weights_only))
            if node.func.attr == "from_pretrained" and "Tokenizer" not in owner and "Config" not in owner:
                pretrained.append((where, weights_only))
    assert loads and pretrained
    assert all(ok for _, ok in loads), loads
    assert all(ok for _, ok in pretrained), pretrained
    restore = (package / "train" / "checkpoint.py").read_text()
    assert "with weights_only_torch_load():\n        load_path, _ = ctx.engine.load_checkpoint(" in restore


def test_shell_running_shard_urls_are_refused_unless_enabled(demo_shards, tmp_path, monkeypatch):
    from gaudi_pretrain.config import load_config
    from gaudi_pretrain.data.pipeline import build_loader
    from gaudi_pretrain.data.shards import resolve_shards
    from gaudi_pretrain.data.tokenizer import load_tokenizer
    from gaudi_pretrain.errors import DataError

    marker = tmp_path / "pwned"
    monkeypatch.setenv("WDS_SNEAKY", f"pipe:touch {marker}")
    for spec in (
        f"pipe:touch {marker}",
        f"PIPE:touch {marker}",
        f"  pipe:touch {marker}",
        "${SNEAKY}",
        f"{{pipe:touch {marker},x}}",
    ):
        with pytest.raises(DataError, match="pipe: URL, which runs a shell command.*allow_pipe_urls"):
            resolve_shards([spec])
    with pytest.raises(DataError, match="unsupported URL scheme 'javascript:'"):
        resolve_shards(["javascript:alert(1)"])
    assert not marker.exists()
    # explicitly enabled, a pipe: URL is a working shard source
    shard = demo_shards / "train" / "00003.tar"
    assert resolve_shards([f"pipe:cat {shard}"], allow_pipe_urls=True) == [f"pipe:cat {shard}"]
    cfg = load_config(
        "configs/tiny.yaml",
        [
            f"data.train_shards=['pipe:cat {shard}']",
            "data.allow_pipe_urls=true",
            "data.num_workers=0",
            f"train.micro_batch_size={MICRO}",
        ],
    )
    loader = build_loader(cfg, load_tokenizer(str(demo_shards / "tokenizer")))
    assert loader.samples_per_epoch == 180 and len([k for k in next(iter(loader))["keys"] if k]) == MICRO


def test_paths_named_in_files_or_data_cannot_leave_their_directory(demo_shards, finished_run, tmp_path):
    from gaudi_pretrain.config import load_config
    from gaudi_pretrain.data.pipeline import build_loader
    from gaudi_pretrain.data.shards import resolve_shards
    from gaudi_pretrain.data.tokenizer import load_tokenizer
    from gaudi_pretrain.errors import CheckpointError, DataError, PathError
    from gaudi_pretrain.paths import confined
    from gaudi_pretrain.train.checkpoint_dirs import resolve_checkpoint

    root = tmp_path / "root"
    assert confined(root, "samples", "rank_00000.log") == root / "samples" / "rank_00000.log"
    for bad in ("../x", "samples/../../x", "/etc/passwd"):
        with pytest.raises(PathError, match="would leave"):
            confined(root, bad)

    # `latest` naming a (complete-looking) checkpoint outside the run is never followed
    run, _ = _copy_run(finished_run, tmp_path)
    import shutil

    outside = tmp_path / "outside"
    shutil.copytree(run / "checkpoints" / "step_00000002", outside)
    for tag in ("../../outside", str(outside), "step_2/../../../outside"):
        (run / "checkpoints" / "latest").write_text(tag + "\n")
        with pytest.raises(CheckpointError, match="not a checkpoint tag"):
            resolve_checkpoint("auto", run)
        with pytest.raises(CheckpointError, match="not a checkpoint tag"):
            resolve_checkpoint(str(run))

    # a manifest cannot list shards outside its directory
    shards = tmp_path / "shards"
    shards.mkdir()
    (tmp_path / "elsewhere.tar").write_bytes((demo_shards / "train" / "00003.tar").read_bytes())
    (shards / "manifest.json").write_text(json.dumps({"shards": [{"name": "../elsewhere.tar", "samples": 180}]}))
    with pytest.raises(DataError, match="lists the shard '../elsewhere.tar', which is not a file in"):
        resolve_shards([str(shards)])

    # sample keys that climb out (`..`, absolute) or hold control characters are skipped and counted
    samples = _demo_samples(demo_shards, 6)
    names = ["../../evil", "/abs/evil", "ok/../../up", "ctl\x07key", "sub dir/with space", "plain"]
    (shards / "manifest.json").unlink()
    _write_tar(shards / "keys.tar", [(name, parts) for name, (_, parts) in zip(names, samples)])
    cfg = load_config(
        "configs/tiny.yaml",
        [f"data.train_shards=['{shards}']", "data.num_workers=0", f"train.micro_batch_size={MICRO}"],
    )
    batch = next(iter(build_loader(cfg, load_tokenizer(str(demo_shards / "tokenizer")))))
    assert sorted(k for k in batch["keys"] if k) == ["plain", "sub dir/with space"]
    assert int(batch["skipped"]) == 4


# ------------------------------------------------------------------------------------ 7. soak


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_soak_two_ranks_2000_steps_memory_flat_and_throughput_steady(demo_shards, tmp_path):
    """2 ranks x 2,000 steps of the tiny config (micro batch 8, a checkpoint every 500 steps, 4+ epochs):
    after a 20% warm-up the resident memory of rank 0 (alone and with its loader worker) grows < 5%, and
    the throughput of the second half of the run is within 20% of the first half (medians of 50-step
    windows, so a noisy neighbour on a shared CI machine does not decide it)."""
    steps, every = 2000, 50
    run = tmp_path / "soak"
    result = _train(
        demo_shards,
        run,
        ranks=2,
        **{
            "data.train_shards": f"['{demo_shards}/train/*.tar']",
            "train.max_steps": steps,
            "train.micro_batch_size": 8,
            "logging.every_steps": every,
            "logging.sample_log": "false",
            "checkpoint.every_steps": 500,
        },
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = _train_records(run)
    assert [r["step"] for r in records] == list(range(every, steps + 1, every))
    warm = [r for r in records if r["step"] > steps // 5]
    figures = {"steps": steps, "windows_after_warmup": len(warm)}
    for key in ("rss_gib", "rss_with_workers_gib"):
        base, peak = warm[0][key], max(r[key] for r in warm)
        figures[key] = {
            "after_warmup_mib": round(base * 1024, 1),
            "peak_mib": round(peak * 1024, 1),
            "final_mib": round(warm[-1][key] * 1024, 1),
            "growth": round(peak / base - 1, 4),
        }
    sps = [r["samples_per_s"] for r in warm]
    half = len(sps) // 2
    first, second = statistics.median(sps[:half]), statistics.median(sps[half:])
    figures["samples_per_s"] = {
        "first_half_median": round(first, 1),
        "second_half_median": round(second, 1),
        "min": round(min(sps), 1),
        "max": round(max(sps), 1),
    }
    print("soak:", json.dumps(figures))
    (tmp_path / "soak_figures.json").write_text(json.dumps(figures, indent=1))
    assert figures["rss_gib"]["growth"] < 0.05, figures
    assert figures["rss_with_workers_gib"]["growth"] < 0.05, figures
    assert second >= 0.8 * first, figures
    assert all(math.isfinite(r["loss"]) for r in records)
    assert records[-1]["skipped_samples"] == 0 and records[-1]["nonfinite_steps"] == 0
