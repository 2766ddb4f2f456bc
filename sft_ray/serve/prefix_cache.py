"""Prompt prefixes that recur (a system prompt, a task's instructions, a few-shot block, the template's opening),
kept as their KV cache so that the continuous batcher prefills only what follows them.

A causal model's keys and values for a prompt's first L tokens depend on those tokens alone, so a new prompt that
begins with L tokens already seen can start from their cached KV. What is kept is learned from traffic: a prompt
that shares at least ``min_tokens`` leading tokens with a recent one (beyond what is cached for it already) has
that shared part stored once prefilled. Entries are used in part too (a prompt sharing 40 tokens of a 60-token
entry reuses those 40). The least recently used go first past ``max_tokens`` tokens in all; at least one token of
every prompt is always computed, for its logits.
"""

from __future__ import annotations

from collections import OrderedDict, deque


def common_length(a: tuple, b: tuple) -> int:
    """How many leading ids two prompts share: a binary search of slice comparisons, which run in C (a long
    system prompt is thousands of ids, compared with every recent prompt)."""
    lo, hi = 0, min(len(a), len(b))
    if a[:hi] == b[:hi]:
        return hi
    while lo < hi - 1:  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if a[:mid] == b[:mid] else (lo, mid)
    return lo


class PrefixCache:
    def __init__(self, max_tokens: int, min_tokens: int = 16, recent: int = 32):
        self.max_tokens, self.min_tokens = max_tokens, min_tokens
        self.entries: OrderedDict[tuple[int, ...], list] = OrderedDict()  # prefix ids -> [(keys, values)] per layer
        self.recent: deque[tuple[int, ...]] = deque(maxlen=recent)  # prompts seen lately, to spot shared prefixes
        self.tokens = 0  # tokens held, all entries together
        self.hits = 0  # prompts that started from a cached prefix
        self.reused = 0  # prompt tokens not computed again

    def __bool__(self) -> bool:
        return self.max_tokens > 0

    def match(self, ids: list[int]) -> tuple[int, tuple[int, ...] | None]:
        """(length, entry key) of the longest cached prefix of ``ids`` worth using, leaving its last token to
        compute; (0, None) if none."""
        best, key = 0, None
        ids = tuple(ids)
        head = ids[:self.min_tokens]
        for k in self.entries:
            if k[:self.min_tokens] != head:  # most entries fail here, before the longer comparison
                continue
            n = min(common_length(k, ids), len(ids) - 1)
            if n > best:
                best, key = n, k
        if best < self.min_tokens:
            return 0, None
        self.entries.move_to_end(key)
        return best, key

    def kv(self, key: tuple[int, ...], length: int) -> list:
        return [(k[:, :, :length], v[:, :, :length]) for k, v in self.entries[key]]

    def used(self, prompts: int, length: int) -> None:
        self.hits += prompts
        self.reused += prompts * length

    def learn(self, ids: list[int], have: int, take) -> None:
        """After ``ids`` was prefilled (starting from ``have`` cached tokens): store its prefix shared with a recent
        prompt when that is ``min_tokens`` longer than what was cached. ``take(n)``: a copy of the row's KV for its
        first n tokens, per layer."""
        ids_t = tuple(ids)
        shared = max((common_length(r, ids_t) for r in self.recent), default=0)
        self.recent.append(ids_t)
        shared = min(shared, len(ids) - 1)
        if shared - have < self.min_tokens or shared > self.max_tokens or ids_t[:shared] in self.entries:
            return
        self.entries[ids_t[:shared]] = take(shared)
        self.tokens += shared
        while self.tokens > self.max_tokens:
            old, _ = self.entries.popitem(last=False)
            self.tokens -= len(old)
