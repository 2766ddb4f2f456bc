"""Turn one dataset row, whatever its shape, into a list of chat messages (or plain text).

Formats: chat ``messages``; ``prompt``/``completion`` (strings or message lists); Alpaca
``instruction``/``input``/``output`` (with LLaMA-Factory's ``history`` and ``system``); ShareGPT ``conversations``
(``from``/``value``, with a ``system`` column); plain ``text``.
Chat rows may carry tool use in the OpenAI shape (assistant ``tool_calls``, ``tool`` turns, a ``tools``
column of function schemas; ShareGPT's ``function_call``/``observation`` turns) and reasoning
(``reasoning_content``, or ``<think>`` blocks inside the content).
Every failure raises :class:`RowError` with a reason a person can act on; the caller adds file and row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "model": "assistant",
    "tool": "tool",
    "function": "tool",
    "observation": "tool",
    "function_response": "tool",
    "function_call": "assistant",  # its value is the call: {"name": ..., "arguments": ...}
}
FORMATS = ("messages", "prompt_completion", "alpaca", "sharegpt", "text")


class RowError(ValueError):
    """A row that cannot be trained on; the message is the reason, without location."""


@dataclass
class Example:
    """A normalised row: either a conversation (loss on assistant turns) or raw text (loss on all)."""

    messages: list[dict[str, Any]] | None = None
    text: str | None = None
    # prompt/completion rows: assistant turns before this index belong to the prompt and are not trained
    train_from: int = 0
    # function schemas handed to the chat template (``tools=``), from the row's ``tools`` column
    tools: list[dict[str, Any]] | None = None


def detect_format(row: dict[str, Any]) -> str:
    """The row's format, judged by its non-null columns first: a Parquet file or a Hugging Face dataset that
    mixes formats has every column in every row, null where the row does not use it. A row whose format
    columns are all null is judged by the columns it has (so the error says which value is missing)."""
    fmt = _format_of({k for k, v in row.items() if v is not None}) or _format_of(set(row))
    if fmt is None:
        raise RowError(
            f"matches no known format (columns: {sorted(row)}); expected one of: messages | conversations | "
            "prompt+completion | instruction+output | text (set data.format / data.columns for custom names)"
        )
    return fmt


def _format_of(keys: set[str]) -> str | None:
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if "text" in keys:
        return "text"
    return None


def _text(value: Any, what: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise RowError(f"{what} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RowError(f"{what} is empty")
    return value


def _content(value: Any, what: str, allow_empty: bool = False) -> str:
    """A message's content: a string, or a list of OpenAI content parts (``[{"type": "text", "text": ...}]``)
    whose text parts are joined as the Serve endpoint joins them. Models here are text-only, so any other part
    (an image, audio) makes the row bad instead of being dropped from it."""
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                got = repr(kind) if isinstance(part, dict) else type(part).__name__
                raise RowError(f"{what}[{j}] is a {got} content part; only 'text' parts can be trained on "
                               "(the models here are text-only)")
            texts.append(_text(part.get("text"), f"{what}[{j}].text", allow_empty=True))
        value = "".join(texts)
    elif not isinstance(value, str):
        raise RowError(f"{what} must be a string or a list of content parts, got {type(value).__name__}")
    return _text(value, what, allow_empty)


def _json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RowError(f"{what} is not valid JSON ({e.msg} at character {e.pos}): {text[:80]!r}") from None


def _arguments(value: Any, what: str) -> dict[str, Any]:
    """A tool call's arguments as the object chat templates expect (they render it with ``tojson``); a JSON
    string is parsed, so a call the model is trained to make is always valid JSON."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return {}
    if isinstance(value, str):
        value = _json(value, what)
    if not isinstance(value, dict):
        raise RowError(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _tool_calls(value: Any, what: str) -> list[dict[str, Any]]:
    """OpenAI-shape calls (``{"type": "function", "id", "function": {"name", "arguments"}}``; a bare
    ``{"name", "arguments"}`` too), normalised to that shape with ``arguments`` as an object."""
    if not isinstance(value, list) or not value:
        raise RowError(f"{what} must be a non-empty list of tool calls")
    out = []
    for j, call in enumerate(value):
        w = f"{what}[{j}]"
        if not isinstance(call, dict):
            raise RowError(f"{w} is not an object")
        fn = call.get("function", call)
        if not isinstance(fn, dict):
            raise RowError(f"{w}.function is not an object")
        name = fn.get("name")
        if not isinstance(name, str) or not name.strip():
            raise RowError(f"{w} has no function name")
        norm: dict[str, Any] = {"type": "function", "function": {
            "name": name, "arguments": _arguments(fn.get("arguments"), f"{w}.function.arguments")}}
        if call.get("id") is not None:
            norm["id"] = str(call["id"])
        out.append(norm)
    return out


def _check_tool_turns(out: list[dict[str, Any]], what: str) -> None:
    """Each tool result answers a call: it follows an assistant turn with ``tool_calls`` (or another result
    of that turn), there are no more results than calls, and a ``tool_call_id`` names one of the calls."""
    calls: list[dict[str, Any]] | None = None
    answered = 0
    answered_ids: set[str] = set()
    for i, m in enumerate(out):
        if m["role"] != "tool":
            calls = m.get("tool_calls") if m["role"] == "assistant" else None
            answered, answered_ids = 0, set()
            continue
        if not calls:
            raise RowError(f"{what}[{i}] is a tool result with no tool call before it (the assistant turn before "
                           "a tool turn must have tool_calls; in ShareGPT rows, a function_call turn)")
        answered += 1
        if answered > len(calls):
            raise RowError(f"{what}[{i}] is tool result {answered} for {len(calls)} tool call(s)")
        ids = {c["id"] for c in calls if "id" in c}
        cid = m.get("tool_call_id")
        if cid is not None and ids and str(cid) not in ids:
            raise RowError(f"{what}[{i}] answers tool_call_id {cid!r}, which no call before it has "
                           f"(calls: {', '.join(sorted(ids))})")
        if cid is not None and ids and str(cid) in answered_ids:
            raise RowError(f"{what}[{i}] answers tool_call_id {cid!r} a second time")
        if cid is not None:
            answered_ids.add(str(cid))


def _check_messages(messages: Any, what: str = "messages", need_assistant: bool = True) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise RowError(f"{what} must be a non-empty list of messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RowError(f"{what}[{i}] is not an object")
        role = m.get("role")
        if role not in ROLES:
            raise RowError(f"{what}[{i}] has unknown role {role!r} (allowed: {', '.join(ROLES)})")
        msg = {k: v for k, v in m.items() if v is not None}
        has_tool_calls = role == "assistant" and bool(m.get("tool_calls"))
        if has_tool_calls:
            msg["tool_calls"] = _tool_calls(m["tool_calls"], f"{what}[{i}].tool_calls")
        else:
            msg.pop("tool_calls", None)  # [] or a column other rows fill
        if role == "assistant":
            _reasoning(m, msg, f"{what}[{i}]")
        content = m.get("content")
        if content is None and has_tool_calls:
            msg["content"] = ""
        else:
            msg["content"] = _content(content, f"{what}[{i}].content ({role})", allow_empty=has_tool_calls)
        out.append(msg)
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise RowError(f"{what} has no assistant turn to train on")
    _check_tool_turns(out, what)
    return out


REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")  # transformers' names for it, standard first


def _reasoning(m: dict[str, Any], msg: dict[str, Any], what: str) -> None:
    """An assistant turn's reasoning under any of its names, kept as ``reasoning_content`` (what chat templates
    read, and what the masks check); two names with different reasoning make the row bad."""
    given = {k: m[k] for k in REASONING_KEYS if m.get(k) is not None}
    for k in given:
        _text(given[k], f"{what}.{k}", allow_empty=True)
        msg.pop(k, None)
    if len(set(given.values())) > 1:
        raise RowError(f"{what} has different reasoning under {' and '.join(given)}")
    if given:
        msg["reasoning_content"] = next(iter(given.values()))


def _system_column(row: dict[str, Any], msgs: list[dict[str, Any]], what: str) -> list[dict[str, Any]]:
    """A ``system`` column (LLaMA-Factory's ShareGPT and Alpaca layouts) as the conversation's first turn; one
    that already opens with a system turn as well is ambiguous."""
    system = row.get("system")
    if system is None or (isinstance(system, str) and not system.strip()):
        return msgs
    system = _text(system, "system")
    if msgs and isinstance(msgs[0], dict) and msgs[0].get("role") == "system":
        raise RowError(f"the row has a system column and {what} opens with a system turn too; keep one")
    return [{"role": "system", "content": system}, *msgs]


def _history(value: Any) -> list[dict[str, Any]]:
    """Alpaca's ``history`` (LLaMA-Factory): earlier [instruction, response] pairs, as turns before the row's own."""
    if value is None or value == []:
        return []
    if not isinstance(value, list):
        raise RowError(f"history must be a list of [instruction, response] pairs, got {type(value).__name__}")
    turns = []
    for j, pair in enumerate(value):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise RowError(f"history[{j}] must be an [instruction, response] pair")
        turns += [{"role": "user", "content": _text(pair[0], f"history[{j}][0]")},
                  {"role": "assistant", "content": _text(pair[1], f"history[{j}][1]")}]
    return turns


def _renamed(row: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    """The row with ``data.columns`` applied; a renamed column that lands on another column holding a value
    (or two renamed onto one) makes the row bad instead of one silently winning."""
    out: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for k, v in row.items():
        name = columns.get(k, k)
        if name in out and out[name] is not None and v is not None:
            raise RowError(f"data.columns puts {sources[name]!r} and {k!r} both in column {name!r}")
        if name not in out or v is not None:
            out[name], sources[name] = v, k
    return out


def _tools(value: Any) -> list[dict[str, Any]] | None:
    """The ``tools`` column: a list of function schemas (OpenAI ``{"type": "function", "function": {...}}``
    or bare ``{"name", "description", "parameters"}``), or that list as a JSON string."""
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        value = _json(value, "tools")
    if not isinstance(value, list):
        raise RowError(f"tools must be a list of function schemas, got {type(value).__name__}")
    for j, t in enumerate(value):
        fn = t.get("function", t) if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"].strip():
            raise RowError(f"tools[{j}] is not a function schema with a name")
    return value


def _sharegpt_turn(turn: dict[str, Any], role: str, i: int) -> dict[str, Any]:
    value = turn.get("value", turn.get("content"))
    if str(turn.get("from", turn.get("role"))).lower() != "function_call":
        return {"role": role, "content": value}
    what = f"conversations[{i}].value (function_call)"
    if isinstance(value, str):
        value = _json(value, what)
    calls = value if isinstance(value, list) else [value]
    return {"role": "assistant", "content": "", "tool_calls": _tool_calls(calls, what)}


def to_example(row: dict[str, Any], fmt: str = "auto", columns: dict[str, str] | None = None) -> Example:
    """Normalise one row. ``columns`` maps source column names to the canonical ones."""
    if columns:
        row = _renamed(row, columns)
    if fmt == "auto":
        fmt = detect_format(row)
    if fmt == "messages":
        return Example(messages=_check_messages(row.get("messages")), tools=_tools(row.get("tools")))
    if fmt == "sharegpt":
        conv = row.get("conversations")
        if not isinstance(conv, list) or not conv:
            raise RowError("conversations must be a non-empty list")
        msgs = []
        for i, turn in enumerate(conv):
            if not isinstance(turn, dict):
                raise RowError(f"conversations[{i}] is not an object")
            who = turn.get("from", turn.get("role"))
            role = SHAREGPT_ROLES.get(str(who).lower()) if who is not None else None
            if role is None:
                raise RowError(
                    f"conversations[{i}] has unknown speaker {who!r} (allowed: {', '.join(sorted(SHAREGPT_ROLES))})"
                )
            msgs.append(_sharegpt_turn(turn, role, i))
        msgs = _system_column(row, msgs, "conversations")
        return Example(messages=_check_messages(msgs, "conversations"), tools=_tools(row.get("tools")))
    if fmt == "prompt_completion":
        prompt, completion = row.get("prompt"), row.get("completion")
        if isinstance(prompt, list) or isinstance(completion, list):
            p = _check_messages(_system_column(row, prompt, "prompt") if isinstance(prompt, list) else prompt,
                                "prompt", need_assistant=False)
            c = _check_messages(completion, "completion")
            return Example(messages=_check_messages(p + c, "prompt+completion"), train_from=len(p),
                           tools=_tools(row.get("tools")))
        p = _text(prompt, "prompt")
        c = _text(completion, "completion")
        msgs = _system_column(row, [{"role": "user", "content": p}, {"role": "assistant", "content": c}], "prompt")
        return Example(messages=msgs, train_from=len(msgs) - 1)
    if fmt == "alpaca":
        instruction = _text(row.get("instruction"), "instruction")
        extra = row.get("input")
        if extra is not None and not isinstance(extra, str):
            raise RowError(f"input must be a string, got {type(extra).__name__}")
        user = instruction + (f"\n\n{extra}" if extra and extra.strip() else "")
        msgs = _system_column(row, _history(row.get("history")) + [
            {"role": "user", "content": user}, {"role": "assistant", "content": _text(row.get("output"), "output")}],
            "history")
        return Example(messages=msgs)  # every response trained, the history's too (data.loss_on=last_assistant: the output only)
    if fmt == "text":
        return Example(text=_text(row.get("text"), "text"))
    raise RowError(f"unknown data.format {fmt!r} (allowed: auto, {', '.join(FORMATS)})")
