"""Sequence packing without changing the optimisation: a micro-batch is always ``per_device_batch_size`` rows.

Packing only decides how those rows are laid out in memory. Unpacked, each row is one padded line of the
batch; packed, the rows are grouped into as few ``data.max_length`` bins as fit and the bins are evened out,
so a batch carries almost no padding. Rows per optimizer step, and with them the number of steps in an
epoch, do not depend on how long the rows happen to be (as with TRL's ``padding_free``).

A packed batch has no ``attention_mask``; ``position_ids`` restart at 0 for every sequence, which is how
transformers confines attention to each sequence: flash-attention's varlen kernels read the boundaries from
them (``flat``: one line, ``cu_seq_lens`` given), and for sdpa/eager ``masking_utils`` builds a
block-diagonal causal mask from them. The first label of every sequence is ignored, because it would
otherwise be predicted from the previous sequence's last token; an unpacked row never trains that label
either (nothing comes before it).
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Sequence
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


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """The rows of one micro-batch in as few bins as best-fit decreasing needs, evened out: longest row first
    into the least-filled bin it fits, so the widest bin (the batch's padded width) is close to the mean.
    Falls back to the best-fit bins when the evened-out layout would not fit."""
    bfd = best_fit_decreasing(lengths, capacity)
    k = len(bfd)
    heap = [(0, b) for b in range(k)]  # (tokens, bin)
    bins: list[list[int]] = [[] for _ in range(k)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        load, b = heapq.heappop(heap)
        if load and load + lengths[i] > capacity:
            return bfd
        bins[b].append(i)
        heapq.heappush(heap, (load + lengths[i], b))
    return [sorted(b) for b in bins if b]


def packed_collate(rows: list[dict[str, Any]], capacity: int, pad_id: int, flat: bool = False,
                   multiple: int = 8) -> dict[str, Any]:
    """Tensors for one micro-batch of rows (dicts with ``input_ids``, ``labels``[, ``example_id``]).

    ``flat=False`` (sdpa/eager): the rows packed into bins (``pack_rows``), one line per bin, right-padded to
    the widest; the padding forms a sequence of its own (positions restart), so no real token attends to it.
    ``flat=True`` (flash-attention varlen): every row in one line, no padding at all, ``cu_seq_lens`` given."""
    import torch

    lengths = [len(r["input_ids"]) for r in rows]
    lines = [list(range(len(rows)))] if flat else pack_rows(lengths, capacity)
    widths = [sum(lengths[i] for i in line) for line in lines]
    width = max(widths) if flat else int(math.ceil(max(widths) / multiple) * multiple)
    input_ids = torch.full((len(lines), width), pad_id, dtype=torch.long)
    labels = torch.full((len(lines), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(lines), width), dtype=torch.long)
    starts: list[int] = []
    order: list[int] = []
    for r, line in enumerate(lines):
        at = 0
        for i in line:
            n = lengths[i]
            input_ids[r, at:at + n] = torch.as_tensor(np.asarray(rows[i]["input_ids"], dtype=np.int64))
            labels[r, at + 1:at + n] = torch.as_tensor(np.asarray(rows[i]["labels"], dtype=np.int64)[1:])
            position_ids[r, at:at + n] = torch.arange(n)
            starts.append(at)
            order.append(i)
            at += n
        position_ids[r, at:] = torch.arange(width - at)
    # use_cache=False: transformers only reads packed positions when no KV cache is being built
    out: dict[str, Any] = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
                           "use_cache": False, "num_tokens": sum(lengths)}
    if flat:
        cu = torch.tensor(starts + [width], dtype=torch.int32)
        out["cu_seq_lens_q"] = out["cu_seq_lens_k"] = cu
        out["max_length_q"] = out["max_length_k"] = int(cu.diff().max())
    if rows and "example_id" in rows[0]:
        out["example_id"] = [str(rows[i]["example_id"]) for i in order]
    return out
