"""The OpenAI wire format: request and response models, what this server refuses, error bodies, stream chunks.

Nothing here generates or serves; ``app.py`` reads requests through ``parse_body`` and answers with the response
models below (``.json()`` of each is the body the OpenAI API sends).
"""

# no `from __future__ import annotations`: pydantic and FastAPI need real annotation objects

import json
from itertools import accumulate
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_serializer, field_validator, model_validator

MAX_JSON_DEPTH = 64  # OpenAI requests nest a few levels; thousands of levels is an attack on the parser


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str, param: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.type = status, message, code, param, type_


def error_body(message: str, code: str, param: str | None = None, type_: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class ChatMessage(BaseModel):
    """One message of a chat request. Unknown keys are refused (as OpenAI's API does); ``name`` and
    ``tool_call_id`` go to the chat template; what an earlier response carried (``refusal``, ``annotations``,
    empty ``tool_calls``) may come back with it."""
    model_config = ConfigDict(extra="forbid")
    role: Literal["developer", "system", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]]
    name: str | None = None
    tool_call_id: str | None = None
    refusal: str | None = None
    annotations: list[Any] | None = None
    tool_calls: list[Any] | None = None
    function_call: Any = None
    audio: Any = None

    def as_template_dict(self, where: str) -> dict[str, Any]:
        """The message as the chat template takes it; ``developer`` is the newer name of ``system``."""
        for param in ("tool_calls", "function_call", "audio"):
            if getattr(self, param):
                raise APIError(400, f"{where}.{param} is not supported by this server (the transformers backend "
                                    "reads text turns only)", "unsupported_parameter", f"{where}.{param}")
        m: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text(where)}
        if self.name is not None:
            m["name"] = self.name
        if self.tool_call_id is not None:
            m["tool_call_id"] = self.tool_call_id
        return m

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
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    include_obfuscation: bool | None = None  # padding against length side channels: nothing to pad here


MAX_STOP, MAX_STOP_CHARS = 4, 256
NULL_MEANS_DEFAULT = frozenset({"temperature", "top_p", "n", "stream", "presence_penalty", "frequency_penalty",
                                "echo"})


class _Common(BaseModel):
    """Every field of OpenAI's request is honoured, refused by name when set (``unsupported``), or has no effect on
    the answer (``user``, ``metadata``, ``store``, ``service_tier``, ...); an unknown field is refused by name, as
    OpenAI's API does, so a misspelt or vendor-specific option never passes unnoticed."""
    model_config = ConfigDict(extra="forbid")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None  # at most MAX_STOP strings of at most MAX_STOP_CHARS (see _stop)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # what torch's generator takes
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)
    # no effect on the answer: who asked, and OpenAI's own storage and billing options
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # accepted by OpenAI, not implemented here: refused by name (see ``unsupported``), never silently ignored
    response_format: Any = None

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        """``"temperature": null`` means the default in OpenAI's API (clients send it for an unset option)."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if not (v is None and k in NULL_MEANS_DEFAULT)}
        return data

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        """OpenAI's limit of 4, each of bounded length: every streamed piece is checked against each of them."""
        stops = [v] if isinstance(v, str) else v or []
        if len(stops) > MAX_STOP or any(len(x) > MAX_STOP_CHARS for x in stops):
            raise ValueError(f"at most {MAX_STOP} stop strings of at most {MAX_STOP_CHARS} characters each")
        return v

    def biases(self) -> dict[int, float] | None:
        """``logit_bias`` with token ids as ints; an entry that is not a token id or whose bias is out of
        OpenAI's range [-100, 100] is refused."""
        if not self.logit_bias:
            return None
        out = {}
        for k, v in self.logit_bias.items():
            if not (k.strip().isascii() and k.strip().isdigit()) or not -100 <= v <= 100:  # "²".isdigit() too
                raise APIError(400, f"logit_bias: {k!r}: {v} must map a token id to a bias in [-100, 100]",
                               "invalid_value", "logit_bias")
            out[int(k)] = float(v)
        return out

    def logprob_count(self) -> int | None:
        """None: no log-probabilities; k >= 0: the chosen token's and the k most likely alternatives'."""
        raise NotImplementedError


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)  # OpenAI's range
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None  # only means something with tools, which are refused
    modalities: list[str] | None = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    web_search_options: Any = None

    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Common):
    prompt: str = Field(min_length=1)
    logprobs: int | None = Field(None, ge=0, le=5)  # the legacy API's range: alternatives per token
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)

    def logprob_count(self) -> int | None:
        return self.logprobs


def unsupported(req: _Common) -> None:
    """Refuse what the client asked for and this server would otherwise silently not do."""
    if getattr(req, "top_logprobs", None) is not None and not getattr(req, "logprobs", None) is True:
        raise APIError(400, "top_logprobs needs logprobs=true", "invalid_value", "top_logprobs")
    asked = {
        "response_format": req.response_format not in (None, {"type": "text"}),
        "tools": bool(getattr(req, "tools", None)) or bool(getattr(req, "functions", None)),
        "tool_choice": getattr(req, "tool_choice", None) not in (None, "none"),
        "function_call": getattr(req, "function_call", None) not in (None, "none"),
        "modalities": getattr(req, "modalities", None) not in (None, ["text"]),
        "audio": getattr(req, "audio", None) is not None,
        "prediction": getattr(req, "prediction", None) is not None,
        "reasoning_effort": getattr(req, "reasoning_effort", None) is not None,
        "verbosity": getattr(req, "verbosity", None) is not None,
        "web_search_options": getattr(req, "web_search_options", None) is not None,
        "echo": bool(getattr(req, "echo", False)),
        "suffix": bool(getattr(req, "suffix", None)),
        "best_of": getattr(req, "best_of", None) not in (None, 1),
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
    except ValueError as e:  # valid JSON Python will not read: an integer of thousands of digits
        raise APIError(400, f"request body cannot be read: {e}", "invalid_json") from None
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
        if err.get("type") == "extra_forbidden":
            raise APIError(400, f"unrecognized request argument supplied: {param}", "unknown_parameter",
                           param) from None
        raise APIError(400, f"{param or 'body'}: {err.get('msg', str(e))}", "invalid_value", param) from None


# -- responses

class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class CompletionLogprobs(BaseModel):
    """The legacy completions shape: parallel lists, alternatives as {token: logprob}."""
    tokens: list[str] = []
    token_logprobs: list[float] = []
    top_logprobs: list[dict[str, float]] = []
    text_offset: list[int] = []


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens)


class _Envelope(BaseModel):
    """What every response and stream chunk carries around its choices."""
    id: str
    created: int
    model: str


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str
    logprobs: ChatLogprobs | None = None


class ChatCompletion(_Envelope):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str
    logprobs: CompletionLogprobs | None = None


class Completion(_Envelope):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None

    @field_serializer("delta")
    def _only_set(self, d: Delta) -> dict:  # OpenAI's deltas carry only what changed ({} at the end)
        return d.model_dump(exclude_none=True)


class ChatChunk(_Envelope):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class PieceChoice(BaseModel):
    """A completions stream chunk's choice (finish_reason is null until the last)."""
    index: int = 0
    text: str = ""
    finish_reason: str | None = None
    logprobs: CompletionLogprobs | None = None


class CompletionChunk(_Envelope):
    object: Literal["text_completion"] = "text_completion"
    choices: list[PieceChoice]  # [] in the usage chunk
    usage: Usage | None = None


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "sft-ray"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


# a token's log-probabilities as the engine describes them: (text, bytes, logprob, [(text, bytes, logprob), ...])
Described = list[tuple[str, list[int], float, list[tuple[str, list[int], float]]]]


def chat_logprobs(entries: Described) -> ChatLogprobs:
    return ChatLogprobs(content=[
        TokenLogprob(token=t, bytes=b, logprob=lp,
                     top_logprobs=[TopLogprob(token=at, bytes=ab, logprob=alp) for at, ab, alp in alts])
        for t, b, lp, alts in entries])


def completion_logprobs(entries: Described, offset: int) -> CompletionLogprobs:
    """``offset``: where the first token's text starts (characters into prompt + completion)."""
    starts = list(accumulate((len(e[0]) for e in entries), initial=offset))[:-1]
    return CompletionLogprobs(tokens=[e[0] for e in entries], token_logprobs=[e[2] for e in entries],
                              top_logprobs=[{at: alp for at, _, alp in e[3]} for e in entries], text_offset=starts)


def sse(chunk: BaseModel) -> str:
    """One Server-Sent Events message."""
    return f"data: {chunk.model_dump_json()}\n\n"
