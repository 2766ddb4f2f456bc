"""Chat template rendering, tokenization and the loss mask.

The model is trained on exactly the text ``apply_chat_template`` gives for the whole conversation (with the
row's ``tools``). The mask is found by rendering it turn by turn: an assistant turn's trained text starts
where the generation prompt for it ends (``messages[:i]`` with ``add_generation_prompt``) and ends where the
template ends that turn (``messages[:i+1]``, trailing whitespace aside): its content, reasoning, tool calls
and end-of-turn token, as the template writes them, and nothing of the next turn. This works with any chat
template, not only those with ``{% generation %}`` markers. Templates that render a turn differently once
later turns follow (Qwen3 drops the reasoning of turns before the last user message, and writes an empty
think block only for the final turn) are handled by locating the turn in the whole text instead, and every
turn is checked: a template that leaves out a turn's content, its tool calls, the ``tools`` schemas or the
final turn's reasoning makes the row bad instead of silently training on less than the data holds.
"""

from __future__ import annotations

import os
from typing import Any

from sft_ray.encode import IGNORE_INDEX, labels_for
from sft_ray.formats import Example, RowError

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_PROBE = "\x00sft-ray-probe\x00"


class TooLong(Exception):
    """A row longer than ``data.max_length`` under ``too_long=drop`` (counted, not an error)."""


def render(tok, messages, add_generation_prompt: bool = False, **kwargs: Any) -> str:
    """``tok.apply_chat_template(messages, tokenize=False, ...)``, through the compiled template directly where
    that gives the same text (see ``_render_direct``)."""
    from jinja2 import TemplateError

    try:
        text = _render_direct(tok, messages, add_generation_prompt, kwargs)
        if text is None:
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                           **kwargs)
        return text
    except TemplateError as e:  # raise_exception(...) in the template, or a template bug this row reaches
        raise RowError(f"the chat template refused this conversation: {e}") from None
    except Exception as e:  # e.g. a TypeError from a value of the wrong type: this row's fault, not the batch's
        raise RowError(f"the chat template failed on this conversation: {type(e).__name__}: {e}") from None


# render calls made directly; templates compared with apply_chat_template; templates found to differ (fall back)
_DIRECT: dict[str, Any] = {"calls": 0, "checked": set(), "off": set()}
CHECK_EVERY = 512


def _render_direct(tok, messages, add_generation_prompt: bool, kwargs: dict[str, Any]) -> str | None:
    """Render with transformers' compiled (sandboxed, cached) template, skipping ``apply_chat_template``'s
    wrapper, which costs as much again as the rendering: it rebuilds every input as plain JSON data for the
    sandbox, and ours already is (rows are parsed JSON, normalised by ``formats.to_example``). The inputs the
    template sees are the same: messages without None values and with reasoning fields aliased, the
    tokenizer's special tokens, ``tools`` and the template kwargs. The first render of each template, and one
    in ``CHECK_EVERY`` after it, is compared with ``apply_chat_template``; a difference switches that template
    back to it for good. None: use ``apply_chat_template`` (a dict of templates, or a transformers without
    these helpers)."""
    tmpl = tok.chat_template
    if not isinstance(tmpl, str) or tmpl in _DIRECT["off"] or "documents" in kwargs:
        return None
    try:
        from transformers.utils.chat_template_utils import _alias_reasoning_fields, _compile_jinja_template
    except ImportError:
        return None
    kw = dict(kwargs)
    tools = kw.pop("tools", None)
    msgs = _alias_reasoning_fields([{k: v for k, v in m.items() if v is not None} for m in messages])
    text = _compile_jinja_template(tmpl).render(messages=msgs, tools=tools, documents=None,
                                                add_generation_prompt=add_generation_prompt,
                                                **{**tok.special_tokens_map, **kw})
    _DIRECT["calls"] += 1
    if _DIRECT["calls"] % CHECK_EVERY == 1 or tmpl not in _DIRECT["checked"]:
        _DIRECT["checked"].add(tmpl)
        if text != tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                           **kwargs):
            import logging

            logging.getLogger(__name__).warning("rendering the chat template directly differs from "
                                                "apply_chat_template; using apply_chat_template for it")
            _DIRECT["off"].add(tmpl)
            return None
    return text


def _probe_turn(tok, kwargs) -> tuple[str, str]:
    """What the template writes before an assistant turn's content (the generation prompt) and after it
    (the end-of-turn text), read off a probe conversation; cached on the tokenizer per template and kwargs."""
    kw = {k: v for k, v in kwargs.items() if k != "tools"}
    key = (tok.chat_template, repr(sorted(kw.items())))
    cache = tok.__dict__.setdefault("_sft_ray_probe", {})
    if key not in cache:
        cache[key] = _probe(tok, kw)
    return cache[key]


def _probe(tok, kw) -> tuple[str, str]:
    user = [{"role": "user", "content": "x"}]
    base = render(tok, user, **kw)
    gen = render(tok, user, add_generation_prompt=True, **kw)[len(base):]
    whole = render(tok, user + [{"role": "assistant", "content": _PROBE}], **kw)
    after = whole[whole.rfind(_PROBE) + len(_PROBE):] if _PROBE in whole else ""
    return gen, after.strip()


def _without_reasoning(m: dict[str, Any]) -> dict[str, Any]:
    m = {k: v for k, v in m.items() if k != "reasoning_content"}
    if THINK_CLOSE in m["content"]:
        m["content"] = m["content"].split(THINK_CLOSE)[-1].lstrip("\n")
    return m


def _contexts(msgs: list[dict[str, Any]], i: int):
    """The conversation before turn ``i`` as the whole text may render it: as is; with the reasoning of
    assistant turns before the last user message dropped (Qwen3); with all earlier reasoning dropped."""
    yield msgs[:i]
    if not any(m["role"] == "assistant" and (m.get("reasoning_content") or THINK_CLOSE in m["content"])
               for m in msgs[:i]):
        return
    last_user = max((k for k, m in enumerate(msgs) if m["role"] == "user"), default=-1)
    yield [_without_reasoning(m) if m["role"] == "assistant" and k < last_user else m for k, m in enumerate(msgs[:i])]
    yield [_without_reasoning(m) if m["role"] == "assistant" else m for m in msgs[:i]]


# final-turn starts read off the whole text: calls, (template, kwargs) checked against rendering, and turned off
_LAST: dict[str, Any] = {"calls": 0, "checked": set(), "off": set()}


def _read_final_turn_start(tok, msgs, i: int, full: str, kwargs) -> tuple[int | None, tuple]:
    """Where the conversation's final assistant turn starts, read off the whole text instead of rendering the
    conversation before it: its plain content ends the whole text, followed only by the template's end-of-turn
    text, and the generation prompt comes right before it. None (and the template's key): not applicable
    (another turn, reasoning, tool calls, empty content) or not found so."""
    m = msgs[i]
    key = (tok.chat_template, repr(sorted((k, v) for k, v in kwargs.items() if k != "tools")))
    if (i != len(msgs) - 1 or not m.get("content") or m.get("tool_calls") or m.get("reasoning_content")
            or THINK_CLOSE in m["content"] or key in _LAST["off"]):
        return None, key
    gen, eot = _probe_turn(tok, kwargs)
    body = full.rstrip()
    if not gen or not eot or not body.endswith(m["content"] + eot):
        return None, key
    start = len(body) - len(eot) - len(m["content"])
    return (start if full[:start].endswith(gen) else None), key


def _rendered_turn_start(tok, msgs, i: int, full: str, kwargs) -> int:
    """Where assistant turn ``i > 0`` starts: the end of the conversation before it, rendered with the generation
    prompt, as the whole text has it."""
    for ctx in _contexts(msgs, i):
        before = render(tok, ctx, add_generation_prompt=True, **kwargs)
        if full.startswith(before):
            return len(before)
        base = render(tok, ctx, **kwargs)
        if full.startswith(base):  # a generation prompt the turn lacks (enable_thinking=false's empty block)
            common = os.path.commonprefix([before[len(base):], full[len(base):]])
            if THINK_OPEN in common:  # the empty think block's opening tag is the turn's own reasoning's here
                common = common[:common.index(THINK_OPEN)]
            return len(base) + len(common)
    raise RowError(
        f"the chat template does not render this conversation turn by turn (the text before assistant turn {i} "
        "is not a prefix of the whole), so its assistant turns cannot be masked; set data.loss_on=last_assistant")


def _turn_start(tok, msgs, i: int, full: str, kwargs) -> int:
    """Where assistant turn ``i``'s trained text starts. A final turn is read off the whole text where it can be
    (``_read_final_turn_start``: a single-turn row then costs one render, not two); the first such row of each
    template, and one in ``CHECK_EVERY`` after it, is also rendered turn by turn, and a difference turns the
    reading off for that template."""
    if i > 0:
        fast, key = _read_final_turn_start(tok, msgs, i, full, kwargs)
        if fast is None:
            return _rendered_turn_start(tok, msgs, i, full, kwargs)
        _LAST["calls"] += 1
        if _LAST["calls"] % CHECK_EVERY != 1 and key in _LAST["checked"]:
            return fast
        _LAST["checked"].add(key)
        try:
            slow = _rendered_turn_start(tok, msgs, i, full, kwargs)
        except RowError:
            slow = None
        if slow != fast:
            import logging

            logging.getLogger(__name__).warning("the final assistant turn's start read off the whole text differs "
                                                "from rendering turn by turn; rendering turn by turn for this template")
            _LAST["off"].add(key)
            return _rendered_turn_start(tok, msgs, i, full, kwargs)
        return fast
    gen = _probe_turn(tok, kwargs)[0]
    pos = full.find(gen) if gen else -1  # a conversation that opens with the assistant
    if pos < 0:
        raise RowError("the conversation opens with an assistant turn and the chat template's generation prompt "
                       "is not in its text, so the turn cannot be located")
    return pos + len(gen)


def _turn_end(tok, msgs, i: int, start: int, full: str, kwargs) -> int:
    upto = render(tok, msgs[: i + 1], **kwargs) if i + 1 < len(msgs) else full
    if full.startswith(upto) and len(upto.rstrip()) > start:
        return len(upto.rstrip())
    # the turn renders differently once later turns follow: it ends at the template's end-of-turn text
    eot = _probe_turn(tok, kwargs)[1]
    pos = full.find(eot, start) if eot else -1
    if pos < 0:
        raise RowError(f"the chat template renders assistant turn {i} differently inside the conversation than at "
                       "its end, and has no end-of-turn text to find it by; set data.loss_on=last_assistant")
    return pos + len(eot)


def _shown(name: str, text: str, contents: list[str], calls: int = 1) -> bool:
    """Whether ``text`` shows ``name`` ``calls`` times beyond its occurrences inside the messages' own
    ``contents`` (an answer that mentions a tool is not the tool call, nor its schema)."""
    return text.count(name) >= sum(c.count(name) for c in contents) + calls


def _check_turn(m: dict[str, Any], i: int, text: str, last: bool, train_reasoning: bool) -> None:
    """The trained text of turn ``i`` holds what the data says the assistant wrote."""
    answer = m["content"].split(THINK_CLOSE)[-1].strip()
    if answer and answer not in text:
        raise RowError(f"the chat template rewrote assistant turn {i}: its content is not in the text trained for it")
    names = [c["function"]["name"] for c in m.get("tool_calls", [])]
    for name in dict.fromkeys(names):
        if not _shown(name, text, [m["content"]], names.count(name)):
            raise RowError(
                f"the chat template does not render tool calls (assistant turn {i}'s call to {name!r} is not in its "
                "text), so they would not be trained; give a template that does as model.chat_template (e.g. "
                "model.chat_template=chatml)")
    reasoning = (m.get("reasoning_content") or "").strip()
    if last and train_reasoning and reasoning and reasoning not in text:
        raise RowError(
            f"the chat template leaves out the reasoning_content of the final assistant turn {i}, so it would not be "
            "trained; give a template that renders it (e.g. model.chat_template=chatml), put it in the content as "
            "<think>...</think>, or set data.train_reasoning=false")


def _reasoning_spans(m: dict[str, Any], text: str) -> list[tuple[int, int]]:
    """Where the turn's reasoning sits in its trained text: the <think> blocks that open it (tags and the
    whitespace after them included; a <think> later in an answer is the answer's), else the reasoning_content
    as the template wrote it."""
    spans: list[tuple[int, int]] = []
    pos = len(text) - len(text.lstrip())
    while text.startswith(THINK_OPEN, pos):
        b = text.find(THINK_CLOSE, pos + len(THINK_OPEN))
        if b < 0:
            break
        end = b + len(THINK_CLOSE)
        end += len(text[end:]) - len(text[end:].lstrip())
        spans.append((pos, end))
        pos = end
    if spans:
        return spans
    r = (m.get("reasoning_content") or "").strip()
    k = text.find(r) if r else -1
    return [(k, k + len(r))] if k >= 0 else []


def _assistant_char_spans(tok, ex: Example, targets: list[int], full: str, kwargs,
                          train_reasoning: bool = True) -> list[tuple[int, int]]:
    """Character spans [start, end) of ``full`` to train: each target assistant turn as the template wrote it."""
    msgs = ex.messages or []
    last_assistant = max(k for k, m in enumerate(msgs) if m["role"] == "assistant")
    if any(m["role"] == "user" for m in msgs[last_assistant:]):
        last_assistant = -1  # a user turn after it: templates may drop its reasoning like any earlier turn's (Qwen3)
    spans = []
    for i in targets:
        start = _turn_start(tok, msgs, i, full, kwargs)
        end = _turn_end(tok, msgs, i, start, full, kwargs)
        text = full[start:end]
        _check_turn(msgs[i], i, text, i == last_assistant, train_reasoning)
        kept = start
        for a, b in ([] if train_reasoning else _reasoning_spans(msgs[i], text)):
            if start + a > kept:
                spans.append((kept, start + a))
            kept = start + b
        if end > kept:
            spans.append((kept, end))
    if ex.tools:
        names = [t.get("function", t)["name"] for t in ex.tools]
        first_turn = min((s for s, _ in spans), default=len(full))
        before = [m for k, m in enumerate(msgs) if k < min(targets)]  # what the text before the first turn holds
        contents = [m["content"] for m in before]
        calls = [c["function"]["name"] for m in before for c in m.get("tool_calls", [])]
        if not any(_shown(n, full[:first_turn], contents, calls.count(n) + 1) for n in names):
            raise RowError(f"the chat template ignores the row's tools (none of {', '.join(names[:5])} is in the "
                           "rendered text), so the model would be trained to call tools it was never shown; give a "
                           "template that renders tools as model.chat_template (e.g. model.chat_template=chatml)")
    return spans


def _target_turns(ex: Example, loss_on: str) -> list[int]:
    msgs = ex.messages or []
    idx = [i for i, m in enumerate(msgs) if m["role"] == "assistant" and i >= ex.train_from]
    if not idx:
        raise RowError("no assistant turn to train on")
    return idx[-1:] if loss_on == "last_assistant" else idx


def tokenize_example(ex: Example, tok, max_length: int, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """``input_ids``, ``labels`` (-100 where not trained) and counts for one example (the other arguments are
    ``tokenize_examples``'); raises ``RowError`` for a bad row, ``TooLong`` for one dropped by ``too_long=drop``."""
    out = tokenize_examples([ex], tok, max_length, *args, **kwargs)[0]
    if isinstance(out, Exception):
        raise out
    return out


def tokenize_examples(
    examples: list[Example],
    tok,
    max_length: int,
    loss_on: str = "assistant",
    too_long: str = "truncate",
    template_kwargs: dict[str, Any] | None = None,
    train_reasoning: bool = True,
) -> list[dict[str, Any] | RowError | TooLong]:
    """``tokenize_example`` for a batch, in order; a bad or dropped row is returned as its exception, in its place.
    Each row is rendered and its trained spans found on its own; the tokenizer is called once for the batch
    (see ``encode.labels_for``)."""
    out: list[Any] = [None] * len(examples)
    chats: list[tuple[int, str, list[tuple[int, int]] | None]] = []  # (index, text, trained spans or None: all)
    texts: list[tuple[int, str]] = []
    for k, ex in enumerate(examples):
        if ex.text is not None:
            try:
                texts.append((k, _text_or_error(ex.text)))
            except RowError as e:
                out[k] = e
            continue
        kwargs = dict(template_kwargs or {})
        if ex.tools:
            kwargs["tools"] = ex.tools
        try:
            full = _text_or_error(render(tok, ex.messages, **kwargs))
            spans = None if loss_on == "all" else _assistant_char_spans(
                tok, ex, _target_turns(ex, loss_on), full, kwargs, train_reasoning)
        except RowError as e:
            out[k] = e
            continue
        chats.append((k, full, spans))
    if chats:
        for (k, _, _), (ids, labels) in zip(chats, labels_for([c[1] for c in chats], [c[2] for c in chats], tok)):
            out[k] = _finish(ids, labels, max_length, too_long)
    if texts:
        eos = tok.eos_token_id
        for (k, _), ids in zip(texts, tok([t for _, t in texts], add_special_tokens=True)["input_ids"]):
            if eos is not None and (not ids or ids[-1] != eos):
                ids = ids + [eos]
            out[k] = _finish(ids, list(ids), max_length, too_long)
    return out


def _text_or_error(text: str) -> str:
    """Text the tokenizer can encode: a lone UTF-16 surrogate (an emoji cut in half by a scraper, "\\ud83d" in
    JSON) makes the row bad here, instead of failing the tokenizer call of its whole batch."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RowError(f"the text holds a lone UTF-16 surrogate {e.object[e.start:e.end]!r} at character {e.start}, "
                       "which is not text (half of an emoji or other character cut apart)") from None
    return text


def _finish(ids: list[int], labels: list[int], max_length: int, too_long: str) -> dict[str, Any] | RowError | TooLong:
    truncated = False
    if len(ids) > max_length:
        if too_long == "drop":
            return TooLong(f"{len(ids)} tokens > data.max_length={max_length}")
        ids, labels, truncated = ids[:max_length], labels[:max_length], True
    n_trained = sum(1 for x in labels if x != IGNORE_INDEX)
    if n_trained == 0:
        if truncated:
            return TooLong(f"no trained tokens left after truncation to data.max_length={max_length}")
        return RowError("no tokens to train on after applying the chat template")
    return {"input_ids": ids, "labels": labels, "n_tokens": len(ids), "n_trained": n_trained, "truncated": truncated}


def trained_text(tok, input_ids, labels) -> list[str]:
    """Decode each contiguous run of trained tokens (for previews and tests)."""
    runs, cur = [], []
    for t, l in zip(input_ids, labels):
        if l != IGNORE_INDEX:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r) for r in runs]
