"""The two pretraining objectives' batch-level randomness: MLM masking and ITM negatives.

Both take an explicit `numpy.random.Generator`; the pipeline seeds it from (seed, epoch, rank,
worker, batch index), so any batch can be regenerated exactly without saving RNG streams.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

IGNORE_INDEX = -100


def mask_tokens(
    input_ids: np.ndarray,
    *,
    special_ids: Sequence[int],
    mask_id: int,
    random_ids: np.ndarray,
    probability: float,
    rng: np.random.Generator,
    valid: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """BERT/RoBERTa MLM corruption of `input_ids` [B, L] → (mlm_input_ids, mlm_labels).

    Each non-special, non-pad token is selected with `probability`; a selected token becomes
    <mask> (80%), a random id from `random_ids` (10%) or stays unchanged (10%). Labels hold the
    original id at selected positions and -100 elsewhere (and everywhere on rows with valid=False).
    """
    ids = np.asarray(input_ids, dtype=np.int64)
    eligible = ~np.isin(ids, np.asarray(list(special_ids), dtype=np.int64))
    if valid is not None:
        eligible &= np.asarray(valid, dtype=bool)[:, None]
    draw = rng.random(ids.shape)
    selected = eligible & (draw < probability)
    labels = np.where(selected, ids, IGNORE_INDEX)
    # Split the selected positions 80/10/10 with a second uniform draw.
    how = rng.random(ids.shape)
    to_mask = selected & (how < 0.8)
    to_random = selected & (how >= 0.8) & (how < 0.9)
    out = np.where(to_mask, mask_id, ids)
    random_tokens = random_ids[rng.integers(0, len(random_ids), size=ids.shape)]
    out = np.where(to_random, random_tokens, out)
    return out.astype(np.int64), labels.astype(np.int64)


def itm_negatives(
    valid: np.ndarray,
    captions: Sequence[str],
    *,
    negative_prob: float,
    rng: np.random.Generator,
    hard: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Pair each text row with its own image (positive) or another valid row's image (negative).

    Returns (itm_image_index [B], itm_labels [B]): index i / label 1 for a positive, j != i / label 0
    for a negative, i / -100 for an invalid (padding) row. A negative's image is drawn from rows whose
    caption differs from row i's (an identical caption would make the "negative" a true match); if
    no such row exists the row stays positive. A fraction `hard` of the negatives is drawn only from
    those whose caption shares the most words with row i's (the negatives a model cannot tell apart by
    one salient word).
    """
    valid = np.asarray(valid, dtype=bool)
    n = len(valid)
    index = np.arange(n, dtype=np.int64)
    labels = np.where(valid, 1, IGNORE_INDEX).astype(np.int64)
    want_negative = rng.random(n) < negative_prob
    pick = rng.random(n)  # one uniform per row, used to choose among that row's candidates
    caps = np.asarray(list(captions), dtype=object)
    # drawn only when used, so hard = 0 leaves the random stream (and every earlier run) unchanged
    want_hard = rng.random(n) < hard if hard > 0 else np.zeros(n, dtype=bool)
    words = [set(c.split()) for c in caps] if hard > 0 else None
    for i in np.flatnonzero(valid & want_negative):
        candidates = np.flatnonzero(valid & (caps != caps[i]))
        if len(candidates) == 0:
            continue
        if words is not None and want_hard[i]:
            shared = np.array([len(words[i] & words[j]) for j in candidates])
            candidates = candidates[shared == shared.max()]
        index[i] = candidates[min(int(pick[i] * len(candidates)), len(candidates) - 1)]
        labels[i] = 0
    return index, labels
