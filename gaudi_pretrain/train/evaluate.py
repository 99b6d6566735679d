"""Held-out evaluation: ITM and MLM accuracy on eval shards, and zero-shot retrieval recall.

Retrieval ranks every (image, text) pair of a capped subset by the ITM "match" logit, as BridgeTower
does at fine-tuning time: image retrieval (IR) ranks the N images for each text, text retrieval (TR)
the N texts for each image. Every rank computes the same subset, so ZeRO-3 collectives stay aligned.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def _model(ctx: Any) -> Any:
    module = getattr(ctx.engine, "module", ctx.engine)  # a DeepSpeed engine in training, a bare model in `eval`
    return getattr(module, "_orig_mod", module)


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
def retrieval_scores(model: Any, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor, chunk: int) -> torch.Tensor:
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
def evaluate(ctx: Any, step: int) -> dict[str, Any]:
    """ITM/MLM accuracy over (at most eval.max_samples of) the eval shards, plus retrieval recall."""
    from gaudi_pretrain.data.pipeline import build_loader
    from gaudi_pretrain.train.loop import _to_device
    from gaudi_pretrain.train.metrics import all_reduce_sum

    cfg, dev, dtype = ctx.cfg, ctx.backend.device, ctx.state.get("float_dtype", torch.float32)
    ctx.engine.eval()
    model = _model(ctx)
    loader = build_loader(cfg, ctx.tokenizer, rank=ctx.dist.rank, world_size=ctx.dist.world_size, split="eval")
    per_step = cfg.train.micro_batch_size * ctx.dist.world_size
    n_batches = min(loader.batches_per_epoch, max(1, math.ceil(cfg.eval.max_samples / per_step)))
    sums = [0.0] * 6  # mlm_correct, mlm_count, itm_correct, itm_count, loss*batches, batches
    it = iter(loader)
    for _ in range(n_batches):
        batch = next(it)
        batch.pop("keys")
        batch.pop("skipped")
        with ctx.backend.autocast():
            out = ctx.engine(_to_device(batch, dev, dtype))
        for i, v in enumerate((out.mlm_correct, out.mlm_count, out.itm_correct, out.itm_count)):
            sums[i] += float(v)
        sums[4] += float(out.loss)
        sums[5] += 1
    mlm_c, mlm_n, itm_c, itm_n, loss, batches = all_reduce_sum(sums, dev)
    record: dict[str, Any] = {
        "kind": "eval",
        "step": step,
        "loss": loss / max(batches, 1),
        "mlm_acc": mlm_c / max(mlm_n, 1),
        "itm_acc": itm_c / max(itm_n, 1),
        "eval_samples": int(itm_n),
    }
    if cfg.eval.retrieval_samples > 1:
        record.update(_retrieval(ctx, model, dev, dtype))
    return record


def _retrieval(ctx: Any, model: Any, dev: Any, dtype: Any) -> dict[str, Any]:
    from gaudi_pretrain.data.pipeline import build_loader
    from gaudi_pretrain.train.loop import _to_device

    cfg = ctx.cfg
    loader = build_loader(cfg, ctx.tokenizer, rank=0, world_size=1, split="eval")  # same subset on all ranks
    pix, ids, mask = [], [], []
    it, have = iter(loader), 0
    for _ in range(loader.batches_per_epoch):
        batch = next(it)
        valid = batch["sample_mask"]
        pix.append(batch["pixel_values"][valid])  # host-side selection: the device sees fixed shapes
        ids.append(batch["input_ids"][valid])
        mask.append(batch["attention_mask"][valid])
        have += int(valid.sum())
        if have >= cfg.eval.retrieval_samples:
            break
    n = min(have, cfg.eval.retrieval_samples)
    tensors = {"pixel_values": torch.cat(pix)[:n], "input_ids": torch.cat(ids)[:n], "attention_mask": torch.cat(mask)[:n]}
    tensors = _to_device(tensors, dev, dtype)
    with ctx.backend.autocast():
        scores = retrieval_scores(model, tensors["pixel_values"], tensors["input_ids"], tensors["attention_mask"],
                                  chunk=cfg.eval.batch_size)
    return {**recall_at_k(scores), "retrieval_samples": n}
