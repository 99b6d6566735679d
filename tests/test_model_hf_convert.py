"""Weights in and out: transformers export/import, checkpoint errors, CLIP / RoBERTa tower init.

No downloads: tiny random transformers models are saved to tmp_path and loaded from there.
"""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_model_bridgetower import L, S, model_batch, model_randomize, model_tiny_cfg, rel_err

from gaudi_pretrain.config import RunConfig, save_config
from gaudi_pretrain.errors import CheckpointError, ConfigError
from gaudi_pretrain.model import factory, hf_convert
from gaudi_pretrain.model.pretraining import BridgeTowerForPretraining
from gaudi_pretrain.train import checkpoint


def model_fresh(cfg=None) -> BridgeTowerForPretraining:
    model = BridgeTowerForPretraining(cfg or model_tiny_cfg())
    model_randomize(model, seed=int(torch.randint(0, 10_000, ())))
    return model.eval()


def mark_complete(ckpt, step: int = 10) -> None:
    """What a finished save writes last: client_state.json (export-hf and eval refuse a directory without it)."""
    (ckpt / checkpoint.CLIENT_STATE).write_text(json.dumps(dataclasses.asdict(checkpoint.ClientState(step=step))))


def model_tokenizer():
    """A tiny byte-level BPE fast tokenizer with RoBERTa's special tokens (trained in milliseconds)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        ["a red circle at the top left", "a blue square"] * 20,
        vocab_size=300,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
    )


def test_hf_config_round_trip():
    for cfg in (model_tiny_cfg(), model_tiny_cfg(itc_heads=True, contrastive_hidden_size=32)):
        hf_cfg = hf_convert.to_hf_config(cfg)
        assert hf_cfg.text_config.max_position_embeddings == L + 2 and hf_cfg.vision_config.share_layernorm
        back = hf_convert.from_hf_config(hf_cfg)
        assert back == cfg
        assert hf_convert.from_hf_config(json.loads(hf_cfg.to_json_string())) == cfg


def test_unsupported_hf_flags_are_refused():
    d = hf_convert.hf_config_dict(model_tiny_cfg())
    d["share_link_tower_layers"] = True
    with pytest.raises(CheckpointError, match="share_link_tower_layers"):
        hf_convert.from_hf_config(d)


@torch.no_grad()
def test_export_loads_in_transformers_with_equal_logits(tmp_path):
    from transformers import BridgeTowerForImageAndTextRetrieval, BridgeTowerForMaskedLM, BridgeTowerImageProcessor

    cfg = model_tiny_cfg()
    model = model_fresh(cfg)
    out = hf_convert.export_hf(model, cfg, tmp_path / "hf", tokenizer=model_tokenizer())
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json"} <= names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left behind
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["BridgeTowerForMaskedLM", "BridgeTowerForImageAndTextRetrieval"]

    batch = model_batch()
    px, ids, mask, valid = batch["pixel_values"], batch["input_ids"], batch["attention_mask"], batch["sample_mask"]
    mlm, info = BridgeTowerForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert info["missing_keys"] in ([], set()) and not info.get("mismatched_keys")
    assert all(k.startswith("itm_score.") for k in info["unexpected_keys"])  # the other head only
    theirs = mlm.eval()(input_ids=ids, attention_mask=mask, pixel_values=px).logits
    assert rel_err(model.mlm_logits(px, ids, mask)[valid], theirs[valid]) <= 1e-5

    itm, info = BridgeTowerForImageAndTextRetrieval.from_pretrained(out, output_loading_info=True)
    assert info["missing_keys"] in ([], set()) and not info.get("mismatched_keys")
    assert all(k.startswith("mlm_score.") for k in info["unexpected_keys"])
    theirs = itm.eval()(input_ids=ids, attention_mask=mask, pixel_values=px).logits
    assert rel_err(model.itm_logits(px, ids, mask)[valid], theirs[valid]) <= 1e-5

    # the exported image processor turns an image into the pixels our loader feeds the model
    import io

    import numpy as np
    from PIL import Image

    from gaudi_pretrain.data.transforms import decode_image, normalize_images

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    processor = BridgeTowerImageProcessor.from_pretrained(out)
    pixels = processor(image, return_tensors="pt")["pixel_values"]
    ours = normalize_images(decode_image(buf.getvalue(), S)[None])
    assert tuple(pixels.shape) == tuple(ours.shape) == (1, 3, S, S)
    assert float((pixels - ours).abs().max()) < 0.02  # one uint8 rounding step after normalisation


def test_export_refuses_non_empty_dir_and_bad_weights(tmp_path):
    cfg = model_tiny_cfg()
    model = model_fresh(cfg)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("x")
    with pytest.raises(CheckpointError, match="not empty"):
        hf_convert.export_hf(model, cfg, tmp_path / "hf")
    hf_convert.export_hf(model, cfg, tmp_path / "hf", overwrite=True)
    assert not (tmp_path / "hf" / "keep.txt").exists()
    state = {f"module.{k}": v for k, v in model.state_dict().items()}  # wrapped names are unwrapped
    hf_convert.export_hf(state, cfg, tmp_path / "hf2")
    state.pop("module.itm_score.fc.bias")
    with pytest.raises(CheckpointError, match="itm_score.fc.bias"):
        hf_convert.export_hf(state, cfg, tmp_path / "hf3")
    assert not (tmp_path / "hf3").exists()


def test_export_checkpoint_from_run_dir(tmp_path):
    data = {"tokenizer": str(tmp_path / "tok"), "max_text_len": L}
    cfg = RunConfig.model_validate({"model": model_tiny_cfg().model_dump(), "data": data})
    model_tokenizer().save_pretrained(str(tmp_path / "tok"))
    model = model_fresh(cfg.model)
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000010"
    ckpt.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt / "model.safetensors"))
    save_config(cfg, ckpt / "config.yaml")
    mark_complete(ckpt)
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_00000010\n")

    out = checkpoint.export_checkpoint(tmp_path / "run", tmp_path / "hf")
    assert (out / "tokenizer.json").is_file()
    exported = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(exported[k], v) for k, v in model.state_dict().items())
    with pytest.raises(CheckpointError, match="no complete checkpoint at"):
        checkpoint.export_checkpoint(tmp_path / "nowhere", tmp_path / "hf4")


def test_load_pretrained_round_trip_and_fresh_heads(tmp_path):
    from transformers import BridgeTowerForMaskedLM

    cfg = model_tiny_cfg()
    model = model_fresh(cfg)
    hf_convert.export_hf(model, cfg, tmp_path / "both")
    loaded = BridgeTowerForPretraining(cfg)
    report = hf_convert.load_pretrained(loaded, tmp_path / "both")
    assert report.fresh == [] and report.ignored == []
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))

    # a ForMaskedLM-only checkpoint (transformers' own save): the ITM head is initialised fresh, and said so
    BridgeTowerForMaskedLM.from_pretrained(tmp_path / "both").save_pretrained(tmp_path / "mlm_only")
    with pytest.warns(UserWarning, match="itm_score"):
        report = factory.build_model(model_tiny_cfg(from_pretrained=str(tmp_path / "mlm_only")))
    built = BridgeTowerForPretraining(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = hf_convert.load_pretrained(built, tmp_path / "mlm_only")
    assert report.fresh == ["itm_score.fc.weight", "itm_score.fc.bias"]
    assert torch.equal(built.mlm_score.decoder.weight, model.mlm_score.decoder.weight)

    tied = {k: v for k, v in model.state_dict().items() if k != "mlm_score.decoder.weight"}
    report = hf_convert.load_state_dict_into(built, tied)
    assert report.tied == ["mlm_score.decoder.weight"] and report.fresh == []
    assert torch.equal(built.mlm_score.decoder.weight, model.bridgetower.text_model.embeddings.word_embeddings.weight)

    with pytest.raises(CheckpointError, match="different architecture"):
        hf_convert.load_pretrained(BridgeTowerForPretraining(model_tiny_cfg(layer_norm_eps=1e-6)), tmp_path / "both")


def test_missing_and_unexpected_keys_are_named(tmp_path):
    cfg = model_tiny_cfg()
    state = model_fresh(cfg).state_dict()
    dropped = "bridgetower.cross_modal_text_layers.1.output.dense.weight"
    state.pop(dropped)
    state["bridgetower.surprise.weight"] = torch.zeros(1)
    state["bridgetower.text_model.embeddings.position_ids"] = torch.arange(L + 2)[None]  # old-style buffer: ignored
    named = (
        r"missing keys \[.*cross_modal_text_layers\.1\.output\.dense\.weight.*unexpected keys \[bridgetower\.surprise"
    )
    with pytest.raises(CheckpointError, match=named):
        hf_convert.load_state_dict_into(BridgeTowerForPretraining(cfg), state)

    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(hf_convert.to_hf_config(cfg).to_json_string())
    state.pop("bridgetower.surprise.weight")
    torch.save(state, d / "pytorch_model.bin")  # read with weights_only=True
    with pytest.raises(CheckpointError, match="output.dense.weight"):
        hf_convert.load_pretrained(BridgeTowerForPretraining(cfg), d)

    state[dropped] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match="wrong shape"):
        hf_convert.load_state_dict_into(BridgeTowerForPretraining(cfg), state)
    with pytest.raises(CheckpointError, match="not found"):
        hf_convert.load_pretrained(BridgeTowerForPretraining(cfg), tmp_path / "absent")


# ------------------------------------------------------------------------------- tower init


def _tiny_clip_vision_config(image_size: int):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=1,
        image_size=image_size,
        patch_size=8,
        hidden_act="quick_gelu",
    )


@torch.no_grad()
def test_clip_init_reproduces_hidden_states(tmp_path):
    from transformers import CLIPConfig, CLIPModel, CLIPVisionModel

    clip = CLIPVisionModel(_tiny_clip_vision_config(S)).eval()
    model_randomize(clip)
    clip.save_pretrained(tmp_path / "clip_vision")
    full = CLIPModel(
        CLIPConfig(
            text_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                vocab_size=50,
                bos_token_id=0,
                eos_token_id=2,
                pad_token_id=1,
            ),
            vision_config=_tiny_clip_vision_config(S).to_dict(),
            projection_dim=16,
        )
    )
    # CLIPModel.vision_model is a CLIPVisionTransformer in transformers 4.x, a CLIPVisionModel in 5.x
    weights = clip.state_dict()
    if not any(k.startswith("vision_model.") for k in full.vision_model.state_dict()):
        weights = {k.removeprefix("vision_model."): v for k, v in weights.items()}
    full.vision_model.load_state_dict(weights)
    full.save_pretrained(tmp_path / "clip_full")

    px = torch.randn(2, 3, S, S)
    ref = clip(pixel_values=px, output_hidden_states=True)
    for source in ("clip_vision", "clip_full"):
        model = factory.build_model(model_tiny_cfg(init_vision_from=str(tmp_path / source))).eval()
        visual = model.bridgetower.vision_model.visual
        outs = visual(px)
        for i, h in enumerate(outs):
            assert rel_err(h, ref.hidden_states[i + 1]) <= 1e-5
        assert rel_err(visual.ln_post(outs[-1])[:, 0], ref.pooler_output) <= 1e-5


@torch.no_grad()
def test_clip_position_grid_interpolation(tmp_path):
    from transformers import CLIPVisionModel

    clip = CLIPVisionModel(_tiny_clip_vision_config(24)).eval()  # 3×3 grid → our 4×4
    model_randomize(clip)
    clip.save_pretrained(tmp_path / "clip")
    model = factory.build_model(model_tiny_cfg(init_vision_from=str(tmp_path / "clip"))).eval()
    pos = model.bridgetower.vision_model.visual.embeddings.position_embedding.weight
    src = clip.state_dict()[[k for k in clip.state_dict() if k.endswith("position_embedding.weight")][0]]
    assert tuple(pos.shape) == ((S // 8) ** 2 + 1, 64)
    assert torch.equal(pos[0], src[0])  # CLS position kept
    # transformers' own bicubic interpolation at the new size gives the same tower
    px = torch.randn(2, 3, S, S)
    ref = clip(pixel_values=px, output_hidden_states=True, interpolate_pos_encoding=True)
    assert rel_err(model.bridgetower.vision_model.visual(px)[-1], ref.hidden_states[-1]) <= 1e-5

    with pytest.raises(ConfigError, match="patch_size"):
        factory.build_model(
            model_tiny_cfg(
                init_vision_from=str(tmp_path / "clip"),
                vision=dict(hidden_size=64, num_hidden_layers=3, patch_size=16, image_size=S),
            )
        )


@torch.no_grad()
def test_roberta_init_reproduces_hidden_states(tmp_path):
    from transformers import RobertaConfig, RobertaForMaskedLM, RobertaModel

    cfg = model_tiny_cfg()
    t = cfg.text
    rcfg = RobertaConfig(
        vocab_size=t.vocab_size,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=L + 2,
        type_vocab_size=1,
        pad_token_id=1,
        layer_norm_eps=1e-5,
    )  # RobertaConfig's default is 1e-12; roberta-large uses 1e-5
    roberta = RobertaModel(rcfg).eval()
    model_randomize(roberta)
    roberta.save_pretrained(tmp_path / "roberta")
    mlm = RobertaForMaskedLM(rcfg)
    mlm.roberta.load_state_dict(roberta.state_dict(), strict=False)
    mlm.save_pretrained(tmp_path / "roberta_mlm")  # keys under `roberta.`, no pooler

    batch = model_batch()
    ids, mask, valid = batch["input_ids"], batch["attention_mask"], batch["sample_mask"]
    ref = roberta(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    for source in ("roberta", "roberta_mlm"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = factory.build_model(model_tiny_cfg(init_text_from=str(tmp_path / source))).eval()
        outs = model.bridgetower.text_model(ids, mask)
        assert len(outs) == 3
        for i, h in enumerate(outs):
            assert rel_err(h[valid], ref[i + 1][valid]) <= 1e-5

    with pytest.raises(ConfigError, match="vocab_size"):
        factory.build_model(
            model_tiny_cfg(init_text_from=str(tmp_path / "roberta"), text=dict(t.model_dump(), vocab_size=100))
        )
    with pytest.raises(ConfigError, match="layer_norm_eps"):
        factory.build_model(
            model_tiny_cfg(
                init_text_from=str(tmp_path / "roberta"), text=dict(t.model_dump(), layer_norm_eps=1e-12 * 3)
            )
        )
    with pytest.raises(ConfigError, match="either"):
        factory.build_model(model_tiny_cfg(init_text_from="x", from_pretrained="y"))


def test_export_hf_command_registers_and_runs(tmp_path):
    import argparse

    from gaudi_pretrain.cli import export

    parser = argparse.ArgumentParser()
    export.register(parser.add_subparsers(dest="command"))
    data = {"tokenizer": str(tmp_path / "tok"), "max_text_len": L}
    cfg = RunConfig.model_validate({"model": model_tiny_cfg().model_dump(), "data": data})
    model_tokenizer().save_pretrained(str(tmp_path / "tok"))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    state = {k: v.contiguous() for k, v in model_fresh(cfg.model).state_dict().items()}
    save_file(state, str(ckpt / "model.safetensors"))
    save_config(cfg, ckpt / "config.yaml")
    mark_complete(ckpt)
    args = parser.parse_args(["export-hf", str(ckpt), str(tmp_path / "out")])
    assert args.handler(args) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()
    args = parser.parse_args(["export-hf", str(ckpt), str(tmp_path / "out")])
    with pytest.raises(CheckpointError, match="not empty"):
        args.handler(args)
