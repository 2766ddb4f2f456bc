"""Sequence packing: best-fit-decreasing bins of ``data.max_length`` tokens, without cross-contamination.

Packing runs on each trainer over windows of its own shard (so it streams, and a resumed run packs the
same windows again). A packed batch has no ``attention_mask``; ``position_ids`` restart at 0 for every
sequence, which is how transformers confines attention to each sequence: flash-attention's varlen
kernels read the boundaries from them, and for sdpa/eager ``masking_utils`` builds a block-diagonal
causal mask from them. The first label of every sequence is ignored, because it would otherwise be
predicted from the previous sequence's last token; an unpacked row never trains that label either.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from sft_ray.template import IGNORE_INDEX


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into bins of at most ``capacity`` tokens: longest first, each into the
    fullest bin it still fits (a new bin when none does). A length above ``capacity`` gets a bin of its own."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted: the first fit found is the best fit
    for i in order:
        need = lengths[i]
        k = bisect.bisect_left(free, (need, -1))
        if k < len(free):
            room, b = free.pop(k)
            bins[b].append(i)
            room -= need
        else:
            bins.append([i])
            b, room = len(bins) - 1, capacity - need
        if room > 0:
            bisect.insort(free, (room, b))
    return bins


def expected_bins(lengths: np.ndarray, capacity: int, window: int, sample: int = 20_000, seed: int = 0) -> float:
    """Bins per row that windowed BFD packing gives for this length distribution (a seeded sample of it);
    the driver turns this into optimizer steps before training starts."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) == 0:
        return 0.0
    rng = np.random.default_rng(seed)
    if len(lengths) > sample:
        lengths = rng.choice(lengths, size=sample, replace=False)
    else:
        lengths = rng.permutation(lengths)
    bins = sum(len(best_fit_decreasing(lengths[s:s + window].tolist(), capacity))
               for s in range(0, len(lengths), window))
    return bins / len(lengths)


def pack_stream(batches: Iterable[dict[str, Any]], capacity: int, bins_per_batch: int) -> Iterator[list[dict]]:
    """Micro-batches of ``bins_per_batch`` bins from a stream of row windows (dicts of columns); each bin is a
    list of rows ``{input_ids, labels[, example_id]}``. Bins left over at a window's end start the next batch."""
    pending: list[list[dict]] = []
    for window in batches:
        rows = [{k: window[k][i] for k in window} for i in range(len(window["input_ids"]))]
        for b in best_fit_decreasing([len(r["input_ids"]) for r in rows], capacity):
            pending.append([rows[i] for i in b])
            if len(pending) == bins_per_batch:
                yield pending
                pending = []
    if pending:
        yield pending


def packed_collate(bins: list[list[dict]], pad_id: int, flat: bool = False, multiple: int = 8) -> dict[str, Any]:
    """Tensors for a micro-batch of bins.

    ``flat=False`` (sdpa/eager): one row per bin, right-padded to the longest bin; the padding forms a
    sequence of its own (positions restart), so no real token attends to it. ``flat=True``
    (flash-attention varlen): every sequence in one row, no padding at all, with ``cu_seq_lens`` given so
    the kernels need not derive them."""
    import torch

    rows = [[s for b in bins for s in b]] if flat else bins
    lens = [sum(len(s["input_ids"]) for s in r) for r in rows]
    width = max(lens) if flat else int(math.ceil(max(lens) / multiple) * multiple)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    starts: list[int] = []
    for r, seqs in enumerate(rows):
        at = 0
        for s in seqs:
            n = len(s["input_ids"])
            input_ids[r, at:at + n] = torch.as_tensor(np.asarray(s["input_ids"], dtype=np.int64))
            labels[r, at + 1:at + n] = torch.as_tensor(np.asarray(s["labels"], dtype=np.int64)[1:])
            position_ids[r, at:at + n] = torch.arange(n)
            starts.append(at)
            at += n
        position_ids[r, at:] = torch.arange(width - at)
    # use_cache=False: transformers only reads packed positions when no KV cache is being built
    out: dict[str, Any] = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "use_cache": False}
    if flat:
        cu = torch.tensor(starts + [width], dtype=torch.int32)
        out["cu_seq_lens_q"] = out["cu_seq_lens_k"] = cu
        out["max_length_q"] = out["max_length_k"] = int(cu.diff().max())
    ids = [str(s["example_id"]) for r in rows for s in r if "example_id" in s]
    if ids:
        out["example_id"] = ids
    return out
