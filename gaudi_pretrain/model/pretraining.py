"""The pretraining objective: masked language modelling + image-text matching, one batch at a time.

One vision pass serves both the MLM forward (masked text, true image) and the ITM forward (clean text, the
image of row `itm_image_index[i]`), gathered with `index_select`; why that is the recipe's two-forward
objective exactly: docs/architecture.md "Why the shared vision pass is the same objective".

Losses are sum / clamp(count, 1) over targets != -100, so padding rows (labels -100) count for nothing and
a batch without any target gives 0, not NaN. Metric sums are returned as tensors: no host sync here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from gaudi_pretrain.config import ModelConfig
from gaudi_pretrain.model.attention import AttentionFn
from gaudi_pretrain.model.bridgetower import BridgeTowerModel, Features, LayerNorm, init_weights
from gaudi_pretrain.model.precision import fp32_region

IGNORE_INDEX = -100
LOGIT_SCALE_INIT = 2.6592  # transformers' BridgeTowerConfig.logit_scale_init_value (-itm-mlm-itc)


class PretrainingOutput(NamedTuple):
    """A NamedTuple, not a dataclass: DeepSpeed ZeRO-3 hooks find tensors only in tuples, lists and dicts."""

    loss: torch.Tensor  # mlm_loss + itm_loss
    mlm_loss: torch.Tensor
    itm_loss: torch.Tensor
    mlm_logits: torch.Tensor  # [B, L, V]
    itm_logits: torch.Tensor  # [B, 2]; column 1 = "match"
    mlm_correct: torch.Tensor  # int64 sums over targets != -100
    mlm_count: torch.Tensor
    itm_correct: torch.Tensor
    itm_count: torch.Tensor


class PredictionHeadTransform(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.LayerNorm = LayerNorm(dim, eps=eps)

    def forward(self, x):
        return self.LayerNorm(F.gelu(self.dense(x)))


class MLMHead(nn.Module):
    """`mlm_score`: transform → decoder (not tied to the word embeddings) + bias."""

    def __init__(self, dim: int, vocab: int, eps: float):
        super().__init__()
        self.transform = PredictionHeadTransform(dim, eps)
        self.decoder = nn.Linear(dim, vocab, bias=False)
        self.bias = nn.Parameter(torch.zeros(vocab))

    def forward(self, x):
        return self.decoder(self.transform(x)) + self.bias


class LinearHead(nn.Module):
    """`itm_score` (2H → 2) and the contrastive heads: a single `fc`."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.fc(x)


def _ce_stats(logits: torch.Tensor, labels: torch.Tensor):
    """Mean cross-entropy over targets != -100 (0 when there are none), correct and count sums."""
    logits, labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    valid = labels.ne(IGNORE_INDEX)
    count = valid.sum()
    with fp32_region(logits):
        loss = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum") / count.clamp(min=1)
    correct = (logits.argmax(dim=-1).eq(labels) & valid).sum()
    return loss, correct.detach(), count.detach()


class BridgeTowerForPretraining(nn.Module):
    """transformers' BridgeTowerForMaskedLM ∪ BridgeTowerForImageAndTextRetrieval (same state-dict names),
    plus the -itm-mlm-itc contrastive heads when `cfg.itc_heads`."""

    def __init__(self, cfg: ModelConfig, attention_fn: AttentionFn | None = None):
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size
        self.bridgetower = BridgeTowerModel(cfg, attention_fn)
        self.mlm_score = MLMHead(h, cfg.text.vocab_size, cfg.layer_norm_eps)
        self.itm_score = LinearHead(2 * h, 2)
        if cfg.itc_heads:
            self.itc_text_head = LinearHead(h, cfg.contrastive_hidden_size)
            self.itc_image_head = LinearHead(h, cfg.contrastive_hidden_size)
            self.itc_cross_modal_head = LinearHead(2 * h, cfg.contrastive_hidden_size)
            self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))
        init_weights(self)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.bridgetower.set_grad_checkpointing(enable)

    # ----------------------------------------------------------------------------- training step

    def forward(self, batch: Mapping[str, torch.Tensor]) -> PretrainingOutput:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        bt = self.bridgetower
        images = bt.encode_images(batch["pixel_values"])  # C × [B, Li, H], once per batch
        index = batch["itm_image_index"]
        paired = tuple(torch.cat([f, f.index_select(0, index)]) for f in images)  # rows B.. = ITM images
        mask2 = torch.cat([mask, mask])
        text = bt.encode_text(torch.cat([batch["mlm_input_ids"], ids]), mask2)  # C × [2B, L, H]
        text_f, image_f = bt.cross_encode(text, mask2, paired)
        return self.heads(text_f, image_f, batch)

    def heads(
        self, text_f: torch.Tensor, image_f: torch.Tensor, batch: Mapping[str, torch.Tensor]
    ) -> PretrainingOutput:
        """MLM and ITM heads and losses on the cross-modal outputs of the 2B rows (MLM rows first)."""
        b = batch["input_ids"].shape[0]
        mlm_logits = self.mlm_score(text_f[:b])  # [B, L, V]
        itm_logits = self.itm_score(self.bridgetower.pool(text_f[b:], image_f[b:]))  # [B, 2]
        mlm_loss, mlm_correct, mlm_count = _ce_stats(mlm_logits, batch["mlm_labels"])
        itm_loss, itm_correct, itm_count = _ce_stats(itm_logits, batch["itm_labels"])
        return PretrainingOutput(
            loss=mlm_loss + itm_loss,
            mlm_loss=mlm_loss,
            itm_loss=itm_loss,
            mlm_logits=mlm_logits,
            itm_logits=itm_logits,
            mlm_correct=mlm_correct,
            mlm_count=mlm_count,
            itm_correct=itm_correct,
            itm_count=itm_count,
        )

    # ------------------------------------------------------------------------- inference helpers

    def encode_images(self, pixel_values: torch.Tensor) -> Features:
        """Vision features for `match_logits_from_features` (rank N texts × N images with N vision passes)."""
        return self.bridgetower.encode_images(pixel_values)

    def match_logits_from_features(
        self, images: Features, image_index: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """ITM "match" logit [N] of text row i with image `image_index[i]` of precomputed `images`."""
        bt = self.bridgetower
        paired = tuple(f.index_select(0, image_index) for f in images)
        text_f, image_f = bt.cross_encode(bt.encode_text(input_ids, attention_mask), attention_mask, paired)
        return self.itm_score(bt.pool(text_f, image_f))[:, 1]

    def itm_logits(self, pixel_values, input_ids, attention_mask) -> torch.Tensor:
        """One full ITM forward (like BridgeTowerForImageAndTextRetrieval): [N, 2]."""
        _, _, pooled = self.bridgetower(input_ids, attention_mask, pixel_values)
        return self.itm_score(pooled)

    def itm_scores(self, pixel_values, input_ids, attention_mask) -> torch.Tensor:
        """Match logit [N] of each (image i, text i) pair, the retrieval ranking score."""
        return self.itm_logits(pixel_values, input_ids, attention_mask)[:, 1]

    def mlm_logits(self, pixel_values, input_ids, attention_mask) -> torch.Tensor:
        """One full MLM forward (like BridgeTowerForMaskedLM): [N, L, V]."""
        text_f, _, _ = self.bridgetower(input_ids, attention_mask, pixel_values)
        return self.mlm_score(text_f)
