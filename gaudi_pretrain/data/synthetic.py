"""The embedded demo dataset: colored shapes on noisy backgrounds with captions naming them.

"a red circle at the top left": 6 colors × 4 shapes × 4 quadrants = 96 captions. Color, shape and
position all vary independently, so a model must see all three to tell a match from a mismatch (with
color alone ITM caps near 0.92; see docs/testing.md). Each shape nearly fills its quadrant (a 2 × 2 block
of the tiny model's 8-pixel patches) with a pixel or two of jitter. Images are real JPEGs drawn with PIL,
deterministic from the seed, and go through the same builder as real data (images + JSONL →
`build_shards`).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from gaudi_pretrain.utils import atomic_write_text

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 215, 30),
    "purple": (140, 40, 190),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "cross")
NOISE_STD = 10.0
BACKGROUND_RANGE = (120, 136)  # grey level of the background, drawn per image (a wide range hides position)
RADIUS_RANGE = (0.40, 0.48)  # of half the image side
# Bumped whenever what the generator draws changes: `gaudi-pretrain demo` rebuilds a set of another version.
DEMO_VERSION = 2
POSITIONS = {"top left": (0, 0), "top right": (1, 0), "bottom left": (0, 1), "bottom right": (1, 1)}


DEMO_INFO = "demo.json"


def caption_for(color: str, shape: str, position: str) -> str:
    return f"a {color} {shape} at the {position}"


def all_captions() -> list[str]:
    return [caption_for(c, s, p) for c in COLORS for s in SHAPES for p in POSITIONS]


def draw_sample(rng: np.random.Generator, size: int = 32) -> tuple[Any, str]:
    """One (PIL image, caption): a shape of random color/kind/quadrant, size and offset jitter, noise."""
    from PIL import Image, ImageDraw

    color = list(COLORS)[rng.integers(len(COLORS))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    position = list(POSITIONS)[rng.integers(len(POSITIONS))]
    base = rng.integers(*BACKGROUND_RANGE)
    noise = rng.normal(0, NOISE_STD, size=(size, size, 3))
    background = np.clip(base + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(background, "RGB")
    draw = ImageDraw.Draw(img)
    half = size / 2
    qx, qy = POSITIONS[position]
    radius = half * rng.uniform(*RADIUS_RANGE)
    jitter = half / 2 - radius
    cx = qx * half + half / 2 + rng.uniform(-jitter, jitter)
    cy = qy * half + half / 2 + rng.uniform(-jitter, jitter)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    fill = tuple(int(np.clip(v + rng.integers(-20, 21), 0, 255)) for v in COLORS[color])
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=fill)
    else:  # cross
        arm = radius * 0.38
        draw.rectangle((cx - radius, cy - arm, cx + radius, cy + arm), fill=fill)
        draw.rectangle((cx - arm, cy - radius, cx + arm, cy + radius), fill=fill)
    return img, caption_for(color, shape, position)


def _write_images(folder: Path, n: int, seed: int, size: int) -> Path:
    """Draw n samples as JPEG files plus a JSONL (relative paths) in `folder`; returns the JSONL."""
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        img, caption = draw_sample(rng, size)
        name = f"{i:06d}.jpg"
        img.save(folder / name, format="JPEG", quality=95)
        lines.append(json.dumps({"image": name, "caption": caption}))
    jsonl = folder / "captions.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    return jsonl


def _unequal_sizes(total: int, fractions: tuple[float, ...]) -> list[int]:
    sizes = [int(total * f) for f in fractions]
    sizes[0] += total - sum(sizes)
    return [s for s in sizes if s > 0]


def build_demo_dataset(
    out: str | Path,
    *,
    seed: int = 0,
    train_samples: int = 4000,
    eval_samples: int = 600,
    image_size: int = 32,
    vocab_size: int = 512,
    workers: int = 1,
    progress: bool = False,
) -> dict[str, Any]:
    """Write `<out>/train/*.tar` (4 shards of unequal sizes), `<out>/eval/*.tar` (held-out draws from
    another seed) and `<out>/tokenizer` (BPE trained on the captions). Returns a summary."""
    from gaudi_pretrain.data.shards import build_shards, records_from_jsonl
    from gaudi_pretrain.data.tokenizer import train_demo_tokenizer

    out = Path(out)
    summary: dict[str, Any] = {"out": str(out)}
    plans = {
        "train": (train_samples, seed * 2 + 0, (0.35, 0.3, 0.2, 0.15)),
        "eval": (eval_samples, seed * 2 + 1, (0.6, 0.4)),
    }
    for split, (n, split_seed, fractions) in plans.items():
        with tempfile.TemporaryDirectory(prefix=f"demo_{split}_") as tmp:
            jsonl = _write_images(Path(tmp), n, split_seed, image_size)
            manifest = build_shards(
                records_from_jsonl(jsonl),
                out / split,
                image_size=image_size,
                samples_per_shard=max(n, 1),
                shard_sizes=_unequal_sizes(n, fractions),
                workers=workers,
                progress=progress,
            )
        summary[split] = {"samples": manifest["total"], "shards": [s["samples"] for s in manifest["shards"]]}
    tok = train_demo_tokenizer(all_captions(), out / "tokenizer", vocab_size=vocab_size)
    summary["tokenizer"] = {"path": str(out / "tokenizer"), "vocab_size": len(tok)}
    summary["version"] = DEMO_VERSION
    atomic_write_text(out / DEMO_INFO, json.dumps(summary, indent=1) + "\n")  # last: marks a complete set
    return summary


def demo_dataset_version(out: str | Path) -> int | None:
    """The generator version of a complete demo set at `out` (None: absent, incomplete or older than v2)."""
    try:
        return int(json.loads((Path(out) / DEMO_INFO).read_text())["version"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
