"""The OpenAI wire format: request models, what this server refuses, error bodies, and stream chunks.

Nothing here generates or serves; ``app.py`` reads requests through ``parse_body`` and answers with these.
"""

# no `from __future__ import annotations`: pydantic and FastAPI need real annotation objects

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_JSON_DEPTH = 64  # OpenAI requests nest a few levels; thousands of levels is an attack on the parser


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str, param: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.type = status, message, code, param, type_


def error_body(message: str, code: str, param: str | None = None, type_: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]]

    def text(self, where: str) -> str:
        """OpenAI content parts ([{type: text, text: ...}]) joined; the backend is text-only, so any other
        part (an image, audio) is refused by name instead of being dropped from the prompt."""
        if isinstance(self.content, str):
            return self.content
        texts = []
        for j, p in enumerate(self.content):
            if p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise APIError(400, f"{where}.content[{j}] is a {p.get('type')!r} part; this model reads text only",
                               "unsupported_content", f"{where}.content")
            texts.append(p["text"])
        return "".join(texts)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (e.g. user)
    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # what torch's generator takes
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)
    # accepted by OpenAI, not implemented here: refused by name (see ``unsupported``), never silently ignored
    logprobs: Any = None
    top_logprobs: Any = None
    response_format: Any = None


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None


class CompletionRequest(_Common):
    prompt: str = Field(min_length=1)
    echo: bool = False
    suffix: str | None = None


def unsupported(req: _Common) -> None:
    """Refuse what the client asked for and this server would otherwise silently not do."""
    asked = {
        "logprobs": req.logprobs not in (None, False, 0),
        "top_logprobs": req.top_logprobs not in (None, 0),
        "response_format": req.response_format not in (None, {"type": "text"}),
        "tools": bool(getattr(req, "tools", None)) or bool(getattr(req, "functions", None)),
        "tool_choice": getattr(req, "tool_choice", None) not in (None, "none"),
        "echo": bool(getattr(req, "echo", False)),
        "suffix": bool(getattr(req, "suffix", None)),
    }
    for param, on in asked.items():
        if on:
            raise APIError(400, f"{param} is not supported by this server (the transformers backend generates "
                                "plain text)", "unsupported_parameter", param)


def _depth(x: Any, limit: int) -> int:
    """Nesting depth of parsed JSON, iteratively (no recursion limit to hit), stopping past ``limit``."""
    deepest, stack = 0, [(x, 1)]
    while stack:
        v, d = stack.pop()
        deepest = max(deepest, d)
        if deepest > limit:
            return deepest
        if isinstance(v, dict):
            stack += [(w, d + 1) for w in v.values()]
        elif isinstance(v, list):
            stack += [(w, d + 1) for w in v]
    return deepest


def parse_body(raw: bytes, schema: type[BaseModel]) -> BaseModel:
    """A request body as ``schema``, or an APIError that says what is wrong with it (never a 500)."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(400, "request body is not valid JSON", "invalid_json") from None
    except RecursionError:
        raise APIError(400, f"request body is nested more than {MAX_JSON_DEPTH} levels deep", "invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object", "invalid_json")
    if _depth(data, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise APIError(400, f"request body is nested more than {MAX_JSON_DEPTH} levels deep", "invalid_json")
    try:  # a lone UTF-16 surrogate ("\ud800") parses as JSON but is not text any tokenizer can encode
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise APIError(400, f"request body holds a lone UTF-16 surrogate ({e.object[e.start:e.end]!r}), which is "
                            "not text", "invalid_value") from None
    try:
        return schema.model_validate(data)
    except Exception as e:  # pydantic.ValidationError
        err = e.errors()[0] if hasattr(e, "errors") else {}
        param = ".".join(str(p) for p in err.get("loc", [])) or None
        raise APIError(400, f"{param or 'body'}: {err.get('msg', str(e))}", "invalid_value", param) from None


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(cid: str, kind: str, model: str, created: int, delta: str | dict | None, finish: str | None = None) -> str:
    """One Server-Sent Events chunk: a chat delta or a completion text piece."""
    if kind == "chat":
        d = delta if isinstance(delta, dict) else ({"content": delta} if delta is not None else {})
        chunk = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                 "choices": [{"index": 0, "delta": d, "finish_reason": finish, "logprobs": None}]}
    else:
        chunk = {"id": cid, "object": "text_completion", "created": created, "model": model,
                 "choices": [{"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}]}
    return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"


def sse_usage(cid: str, kind: str, model: str, created: int, counts: dict[str, int]) -> str:
    """The last chunk of a stream asked for with ``stream_options.include_usage``: no choices, the usage."""
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    chunk = {"id": cid, "object": obj, "created": created, "model": model, "choices": [], "usage": counts}
    return f"data: {json.dumps(chunk)}\n\n"
