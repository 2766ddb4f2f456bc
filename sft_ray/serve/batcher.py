"""Continuous batching: every request, streaming or not, joins one running batch at a token boundary and leaves
it when it ends, is cancelled, or its client goes.

One thread owns the model. Each step it prefills the requests that arrived (one forward for those of similar
length, left-padded; each row's first token chosen), merges their KV caches into the running batch's (left
padding), and decodes one token for every running request with one forward. A prompt that begins with a prefix
kept in ``prefix_cache.PrefixCache`` (a recurring system prompt or instructions) starts from that prefix's KV and
only its remaining tokens are computed: its row is [prefix, padding, rest], positions counted past the padding.
Tokens are chosen by ``engine._RowSampler`` rules: greedy rows take the argmax, sampling
rows draw from their own generator. Padding columns that no row needs any more are trimmed as requests leave.

Only models whose cache is transformers' plain ``DynamicCache`` of full-attention layers are batched this way
(``supports``); others keep one ``generate`` per request.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import dataclass, field
from typing import Any

from sft_ray.serve.engine import _RowSampler, logprobs_of
from sft_ray.serve.prefix_cache import PrefixCache


@dataclass
class Handle:
    """A request in the batcher: its token ids arrive one by one (None at the end), on ``tokens`` or, for a
    request submitted with an event loop, on an asyncio queue read by ``next_token`` (no thread waits on it);
    ``result`` holds ``ids`` or ``error`` once done."""

    req: Any
    cancelled: threading.Event
    loop: asyncio.AbstractEventLoop | None = None
    tokens: queue.Queue = field(default_factory=queue.Queue)
    result: dict = field(default_factory=dict)
    done: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self):
        self._aq: asyncio.Queue | None = asyncio.Queue() if self.loop is not None else None

    def put(self, tok: int | None) -> None:
        if self.loop is None:
            self.tokens.put(tok)
            return
        try:
            self.loop.call_soon_threadsafe(self._aq.put_nowait, tok)
        except RuntimeError:  # the loop has closed (the replica is going away): nobody is listening
            self.cancelled.set()

    async def next_token(self) -> int | None:
        return await self._aq.get()

    def arrived(self) -> list[int | None]:
        """The tokens already delivered and not read yet, without waiting: a reader that fell behind the batcher
        (a busy event loop) takes them in one go."""
        out = []
        while not self._aq.empty():
            out.append(self._aq.get_nowait())
        return out

    def join(self, timeout: float | None = None) -> None:
        self.done.wait(timeout)


class _Row:
    def __init__(self, handle: Handle, sampler):
        self.handle, self.sampler = handle, sampler  # sampler: a one-row _RowSampler (its generator)
        self.ids: list[int] = []
        self.pos = len(handle.req.input_ids)  # position of the next input token


class ContinuousBatcher:
    def __init__(self, model, eos_ids: set[int], max_batch: int = 32, prefix_tokens: int = 0):
        import torch

        self.torch, self.model, self.eos_ids, self.max_batch = torch, model, eos_ids, max_batch
        self.device = model.device
        import inspect

        # transformers 5 renamed the forward's ``past_key_values`` to ``cache``; the cache object is updated in place
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.last_only = {"logits_to_keep": 1} if "logits_to_keep" in params else {}  # no vocab logits per prompt token
        self.inbox: queue.Queue[list[Handle]] = queue.Queue()  # requests submitted together arrive together
        self.running = 0  # requests in the batch now (read by the app's metrics)
        self.most_running = 0  # the most requests decoded together so far
        self.prefills = self.prefilled = 0  # prefill forwards, and the requests they held
        self.decoded = 0  # tokens generated, all requests together
        self.prefixes = PrefixCache(prefix_tokens)  # read and written by the loop's thread only
        self._thread = threading.Thread(target=self._loop, name="continuous-batcher", daemon=True)
        self._thread.start()

    @staticmethod
    def supports(model) -> bool:
        """A plain DynamicCache of full-attention layers (what the merge and trim below handle)."""
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        try:
            cache = DynamicCache(config=model.config)
        except Exception:
            return False
        return bool(cache.layers) and all(type(layer) is DynamicLayer for layer in cache.layers)

    def submit(self, req, cancelled: threading.Event | None = None,
               loop: asyncio.AbstractEventLoop | None = None) -> Handle:
        h = Handle(req, cancelled or threading.Event(), loop)
        self.inbox.put([h])
        return h

    def submit_many(self, reqs) -> list[Handle]:
        """Requests that are prefilled together (as far as their lengths allow)."""
        hs = [Handle(r, threading.Event()) for r in reqs]
        self.inbox.put(hs)
        return hs

    # -- the loop (one thread owns the model)

    def _loop(self) -> None:
        torch = self.torch
        rows: list[_Row] = []
        pending: list[Handle] = []  # arrived, waiting for room in the batch
        cache = mask = None
        while True:
            try:
                if not pending and not rows:
                    pending += self.inbox.get()
                while True:
                    pending += self.inbox.get_nowait()
            except queue.Empty:
                pass
            room = self.max_batch - len(rows)
            waiting, pending = pending[:room], pending[room:]
            try:
                with torch.inference_mode():
                    live = []
                    for h in waiting:
                        if h.cancelled.is_set():
                            self._end(_Row(h, None), None)
                        else:
                            live.append(h)
                    for group, have, kv in self._plan(live):
                        new_cache, new_mask, new_rows = self._drop_finished(*self._prefill(group, have, kv))
                        if new_rows:
                            cache, mask = self._merge(cache, mask, new_cache, new_mask)
                            rows += new_rows
                    if rows:
                        self.most_running = max(self.most_running, len(rows))
                        cache, mask, rows = self._step(rows, cache, mask)
            except Exception as e:  # a failed forward fails the requests in it, not the replica
                for r in rows:
                    self._end(r, e)
                for h in waiting:
                    if not h.done.is_set():
                        self._end(_Row(h, None), e)
                rows, cache, mask = [], None, None
            self.running = len(rows)

    def _plan(self, handles: list[Handle]) -> list[tuple[list[Handle], int, list | None]]:
        """(group, cached prefix length, its KV): requests that start from the same cached prefix (or none),
        grouped by the length of what is left to compute. The KV is taken now: a group's prefill may store a new
        prefix and push out the one a later group starts from."""
        if not self.prefixes:
            return [(g, 0, None) for g in self._groups(handles)]
        by_prefix: dict[tuple[int, tuple | None], list[Handle]] = {}
        for h in handles:
            by_prefix.setdefault(self.prefixes.match(h.req.input_ids), []).append(h)
        return [(g, have, self.prefixes.kv(key, have) if key is not None else None)
                for (have, key), hs in by_prefix.items() for g in self._groups(hs, skip=have)]

    @staticmethod
    def _groups(handles: list[Handle], waste: float = 1.25, skip: int = 0) -> list[list[Handle]]:
        """Requests that arrived together, prefilled together: sorted by prompt length (less the ``skip`` tokens
        that are cached) and cut where left padding would make a group's forward more than ``waste`` times its
        real tokens."""
        groups: list[list[Handle]] = []
        real = 0
        for h in sorted(handles, key=lambda h: len(h.req.input_ids)):
            n = len(h.req.input_ids) - skip
            if groups and (len(groups[-1]) + 1) * n <= waste * (real + n):
                groups[-1].append(h)
                real += n
            else:
                groups.append([h])
                real = n
        return groups

    def _prefill(self, group: list[Handle], have: int = 0, prefix_kv: list | None = None):
        """One forward over the prompts of ``group`` (left-padded, positions counted from each prompt's first
        token, as ``generate`` does); each row's first token chosen from its last position's logits. With
        ``have`` tokens cached (``prefix_kv``), the cache starts as that prefix's KV (the same for every row) and
        the forward computes the rest of each prompt: a row is [prefix, padding, rest]."""
        from transformers import DynamicCache

        torch = self.torch
        width = max(len(h.req.input_ids) for h in group) - have
        ids = torch.zeros((len(group), width), dtype=torch.long, device=self.device)
        mask = torch.zeros((len(group), have + width), dtype=torch.long, device=self.device)
        mask[:, :have] = 1
        for i, h in enumerate(group):
            n = len(h.req.input_ids) - have
            ids[i, width - n:] = torch.tensor(h.req.input_ids[have:], device=self.device)
            mask[i, have + width - n:] = 1
        pos = (mask.cumsum(dim=1) - 1).clamp(min=0)[:, have:]
        cache = DynamicCache(config=self.model.config)
        if have:
            for layer, (k, v) in enumerate(prefix_kv):
                cache.update(k.expand(len(group), -1, -1, -1).contiguous(),
                             v.expand(len(group), -1, -1, -1).contiguous(), layer)
            self.prefixes.used(len(group), have)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **self.last_only,
                         **{self.cache_kw: cache})
        self.prefills, self.prefilled = self.prefills + 1, self.prefilled + len(group)
        if self.prefixes:
            for i, h in enumerate(group):

                def take(n: int, i=i) -> list:
                    """Row i's KV for its first n tokens: its own columns, in order, padding left out."""
                    cols = mask[i].nonzero().squeeze(1)[:n]
                    return [(layer.keys[i:i + 1].index_select(2, cols), layer.values[i:i + 1].index_select(2, cols))
                            for layer in cache.layers]

                self.prefixes.learn(h.req.input_ids, have, take)
        rows = [_Row(h, _RowSampler([h.req], self.device, torch)) for h in group]
        for r, tok in zip(rows, self._choose(rows, out.logits[:, -1, :])):
            self._take(r, tok)
        return cache, mask, rows

    def _step(self, rows: list[_Row], cache, mask):
        torch = self.torch
        nxt = torch.tensor([[r.ids[-1]] for r in rows], device=self.device)
        mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=mask.dtype, device=self.device)], dim=1)
        pos = torch.tensor([[r.pos] for r in rows], device=self.device)
        out = self.model(input_ids=nxt, attention_mask=mask, position_ids=pos, use_cache=True,
                         **{self.cache_kw: cache})
        for r, tok in zip(rows, self._choose(rows, out.logits[:, -1, :])):
            r.pos += 1
            self._take(r, tok)
        return self._drop_finished(cache, mask, rows)

    def _drop_finished(self, cache, mask, rows: list[_Row]):
        """End the rows that are done and take them out of the cache, trimming padding no row needs any more."""
        finished = [self._finished(r) for r in rows]  # once: a cancel may land at any moment
        keep = [i for i, done in enumerate(finished) if not done]
        for r, done in zip(rows, finished):
            if done:
                self._end(r, None)
        if len(keep) == len(rows):
            return cache, mask, rows
        if not keep:
            return None, None, []
        index = self.torch.tensor(keep, device=self.device)
        mask = mask.index_select(0, index)
        first = int(mask.any(dim=0).nonzero()[0])  # leading columns that are padding in every row left
        mask = mask[:, first:]
        for layer in cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, first:]
            layer.values = layer.values.index_select(0, index)[:, :, first:]
        return cache, mask, [rows[i] for i in keep]

    def _merge(self, cache, mask, new, new_mask):
        """The running batch's cache plus newly prefilled requests' (their prompts; the token each chose is fed in
        by the next step), both left-padded to one width."""
        torch = self.torch
        if cache is None:
            return new, new_mask
        width = max(mask.shape[1], new_mask.shape[1])

        def left(t, n, dim):
            if n == 0:
                return t
            shape = list(t.shape)
            shape[dim] = n
            return torch.cat([torch.zeros(shape, dtype=t.dtype, device=t.device), t], dim=dim)

        for old_layer, new_layer in zip(cache.layers, new.layers):
            old_layer.keys = torch.cat([left(old_layer.keys, width - mask.shape[1], 2),
                                        left(new_layer.keys, width - new_mask.shape[1], 2)], dim=0)
            old_layer.values = torch.cat([left(old_layer.values, width - mask.shape[1], 2),
                                          left(new_layer.values, width - new_mask.shape[1], 2)], dim=0)
        mask = torch.cat([left(mask, width - mask.shape[1], 1), left(new_mask, width - new_mask.shape[1], 1)], dim=0)
        return cache, mask

    def _choose(self, rows: list[_Row], logits) -> list[int]:
        """Each row's next token; the log-probabilities of the rows that asked go to their results first (before
        the token is handed out, so a reader that has the token finds its entry)."""
        toks = [r.sampler.pick(0, logits[i], r.ids) for i, r in enumerate(rows)]
        for r, e in zip(rows, logprobs_of(self.torch, logits, toks, [r.handle.req.logprobs for r in rows])):
            if e is not None:
                r.handle.result.setdefault("logprobs", []).append(e)
        return toks

    def _take(self, row: _Row, tok: int) -> None:
        row.ids.append(tok)
        self.decoded += 1
        if tok not in self.eos_ids:
            row.handle.put(tok)

    def _finished(self, row: _Row) -> bool:
        return (row.ids[-1] in self.eos_ids or len(row.ids) >= row.handle.req.max_tokens
                or row.handle.cancelled.is_set())

    def _end(self, row: _Row, error: Exception | None) -> None:
        h = row.handle
        if h.done.is_set():  # ended already (a failure after some rows finished in the same step)
            return
        if error is not None:
            h.result["error"] = error
        else:
            h.result["ids"] = row.ids
        h.done.set()
        h.put(None)
