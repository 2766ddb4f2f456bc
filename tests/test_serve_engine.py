"""The serving engine in-process (no Serve, no HTTP): one batch holds requests with different sampling settings,
each sampling request draws from its own generator, and greedy rows are what ``generate`` alone gives."""

import threading

import pytest
import torch

from sft_ray.serve.engine import Engine, GenRequest


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return Engine(str(tiny_model_dir))


def _req(engine, prompt, temperature=0.0, seed=None, top_p=1.0, max_tokens=12):
    return GenRequest(input_ids=engine.chat_ids([{"role": "user", "content": prompt}]), max_tokens=max_tokens,
                      temperature=temperature, top_p=top_p, stop=(), seed=seed)


def _alone_greedy(engine, ids, n):
    out = engine.model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                max_new_tokens=n, do_sample=False, pad_token_id=engine.tok.pad_token_id,
                                eos_token_id=sorted(engine.eos_ids), temperature=None, top_p=None, top_k=None)
    return engine._finish(GenRequest(ids, n, 0.0, 1.0, (), None), out[0, len(ids):].tolist()).text


def test_a_seeded_request_gives_the_same_answer_whatever_is_batched_beside_it(engine):
    seeded = _req(engine, "Name a colour.", temperature=1.5, seed=7)
    alone = engine.generate([seeded])[0].text
    mixed = engine.generate([_req(engine, "Count to three, please, slowly."), seeded,
                             _req(engine, "hi", temperature=0.9, top_p=0.8),
                             _req(engine, "Name a colour.", temperature=1.5, seed=8)])
    assert mixed[1].text == alone
    assert mixed[3].text != alone  # another seed, another draw (random tiny model, temperature 1.5)
    torch.manual_seed(0)  # the global RNG plays no part
    assert engine.generate([seeded])[0].text == alone


def test_greedy_rows_in_a_mixed_batch_equal_generate_alone(engine):
    reqs = [_req(engine, "Count to three, please, slowly."), _req(engine, "hi", temperature=1.0, seed=3),
            _req(engine, "What is 2+2?")]
    out = engine.generate(reqs)
    for i in (0, 2):
        assert out[i].text == _alone_greedy(engine, reqs[i].input_ids, reqs[i].max_tokens)


def test_seeded_streams_under_concurrency_are_reproducible(engine):
    """Streams run in threads beside each other; each seeded one matches its own run alone."""
    def run(r):
        streamer, thread, result = engine.stream(r, threading.Event())
        text = "".join(streamer)
        thread.join()
        return text

    reqs = [_req(engine, f"Tell me about {w}.", temperature=1.2, seed=s) for s, w in enumerate(["cats", "dogs", "owls"])]
    alone = [run(r) for r in reqs]
    got = [None] * 3
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, run(reqs[i]))) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == alone


def test_top_p_keeps_only_the_most_likely_tokens(engine):
    """top_p close to 0 leaves one token: the answer is the greedy one, whatever the seed and temperature."""
    greedy = engine.generate([_req(engine, "hi")])[0].text
    assert engine.generate([_req(engine, "hi", temperature=2.0, seed=s, top_p=1e-6) for s in (1, 2)])[0].text == greedy


def test_requests_join_the_running_batch_and_leave_it_with_generates_answers(engine):
    """A long stream runs; more requests arrive while it decodes, join its batch at a token boundary (the batch
    holds several at once) and each ends with exactly what ``generate`` alone gives, greedy token for token."""
    assert engine.batcher is not None  # a Llama: plain DynamicCache
    long = _req(engine, "Count to three, please, slowly.", max_tokens=40)
    streamer, handle, result = engine.stream(long, threading.Event())
    it = iter(streamer)
    first = next(it)  # the long one is decoding
    others = [_req(engine, p, max_tokens=n) for p, n in (("hi", 5), ("What is 2+2?", 17), ("Name a colour.", 30))]
    answers = engine.generate(others)
    text = first + "".join(it)
    handle.join(60)
    assert engine.batcher.most_running >= 2
    assert text == engine._finish(long, result["ids"]).text == _alone_greedy(engine, long.input_ids, 40)
    for r, a in zip(others, answers):
        assert a.text == _alone_greedy(engine, r.input_ids, r.max_tokens)


def test_requests_arriving_together_are_prefilled_together(engine):
    """Prompts of different lengths sent at once share prefill forwards (left-padded, positions from each prompt's
    own start) and still end with exactly ``generate``'s greedy tokens."""
    prompts = ["hi", "What is 2+2?", "Name a colour.", "Count to three, please.", "Say yes.", "Tell me about owls."]
    reqs = [_req(engine, p, max_tokens=9) for p in prompts]
    forwards, rows = engine.batcher.prefills, engine.batcher.prefilled
    out = engine.generate(reqs)
    assert engine.batcher.prefilled - rows == len(reqs)
    assert engine.batcher.prefills - forwards < len(reqs)
    for r, o in zip(reqs, out):
        assert o.text == _alone_greedy(engine, r.input_ids, r.max_tokens)


def test_prefill_groups_bound_the_padding():
    from types import SimpleNamespace

    from sft_ray.serve.batcher import ContinuousBatcher

    def h(n):
        return SimpleNamespace(req=SimpleNamespace(input_ids=[0] * n))

    groups = ContinuousBatcher._groups([h(n) for n in (100, 10, 11, 12, 98, 300)])
    assert [[len(x.req.input_ids) for x in g] for g in groups] == [[10, 11, 12], [98, 100], [300]]
    for g in groups:  # padded area within 1.25x of the real tokens
        assert len(g) * max(len(x.req.input_ids) for x in g) <= 1.25 * sum(len(x.req.input_ids) for x in g)


def test_a_cancelled_stream_leaves_at_once_and_the_rest_go_on(engine):
    cancelled = threading.Event()
    streamer, handle, result = engine.stream(_req(engine, "Tell me a long story.", max_tokens=200), cancelled)
    it = iter(streamer)
    next(it)
    other = _req(engine, "What is 2+2?", max_tokens=20)
    done = {}
    t = threading.Thread(target=lambda: done.setdefault("a", engine.generate([other])[0]))
    t.start()
    cancelled.set()  # the client went away
    handle.join(30)
    assert handle.done.is_set() and len(result["ids"]) < 200
    t.join(60)
    assert done["a"].text == _alone_greedy(engine, other.input_ids, 20)


def test_continuous_batching_off_keeps_one_generate_per_request(tiny_model_dir):
    off = Engine(str(tiny_model_dir), continuous=False)
    assert off.batcher is None
    r = _req(off, "hi", max_tokens=8)
    assert off.generate([r])[0].text == _alone_greedy(off, r.input_ids, 8)


def test_sliding_window_caches_are_not_merged():
    """A sliding-window cache drops old positions; merging it by left padding would be wrong, so such models
    keep one generate per request."""
    from transformers import MistralConfig, MistralForCausalLM

    from sft_ray.serve.batcher import ContinuousBatcher

    def tiny(window):
        return MistralForCausalLM(MistralConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                sliding_window=window))

    assert (ContinuousBatcher.supports(tiny(16)), ContinuousBatcher.supports(tiny(None))) == (False, True)


def test_logprobs_agree_between_the_running_batch_and_generate(engine, tiny_model_dir):
    """The continuous batcher's log-probabilities (padded batch, merged caches) equal ``generate``'s
    ``output_logits`` path with batching off, for a greedy and a sampling row, cut where the answer is cut."""
    def reqs():
        a = _req(engine, "Count to three, please, slowly.", max_tokens=10)
        b = _req(engine, "hi", temperature=1.0, seed=5, max_tokens=10)
        a.logprobs, b.logprobs = 2, 0
        c = _req(engine, "What is 2+2?", max_tokens=10)  # asks for none
        c.stop = ("\n",)
        return [a, b, c]

    off = Engine(str(tiny_model_dir), continuous=False)
    got, want = engine.generate(reqs()), off.generate(reqs())
    assert got[2].logprobs is None and want[2].logprobs is None
    for g, w in zip(got[:2], want[:2]):
        assert g.text == w.text and len(g.logprobs) == g.completion_tokens == len(w.logprobs)
        for (gt, glp, galts), (wt, wlp, walts) in zip(g.logprobs, w.logprobs):
            assert gt == wt and abs(glp - wlp) < 1e-3 and [t for t, _ in galts] == [t for t, _ in walts]
    assert all(len(alts) == 2 and alts[0][0] == t for t, _, alts in got[0].logprobs)  # greedy: its own best
    assert all(alts == [] and lp <= 0 for _, lp, alts in got[1].logprobs)


def _reference(engine, ids, n, presence=0.0, frequency=0.0, bias=None):
    """OpenAI's rule written out, one full forward per token: logit_bias added, then each token generated so far
    lowered by frequency x its count + presence; the argmax taken."""
    out: list[int] = []
    for _ in range(n):
        with torch.no_grad():
            logits = engine.model(input_ids=torch.tensor([ids + out])).logits[0, -1].float().clone()
        for t, b in (bias or {}).items():
            logits[t] += b
        for t in set(out):
            logits[t] -= frequency * out.count(t) + presence
        out.append(int(torch.argmax(logits)))
        if out[-1] in engine.eos_ids:
            break
    return out


def test_penalties_and_logit_bias_follow_openais_rule_on_both_paths(engine, tiny_model_dir):
    """presence/frequency penalties and logit_bias, greedy, in a batch beside a plain request: the running batch
    and batching off both give the reference loop's tokens, and they change the answer (so they are not ignored)."""
    prompt = "Count to three, please, slowly."
    first = _reference(engine, _req(engine, prompt).input_ids, 1)[0]
    forced = next(t for t in range(1000, 2000) if t != first and t not in engine.eos_ids)

    def reqs():
        a = _req(engine, prompt, max_tokens=12)
        a.presence_penalty, a.frequency_penalty = 0.5, 1.5
        b = _req(engine, "hi", max_tokens=12)
        b.logit_bias = {forced: 100.0}
        return [a, b, _req(engine, "What is 2+2?", max_tokens=12)]

    off = Engine(str(tiny_model_dir), continuous=False)
    plain = _alone_greedy(engine, reqs()[0].input_ids, 12)
    for eng in (engine, off):
        got = eng.generate(reqs())
        a, b, c = reqs()
        want_a = _reference(engine, a.input_ids, 12, 0.5, 1.5)
        assert got[0].text == engine._finish(a, want_a).text != plain
        assert got[1].text == engine.tok.decode([forced] * 12)  # +100: the biased token every time
        assert got[2].text == _alone_greedy(engine, c.input_ids, 12)  # its neighbours' settings do not leak


def test_a_vanishing_temperature_is_greedy_not_a_failed_batch(engine):
    """temperature=1e-40 would overflow logits / temperature to inf and fail every request in the batch with a
    NaN draw; below 1e-5 it is greedy."""
    tiny = _req(engine, "Count to three, please, slowly.", temperature=1e-40)
    out = engine.generate([tiny, _req(engine, "hi", temperature=1.0, seed=1)])
    assert out[0].text == _alone_greedy(engine, tiny.input_ids, tiny.max_tokens)


def test_finish_reason_follows_the_requests_own_max_tokens(engine):
    """In a batch that generates to its longest request, a shorter one whose next token would have been EOS still
    ended by its length."""
    eos = min(engine.eos_ids)
    ids = engine.tok("one two three", add_special_tokens=False)["input_ids"]
    r = GenRequest([1], len(ids), 0.0, 1.0, (), None)
    assert engine._finish(r, ids + [eos, 5, 6]).finish_reason == "length"
    assert engine._finish(r, ids[:-1] + [eos, 5, 6]).finish_reason == "stop"


def test_a_template_that_refuses_the_messages_is_the_requests_fault(tiny_model_dir):
    """A chat template's raise_exception (roles that do not alternate, a system turn it has no place for) is a
    400 with the template's words, not a 500."""
    from types import SimpleNamespace

    from sft_ray.serve.app import OpenAIServer
    from sft_ray.serve.protocol import APIError

    eng = Engine(str(tiny_model_dir), continuous=False)
    eng.tok.chat_template = ("{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('System role "
                             "not supported') }}{% endif %}{{ m.content }}{% endfor %}")
    server = SimpleNamespace(engine=eng)
    with pytest.raises(APIError) as e:
        OpenAIServer.func_or_class._chat_ids(server, [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}])
    assert e.value.status == 400 and "System role not supported" in e.value.message and e.value.param == "messages"
    assert OpenAIServer.func_or_class._chat_ids(server, [{"role": "user", "content": "y"}])


def test_stop_strings_end_the_text_at_the_earliest_and_hold_back_only_their_beginnings():
    """The one place the app's stream, its non-streaming path and the engine's final cut ask (``stops.py``)."""
    from sft_ray.serve.stops import StopStrings

    s = StopStrings(["END", "", "\n\n"])
    assert s and StopStrings("").stops == () and not StopStrings(None)
    assert s.find("a\n\nb END") == 1 and s.find("a END\n\n") == 2 and s.find("nothing") == -1
    assert s.may_begin("text E") and s.may_begin("text EN") and s.may_begin("x\n")
    assert not s.may_begin("text END") and not s.may_begin("text") and not StopStrings("").may_begin("")


def test_a_recurring_prompt_prefix_is_computed_once_and_the_answers_stay_generates(tiny_model_dir):
    """Prompts that share a system prompt: the first two are computed whole (the second shows the prefix recurs),
    the rest start from its cached KV, alone or together, partly (a shorter shared part) or all but the last
    token (the same prompt again); every greedy answer is still ``generate``'s, and a seeded draw is the same as
    with the cache off."""
    eng = Engine(str(tiny_model_dir), prefix_cache_tokens=4096)
    system = "You are a careful assistant. Answer in one short sentence and never use a list. " * 3
    reqs = [GenRequest(eng.chat_ids([{"role": "system", "content": system}, {"role": "user", "content": q}]), 10,
                       0.0, 1.0, (), None) for q in ("hi", "What is 2+2?", "Name a colour.", "Count to three.",
                                                     "Say yes.", "Tell me about owls, please.")]
    shared = min(len(reqs[0].input_ids), len(reqs[1].input_ids))
    while reqs[0].input_ids[:shared] != reqs[1].input_ids[:shared]:
        shared -= 1
    cache = eng.batcher.prefixes
    got = [eng.generate([reqs[0]])[0], eng.generate([reqs[1]])[0]]
    assert (cache.hits, list(map(len, cache.entries))) == (0, [shared])
    got += eng.generate(reqs[2:])  # four at once, all from the cached prefix
    assert (cache.hits, cache.reused) == (4, 4 * shared)
    for r, g in zip(reqs, got):
        assert g.text == _alone_greedy(eng, r.input_ids, r.max_tokens)
    again = eng.generate([reqs[0]])[0]  # the first prompt again: its own tokens are not cached, the shared part is
    assert again.text == got[0].text and cache.hits == 5
    half = GenRequest(reqs[0].input_ids[:shared - 5] + eng.chat_ids([{"role": "user", "content": "x"}]), 10, 0.0,
                      1.0, (), None)  # a prompt that shares only part of the entry
    assert eng.generate([half])[0].text == _alone_greedy(eng, half.input_ids, 10)
    assert cache.reused == 5 * shared + shared - 5

    seeded = GenRequest(reqs[3].input_ids, 10, 1.3, 1.0, (), 11)
    off = Engine(str(tiny_model_dir), prefix_cache_tokens=0)
    assert not off.batcher.prefixes
    assert eng.generate([seeded])[0].text == off.generate([seeded])[0].text
    assert off.batcher.prefixes.hits == 0


def test_the_prefix_cache_keeps_its_token_budget():
    from sft_ray.serve.prefix_cache import PrefixCache

    def take(n):
        return [(torch.zeros(1, 1, n, 2), torch.zeros(1, 1, n, 2))]

    cache = PrefixCache(max_tokens=100, min_tokens=16)
    for i in range(6):  # pairs of prompts sharing 40 tokens; each pair's part is new
        head = [1000 + i] * 40
        cache.learn(head + [1, 2, 3], 0, take)
        cache.learn(head + [4, 5], 0, take)
    assert cache.tokens == sum(map(len, cache.entries)) <= 100 and len(cache.entries) == 2
    assert cache.match([1005] * 40 + [9]) == (40, tuple([1005] * 40))  # the newest are kept
    assert cache.match([1000] * 40 + [9]) == (0, None)  # the oldest went first
    assert cache.match([1005] * 10 + [9]) == (0, None)  # under min_tokens: computed whole
    assert cache.match([1005] * 40) == (39, tuple([1005] * 40))  # the last token is always computed


def test_a_prefix_pushed_out_while_its_requests_wait_is_still_used_for_them(tiny_model_dir):
    """Room for one prefix: requests that arrive together with a new shared prefix store it and push out the old one
    before the requests that matched the old one are prefilled; those still start from the old prefix's KV."""
    from sft_ray.serve.prefix_cache import common_length

    eng = Engine(str(tiny_model_dir))

    def req(system, q):
        return GenRequest(eng.chat_ids([{"role": "system", "content": system}, {"role": "user", "content": q}]), 8,
                          0.0, 1.0, (), None)

    a, b = "Reply in French, briefly and kindly, to what follows. " * 2, "Answer like a pirate, loudly, in caps. " * 2
    shared = [common_length(tuple(req(s, "one").input_ids), tuple(req(s, "two").input_ids)) for s in (a, b)]
    eng.batcher.prefixes.max_tokens = max(shared) + 5  # room for one (the batcher is idle: set before any request)
    eng.generate([req(a, "one")])
    eng.generate([req(a, "two")])
    old = list(eng.batcher.prefixes.entries)
    new = [req(b, "three"), req(b, "four"), req(a, "five"), req(a, "a much longer question than the first ones, six")]
    out = eng.generate(new)
    assert list(eng.batcher.prefixes.entries) != old and len(eng.batcher.prefixes.entries) == 1  # a's went
    assert eng.batcher.prefixes.hits == 2  # the two that matched a's prefix started from it
    for r, o in zip(new, out):
        assert o.text == _alone_greedy(eng, r.input_ids, r.max_tokens)


def test_a_stream_that_fell_behind_catches_up_in_one_piece(engine):
    """Tokens that arrived while the reader was busy come out as one piece (the same text); with log-probabilities
    asked for, a piece per token."""
    import asyncio

    async def read(catch_up: bool, logprobs):
        r = GenRequest(engine.chat_ids([{"role": "user", "content": "Count to three, please, slowly."}]), 12, 0.0,
                       1.0, (), None, logprobs)
        h = engine.batcher.submit(r, None, asyncio.get_running_loop())
        await asyncio.to_thread(h.done.wait, 60)  # the reader is busy until the answer is complete
        await asyncio.sleep(0.05)  # the last tokens' hand-over to this loop
        pieces = [p async for p, _ in engine.apieces(h, catch_up)]
        return pieces, engine._finish(r, h.result["ids"]).text, len(h.result["ids"])

    pieces, text, n = asyncio.run(read(True, None))
    assert "".join(pieces) == text and len(pieces) == 1 and n > 2, (pieces, n)
    pieces, text, n = asyncio.run(read(False, 0))
    assert "".join(pieces) == text and len(pieces) > 2, pieces
