"""Attention kernels and the multi-head attention blocks built on them.

The kernel is chosen when the model is built (`attention_kernel`): `model.attention: eager` is the
readable matmul + fp32-softmax reference; `sdpa` is torch's `scaled_dot_product_attention` or a backend's
fused kernel (HPU: FusedSDPA). Every kernel has the signature

    fn(q, k, v, attn_mask, dropout_p) -> out
        q: [B, H, Lq, D], k and v: [B, H, Lk, D]   (all the same dtype)
        attn_mask: None, or an ADDITIVE float mask in q's dtype broadcastable to [B, H, Lq, Lk]
                   (0 = attend, dtype-min = ignore); never a bool mask
        dropout_p: float, already 0.0 in eval mode
        out: [B, H, Lq, D]; softmax scale = D ** -0.5, not causal

The mask is additive with dtype-min (not -inf, which gives NaN in some kernels), and no row is ever fully
masked (see `additive_mask`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from gaudi_pretrain.model.precision import fp32_region

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None", float], torch.Tensor]


def sdpa_attention(q, k, v, attn_mask, dropout_p):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)


def eager_attention(q, k, v, attn_mask, dropout_p):
    """Plain math (softmax in fp32): the readable reference, and `model.attention: eager`."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)  # [B, H, Lq, Lk]
    if attn_mask is not None:
        scores = scores + attn_mask
    with fp32_region(scores):
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    probs = F.dropout(probs, p=dropout_p, training=dropout_p > 0)
    return torch.matmul(probs, v)


def attention_kernel(impl: str, fused: AttentionFn | None = None) -> AttentionFn:
    """The kernel for `model.attention`: "eager", or "sdpa" (a backend's fused kernel if it has one)."""
    if impl == "eager":
        return eager_attention
    return fused if fused is not None else sdpa_attention


def additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, L] 1/0 keep-mask → [B, 1, 1, L] additive mask in `dtype` (static shape, no indexing).

    A row with no key at all (a padding row of the batch contract) attends to every key instead: fused
    kernels mis-handle fully masked rows (torch's CPU SDPA backward returns wrong gradients for them) and
    such rows carry no loss, so their values do not matter as long as they stay finite."""
    keep = attention_mask.bool()
    keep = keep | ~keep.any(dim=-1, keepdim=True)
    return (~keep[:, None, None, :]).to(dtype) * torch.finfo(dtype).min


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, d = x.shape
    return x.view(b, n, heads, d // heads).transpose(1, 2)  # [B, H, N, Dh]


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, dh = x.shape
    return x.transpose(1, 2).reshape(b, n, h * dh)


class FusedInProjAttention(nn.Module):
    """OpenAI-CLIP attention with one fused q/k/v projection; names as torch's nn.MultiheadAttention
    (`in_proj_weight`, `in_proj_bias`, `out_proj`), so CLIP and BridgeTower checkpoints load as they are.
    Batch-first, no mask (image tokens are never padded), no dropout (CLIP has none)."""

    def __init__(self, dim: int, heads: int, attend: AttentionFn = sdpa_attention):
        super().__init__()
        self.heads, self.attend = heads, attend
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, N, D]
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        out = self.attend(*(_split_heads(t, self.heads) for t in (q, k, v)), None, 0.0)
        return self.out_proj(_merge_heads(out))


class QKV(nn.Module):
    """BERT-style separate query/key/value projections (names `query`, `key`, `value`)."""

    def __init__(self, dim: int, heads: int, dropout: float, attend: AttentionFn = sdpa_attention):
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden size {dim} is not divisible by {heads} heads")
        self.heads, self.dropout, self.attend = heads, dropout, attend
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """x: [B, Lq, D] queries; context: [B, Lk, D] keys/values; key_mask: [B, Lk] 1 = attend, or None."""
        q = _split_heads(self.query(x), self.heads)
        k = _split_heads(self.key(context), self.heads)
        v = _split_heads(self.value(context), self.heads)
        # built in q's dtype here (under autocast q is bf16): a cast of an fp32 dtype-min could overflow to -inf
        mask = additive_mask(key_mask, q.dtype) if key_mask is not None else None
        p = self.dropout if self.training else 0.0
        return _merge_heads(self.attend(q, k, v, mask, p))
