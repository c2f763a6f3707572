"""Length-sorted batches of token sequences, right-padded, with their attention masks."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class Batch:
    """One padded batch.

    Attributes:
        sample_index: int64 ``[batch]``, corpus index of each row (ascending within the batch).
        input_ids: int64 ``[batch, seq]``, right-padded with ``pad_id``.
        attention_mask: int64 ``[batch, seq]``, 1 at real tokens, 0 at padding.
    """

    sample_index: np.ndarray
    input_ids: np.ndarray
    attention_mask: np.ndarray

    @property
    def valid(self) -> tuple[np.ndarray, np.ndarray]:
        """(row, position) of each real token, row-major (the order the graph gathers them in)."""
        return np.nonzero(self.attention_mask)

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())


def length_sorted_batches(
    sequences: Sequence[np.ndarray], sample_index: Sequence[int], batch_size: int, pad_id: int = 0
) -> Iterator[Batch]:
    """Group sequences of similar length (longest first) into right-padded batches.

    Args:
        sequences: token ids of each passage, int64 ``[len_i]``, ``len_i >= 1``.
        sample_index: the corpus index of each passage (same length as ``sequences``).
        batch_size: at most this many passages per batch (>= 1).
        pad_id: token id written at padded positions (masked out everywhere).

    Rows inside a batch are ordered by corpus index, so the first of several equal maxima in a
    batch is the one of the lowest sample.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    lengths = np.array([len(s) for s in sequences])
    order = sorted(range(len(sequences)), key=lambda k: (-lengths[k], sample_index[k]))
    for start in range(0, len(order), batch_size):
        rows = sorted(order[start : start + batch_size], key=lambda k: sample_index[k])
        width = int(max(lengths[k] for k in rows))
        ids = np.full((len(rows), width), pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for r, k in enumerate(rows):
            ids[r, : lengths[k]] = sequences[k]
            mask[r, : lengths[k]] = 1
        yield Batch(np.array([sample_index[k] for k in rows], dtype=np.int64), ids, mask)


def shard_of(batches: Sequence[Batch], index: int, count: int) -> list[Batch]:
    """The batches of shard ``index`` (1-based) of ``count``: every ``count``-th batch of the run,
    from batch ``index - 1`` on (strided over the length-sorted batch order).

    Striding keeps each shard's batches identical to the whole run's (same rows, same padding), so
    the shards' statistics merge to the whole run's exactly, and spreads long and short passages
    evenly over the shards. The shards of ``1..count`` partition ``batches``.

    Raises:
        ValueError: ``index`` not in ``1..count``.
    """
    if not 1 <= index <= count:
        raise ValueError(f"shard index {index} is not in 1..{count}")
    return list(batches[index - 1 :: count])
