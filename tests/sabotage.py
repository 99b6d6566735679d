"""Do the tests guard what they claim? Disable one feature at a time in a copy of the checkout and run the
tests that guard it: each sabotage must make at least one of them FAIL (an error or a pass is a miss).

    python tests/sabotage.py              # all sabotages, then a markdown table (make sabotage)
    python tests/sabotage.py --list       # the sabotages and their guarding tests
    python tests/sabotage.py --only compile_noop,lr_steps_on_skip
    python tests/sabotage.py --baseline   # the guarding tests on the unmodified copy (must all pass)

Run by hand (about 30 minutes on 2 cores, 5 of them the demo run), not in CI. Each sabotage replaces one
exact piece of source text; when the source changes so that the text is gone, the script stops and names
the stale sabotage, so the list moves with the code. The result table is in docs/testing.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BATCH_TIMEOUT_S = 1800  # one sabotage's guarding tests together; each test also has its Sabotage.timeout_s


@dataclass(frozen=True)
class Sabotage:
    id: str
    area: str
    what: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]
    timeout_s: int = 300  # per guarding test; a hung collective counts as caught when it times out


T_MODEL = "tests/test_model_bridgetower.py"
T_TRAIN = "tests/test_train.py"
T_REL = "tests/test_reliability.py"
T_DATA = "tests/test_data_pipeline.py"
T_HPU = "tests/test_hpu_double.py"
T_ELASTIC = "tests/test_elastic.py"

SABOTAGES = [
    Sabotage(
        "grad_checkpointing_noop",
        "model",
        "set_grad_checkpointing does nothing",
        "gaudi_pretrain/model/bridgetower.py",
        '"""Checkpoint every uni-modal and cross-modal layer (recompute activations in backward)."""\n',
        '"""Checkpoint every uni-modal and cross-modal layer (recompute activations in backward)."""\n        return\n',
        (f"{T_MODEL}::test_activation_checkpointing_recomputes_every_layer_with_the_same_loss_and_grads",),
    ),
    Sabotage(
        "shared_vision_ungathered",
        "model",
        "the ITM pass pairs every text with its own image (no negatives)",
        "gaudi_pretrain/model/pretraining.py",
        "torch.cat([f, f.index_select(0, index)])",
        "torch.cat([f, f])",
        (f"{T_MODEL}::test_pretraining_step_equals_two_full_forwards",),
    ),
    Sabotage(
        "layer_norm_bf16",
        "model",
        "LayerNorm normalises bf16 activations in bf16",
        "gaudi_pretrain/model/bridgetower.py",
        "        with fp32_region(x):\n",
        "        return super().forward(x)\n        with fp32_region(x):\n",
        (
            f"{T_MODEL}::test_layer_norms_and_losses_compute_in_fp32_with_bf16_weights",
            f"{T_HPU}::test_layer_norms_softmax_and_losses_stay_fp32_under_hpu_autocast",
        ),
    ),
    Sabotage(
        "compile_noop",
        "backend",
        "Backend.compile returns the model uncompiled",
        "gaudi_pretrain/backends/base.py",
        "return torch.compile(model) if self.cfg.compile else model",
        "return model",
        (
            f"{T_TRAIN}::test_compiled_training_matches_eager",
            "tests/test_backends.py::test_cpu_bf16_autocast_and_compile_switch",
        ),
    ),
    Sabotage(
        "lr_steps_on_skip",
        "non-finite",
        "the lr schedule is stepped on a skipped non-finite step",
        "gaudi_pretrain/train/nonfinite.py",
        '    optimizer = getattr(engine, "optimizer", None)\n',
        '    engine.lr_scheduler.step()\n    optimizer = getattr(engine, "optimizer", None)\n',
        # Under DeepSpeed 0.19 every tested configuration cancels its step on the device (the host-side
        # skip is 0.16's BF16_Optimizer path): the 0.16 rerun is the guard that reaches skip_step.
        (
            f"{T_REL}::test_nonfinite_steps_are_skipped_counted_and_stop_the_run_with_the_last_good_state",
            "tests/test_compat.py::test_training_passes_under_deepspeed_0_16",
        ),
    ),
    Sabotage(
        "skip_decided_per_rank",
        "non-finite",
        "the step-or-skip decision is not all-reduced across ranks",
        "gaudi_pretrain/train/nonfinite.py",
        "        dist.all_reduce(value, op=dist.ReduceOp.MIN)\n",
        "        pass\n",
        (
            f"{T_REL}::test_nonfinite_gradient_on_one_rank_skips_the_step_on_every_rank",
            # DeepSpeed 0.19 skips a step with non-finite reduced gradients itself; 0.16.1 applies it
            "tests/test_compat.py::test_training_passes_under_deepspeed_0_16",
        ),
    ),
    Sabotage(
        "guarded_skip_ignored",
        "non-finite",
        "GuardedAdamW ignores found_inf (a NaN step is applied)",
        "gaudi_pretrain/train/optim.py",
        "keep = torch.ones((), device=device) if self.found_inf is None else",
        "keep = torch.ones((), device=device) if True else",
        (
            "tests/test_optim.py::test_guarded_adamw_is_torch_adamw_and_cancels_a_step_on_the_device",
            f"{T_REL}::test_nonfinite_steps_are_skipped_counted_and_stop_the_run_with_the_last_good_state",
        ),
    ),
    Sabotage(
        "device_schedule_counts_skips",
        "non-finite",
        "the device lr schedule advances on a cancelled step",
        "gaudi_pretrain/train/optim.py",
        "self.counted += 1.0 if found_inf is None else",
        "self.counted += 1.0 if True else",
        (
            "tests/test_optim.py::test_device_schedule_does_not_advance_on_a_cancelled_step_and_resumes",
            f"{T_REL}::test_nonfinite_steps_are_skipped_counted_and_stop_the_run_with_the_last_good_state",
        ),
    ),
    Sabotage(
        "skip_decided_on_host",
        "HPU",
        "every step reads the skip decision on the host",
        "gaudi_pretrain/train/nonfinite.py",
        '    return bool(getattr(optimizer, "supports_device_skip", False)) and',
        "    return False and",
        (f"{T_HPU}::test_training_under_mpirun_against_the_double_reads_the_device_only_at_log_steps",),
    ),
    Sabotage(
        "metrics_float64",
        "HPU",
        "step metrics are summed in float64 (no FP64 on Gaudi)",
        "gaudi_pretrain/train/metrics.py",
        "self.sums = torch.zeros(len(SUM_FIELDS), dtype=torch.float32,",
        "self.sums = torch.zeros(len(SUM_FIELDS), dtype=torch.float64,",
        (f"{T_HPU}::test_training_under_mpirun_against_the_double_reads_the_device_only_at_log_steps",),
    ),
    Sabotage(
        "untested_optimizer_refused",
        "HPU",
        "the DeepSpeed dict does not allow FusedAdamW under ZeRO",
        "gaudi_pretrain/config.py",
        '        ds["zero_allow_untested_optimizer"] = True\n',
        "        pass\n",
        (
            f"{T_HPU}::test_fused_adamw_under_zero_trains_saves_and_resumes",
            f"{T_HPU}::test_fused_adamw_is_an_optimizer_deepspeed_does_not_know",
            f"{T_HPU}::test_the_large_preset_initializes_trains_and_saves_under_the_double",
        ),
    ),
    Sabotage(
        "bridge_mode_unchecked",
        "HPU",
        "the mode the bridge really runs in is not checked",
        "gaudi_pretrain/backends/hpu.py",
        "        self._check_mode()\n",
        "",
        (
            f"{T_HPU}::test_a_bridge_loaded_in_another_mode_is_refused_in_one_line",
            f"{T_HPU}::test_a_mode_mismatch_stops_train_in_one_line",
        ),
    ),
    Sabotage(
        "mode_set_after_torch",
        "HPU",
        "train does not set PT_HPU_LAZY_MODE before torch is imported",
        "gaudi_pretrain/launch_env.py",
        '    apply(cfg, can_set="torch" not in sys.modules)',
        "    pass",
        (f"{T_HPU}::test_fused_adamw_under_zero_trains_saves_and_resumes",),
    ),
    Sabotage(
        "ranks_exported_after_torch",
        "HPU",
        "ranks reach the environment only after the bridge loaded",
        "gaudi_pretrain/launch_env.py",
        "    info = discover()\n    export_env(info)\n",
        "    info = discover()\n",
        (f"{T_HPU}::test_pmi_launch_across_nodes_rendezvous_at_rank_0_and_each_rank_takes_its_card",),
    ),
    Sabotage(
        "seed_silently_skipped",
        "HPU",
        "the HPU seed is skipped when the API is absent",
        "gaudi_pretrain/backends/hpu.py",
        "        self._random().manual_seed_all(seed)",
        '        getattr(self._random(), "manual_seed_all", lambda s: None)(seed)',
        (f"{T_HPU}::test_seed_goes_through_the_real_api_and_fails_loudly",),
    ),
    Sabotage(
        "compile_dynamic_shapes",
        "HPU",
        "torch.compile on HPU without dynamic=False",
        "gaudi_pretrain/backends/hpu.py",
        'torch.compile(model, backend="hpu_backend", dynamic=False)',
        'torch.compile(model, backend="hpu_backend")',
        (
            f"{T_HPU}::test_eager_compile_mode_trains_compiled_without_mark_step",
            f"{T_HPU}::test_eager_mode_compiles_with_hpu_backend_static_shapes_and_never_marks_steps",
        ),
    ),
    Sabotage(
        "split_overlap",
        "data",
        "neighbouring workers' sample ranges overlap by one sample",
        "gaudi_pretrain/data/epoch_plan.py",
        "return index * length // parts, (index + 1) * length // parts",
        "return index * length // parts, min(length, (index + 1) * length // parts + 1)",
        (f"{T_DATA}::test_two_ranks_two_workers_cover_dataset_exactly_once",),
    ),
    Sabotage(
        "workers_left_on_error",
        "data",
        "an error in a loader worker leaves the workers running (the rank's exit then hangs)",
        "gaudi_pretrain/data/pipeline.py",
        "            if shutdown is not None:\n                shutdown()\n",
        "            if shutdown is not None:\n                pass\n",
        (f"{T_DATA}::test_an_error_in_a_worker_shuts_the_workers_down",),
    ),
    Sabotage(
        "corrupt_uncounted",
        "data",
        "a sample that does not decode is dropped without being counted",
        "gaudi_pretrain/data/pipeline.py",
        "                if sample is None:\n                    skipped += 1\n",
        "                if sample is None:\n                    pass\n",
        (
            f"{T_DATA}::test_corrupt_missing_truncated_and_empty_shards_are_skipped_and_counted",
            f"{T_REL}::test_fault_injected_shards_train_one_epoch_and_skips_are_counted_exactly",
        ),
    ),
    Sabotage(
        "cursor_pos_reset",
        "resume",
        "a restored data cursor forgets its position inside the range",
        "gaudi_pretrain/data/pipeline.py",
        'self._cursors = [{k: int(c[k]) for k in ("epoch", "batch", "pos")} for c in state["workers_state"]]',
        'self._cursors = [{"epoch": int(c["epoch"]), "batch": int(c["batch"]), "pos": 0}'
        ' for c in state["workers_state"]]',
        (f"{T_DATA}::test_resume_continues_with_identical_batches",),
    ),
    Sabotage(
        "mlm_mask_ratio",
        "data",
        "MLM replaces 70% of the selected tokens by <mask> instead of 80%",
        "gaudi_pretrain/data/masking.py",
        "to_mask = selected & (how < 0.8)",
        "to_mask = selected & (how < 0.7)",
        ("tests/test_data_transforms.py::test_mlm_masking_statistics_and_special_tokens",),
    ),
    Sabotage(
        "rng_not_restored",
        "resume",
        "resume does not restore the torch CPU generator (dropout stream)",
        "gaudi_pretrain/train/checkpoint.py",
        '    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))\n',
        "",
        (f"{T_TRAIN}::test_resume_after_kill_is_deterministic",),
    ),
    Sabotage(
        "sample_log_not_cut",
        "resume",
        "the per-rank sample log is not cut back to the checkpoint on resume",
        "gaudi_pretrain/train/checkpoint.py",
        "    sample_log.truncate(ctx.run_dir, rank, client.step)\n",
        "",
        (f"{T_REL}::test_kill_9_of_one_rank_mid_epoch_then_resume_uses_every_sample_once",),
    ),
    Sabotage(
        "digest_unchecked",
        "checkpoint",
        "the weights loaded on resume are not compared with the saved digest",
        "gaudi_pretrain/train/checkpoint.py",
        '    want = rank_state.get("weights_sha256")\n',
        "    return True\n",
        (f"{T_REL}::test_resume_refuses_weights_that_are_not_the_saved_ones",),
    ),
    Sabotage(
        "prepare_tag_noop",
        "checkpoint",
        "re-saving a step leaves `latest` on it and the old directory in place",
        "gaudi_pretrain/train/checkpoint_dirs.py",
        "    target = ckpt_root / tag\n    if not target.exists():\n",
        "    target = ckpt_root / tag\n    if True:\n",
        (f"{T_REL}::test_publish_prunes_and_resaving_a_step_first_unpublishes_it",),
    ),
    Sabotage(
        "metrics_not_reduced",
        "metrics",
        "step metrics are rank 0's own, not reduced across ranks",
        "gaudi_pretrain/train/metrics.py",
        "            dist.all_reduce(sums)\n",
        "            pass\n",
        ("tests/test_metrics.py::test_step_metrics_are_reduced_over_ranks_and_skipped_steps_are_dropped",),
    ),
    Sabotage(
        "launch_pe_per_node",
        "launch",
        "mpirun_gaudi.sh divides a socket's cores by all cards of the node",
        "launch/mpirun_gaudi.sh",
        "pe=$(( cores_per_socket / ranks_per_socket ))",
        "pe=$(( cores_per_socket / cards ))",
        (
            "tests/test_launch.py::test_mpirun_multi_node_dry_run",
            "tests/test_launch.py::test_mpirun_single_node_dry_run",
        ),
    ),
    Sabotage(
        "multinode_master_localhost",
        "launch",
        "a job across nodes rendezvous at 127.0.0.1",
        "gaudi_pretrain/distributed.py",
        "    if world == 1 or local_world >= world:\n",
        "    if True:\n",
        ("tests/test_distributed.py",),
    ),
    Sabotage(
        "norm_params_decayed",
        "optimizer",
        "CLIP's ln_* and other norm parameters get weight decay",
        "gaudi_pretrain/train/optim.py",
        'if isinstance(module, _NORM_TYPES) or type(module).__name__.endswith(("LayerNorm", "RMSNorm")):',
        "if False:",
        ("tests/test_optim.py",),
    ),
    Sabotage(
        "export_bilinear",
        "export",
        "the exported image processor resizes bilinearly (ours is bicubic)",
        "gaudi_pretrain/model/hf_convert.py",
        '        "resample": 3,\n',
        '        "resample": 2,\n',
        ("tests/test_model_hf_convert.py::test_export_loads_in_transformers_with_equal_logits",),
    ),
    Sabotage(
        "export_tied_decoder",
        "export",
        "exports let transformers 4.x tie the MLM decoder to the word embeddings",
        "gaudi_pretrain/model/hf_convert.py",
        "            # so (its default is True); BridgeTower's decoder is a separate matrix.\n"
        '            "tie_word_embeddings": False,\n',
        "            # so (its default is True); BridgeTower's decoder is a separate matrix.\n"
        '            "tie_word_embeddings": True,\n',
        ("tests/test_compat.py::test_model_and_hf_convert_pass_under_transformers_4_55",),
    ),
    Sabotage(
        "export_bf16_working_weights",
        "export",
        "a bf16 run saves and exports the bf16 working weights, not the fp32 masters",
        "gaudi_pretrain/train/checkpoint.py",
        '    if cfg.train.precision == "bf16":  # model.safetensors carries',
        "    if False:  # model.safetensors carries",
        (f"{T_TRAIN}::test_bf16_zero_2_and_zero_0_exports_hold_the_fp32_masters",),
    ),
    Sabotage(
        "best_pruned",
        "checkpoint",
        "keep_last prunes the checkpoint `best` names",
        "gaudi_pretrain/train/checkpoint_dirs.py",
        "    prunable = [p for p in complete if p.name not in kept]\n",
        "    prunable = complete\n",
        (
            f"{T_REL}::test_publish_prunes_and_resaving_a_step_first_unpublishes_it",
            f"{T_TRAIN}::test_best_checkpoint_is_kept_exported_and_throughput_windows_skip_pauses",
        ),
    ),
    Sabotage(
        "throughput_window_steps_kept",
        "metrics",
        "evaluations and saves restart the throughput timer but keep its step count (the issue-16 bug)",
        "gaudi_pretrain/train/loop.py",
        "                timer.reset()  # the evaluation's time is not training throughput\n"
        "            saved = None\n"
        "            if improved or s.step % cfg.checkpoint.every_steps == 0 or final:\n"
        "                saved = save_checkpoint(ctx, best=improved, evaluation=evaluation)\n"
        "                timer.reset()\n",
        "                timer.steps, _ = timer.steps, timer.reset()\n"
        "            saved = None\n"
        "            if improved or s.step % cfg.checkpoint.every_steps == 0 or final:\n"
        "                saved = save_checkpoint(ctx, best=improved, evaluation=evaluation)\n"
        "                timer.steps, _ = timer.steps, timer.reset()\n",
        (f"{T_TRAIN}::test_best_checkpoint_is_kept_exported_and_throughput_windows_skip_pauses",),
    ),
    Sabotage(
        "hard_negatives_ignored",
        "data",
        "data.itm_hard_negatives draws no hard negative",
        "gaudi_pretrain/data/masking.py",
        "        if words is not None and want_hard[i]:\n",
        "        if False:\n",
        ("tests/test_data_transforms.py::test_hard_negatives_differ_in_one_attribute_for_the_configured_fraction",),
    ),
    Sabotage(
        "init_bert_std",
        "model",
        "fresh weights drawn at BERT's 0.02 instead of transformers' BridgeTower 0.05",
        "gaudi_pretrain/model/bridgetower.py",
        "INIT_STD = 0.05 ",
        "INIT_STD = 0.02 ",
        (f"{T_MODEL}::test_fresh_init_follows_transformers_bridgetower_init",),
    ),
    Sabotage(
        "init_no_clip_scheme",
        "model",
        "the visual tower keeps the generic init (position embeddings at 0.05, not W^-0.5)",
        "gaudi_pretrain/model/bridgetower.py",
        "    for tower in (m for m in module.modules() if isinstance(m, VisualTower)):",
        "    for tower in ():",
        (f"{T_MODEL}::test_fresh_init_follows_transformers_bridgetower_init",),
    ),
    Sabotage(
        "hard_negatives_no_ramp",
        "data",
        "data.itm_hard_negatives_ramp_epochs is ignored (hard negatives from the first batch)",
        "gaudi_pretrain/data/pipeline.py",
        "(min(1.0, epoch / ramp) if ramp > 0 else 1.0)",
        "1.0",
        (f"{T_DATA}::test_hard_negatives_ramp_in_over_the_configured_epochs",),
    ),
    Sabotage(
        "resplit_restarts_epoch",
        "resume",
        "a resume on another geometry starts the interrupted epoch over (the consumed samples repeat)",
        "gaudi_pretrain/data/pipeline.py",
        "        left = remainder(plan, parts, consumed)\n",
        "        left = remainder(plan, parts, [0] * len(consumed))\n",
        (
            f"{T_DATA}::test_resplit_over_a_new_geometry_uses_every_sample_once",
            f"{T_ELASTIC}::test_killed_run_resumes_on_another_world_size_with_every_sample_once",
        ),
    ),
    Sabotage(
        "universal_module_only",
        "resume",
        "the universal checkpoint loads the module weights only (DeepSpeed loads ZeRO-1/2 state regardless: ZeRO-3 shows it)",
        "gaudi_pretrain/train/checkpoint.py",
        "load_path, _ = ctx.engine.load_checkpoint(load_dir, tag=tag)",
        "load_path, _ = ctx.engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=not universal)",
        (
            f"{T_ELASTIC}::test_bf16_zero_state_loads_exactly_on_another_world_size_and_stage",
            f"{T_ELASTIC}::test_bf16_zero1_resumes_on_one_rank_through_a_universal_checkpoint",
        ),
    ),
    Sabotage(
        "universal_flag_unset",
        "resume",
        "the universal directory is loaded as an ordinary checkpoint (DeepSpeed's load_universal left off)",
        "gaudi_pretrain/train/checkpoint.py",
        "    ctx.engine._config.load_universal_checkpoint = universal\n",
        "    ctx.engine._config.load_universal_checkpoint = False\n",
        (f"{T_ELASTIC}::test_bf16_zero_state_loads_exactly_on_another_world_size_and_stage",),
    ),
    Sabotage(
        "universal_files_unchecked",
        "resume",
        "a published universal directory is used without checking its files against the marker's list",
        "gaudi_pretrain/train/universal.py",
        '        and marker.get("files") == list_files(folder, but=MARKER)',
        "        and True",
        (f"{T_ELASTIC}::test_bf16_zero1_resumes_on_one_rank_through_a_universal_checkpoint",),
    ),
    Sabotage(
        "global_batch_by_steps",
        "resume",
        "a resume with another global batch continues the lr schedule and max_steps by steps, not samples",
        "gaudi_pretrain/train/checkpoint.py",
        "    set_units_per_step(ctx.engine.lr_scheduler, ctx.global_batch / ctx.state.schedule_batch)\n",
        "    ctx.state.schedule_batch = ctx.global_batch\n",
        (f"{T_ELASTIC}::test_killed_run_resumes_on_another_world_size_with_every_sample_once",),
    ),
    Sabotage(
        "loader_left_open_on_error",
        "launch",
        "the loader workers are left to interpreter exit when a rank fails (they ignore SIGTERM: the exit hangs)",
        "gaudi_pretrain/train/loop.py",
        "        data_iter.close()  # the loader workers exit now",
        "        pass  # the loader workers exit now",
        (f"{T_ELASTIC}::test_two_torchrun_agents_one_dies_and_the_other_restarts_alone_with_every_sample_once",),
    ),
    Sabotage(
        "sigterm_ignored",
        "launch",
        "SIGTERM is recorded but never acted on (the job runs on until it is killed)",
        "gaudi_pretrain/train/preemption.py",
        "        self.requested = True\n",
        "        pass\n",
        (f"{T_ELASTIC}::test_sigterm_to_every_rank_saves_within_the_bound_and_exits_0",),
    ),
    Sabotage(
        "demo_hard_negatives_off",
        "learning",
        "the demo recipe draws no hard ITM negatives (only random ones)",
        "configs/tiny.yaml",
        "  itm_hard_negatives: 0.5",
        "  itm_hard_negatives: 0.0",
        (f"{T_TRAIN}::test_demo_learns_on_held_out_data",),
        timeout_s=900,  # a whole demo run: a timeout must not pass for a failed threshold
    ),
]


def copy_checkout(dest: Path) -> None:
    """Tracked files and untracked, not-ignored ones (what a commit of the working tree would hold)."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout.split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def sabotaged_text(sabotage: Sabotage, root: Path) -> str:
    text = (root / sabotage.path).read_text()
    found = text.count(sabotage.old)
    if found != 1:
        raise SystemExit(f"sabotage {sabotage.id} is stale: its text occurs {found} times in {sabotage.path}")
    return text.replace(sabotage.old, sabotage.new)


def run_tests(root: Path, tests: tuple[str, ...], timeout_s: int) -> tuple[str, list[tuple[str, str]], float]:
    """('failed' | 'passed' | 'error', (failing node id, pytest's one-line reason or ''), seconds) of the
    guarding tests in `root`."""
    env = {k: v for k, v in os.environ.items() if k != "GAUDI_PRETRAIN_CRASH"}
    env["PYTHONPATH"] = str(root)
    env["COLUMNS"] = "400"  # pytest drops a failure's reason from its summary line when it does not fit
    start = time.perf_counter()
    # Output to a file, pytest in a session of its own, killed as a group afterwards: ranks a sabotaged
    # test leaves behind (a hung collective) would otherwise hold a pipe open and block this script.
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                "--tb=no",
                "-rfE",
                f"--timeout={timeout_s}",
                "-m",
                "not slow",
                *tests,
            ],
            cwd=root,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            returncode = proc.wait(timeout=BATCH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            returncode = None
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.seek(0)
        stdout = log.read()
    seconds = time.perf_counter() - start
    if returncode is None:
        return "error", [(f"no result within {BATCH_TIMEOUT_S} s", "")], seconds
    failed = re.findall(r"^FAILED (\S+)(?: - (.*))?$", stdout, re.M)
    errors = re.findall(r"^ERROR (\S+)(?: - (.*))?$", stdout, re.M)
    if errors or returncode not in (0, 1):
        return "error", errors or [(stdout.strip().splitlines()[-1] if stdout.strip() else "no output", "")], seconds
    return ("failed" if failed else "passed"), failed, seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated sabotage ids")
    parser.add_argument("--list", action="store_true", help="list the sabotages and exit")
    parser.add_argument("--baseline", action="store_true", help="run every guarding test without sabotage")
    args = parser.parse_args()
    chosen = SABOTAGES
    if args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - {s.id for s in SABOTAGES})
        if unknown:
            parser.error(f"unknown sabotage ids: {', '.join(unknown)}")
        chosen = [s for s in SABOTAGES if s.id in wanted]
    if args.list:
        for s in chosen:
            print(f"{s.id:28} {s.area:11} {s.what}\n{'':41}{' '.join(s.tests)}")
        return 0
    with tempfile.TemporaryDirectory(prefix="sabotage_") as tmp:
        pristine = Path(tmp) / "pristine"
        copy_checkout(pristine)
        for s in chosen:  # every sabotage applies to today's source before anything runs
            sabotaged_text(s, pristine)
        if args.baseline:
            tests = tuple(dict.fromkeys(t for s in chosen for t in s.tests))
            status, failing, seconds = run_tests(pristine, tests, max(s.timeout_s for s in chosen))
            print(f"baseline: {status} in {seconds:.0f} s {' '.join(node for node, _ in failing)}")
            return 0 if status == "passed" else 1
        rows, missed = [], 0
        for s in chosen:
            work = Path(tmp) / s.id
            shutil.copytree(pristine, work)
            (work / s.path).write_text(sabotaged_text(s, work))
            status, failing, seconds = run_tests(work, s.tests, s.timeout_s)
            shutil.rmtree(work)
            caught = status == "failed"
            missed += not caught
            nodes, reasons = zip(*failing) if failing else ((), ())
            hit = ", ".join(n.split("::")[-1] for n in nodes) or "-"
            timed_out = caught and all("Timeout" in r for r in reasons)
            result = ("caught (timed out)" if timed_out else "caught") if caught else f"**MISSED** ({status})"
            print(f"{'caught' if caught else 'MISSED'} {s.id} ({status}, {seconds:.0f} s): {hit}", flush=True)
            for reason in filter(None, reasons):
                print(f"    {reason}", flush=True)
            rows.append(f"| `{s.id}` | {s.area} | {s.what} | {result} | {hit} |")
    print("\n| sabotage | area | what is disabled | result | failing tests |\n|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\n{len(chosen) - missed} of {len(chosen)} sabotages caught")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
