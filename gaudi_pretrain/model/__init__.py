"""BridgeTower for ITM+MLM pretraining: static-shape, weight-compatible with transformers.

Importing this package loads nothing (not torch): the CLI imports below it to answer `--help` and config
errors fast. Entry points: `factory.build_model`, `pretraining.BridgeTowerForPretraining`,
`hf_convert.export_hf` / `load_pretrained`, `flops.flops_per_sample`.
"""
