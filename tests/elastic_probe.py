"""Test helper for tests/test_elastic.py, launched like `python -m gaudi_pretrain` (also under torchrun):
`python tests/elastic_probe.py OUT train --config ... --resume auto`.

It runs the real `train` command, with one addition: right after the checkpoint is restored, before the
first resumed step, every rank saves the engine as it was loaded into an ordinary DeepSpeed checkpoint
OUT/probe. The test converts that with DeepSpeed's ds_to_universal and compares its per-parameter fp32
masters and Adam moments with the ones of the checkpoint the run resumed from."""

from __future__ import annotations

import sys

from gaudi_pretrain.cli import main
from gaudi_pretrain.train import loop

PROBE_TAG = "probe"


def _probe(out: str):
    restore = loop.restore_checkpoint

    def restore_then_save(ctx) -> None:
        restore(ctx)
        ctx.engine.save_checkpoint(out, tag=PROBE_TAG)

    return restore_then_save


if __name__ == "__main__":
    loop.restore_checkpoint = _probe(sys.argv[1])
    sys.exit(main(sys.argv[2:]))
