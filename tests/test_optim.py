"""AdamW groups (weight-decay exemptions, lr multipliers) and the warm-up / linear-decay schedule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gaudi_pretrain.config import OptimConfig
from gaudi_pretrain.train.optim import lr_lambda, make_scheduler, param_groups


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


def test_scheduler_scales_every_group_including_multiplied():
    cfg = OptimConfig(lr=1e-3, lr_multiplier=5.0, warmup_ratio=0.1)
    model = TinyBridgeTower()
    opt = torch.optim.AdamW(param_groups(model, cfg))
    sched = make_scheduler(opt, cfg, max_steps=20)  # warm-up 2 steps
    seen = []
    for _ in range(20):
        seen.append({g["group_name"]: g["lr"] for g in opt.param_groups})
        opt.step()
        sched.step()
    assert seen[0]["decay"] == 0.0
    assert seen[1]["decay"] == pytest.approx(0.5e-3) and seen[1]["decay_mult"] == pytest.approx(2.5e-3)
    assert seen[2]["decay"] == pytest.approx(1e-3) and seen[2]["no_decay_mult"] == pytest.approx(5e-3)
    assert seen[11]["decay"] == pytest.approx(0.5e-3)
    assert opt.param_groups[0]["lr"] == 0.0  # at max_steps
    assert "lr_lambdas" in sched.state_dict()  # checkpointable (DeepSpeed saves it)
