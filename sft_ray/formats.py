"""Turn one dataset row, whatever its shape, into a list of chat messages (or plain text).

Formats: chat ``messages``; ``prompt``/``completion`` (strings or message lists); Alpaca
``instruction``/``input``/``output``; ShareGPT ``conversations`` (``from``/``value``); plain ``text``.
Every failure raises :class:`RowError` with a reason a person can act on; the caller adds file and row.
"""

from __future__ import annotations

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


def detect_format(row: dict[str, Any]) -> str:
    keys = set(row)
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
    raise RowError(
        f"matches no known format (columns: {sorted(keys)}); expected one of: messages | conversations | "
        "prompt+completion | instruction+output | text (set data.format / data.columns for custom names)"
    )


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
        content = m.get("content")
        if content is None and has_tool_calls:
            msg["content"] = ""
        else:
            msg["content"] = _content(content, f"{what}[{i}].content ({role})", allow_empty=has_tool_calls)
        out.append(msg)
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise RowError(f"{what} has no assistant turn to train on")
    return out


def to_example(row: dict[str, Any], fmt: str = "auto", columns: dict[str, str] | None = None) -> Example:
    """Normalise one row. ``columns`` maps source column names to the canonical ones."""
    if columns:
        row = {columns.get(k, k): v for k, v in row.items()}
    if fmt == "auto":
        fmt = detect_format(row)
    if fmt == "messages":
        return Example(messages=_check_messages(row.get("messages")))
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
            msgs.append({"role": role, "content": turn.get("value", turn.get("content"))})
        return Example(messages=_check_messages(msgs, "conversations"))
    if fmt == "prompt_completion":
        prompt, completion = row.get("prompt"), row.get("completion")
        if isinstance(prompt, list) or isinstance(completion, list):
            p = _check_messages(prompt, "prompt", need_assistant=False)
            c = _check_messages(completion, "completion")
            return Example(messages=p + c, train_from=len(p))
        p = _text(prompt, "prompt")
        c = _text(completion, "completion")
        msgs = ([{"role": "system", "content": _text(row["system"], "system")}] if row.get("system") else [])
        msgs += [{"role": "user", "content": p}, {"role": "assistant", "content": c}]
        return Example(messages=msgs, train_from=len(msgs) - 1)
    if fmt == "alpaca":
        instruction = _text(row.get("instruction"), "instruction")
        extra = row.get("input")
        if extra is not None and not isinstance(extra, str):
            raise RowError(f"input must be a string, got {type(extra).__name__}")
        user = instruction + (f"\n\n{extra}" if extra and extra.strip() else "")
        msgs = ([{"role": "system", "content": _text(row["system"], "system")}] if row.get("system") else [])
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": _text(row.get("output"), "output")}]
        return Example(messages=msgs, train_from=len(msgs) - 1)
    if fmt == "text":
        return Example(text=_text(row.get("text"), "text"))
    raise RowError(f"unknown data.format {fmt!r} (allowed: auto, {', '.join(FORMATS)})")
