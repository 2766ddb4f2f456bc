"""Chat template rendering, tokenization and the loss mask.

The mask is found by rendering the conversation turn by turn (``messages[:i]`` with the generation
prompt, then ``messages[:i+1]``), so it works with any chat template, not only those with
``{% generation %}`` markers. Trained tokens are each assistant turn's rendered text plus the
turn's end-of-turn special token, and nothing else.
"""

from __future__ import annotations

from typing import Any

from sft_ray.formats import Example, RowError

IGNORE_INDEX = -100


class TooLong(Exception):
    """A row longer than ``data.max_length`` under ``too_long=drop`` (counted, not an error)."""


def render(tok, messages, add_generation_prompt: bool = False, **kwargs: Any) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs)


def _special_ids(tok) -> set[int]:
    """Special token ids, cached per tokenizer; keyed by its size so that adding tokens (or a deepcopy that
    then adds some) never reuses a stale set."""
    size = len(tok)
    cached = getattr(tok, "_sft_ray_special_ids", None)
    if cached is None or cached[0] != size:
        ids = set(tok.all_special_ids)
        ids |= {i for i, t in tok.added_tokens_decoder.items() if getattr(t, "special", False)}
        cached = (size, ids)
        tok._sft_ray_special_ids = cached
    return cached[1]


def _assistant_char_spans(tok, messages, targets: list[int], full: str, kwargs) -> list[tuple[int, int]]:
    """Character spans [start, end) of each target assistant turn in ``full``, end-of-turn excluded."""
    spans = []
    for i in targets:
        upto = render(tok, messages[: i + 1], **kwargs) if i + 1 < len(messages) else full
        if not full.startswith(upto):
            raise RowError(
                f"the chat template does not render this conversation turn by turn (the text of the first {i + 1} "
                "messages is not a prefix of the whole), so earlier assistant turns cannot be masked; "
                "set data.loss_on=last_assistant"
            )
        before = render(tok, messages[:i], add_generation_prompt=True, **kwargs) if i > 0 else ""
        search_from = len(before) if upto.startswith(before) else 0
        pos, content = -1, ""
        for content in (messages[i]["content"], messages[i]["content"].strip()):  # some templates trim
            pos = upto.rfind(content, search_from) if content else len(upto.rstrip())
            if pos >= 0:
                break
        if pos < 0:
            raise RowError(f"the chat template rewrote assistant turn {i}: its content is not in the rendered text")
        start = len(before) if upto.startswith(before) and len(before) <= pos else pos
        spans.append((start, pos + len(content)))
    return spans


def _target_turns(ex: Example, loss_on: str) -> list[int]:
    msgs = ex.messages or []
    idx = [i for i, m in enumerate(msgs) if m["role"] == "assistant" and i >= ex.train_from]
    if not idx:
        raise RowError("no assistant turn to train on")
    return idx[-1:] if loss_on == "last_assistant" else idx


def tokenize_example(
    ex: Example,
    tok,
    max_length: int,
    loss_on: str = "assistant",
    too_long: str = "truncate",
    template_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Return ``input_ids``, ``labels`` (-100 where not trained) and counts for one example."""
    kwargs = template_kwargs or {}
    if ex.text is not None:
        ids = tok(ex.text, add_special_tokens=True)["input_ids"]
        if tok.eos_token_id is not None and (not ids or ids[-1] != tok.eos_token_id):
            ids = ids + [tok.eos_token_id]
        labels = list(ids)
    else:
        msgs = ex.messages
        full = render(tok, msgs, **kwargs)
        enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        if loss_on == "all":
            labels = list(ids)
        else:
            labels = [IGNORE_INDEX] * len(ids)
            special = _special_ids(tok)
            for start, end in _assistant_char_spans(tok, msgs, _target_turns(ex, loss_on), full, kwargs):
                last = -1
                for k, (s, e) in enumerate(offsets):
                    if s < end and e > start and e > s:
                        labels[k] = ids[k]
                        last = k
                # the end-of-turn token: first special token after the content (skipping lone whitespace)
                k = last + 1
                while k < len(ids) and ids[k] not in special and not full[offsets[k][0] : offsets[k][1]].strip() and k - last <= 2:
                    k += 1
                if k < len(ids) and ids[k] in special:
                    labels[k] = ids[k]
    truncated = False
    if len(ids) > max_length:
        if too_long == "drop":
            raise TooLong(f"{len(ids)} tokens > data.max_length={max_length}")
        ids, labels, truncated = ids[:max_length], labels[:max_length], True
    n_trained = sum(1 for x in labels if x != IGNORE_INDEX)
    if n_trained == 0:
        if truncated:
            raise TooLong(f"no trained tokens left after truncation to data.max_length={max_length}")
        raise RowError("no tokens to train on after applying the chat template")
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
