"""Tokenizers: load one (Hub name or directory) and train the demo's small RoBERTa-style BPE.

The demo tokenizer is a byte-level BPE with RoBERTa's special tokens at RoBERTa's ids
(<s>=0 <pad>=1 </s>=2 <unk>=3 <mask>=4), saved as a transformers fast-tokenizer directory, so the
same code path (`AutoTokenizer.from_pretrained`) serves `roberta-large` and the demo.
"""

from __future__ import annotations

import inspect
import json
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from gaudi_pretrain.errors import DataError

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # ids 0..4, RoBERTa's order


def load_tokenizer(name_or_path: str) -> Any:
    """A transformers fast tokenizer with pad and mask tokens (RoBERTa convention)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
    except Exception as exc:  # OSError, ValueError, hub errors: one line for the user
        hint = " (build the demo set with `gaudi-pretrain shards demo`)" if "demo" in str(name_or_path) else ""
        raise DataError(f"cannot load tokenizer '{name_or_path}': {str(exc).splitlines()[0]}{hint}") from None
    if tok.pad_token_id is None or tok.mask_token_id is None:
        raise DataError(f"tokenizer '{name_or_path}' has no pad or mask token (MLM needs both)")
    return tok


def train_demo_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 512) -> Any:
    """Train a byte-level BPE on `texts` and save it to `out_dir`; returns the loaded tokenizer.

    `vocab_size` is an upper bound (256 byte symbols + 5 specials + merges): a small caption set
    stops merging earlier, so the result always fits a model with `vocab_size` embeddings.
    """
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        list(texts), vocab_size=vocab_size, min_frequency=1, special_tokens=SPECIAL_TOKENS, show_progress=False
    )
    vocab = bpe.get_vocab()
    for i, token in enumerate(SPECIAL_TOKENS):
        if vocab.get(token) != i:
            raise DataError(f"demo tokenizer: special token {token} got id {vocab.get(token)}, expected {i}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = bpe.save_model(tmp)
        if "vocab_file" in inspect.signature(RobertaTokenizerFast.__init__).parameters:  # transformers 4.x
            tok = RobertaTokenizerFast(vocab_file=vocab_file, merges_file=merges_file)
        else:  # transformers 5.x takes the vocabulary and merges themselves
            lines = Path(merges_file).read_text(encoding="utf-8").splitlines()
            merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
            tok = RobertaTokenizerFast(vocab=json.loads(Path(vocab_file).read_text(encoding="utf-8")), merges=merges)
    tok.model_max_length = 512
    tok.save_pretrained(str(out))
    return load_tokenizer(str(out))
