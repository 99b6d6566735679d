"""BridgeTower for ITM+MLM pretraining: fast, static-shape, weight-compatible with transformers.

Importing this package loads torch only: no transformers (imported lazily by `hf_io`), no DeepSpeed, no
device library. Entry points: `pretraining.BridgeTowerForPretraining`, `hf_io.build_model`,
`hf_io.export_hf` / `export_checkpoint`, `attention.set_attention_fn`, `flops.flops_per_sample`.
"""

from gaudi_pretrain.model.attention import get_attention_fn, set_attention_fn
from gaudi_pretrain.model.flops import flops_per_sample, forward_flops

__all__ = ["flops_per_sample", "forward_flops", "get_attention_fn", "set_attention_fn"]
