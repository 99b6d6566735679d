"""gaudi_pretrain: BridgeTower ITM+MLM pretraining on Intel Gaudi (HPU), with CUDA and CPU fallbacks."""

__version__ = "0.1.0"
