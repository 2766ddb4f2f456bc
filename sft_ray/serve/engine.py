"""Generation with a transformers model: batches of requests, and token streams. No HTTP and no Serve in here,
so benchmarks and tests can drive it in-process.

Every request picks its tokens by its own settings and, when it samples, from its own ``torch.Generator``
(``_RowSampler``): requests with different temperatures, top-p or seeds share one ``generate`` call, and a seeded
request gives the same answer whatever runs beside it (the global RNG is never touched)."""

import secrets
import threading
from dataclasses import dataclass
from typing import Any

from sft_ray.serve.stops import StopStrings


@dataclass
class GenRequest:
    input_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int | None
    logprobs: int | None = None  # None: off; k: the chosen token's log-probability and the k most likely
    presence_penalty: float = 0.0  # OpenAI's penalties on the tokens generated so far (not the prompt's)
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit before choosing

    @property
    def stops(self) -> StopStrings:
        return StopStrings(self.stop)

    def adjusts(self) -> bool:
        """Whether the logits are changed before a token is chosen (then even a greedy row needs ``_RowSampler``)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)


# one generated token's log-probabilities: (token id, its logprob, [(alternative id, logprob), ...] best first)
TokenLogprob = tuple[int, float, list[tuple[int, float]]]


def logprobs_of(torch, logits, chosen: list[int], ks: list[int | None]) -> list[TokenLogprob | None]:
    """Log-probabilities of the model's own distribution (the raw logits, before temperature and top-p, as
    OpenAI and vLLM report them) for the rows that asked (``ks[i]`` not None)."""
    want = [i for i, k in enumerate(ks) if k is not None]
    out: list[TokenLogprob | None] = [None] * len(ks)
    if not want:
        return out
    lp = torch.log_softmax(logits[want].float(), dim=-1)
    top = torch.topk(lp, max(ks[i] for i in want), dim=-1) if max(ks[i] for i in want) else None
    for j, i in enumerate(want):
        alts = [] if not ks[i] else list(zip(top.indices[j, :ks[i]].tolist(), top.values[j, :ks[i]].tolist()))
        out[i] = (chosen[i], float(lp[j, chosen[i]]), alts)
    return out


# below this a temperature is greedy: logits / 1e-40 overflow to inf, and a NaN draw would fail the whole batch
MIN_TEMPERATURE = 1e-5


class _RowSampler:
    """A logits processor that makes each row's choice itself: the argmax for a greedy row, else a sample from the
    row's tempered, top-p-filtered distribution drawn with the row's own generator; a row's ``logit_bias`` and
    presence/frequency penalties (OpenAI's rule, over the tokens it has generated) apply first. It returns a score
    row that is finite only at that token, so ``generate``'s greedy step takes it. It runs last, after the model's
    own processors, so a greedy row without adjustments is exactly what ``generate`` alone gives.

    ``prompt_width``: where generated tokens start in ``generate``'s ``input_ids`` (the left-padded prompts)."""

    def __init__(self, reqs: list[GenRequest], device, torch, prompt_width: int = 0):
        self.torch, self.reqs, self.prompt_width = torch, reqs, prompt_width
        self.generators = []
        self.bias = []  # per row: (token ids, biases) tensors, or None
        for r in reqs:
            g = None
            if r.temperature >= MIN_TEMPERATURE:
                g = torch.Generator(device=device)  # on the logits' device: CUDA sampling needs a CUDA generator
                g.manual_seed(r.seed if r.seed is not None else secrets.randbits(63))
            self.generators.append(g)
            self.bias.append((torch.tensor(list(r.logit_bias), dtype=torch.long, device=device),
                              torch.tensor(list(r.logit_bias.values()), dtype=torch.float32, device=device))
                             if r.logit_bias else None)

    def __call__(self, input_ids, scores):
        out = self.torch.full_like(scores, float("-inf"))
        for i in range(len(self.reqs)):
            generated = input_ids[i, self.prompt_width:].tolist() if self.reqs[i].adjusts() else ()
            out[i, self.pick(i, scores[i], generated)] = 0.0
        return out

    def pick(self, i: int, scores, generated=()) -> int:
        """Row ``i``'s next token from its scores and the tokens it has generated so far (what the continuous
        batcher calls directly)."""
        torch, r, g = self.torch, self.reqs[i], self.generators[i]
        row = scores.float()
        if r.adjusts():
            row = row.clone()  # ``scores`` also give the log-probabilities: they stay the model's own
            if self.bias[i] is not None:
                row.index_add_(0, *self.bias[i])
            if generated and (r.presence_penalty or r.frequency_penalty):
                ids, counts = torch.unique(torch.tensor(list(generated), device=row.device), return_counts=True)
                row.index_add_(0, ids, -(counts.float() * r.frequency_penalty + r.presence_penalty))
        if g is None:
            return int(torch.argmax(row))
        logits = row / r.temperature
        if r.top_p < 1.0:  # keep the smallest set of most likely tokens whose mass reaches top_p
            sorted_logits, order = torch.sort(logits, descending=True)
            probs = torch.softmax(sorted_logits, dim=-1)
            drop = torch.cumsum(probs, dim=-1) - probs > r.top_p
            logits[order[drop]] = float("-inf")
        return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=g))


@dataclass
class GenResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    logprobs: list[TokenLogprob] | None = None  # one per completion token, when asked


class Engine:
    """A transformers model answering batches of prompts; no Serve or HTTP in here."""

    def __init__(self, model_dir: str, trust_remote_code: bool = False, base_model: str | None = None,
                 continuous: bool = True, max_running: int = 32, prefix_cache_tokens: int = 4096):
        import torch

        from sft_ray.modeling import load_for_inference, stop_token_ids

        self.torch = torch
        self.model, self.tok = load_for_inference(model_dir, trust_remote_code, base_model)
        self.device = self.model.device
        cfg = self.model.config.get_text_config()
        self.context_length = int(getattr(cfg, "max_position_embeddings", 2048))
        self.vocab_size = int(getattr(cfg, "vocab_size", None) or len(self.tok))  # the logits' width
        self.eos_ids = set(stop_token_ids(self.tok, self.model.generation_config))
        self._added = set(self.tok.added_tokens_decoder)
        try:
            from transformers.convert_slow_tokenizer import bytes_to_unicode

            self._byte_decoder = {c: b for b, c in bytes_to_unicode().items()} if self._byte_level() else None
        except ImportError:
            self._byte_decoder = None
        from sft_ray.serve.batcher import ContinuousBatcher

        self.batcher = ContinuousBatcher(self.model, self.eos_ids, max_running, prefix_cache_tokens) \
            if continuous and ContinuousBatcher.supports(self.model) else None

    def _byte_level(self) -> bool:
        bt = getattr(self.tok, "backend_tokenizer", None)
        try:
            from tokenizers import decoders

            return bt is not None and isinstance(bt.decoder, decoders.ByteLevel)
        except ImportError:
            return False

    def chat_ids(self, messages: list[dict]) -> list[int]:
        text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        """Generated ids as text, the same way for answers and streams (no clean-up of spaces: it would rewrite
        text already streamed)."""
        return self.tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def text_ids(self, prompt: str) -> list[int]:
        return self.tok(prompt, add_special_tokens=True)["input_ids"]

    def count_tokens(self, text: str) -> int:
        return len(self.tok(text, add_special_tokens=False)["input_ids"])

    def _gen_kwargs(self, reqs: list[GenRequest], max_new: int, prompt_width: int) -> dict[str, Any]:
        """Greedy steps for the whole batch; a row that samples or adjusts its logits does so in ``_RowSampler``."""
        from transformers import LogitsProcessorList

        kw: dict[str, Any] = dict(max_new_tokens=max_new, pad_token_id=self.tok.pad_token_id,
                                  eos_token_id=sorted(self.eos_ids), do_sample=False, temperature=None, top_p=None,
                                  top_k=None)
        if any(r.temperature >= MIN_TEMPERATURE or r.adjusts() for r in reqs):
            kw["logits_processor"] = LogitsProcessorList([_RowSampler(reqs, self.device, self.torch, prompt_width)])
        return kw

    def describe(self, lps: list[TokenLogprob]) -> list[tuple[str, list[int], float, list[tuple[str, list[int], float]]]]:
        """Token ids in log-probability entries as (text, bytes, logprob), for the wire."""
        def one(t: int):
            return self._token_text(t), self._token_bytes(t)

        return [(*one(t), lp, [(*one(a), alp) for a, alp in alts]) for t, lp, alts in lps]

    def _token_text(self, t: int) -> str:
        return self.tok.decode([t], skip_special_tokens=False)

    def _token_bytes(self, t: int) -> list[int]:
        """The token's own bytes: for a byte-level BPE vocabulary (GPT-2's family) a token can be part of a
        character, which its decoded text cannot show."""
        piece = self.tok.convert_ids_to_tokens(t)
        if isinstance(piece, str) and self._byte_decoder is not None and t not in self._added \
                and all(c in self._byte_decoder for c in piece):
            return [self._byte_decoder[c] for c in piece]
        return list(self._token_text(t).encode("utf-8"))

    def _finish(self, r: GenRequest, ids: list[int], lps: list[TokenLogprob] | None = None) -> GenResult:
        """Cut at end-of-sequence, the request's own max_tokens, and its stop strings (log-probabilities with
        the tokens they belong to: up to the one that completes the text, after a stop string)."""
        ids = ids[: r.max_tokens]  # a batch's generate runs to its longest request: this one ends at its own limit
        reason = "length"
        for i, t in enumerate(ids):
            if t in self.eos_ids:
                ids, reason = ids[:i], "stop"
                break
        text = self.decode(ids)
        n = len(ids)
        kept = n
        cut = r.stops.find(text)
        if cut >= 0:
            text, reason = text[:cut], "stop"
            n = self.count_tokens(text)
            if r.logprobs is not None:
                kept = next((k for k in range(len(ids) + 1)
                             if len(self.decode(ids[:k])) >= len(text)), len(ids))
        return GenResult(text=text, prompt_tokens=len(r.input_ids), completion_tokens=n, finish_reason=reason,
                         logprobs=None if r.logprobs is None else list(lps or [])[:kept])

    def generate(self, reqs: list[GenRequest]) -> list[GenResult]:
        """Answers for several requests: through the running batch, or one left-padded ``generate`` call."""
        if self.batcher is not None:
            handles = self.batcher.submit_many(reqs)
            for h in handles:
                h.join()
                if "error" in h.result:
                    raise h.result["error"]
            return [self._finish(r, h.result["ids"], h.result.get("logprobs")) for r, h in zip(reqs, handles)]
        torch = self.torch
        width = max(len(r.input_ids) for r in reqs)
        pad = self.tok.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(r.input_ids)) + r.input_ids for r in reqs])
        attn = torch.tensor([[0] * (width - len(r.input_ids)) + [1] * len(r.input_ids) for r in reqs])
        ks = [r.logprobs for r in reqs]
        extra = {"output_logits": True, "return_dict_in_generate": True} if any(k is not None for k in ks) else {}
        with torch.inference_mode():
            out = self.model.generate(input_ids=input_ids.to(self.device), attention_mask=attn.to(self.device),
                                      **self._gen_kwargs(reqs, max(r.max_tokens for r in reqs), width), **extra)
        seqs = out.sequences if extra else out
        lps: list[list[TokenLogprob]] = [[] for _ in reqs]
        for step, logits in enumerate(out.logits if extra else ()):
            chosen = seqs[:, width + step].tolist()
            for j, e in enumerate(logprobs_of(torch, logits, chosen, ks)):
                if e is not None:
                    lps[j].append(e)
        return [self._finish(r, seqs[j, width:].tolist(), lps[j]) for j, r in enumerate(reqs)]

    def stream(self, r: GenRequest, cancelled: threading.Event):
        """(text pieces as they are generated, something to ``join``, the result dict with ``ids`` or ``error``);
        generation stops early when ``cancelled`` is set."""
        if self.batcher is not None:
            h = self.batcher.submit(r, cancelled)
            return self._pieces(h), h, h.result
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        torch = self.torch

        class _Cancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kw):
                return cancelled.is_set()

        streamer = TextIteratorStreamer(self.tok, skip_prompt=True, skip_special_tokens=True,
                                        clean_up_tokenization_spaces=False)
        ids = torch.tensor([r.input_ids], device=self.device)
        kwargs = self._gen_kwargs([r], r.max_tokens, len(r.input_ids))
        result: dict[str, Any] = {}

        def run():
            try:
                with torch.inference_mode():
                    out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                                              stopping_criteria=StoppingCriteriaList([_Cancelled()]), **kwargs)
                result["ids"] = out[0, ids.shape[1]:].tolist()
            except Exception as e:  # surfaces in the response stream instead of hanging it
                result["error"] = e
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return streamer, thread, result

    def _pieces(self, h):
        """Text as the batcher's token ids arrive (a thread waits on them)."""
        detok = Detokenizer(self.decode)
        while True:
            tok = h.tokens.get()
            piece = detok.add(tok)
            if piece:
                yield piece
            if tok is None:
                return

    async def apieces(self, h, catch_up: bool = True):
        """(text, tokens so far) as the batcher's token ids arrive, for a request submitted with the event loop
        (nothing blocks); the count says which of ``h.result["logprobs"]`` a piece's tokens are. With
        ``catch_up``, tokens that arrived while the reader was busy come out as one piece: a loaded event loop
        sends one stream message for them instead of falling further behind one message per token (vLLM's
        streams merge the same way). Without it (log-probabilities, whose pieces mark where a stop string cuts
        them), a piece per token."""
        detok = Detokenizer(self.decode)
        while True:
            toks = [await h.next_token()]
            if catch_up and toks[-1] is not None:
                toks += h.arrived()
            piece = detok.add_many(toks)
            if piece:
                yield piece, len(detok.ids)
            if toks[-1] is None:
                return


class Detokenizer:
    """Token ids to text pieces, decoded whole each time so that a character made of several tokens comes out
    complete: a piece never ends in half a character (until the end)."""

    def __init__(self, decode):
        self.decode, self.ids, self.sent = decode, [], ""  # decode: Engine.decode, as for whole answers

    def add(self, token: int | None) -> str:
        return self.add_many([token])

    def add_many(self, tokens: list[int | None]) -> str:
        """The new text of ``tokens`` (None: the end), decoded once for all of them."""
        self.ids += [t for t in tokens if t is not None]
        text = self.decode(self.ids)
        if (tokens[-1] is not None and text.endswith("\ufffd")) or not text.startswith(self.sent):
            return ""
        piece, self.sent = text[len(self.sent):], text
        return piece
