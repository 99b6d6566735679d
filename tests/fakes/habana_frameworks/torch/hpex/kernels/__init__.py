"""Fake FusedSDPA: apply(q, k, v, attn_mask, dropout_p, is_causal, scale, softmax_mode, ...) positional,
as documented; records the call and the mask dtype, computes with torch SDPA."""
import torch
import torch.nn.functional as F

from hpu_recorder import record, record_import

record_import(__name__)


class FusedSDPA:
    @staticmethod
    def apply(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, softmax_mode="None",
              *rest):
        record("FusedSDPA.apply", None if attn_mask is None else attn_mask.dtype, dropout_p, is_causal, scale)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale)
