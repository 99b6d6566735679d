"""AdamW groups (weight-decay exemptions, lr multipliers) and the warm-up / linear-decay schedule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gaudi_pretrain.config import OptimConfig
from gaudi_pretrain.train.optim import (
    DeviceSchedule,
    GuardedAdamW,
    lr_lambda,
    make_scheduler,
    param_groups,
    set_units_per_step,
)


class Block(nn.Module):
    def __init__(self, d=4):
        super().__init__()
        self.dense = nn.Linear(d, d)
        self.LayerNorm = nn.LayerNorm(d)


class ClipBlock(nn.Module):
    def __init__(self, d=4):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.mlp = nn.Module()
        self.mlp.c_fc = nn.Linear(d, d)


class TinyBridgeTower(nn.Module):
    """Parameter names shaped like transformers' BridgeTower (bridgetower.*, mlm_score.*, itm_score.*)."""

    def __init__(self, d=4):
        super().__init__()
        bt = self.bridgetower = nn.Module()
        bt.text_model = nn.Module()
        bt.text_model.embeddings = nn.Module()
        bt.text_model.embeddings.word_embeddings = nn.Embedding(10, d)
        bt.text_model.embeddings.LayerNorm = nn.LayerNorm(d)
        bt.text_model.encoder = Block(d)
        bt.vision_model = nn.Module()
        bt.vision_model.visual = nn.Module()
        bt.vision_model.visual.class_embedding = nn.Parameter(torch.zeros(d))
        bt.vision_model.visual.ln_post = nn.LayerNorm(d)
        bt.vision_model.visual.resblock = ClipBlock(d)
        bt.token_type_embeddings = nn.Embedding(2, d)
        bt.cross_modal_text_transform = nn.Linear(d, d)
        bt.cross_modal_text_layers = Block(d)
        bt.cross_modal_text_layernorm = nn.LayerNorm(d)
        bt.cross_modal_image_link_tower = nn.Module()
        bt.cross_modal_image_link_tower.LayerNorm = nn.LayerNorm(d)
        self.mlm_score = nn.Module()
        self.mlm_score.transform = Block(d)
        self.mlm_score.decoder = nn.Linear(d, 10, bias=False)
        self.mlm_score.bias = nn.Parameter(torch.zeros(10))
        self.itm_score = nn.Module()
        self.itm_score.fc = nn.Linear(2 * d, 2)
        self.frozen = nn.Parameter(torch.zeros(1), requires_grad=False)


EXPECTED = {
    "decay": {
        "bridgetower.text_model.embeddings.word_embeddings.weight",
        "bridgetower.text_model.encoder.dense.weight",
        "bridgetower.vision_model.visual.class_embedding",
        "bridgetower.vision_model.visual.resblock.mlp.c_fc.weight",
        "bridgetower.token_type_embeddings.weight",
    },
    "no_decay": {
        "bridgetower.text_model.embeddings.LayerNorm.weight",
        "bridgetower.text_model.embeddings.LayerNorm.bias",
        "bridgetower.text_model.encoder.dense.bias",
        "bridgetower.text_model.encoder.LayerNorm.weight",
        "bridgetower.text_model.encoder.LayerNorm.bias",
        "bridgetower.vision_model.visual.ln_post.weight",
        "bridgetower.vision_model.visual.ln_post.bias",
        "bridgetower.vision_model.visual.resblock.ln_1.weight",
        "bridgetower.vision_model.visual.resblock.ln_1.bias",
        "bridgetower.vision_model.visual.resblock.mlp.c_fc.bias",
    },
    "decay_mult": {
        "bridgetower.cross_modal_text_transform.weight",
        "bridgetower.cross_modal_text_layers.dense.weight",
        "mlm_score.transform.dense.weight",
        "mlm_score.decoder.weight",
        "itm_score.fc.weight",
    },
    "no_decay_mult": {
        "bridgetower.cross_modal_text_transform.bias",
        "bridgetower.cross_modal_text_layers.dense.bias",
        "bridgetower.cross_modal_text_layers.LayerNorm.weight",
        "bridgetower.cross_modal_text_layers.LayerNorm.bias",
        "bridgetower.cross_modal_text_layernorm.weight",
        "bridgetower.cross_modal_text_layernorm.bias",
        "bridgetower.cross_modal_image_link_tower.LayerNorm.weight",
        "bridgetower.cross_modal_image_link_tower.LayerNorm.bias",
        "mlm_score.transform.dense.bias",
        "mlm_score.transform.LayerNorm.weight",
        "mlm_score.transform.LayerNorm.bias",
        "mlm_score.bias",
        "itm_score.fc.bias",
    },
}


def test_param_groups_follow_bridgetower_rules():
    cfg = OptimConfig(lr=1e-5, weight_decay=0.01, lr_multiplier=5.0)
    model = TinyBridgeTower()
    groups = param_groups(model, cfg)
    assert [g["group_name"] for g in groups] == ["decay", "no_decay", "decay_mult", "no_decay_mult"]
    got = {g["group_name"]: set(g["names"]) for g in groups}
    assert got == EXPECTED
    settings = {g["group_name"]: (g["lr"], g["weight_decay"]) for g in groups}
    assert settings["decay"] == (1e-5, 0.01)
    assert settings["no_decay"] == (1e-5, 0.0)
    assert settings["decay_mult"] == (pytest.approx(5e-5), 0.01)
    assert settings["no_decay_mult"] == (pytest.approx(5e-5), 0.0)
    # every trainable parameter exactly once, frozen ones never
    params = [p for g in groups for p in g["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == len(trainable) == len({id(p) for p in params})
    for g in groups:
        named = dict(model.named_parameters())
        assert all(named[n] is p for n, p in zip(g["names"], g["params"]))


def test_groups_work_with_torch_adamw_and_compiled_names():
    model = TinyBridgeTower()
    wrapped = nn.Module()
    wrapped._orig_mod = model  # what torch.compile's OptimizedModule looks like from outside
    groups = param_groups(wrapped, OptimConfig())
    assert {g["group_name"]: set(g["names"]) for g in groups} == EXPECTED
    opt = torch.optim.AdamW(groups, lr=1e-5)
    assert len(opt.param_groups) == 4


def test_empty_groups_are_dropped():
    groups = param_groups(nn.Linear(2, 2), OptimConfig())
    assert [g["group_name"] for g in groups] == ["decay", "no_decay"]


def test_lr_schedule_points():
    cfg = OptimConfig(lr=1e-3, warmup_ratio=0.1, end_lr_ratio=0.0)
    f = lr_lambda(cfg, max_steps=1000)  # warm-up 100 steps, decay over 900
    assert f(0) == 0.0
    assert f(50) == pytest.approx(0.5)
    assert f(100) == pytest.approx(1.0)
    assert f(550) == pytest.approx(0.5)
    assert f(999) == pytest.approx(1 / 900)
    assert f(1000) == 0.0 and f(1200) == 0.0
    f_end = lr_lambda(OptimConfig(warmup_ratio=0.1, end_lr_ratio=0.1), 1000)
    assert f_end(550) == pytest.approx(0.55) and f_end(1000) == pytest.approx(0.1)
    assert lr_lambda(OptimConfig(warmup_ratio=0.0), 10)(0) == 1.0


@pytest.mark.parametrize("optimizer", ["torch", "guarded"])
def test_scheduler_scales_every_group_including_multiplied(optimizer):
    """Host LambdaLR (for torch / Habana optimizers) and the device schedule (GuardedAdamW) give the same lrs."""
    cfg = OptimConfig(lr=1e-3, lr_multiplier=5.0, warmup_ratio=0.1)
    model = TinyBridgeTower()
    opt = (torch.optim.AdamW if optimizer == "torch" else GuardedAdamW)(param_groups(model, cfg))
    sched = make_scheduler(opt, cfg, max_steps=20)  # warm-up 2 steps
    assert isinstance(sched, DeviceSchedule) == (optimizer == "guarded")
    seen = []
    for _ in range(20):
        seen.append({g["group_name"]: float(g["lr"]) for g in opt.param_groups})
        opt.step()
        sched.step()
    assert seen[0]["decay"] == 0.0
    assert seen[1]["decay"] == pytest.approx(0.5e-3) and seen[1]["decay_mult"] == pytest.approx(2.5e-3)
    assert seen[2]["decay"] == pytest.approx(1e-3) and seen[2]["no_decay_mult"] == pytest.approx(5e-3)
    assert seen[11]["decay"] == pytest.approx(0.5e-3)
    f = lr_lambda(cfg, 20)
    assert [s["decay"] for s in seen] == pytest.approx([1e-3 * f(k) for k in range(20)], abs=1e-10)
    assert float(opt.param_groups[0]["lr"]) == 0.0  # at max_steps
    state = sched.state_dict()  # checkpointable (DeepSpeed saves it)
    assert ("applied_steps" in state) if optimizer == "guarded" else ("lr_lambdas" in state)


def _params(seed: int) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(5, 3, generator=g)), nn.Parameter(torch.randn(7, generator=g))]


def _set_grads(params, seed: int, value: float | None = None) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) if value is None else torch.full_like(p, value)


def test_guarded_adamw_is_torch_adamw_and_cancels_a_step_on_the_device():
    """Same arithmetic as torch.optim.AdamW; with `found_inf` = 1 a step with NaN gradients changes no
    parameter, moment or step count, and the run goes on exactly as if that step had not been taken."""
    kwargs = dict(lr=1e-2, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.01)
    ref_params, ours_params = _params(0), _params(0)
    ref = torch.optim.AdamW([{"params": ref_params[:1]}, {"params": ref_params[1:], "weight_decay": 0.0}], **kwargs)
    ours = GuardedAdamW([{"params": ours_params[:1]}, {"params": ours_params[1:], "weight_decay": 0.0}], **kwargs)
    for step in range(8):
        if step == 3:  # a non-finite step, cancelled on the device; the reference never sees it
            _set_grads(ours_params, 99, float("nan"))
            before = [p.detach().clone() for p in ours_params]
            state = {k: v.clone() for k, v in ours.state[ours_params[0]].items()}
            ours.found_inf = torch.tensor(1.0)
            ours.step()
            assert all(torch.equal(a, b) for a, b in zip(before, ours_params))
            assert all(torch.equal(state[k], ours.state[ours_params[0]][k]) for k in state)
            ours.found_inf = torch.tensor(0.0)
            continue
        _set_grads(ref_params, step)
        _set_grads(ours_params, step)
        ref.step()
        ours.step()
    for a, b in zip(ref_params, ours_params):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    assert float(ours.state[ours_params[0]]["step"]) == 7.0
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(ours.state[ours_params[0]][key], ref.state[ref_params[0]][key])


def test_device_schedule_does_not_advance_on_a_cancelled_step_and_resumes():
    cfg = OptimConfig(lr=1e-3, warmup_ratio=0.1)
    opt = GuardedAdamW(_params(1), lr=cfg.lr)
    sched = DeviceSchedule(opt, cfg, max_steps=10)
    lrs = []
    for step in range(6):
        opt.found_inf = torch.tensor(1.0 if step in (2, 3) else 0.0)
        sched.step()
        lrs.append(float(opt.param_groups[0]["lr"]))
    f = lr_lambda(cfg, 10)
    assert lrs == pytest.approx([1e-3 * f(k) for k in (1, 2, 2, 2, 3, 4)])
    again = DeviceSchedule(GuardedAdamW(_params(1), lr=cfg.lr), cfg, max_steps=10)
    again.load_state_dict(sched.state_dict())
    assert sched.state_dict() == {"applied_steps": 4}
    assert float(again.optimizer.param_groups[0]["lr"]) == pytest.approx(1e-3 * f(4))


@pytest.mark.parametrize("optimizer", ["torch", "guarded"])
def test_schedule_continues_by_samples_after_a_global_batch_change(optimizer):
    """A resume with half the global batch: each step advances the schedule by half a step, and the
    state saved after that (what the next checkpoint holds) continues where it stopped."""
    cfg = OptimConfig(lr=1e-3, warmup_ratio=0.2)
    make = torch.optim.AdamW if optimizer == "torch" else GuardedAdamW

    def fresh():
        opt = make(_params(1), lr=cfg.lr)
        return opt, make_scheduler(opt, cfg, max_steps=10)

    def lr(opt) -> float:
        return float(opt.param_groups[0]["lr"])

    f = lr_lambda(cfg, 10)
    opt, sched = fresh()
    for _ in range(4):
        opt.step()
        sched.step()
    opt, resumed = fresh()
    resumed.load_state_dict(sched.state_dict())
    set_units_per_step(resumed, 0.5)
    assert lr(opt) == pytest.approx(1e-3 * f(4))
    seen = []
    for _ in range(3):
        opt.step()
        resumed.step()
        seen.append(lr(opt))
    assert seen == pytest.approx([1e-3 * f(u) for u in (4.5, 5.0, 5.5)])
    opt, again = fresh()  # the next resume, same half batch
    again.load_state_dict(resumed.state_dict())
    set_units_per_step(again, 0.5)
    opt.step()
    again.step()
    assert lr(opt) == pytest.approx(1e-3 * f(6.0))


@pytest.mark.parametrize("optimizer", ["torch", "guarded"])
def test_a_resume_with_a_longer_max_steps_follows_the_new_schedule(optimizer):
    """The saved schedule state is its position only: warm-up and length come from the resuming run."""
    cfg = OptimConfig(lr=1e-3, warmup_ratio=0.1)
    make = torch.optim.AdamW if optimizer == "torch" else GuardedAdamW
    opt = make(_params(1), lr=cfg.lr)
    sched = make_scheduler(opt, cfg, max_steps=10)
    for _ in range(4):
        opt.step()
        sched.step()
    longer_opt = make(_params(1), lr=cfg.lr)
    longer = make_scheduler(longer_opt, cfg, max_steps=20)
    longer.load_state_dict(sched.state_dict())
    set_units_per_step(longer, 1.0)
    longer_opt.step()
    longer.step()
    assert float(longer_opt.param_groups[0]["lr"]) == pytest.approx(1e-3 * lr_lambda(cfg, 20)(5))


def test_device_schedule_at_a_fractional_rate_does_not_accumulate_rounding():
    """Late in a long run (100,000 schedule steps) at 0.96 of a step per step (4032 of 4096 samples): the
    position after 1,000 more steps is exact to float32's resolution there, not off by the ~1 step that
    adding a rounded 0.96 a thousand times would give."""
    cfg = OptimConfig(lr=1e-3, warmup_ratio=0.0)
    sched = DeviceSchedule(GuardedAdamW(_params(1), lr=cfg.lr), cfg, max_steps=200_000)
    sched.load_state_dict({"applied_steps": 100_000})
    set_units_per_step(sched, 0.96)
    for _ in range(1000):
        sched.step()
    assert sched.state_dict()["applied_steps"] == pytest.approx(100_960, abs=0.01)
