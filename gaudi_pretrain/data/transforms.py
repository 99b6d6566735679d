"""Image and text transforms: the paper's (resize shorter side, bicubic → center crop → CLIP normalize)
and RoBERTa-convention tokenization to a fixed length.

Decoding uses PIL's JPEG draft mode: libjpeg scales by 1/2, 1/4 or 1/8 while decoding when the stored
image is at least twice the target, which skips most of the decode work for large originals. Shards
built by `gaudi_pretrain.data.shards` are already resized (shorter side = image size), so the usual
path here is decode → center crop, with no resampling at all.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resize_shorter_side(img: Any, size: int) -> Any:
    """Resize a PIL image so its shorter side is `size` (bicubic); unchanged if it already is."""
    from PIL import Image

    w, h = img.size
    if min(w, h) == size:
        return img
    scale = size / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    return img.resize(new, Image.BICUBIC)


def to_rgb(img: Any, min_size: int | None = None) -> Any:
    """An opened PIL image → loaded RGB image. With `min_size`, a JPEG is decoded in draft mode:
    libjpeg downscales while decoding as far as keeps both sides >= min_size."""
    from PIL import Image

    if min_size is not None and img.format == "JPEG":
        img.draft("RGB", (min_size, min_size))
    if img.mode != "RGB":
        if img.mode in ("P", "LA", "RGBA", "PA") or "transparency" in img.info:
            img = img.convert("RGBA")
            background = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(background, img)
        img = img.convert("RGB")
    img.load()
    return img


def open_rgb(data: bytes, min_size: int | None = None) -> Any:
    """Decode image bytes to an RGB PIL image (draft-mode JPEG decode when `min_size` is given)."""
    from PIL import Image

    return to_rgb(Image.open(io.BytesIO(data)), min_size)


def center_crop(img: Any, size: int) -> Any:
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def decode_image(data: bytes, size: int) -> np.ndarray:
    """JPEG/PNG bytes → uint8 [size, size, 3]: draft decode, shorter side → size (bicubic), center crop."""
    img = center_crop(resize_shorter_side(open_rgb(data, size), size), size)
    return np.asarray(img, dtype=np.uint8)


def normalize_images(images: np.ndarray) -> Any:
    """uint8 [B, S, S, 3] → float32 torch tensor [B, 3, S, S], CLIP-normalised.

    One byte-sized transpose, one conversion and one fused scale+shift per channel: this runs on
    every batch in the loader workers and was the largest per-sample cost before the decode.
    """
    import torch

    x = torch.from_numpy(np.ascontiguousarray(np.asarray(images).transpose(0, 3, 1, 2))).float()
    mean, std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
    return x.mul_((1.0 / (255.0 * std)).view(1, 3, 1, 1)).add_((-mean / std).view(1, 3, 1, 1))


def tokenize(tokenizer: Any, captions: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Captions → (input_ids, attention_mask) int64 [B, max_len]: `<s> … </s> <pad>…`, truncated."""
    enc = tokenizer(list(captions), padding="max_length", truncation=True, max_length=max_len, return_tensors="np")
    return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
