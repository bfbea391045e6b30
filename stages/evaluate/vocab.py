"""The eval stage's vocabulary transforms: IFSeg's unseen-only GT filter and background words.

unseen_only (IFSeg COCO "15 unseen", methods-spec §1.6): the test vocabulary is the unseen subset in vocabulary
order; GT of any other class becomes ignore, unseen ids are remapped to 0..U-1.

background words (Seifi et al. PV-21, methods-spec §3.3, protocol `background: stuff_names`): predictors score
the vocabulary plus extra stuff words appended after it (ids C..C+K-1); a pixel won by an extra word is
predicted as the vocabulary's background class. The background class's own name stays a prompt as well (the
paper does not say whether it is dropped).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline.data.vocab import Vocabulary


def unseen_only_lut(vocab: Vocabulary) -> np.ndarray:
    """LUT full train id -> unseen-subset id (position in `vocab.unseen_ids`); every other value -> ignore.

    Returns:
        int64 [max(num_classes, ignore_index) + 1]; index it with ids clipped to its last entry (= ignore).
    """
    lut = np.full(max(vocab.num_classes, vocab.ignore_index) + 1, vocab.ignore_index, dtype=np.int64)
    lut[list(vocab.unseen_ids)] = np.arange(len(vocab.unseen_ids))
    return lut


def unseen_only_vocab(vocab: Vocabulary) -> Vocabulary:
    """The unseen classes of `vocab` as a vocabulary of their own, named `<name>_unseen_only`."""
    return vocab.subset(list(vocab.unseen_ids), f"{vocab.name}_unseen_only")


def with_background_words(vocab: Vocabulary, words: Sequence[str]) -> Vocabulary:
    """`vocab` with `words` appended as classes C..C+K-1 (every variant spells them as given; no source ids).

    Raises:
        ValueError: a word repeats or is already a class name.
    """
    if not words:
        return vocab
    coarse = None if vocab.coarse is None else (*vocab.coarse, *(["background"] * len(words)))
    return Vocabulary(name=f"{vocab.name}+background_words", names=(*vocab.names, *words),
                      variants={key: (*names, *words) for key, names in vocab.variants.items()},
                      unseen_ids=vocab.unseen_ids, coarse=coarse, source_ids=None, ignore_index=vocab.ignore_index)


def fold_background_words(pred: np.ndarray, num_classes: int, background_id: int) -> np.ndarray:
    """Map predicted ids >= `num_classes` (the background words) to `background_id`; returns a new array."""
    return np.where(pred >= num_classes, background_id, pred)
