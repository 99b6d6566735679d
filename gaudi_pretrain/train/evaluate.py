"""Held-out evaluation: ITM and MLM accuracy on eval shards, and zero-shot retrieval recall.

Retrieval ranks every (image, text) pair of a capped subset by the ITM "match" logit, as BridgeTower
does at fine-tuning time (docs/architecture.md, "Evaluation"). Every rank scores the same subset, so
ZeRO-3 collectives stay aligned.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from gaudi_pretrain.backends import Backend, select_backend
from gaudi_pretrain.config import EvalConfig, RunConfig
from gaudi_pretrain.data.pipeline import PretrainLoader, build_loader
from gaudi_pretrain.data.tokenizer import load_tokenizer
from gaudi_pretrain.distributed import DistInfo
from gaudi_pretrain.errors import CheckpointError
from gaudi_pretrain.train.checkpoint import load_checkpoint_model, read_client_state
from gaudi_pretrain.train.metrics import all_reduce_sum
from gaudi_pretrain.utils import unwrap_model


def eval_loaders(cfg: RunConfig, tokenizer: Any, dist: DistInfo) -> tuple[PretrainLoader, PretrainLoader | None]:
    """Fresh loaders over `data.eval_shards`: this rank's share for accuracy, and the whole split (the
    same on every rank) for retrieval when `eval.retrieval_samples` asks for it."""
    loader = build_loader(cfg, tokenizer, rank=dist.rank, world_size=dist.world_size, split="eval")
    retrieval = (
        build_loader(cfg, tokenizer, rank=0, world_size=1, split="eval") if cfg.eval.retrieval_samples > 1 else None
    )
    return loader, retrieval


def recall_at_k(scores: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """scores[i, j] = match logit of text i with image j; the true pairs are the diagonal."""
    n = scores.shape[0]
    target = torch.arange(n)
    # rank of the true image among all images for each text (IR), and of the true text for each image (TR)
    ir_rank = (scores > scores[target, target][:, None]).sum(dim=1)
    tr_rank = (scores.t() > scores[target, target][:, None]).sum(dim=1)
    out = {}
    for k in ks:
        out[f"ir_r{k}"] = float((ir_rank < k).float().mean())
        out[f"tr_r{k}"] = float((tr_rank < k).float().mean())
    return out


@torch.no_grad()
def retrieval_scores(
    model: Any, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, chunk: int
) -> torch.Tensor:
    """N×N ITM match logits; the vision tower runs once per image, the cross encoder once per pair."""
    n = input_ids.shape[0]
    vision = model.encode_images(pixel_values)
    scores = torch.empty(n, n)
    pairs = torch.cartesian_prod(torch.arange(n), torch.arange(n))  # (text i, image j)
    for start in range(0, pairs.shape[0], chunk):
        idx = pairs[start : start + chunk]
        size = idx.shape[0]
        if size < chunk:  # keep shapes static: pad the last chunk with repeats of its first pair
            idx = torch.cat([idx, idx[:1].expand(chunk - size, 2)])
        text_i, image_j = idx[:, 0].to(input_ids.device), idx[:, 1].to(input_ids.device)
        logits = model.match_logits_from_features(
            vision, image_j, input_ids.index_select(0, text_i), attention_mask.index_select(0, text_i)
        )
        scores[idx[:size, 0], idx[:size, 1]] = logits[:size].float().cpu()
    return scores


@torch.no_grad()
def evaluate(
    model: Any,
    backend: Backend,
    loader: PretrainLoader,
    retrieval_loader: PretrainLoader | None,
    cfg: EvalConfig,
    step: int,
    float_dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """ITM/MLM accuracy over (at most `cfg.max_samples` of) `loader`, reduced over ranks, plus retrieval
    recall over `retrieval_loader`. `model` is what runs the forward: a DeepSpeed engine in training, a
    bare model in `gaudi-pretrain eval`; the caller restores train mode."""
    model.eval()
    per_step = loader.spec.batch_size * loader.spec.world_size
    n_batches = min(loader.batches_per_epoch, max(1, math.ceil(cfg.max_samples / per_step)))
    sums = [0.0] * 6  # mlm_correct, mlm_count, itm_correct, itm_count, loss*batches, batches
    it = iter(loader)
    for _ in range(n_batches):
        batch = next(it)
        batch.pop("keys")
        batch.pop("skipped")
        with backend.autocast():
            out = model(backend.to_device(batch, float_dtype))
        for i, v in enumerate((out.mlm_correct, out.mlm_count, out.itm_correct, out.itm_count)):
            sums[i] += float(v)
        sums[4] += float(out.loss)
        sums[5] += 1
    mlm_c, mlm_n, itm_c, itm_n, loss, batches = all_reduce_sum(sums, backend.device)
    record: dict[str, Any] = {
        "kind": "eval",
        "step": step,
        "loss": loss / max(batches, 1),
        "mlm_acc": mlm_c / max(mlm_n, 1),
        "itm_acc": itm_c / max(itm_n, 1),
        "eval_samples": int(itm_n),
    }
    if retrieval_loader is not None:
        record.update(_retrieval(unwrap_model(model), backend, retrieval_loader, cfg, float_dtype))
    return record


def _retrieval(
    model: Any, backend: Backend, loader: PretrainLoader, cfg: EvalConfig, float_dtype: torch.dtype
) -> dict[str, Any]:
    pix, ids, mask = [], [], []
    it, have = iter(loader), 0
    for _ in range(loader.batches_per_epoch):
        batch = next(it)
        valid = batch["sample_mask"]
        pix.append(batch["pixel_values"][valid])  # host-side selection: the device sees fixed shapes
        ids.append(batch["input_ids"][valid])
        mask.append(batch["attention_mask"][valid])
        have += int(valid.sum())
        if have >= cfg.retrieval_samples:
            break
    n = min(have, cfg.retrieval_samples)
    tensors = {
        "pixel_values": torch.cat(pix)[:n],
        "input_ids": torch.cat(ids)[:n],
        "attention_mask": torch.cat(mask)[:n],
    }
    tensors = backend.to_device(tensors, float_dtype)
    with backend.autocast():
        scores = retrieval_scores(
            model, tensors["pixel_values"], tensors["input_ids"], tensors["attention_mask"], chunk=cfg.batch_size
        )
    return {**recall_at_k(scores), "retrieval_samples": n}


def evaluate_checkpoint(ckpt: Path, cfg: RunConfig) -> dict[str, Any]:
    """`gaudi-pretrain eval`: the weights of the complete checkpoint `ckpt` (no DeepSpeed, no training
    state) on `cfg`'s `data.eval_shards`, in one process."""
    if not cfg.data.eval_shards:
        raise CheckpointError("data.eval_shards is empty: nothing to evaluate on")
    backend = select_backend(cfg.backend, cfg.train.precision, cfg.train.zero_stage)
    backend.prepare_environment()
    model = load_checkpoint_model(ckpt, cfg.model, backend.attention_fn()).to(backend.device)
    loader, retrieval = eval_loaders(cfg, load_tokenizer(cfg.data.tokenizer), DistInfo.single())
    record = evaluate(model, backend, loader, retrieval, cfg.eval, read_client_state(ckpt).step)
    record["checkpoint"] = str(ckpt)
    return record
