"""FusedSDPA: a torch.autograd.Function, so `apply` takes its arguments positionally: (q, k, v, attn_mask,
dropout_p, is_causal, scale, softmax_mode, recompute_mode, valid_seq_len, seq_padding_type, ...)
(gaudi-pytorch-bridge v1.19.0 hpex/kernels/FusedSDPA.py). The double records the call and computes with
torch's SDPA."""

import torch.nn.functional as F
from _hpu_double import record, record_import

record_import(__name__)


class FusedSDPA:
    @staticmethod
    def apply(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, softmax_mode="None", *rest):
        record("FusedSDPA.apply", None if attn_mask is None else attn_mask.dtype, dropout_p, is_causal, scale)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale
        )
