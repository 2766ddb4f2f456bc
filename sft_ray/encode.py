"""Rendered conversations to token ids and labels, a batch at a time.

The tokenizer is most of the data pipeline's cost, and tracking character offsets is a third of the
tokenizer's. For byte-level BPE tokenizers (GPT-2's family: Llama 3, Qwen, SmolLM, ...) a text's tokens are its
UTF-8 bytes cut in pieces, so where each token starts and ends follows from the ids alone: the ids come from the
tokenizer's batch call without offsets, and the trained spans are matched against the tokens' byte ranges. That
path is taken only where it gives the labels the offsets give, checked three ways: a probe of awkward texts when
a tokenizer is first seen, every row's byte count against its text, and one row in ``CHECK_EVERY`` recomputed
with offsets (a difference turns the path off for that tokenizer). Everything else gets the offsets.
"""

from __future__ import annotations

import logging
import weakref
from bisect import bisect_left, bisect_right
from itertools import accumulate
from typing import Any

IGNORE_INDEX = -100
CHECK_EVERY = 256

log = logging.getLogger(__name__)

Spans = list[tuple[int, int]]
_TABLES: dict[int, tuple[Any, int, list[int] | None]] = {}  # id(tok) -> (weakref, vocab size, bytes per id)
_ROWS = {"n": 0}


def labels_for(texts: list[str], spans: list[Spans | None], tok) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) of each rendered text, no special tokens added (the template wrote them); labels are the
    ids inside the text's trained character spans (``None``: every token) and IGNORE_INDEX elsewhere."""
    table = _byte_table(tok)
    if table is None:
        return [(ids, list(ids) if sp is None else span_labels(ids, offsets, sp))
                for (ids, offsets), sp in zip(encode(texts, tok, offsets=True), spans)]
    out = []
    for text, sp, ids in zip(texts, spans, encode(texts, tok, offsets=False)):
        labels = list(ids) if sp is None else _byte_labels(ids, text, sp, table)
        _ROWS["n"] += 1
        if labels is None or (sp is not None and _ROWS["n"] % CHECK_EVERY == 1):
            ids2, offsets = encode([text], tok, offsets=True)[0]
            exact = span_labels(ids2, offsets, sp) if sp is not None else list(ids2)
            if labels is not None and (exact != labels or ids2 != ids):
                log.warning("token labels from byte lengths differ from the tokenizer's offsets; using offsets")
                _TABLES[id(tok)] = (weakref.ref(tok), _vocab_size(tok), None)
                table = None
            ids, labels = ids2, exact
        out.append((ids, labels))
        if table is None:  # turned off by the check: the rest of the batch through offsets
            rest = len(out)
            return out + labels_for(texts[rest:], spans[rest:], tok)
    return out


def encode(texts: list[str], tok, offsets: bool) -> list:
    """Token ids (with character offsets if asked) of ``texts``. Straight from the Rust tokenizer when it is set
    up as ``tok(...)`` would set it (no truncation, no padding, special tokens not split), which spares building
    a BatchEncoding; else through ``tok``."""
    bt = getattr(tok, "backend_tokenizer", None)
    if (bt is not None and bt.truncation is None and bt.padding is None
            and bool(bt.encode_special_tokens) == bool(getattr(tok, "split_special_tokens", False))):
        if offsets:
            return [(e.ids, e.offsets) for e in bt.encode_batch(texts, add_special_tokens=False)]
        fast = getattr(bt, "encode_batch_fast", bt.encode_batch)  # tokenizers >= 0.21: no offsets tracked
        return [e.ids for e in fast(texts, add_special_tokens=False)]
    enc = tok(texts, add_special_tokens=False, return_offsets_mapping=offsets)
    return list(zip(enc["input_ids"], enc["offset_mapping"])) if offsets else list(enc["input_ids"])


def span_labels(ids: list[int], offsets: list[tuple[int, int]], spans: Spans) -> list[int]:
    """``ids`` where a token's character offsets overlap a trained span, else IGNORE_INDEX."""
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in spans:
        for k, (s, e) in enumerate(offsets):
            if s < end and e > start and e > s:
                labels[k] = ids[k]
    return labels


def _byte_labels(ids: list[int], text: str, spans: Spans, table: list[int]) -> list[int] | None:
    """Labels from each token's byte range; None when the tokens' bytes do not add up to the text's."""
    lens = [table[i] for i in ids]
    if 0 in lens or sum(lens) != len(text.encode("utf-8")):
        return None
    ends = list(accumulate(lens))
    if not text.isascii():  # the spans are in characters; the tokens in bytes
        spans = [(len(text[:a].encode("utf-8")), len(text[:b].encode("utf-8"))) for a, b in spans]
    labels = [IGNORE_INDEX] * len(ids)
    for a, b in spans:
        if b > a:  # tokens ending after a and starting before b
            k0, k1 = bisect_right(ends, a), min(bisect_left(ends, b) + 1, len(ids))
            labels[k0:k1] = ids[k0:k1]
    return labels


def _vocab_size(tok) -> int:
    return tok.backend_tokenizer.get_vocab_size(with_added_tokens=True)


def _byte_table(tok) -> list[int] | None:
    """Bytes per token id for a byte-level BPE tokenizer whose byte ranges pass the probe; else None.
    Cached per tokenizer object and vocabulary size (adding tokens makes a new table)."""
    bt = getattr(tok, "backend_tokenizer", None)
    if bt is None:
        return None
    n = bt.get_vocab_size(with_added_tokens=True)
    hit = _TABLES.get(id(tok))
    if hit is not None and hit[0]() is tok and hit[1] == n:
        return hit[2]
    table = _make_table(bt, n)
    if table is not None and not _probe_agrees(tok, table):
        table = None
    _TABLES[id(tok)] = (weakref.ref(tok), n, table)
    return table


def _make_table(bt, n: int) -> list[int] | None:
    from tokenizers import decoders, pre_tokenizers

    if bt.normalizer is not None or not isinstance(bt.decoder, decoders.ByteLevel):
        return None
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    table = [0] * n  # 0: unknown (a row holding such a token takes the offsets path)
    for piece, i in bt.get_vocab(with_added_tokens=False).items():
        if i < n and all(c in alphabet for c in piece):
            table[i] = len(piece)
    for i, added in bt.get_added_tokens_decoder().items():
        # matched literally in the raw text, unless it swallows the whitespace beside it
        table[i] = 0 if (added.lstrip or added.rstrip) else len(added.content.encode("utf-8"))
    return table


_PROBE_TEXTS = ["a   b\n\n  c\t d ", "  lead and trail  ", "x\n\n\ny", "日本語 and émoji 😀👍🏽 mixed",
                "12345 67 8.9", "tabs\t\tand\r\nCRLF", "' quotes\" `code` ```"]


def _probe_agrees(tok, table: list[int]) -> bool:
    """Labels from byte lengths equal labels from offsets on awkward texts, with spans at every position."""
    specials = [t for t in (tok.all_special_tokens or []) if t][:3]
    texts = _PROBE_TEXTS + [f"{s}{t}{s}" for s in specials for t in _PROBE_TEXTS[:3]]
    for text, (ids, offsets) in zip(texts, encode(texts, tok, offsets=True)):
        if encode([text], tok, offsets=False)[0] != ids:
            return False
        for a in range(0, len(text) + 1, 3):
            for b in (a + 1, a + 4, len(text)):
                sp = [(a, min(b, len(text)))]
                if _byte_labels(ids, text, sp, table) != span_labels(ids, offsets, sp):
                    return False
    return True
