"""Image transform, tokenization, MLM masking statistics, ITM negatives, demo set and tokenizer, CLI."""

from __future__ import annotations

import argparse
import io
import json

import numpy as np
import pytest
import torch

from gaudi_pretrain.data.masking import itm_negatives, mask_tokens
from gaudi_pretrain.data.transforms import CLIP_MEAN, CLIP_STD, decode_image, normalize_images

pytestmark = pytest.mark.timeout(120)


def _jpeg(w: int, h: int, color=(200, 40, 10)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_image_transform_shape_and_normalisation():
    from PIL import Image

    img = decode_image(_jpeg(640, 480), 294)
    assert img.shape == (294, 294, 3) and img.dtype == np.uint8
    assert np.abs(img.astype(int) - [200, 40, 10]).max() <= 3  # a flat color survives decode+resize
    # center crop: a left/right split image keeps both halves equally
    arr = np.zeros((40, 100, 3), dtype=np.uint8)
    arr[:, 50:] = 255
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    crop = decode_image(buf.getvalue(), 20)
    assert crop.shape == (20, 20, 3) and crop[:, :8].max() < 30 and crop[:, 12:].min() > 225
    x = normalize_images(np.stack([img, np.full_like(img, 255)]))
    assert x.shape == (2, 3, 294, 294) and x.dtype == torch.float32
    expected = (torch.tensor([200, 40, 10]) / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(x[0].mean(dim=(1, 2)), expected, atol=0.03)
    assert torch.allclose(x[1, :, 0, 0], (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD))


def test_grayscale_and_palette_images_become_rgb():
    from PIL import Image

    for mode in ("L", "P", "RGBA", "CMYK"):
        buf = io.BytesIO()
        Image.new(mode, (30, 20)).save(buf, format="PNG" if mode != "CMYK" else "JPEG")
        assert decode_image(buf.getvalue(), 16).shape == (16, 16, 3)


def test_mlm_masking_statistics_and_special_tokens():
    rng = np.random.default_rng(0)
    special = [0, 1, 2, 3, 4]
    b, n = 512, 48
    ids = rng.integers(5, 300, size=(b, n))
    ids[:, 0], ids[:, 30], ids[:, 31:] = 0, 2, 1  # <s> … </s> <pad>…
    valid = np.ones(b, dtype=bool)
    valid[-12:] = False
    random_ids = np.arange(5, 300)
    out, labels = mask_tokens(
        ids,
        special_ids=special,
        mask_id=4,
        random_ids=random_ids,
        probability=0.15,
        rng=np.random.default_rng(1),
        valid=valid,
    )
    selected = labels != -100
    eligible = np.zeros_like(selected)
    eligible[:-12, 1:30] = True
    assert not (selected & ~eligible).any()  # never specials, pads or padding rows
    assert (labels[selected] == ids[selected]).all()
    rate = selected.sum() / eligible.sum()
    assert abs(rate - 0.15) < 0.01
    masked = (out == 4) & selected
    changed = (out != ids) & (out != 4) & selected
    kept = (out == ids) & selected
    n_sel = selected.sum()
    # random replacements that hit the original id count as "kept": ~10% + 10%/295
    assert abs(masked.sum() / n_sel - 0.8) < 0.02
    assert abs(changed.sum() / n_sel - 0.1) < 0.015
    assert abs(kept.sum() / n_sel - 0.1) < 0.015
    assert np.isin(out[changed], random_ids).all()
    assert (out[~selected] == ids[~selected]).all()


def test_itm_negatives_pick_valid_rows_with_other_captions():
    captions = ["a", "b", "a", "c", "d", "e", "", ""]
    valid = np.array([1, 1, 1, 1, 1, 1, 0, 0], dtype=bool)
    negatives = 0
    for seed in range(200):
        index, labels = itm_negatives(valid, captions, negative_prob=0.5, rng=np.random.default_rng(seed))
        assert (labels[~valid] == -100).all() and (index[~valid] == np.arange(8)[~valid]).all()
        neg = labels == 0
        negatives += neg.sum()
        assert valid[index[neg]].all() and (index[neg] != np.arange(8)[neg]).all()
        assert all(captions[j] != captions[i] for i, j in zip(np.flatnonzero(neg), index[neg]))
        assert (index[labels == 1] == np.flatnonzero(labels == 1)).all()
    assert abs(negatives / (200 * 6) - 0.5) < 0.05
    index, labels = itm_negatives(np.array([True, False]), ["x", ""], negative_prob=1.0, rng=np.random.default_rng(0))
    assert labels.tolist() == [1, -100]  # a lone valid row cannot get a negative


def test_hard_negatives_differ_in_one_attribute_for_the_configured_fraction():
    """`data.itm_hard_negatives`: that fraction of the negatives is drawn from the captions sharing the most
    words with the row's own — on the demo's captions, a caption differing in exactly one attribute word —
    while the rest stay uniform over other captions (5/6 of which differ in colour). 0 leaves the stream
    of the default path untouched, so runs without the option are unchanged."""
    from gaudi_pretrain.data.synthetic import all_captions

    rng = np.random.default_rng(0)
    captions = list(rng.choice(all_captions(), size=64))
    valid = np.ones(64, dtype=bool)

    def one_word_share(hard):
        one_word = total = 0
        for seed in range(100):
            index, labels = itm_negatives(
                valid, captions, negative_prob=0.5, rng=np.random.default_rng(seed), hard=hard
            )
            for i in np.flatnonzero(labels == 0):
                a, b = captions[i].split(), captions[index[i]].split()
                one_word += sum(x != y for x, y in zip(a, b)) == 1
                total += 1
        return one_word / total

    plain = [itm_negatives(valid, captions, negative_prob=0.5, rng=np.random.default_rng(s)) for s in range(5)]
    zero = [itm_negatives(valid, captions, negative_prob=0.5, rng=np.random.default_rng(s), hard=0.0) for s in range(5)]
    assert all((a[0] == b[0]).all() and (a[1] == b[1]).all() for a, b in zip(plain, zero))
    # uniform negatives differ in one word about 10% of the time (10 of the 95 other captions); hard ones always
    assert one_word_share(0.0) < 0.2
    assert one_word_share(1.0) == 1.0
    assert one_word_share(0.5) == pytest.approx(0.5 + 0.5 * one_word_share(0.0), abs=0.05)


def test_demo_dataset_and_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    from gaudi_pretrain.cli import shards as commands
    from gaudi_pretrain.data.shards import inspect_shards
    from gaudi_pretrain.data.synthetic import all_captions

    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "shards",
            "demo",
            "--out",
            str(tmp_path / "demo"),
            "--train-samples",
            "300",
            "--eval-samples",
            "60",
            "--seed",
            "5",
        ]
    )
    assert args.handler(args) == 0
    train = inspect_shards(str(tmp_path / "demo" / "train"))
    sizes = [s["samples"] for s in train["shards"]]
    assert sum(sizes) == 300 and len(sizes) == 4 and len(set(sizes)) == 4  # unequal shards
    assert inspect_shards(str(tmp_path / "demo" / "eval"))["total_samples"] == 60
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "demo" / "tokenizer"))
    assert [tok.convert_tokens_to_ids(t) for t in ("<s>", "<pad>", "</s>", "<unk>", "<mask>")] == [0, 1, 2, 3, 4]
    assert len(tok) <= 512
    enc = tok(all_captions()[:2], padding="max_length", max_length=16, truncation=True)
    assert enc["input_ids"][0][0] == 0 and 2 in enc["input_ids"][0] and enc["input_ids"][0][-1] == 1
    assert max(len(tok(c)["input_ids"]) for c in all_captions()) <= 16
    # demo.json, written last, marks a complete set of this generator version; without it `demo` rebuilds
    from gaudi_pretrain.data.synthetic import DEMO_INFO, DEMO_VERSION, demo_dataset_version

    assert demo_dataset_version(tmp_path / "demo") == DEMO_VERSION
    info = json.loads((tmp_path / "demo" / DEMO_INFO).read_text())
    assert info["train"]["samples"] == 300 and info["version"] == DEMO_VERSION
    assert demo_dataset_version(tmp_path / "missing") is None
    # deterministic from the seed: a second build gives identical shards
    args = parser.parse_args(
        [
            "shards",
            "demo",
            "--out",
            str(tmp_path / "again"),
            "--train-samples",
            "300",
            "--eval-samples",
            "60",
            "--seed",
            "5",
        ]
    )
    args.handler(args)
    for name in ("train/00000.tar", "eval/00001.tar"):
        assert (tmp_path / "demo" / name).read_bytes() == (tmp_path / "again" / name).read_bytes()


def test_shards_cli_help_and_errors(tmp_path, capsys):
    from gaudi_pretrain.cli import shards as commands
    from gaudi_pretrain.errors import DataError

    parser = argparse.ArgumentParser(prog="gaudi-pretrain")
    commands.register(parser.add_subparsers(dest="command"))
    for argv in (
        ["shards", "--help"],
        ["shards", "build", "--help"],
        ["shards", "inspect", "--help"],
        ["shards", "demo", "--help"],
    ):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args(argv)
        assert exc.value.code == 0
    help_text = capsys.readouterr().out
    assert "--img2dataset" in help_text and "--train-samples" in help_text and "--examples" in help_text
    args = parser.parse_args(["shards", "build", "--coco-json", "x.json", "--out", str(tmp_path)])
    with pytest.raises(DataError, match="--coco-images"):
        args.handler(args)
    args = parser.parse_args(["shards", "build", "--jsonl", str(tmp_path / "none.jsonl"), "--out", str(tmp_path)])
    with pytest.raises(DataError, match="not found"):
        args.handler(args)
    args = parser.parse_args(["shards", "inspect", str(tmp_path / "nothing*.tar")])
    with pytest.raises(DataError, match="no shards match"):
        args.handler(args)
