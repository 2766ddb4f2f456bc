"""The HTTP app of a Serve replica: routes, authentication, request limits, dynamic batching and streams.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``, ``GET /health``,
``GET /v1/stats``, and ``GET /``: the playground, a chat page (``playground.html``, plain HTML and JavaScript,
nothing fetched from elsewhere) that streams from ``/v1/chat/completions`` with the key typed into it.
With ``serve.continuous_batching`` (default) every request, streaming or not, joins the engine's running batch
(``batcher.py``); without it, non-streaming requests are batched dynamically (``@serve.batch``) and streams
are generated one ``generate`` each. Streams stop as soon as the client goes
away. Bad requests get an OpenAI-style error body and a 4xx (``protocol.py``); the replica keeps serving.
"""

# no `from __future__ import annotations`: Serve's FastAPI class views need real annotation objects

import asyncio
import base64
import hashlib
import json
import logging
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from ray import serve

from sft_ray.serve.engine import Detokenizer, Engine, GenRequest, GenResult
from sft_ray.serve.guard import bearer_ok, check_max_tokens, read_capped, unauthorized
from sft_ray.serve.protocol import (APIError, AssistantMessage, ChatChoice, ChatChunk, ChatChunkChoice,
                                    ChatCompletion, ChatRequest, Completion, CompletionChoice, CompletionChunk,
                                    CompletionRequest, Delta, Model, ModelList, PieceChoice, _Common, chat_logprobs,
                                    completion_logprobs, error_body, parse_body, sse, unsupported, usage)
from sft_ray.serve.stops import StopStrings

log = logging.getLogger("sft_ray.serve")

# no schema or docs routes: outside the key there are only the playground page and /health
app = FastAPI(title="sft-ray", docs_url=None, redoc_url=None, openapi_url=None)
STREAM_FAILED = "generating this answer failed on the server (the replica keeps serving; the reason is in its log)"


def _playground() -> tuple[str, dict[str, str]]:
    """The playground page and its headers: a Content-Security-Policy that lets the page run its own inline
    script and style (by their hashes) and talk to this server only."""
    page = (Path(__file__).parent / "playground.html").read_text(encoding="utf-8")

    def hashes(tag: str) -> str:
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()}'"
                        for body in re.findall(rf"<{tag}>(.*?)</{tag}>", page, re.S))

    csp = (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; connect-src 'self'; "
           "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return page, {"Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff",
                  "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


PLAYGROUND, PLAYGROUND_HEADERS = _playground()


@app.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError):
    return JSONResponse(error_body(exc.message, exc.code, exc.param, exc.type), status_code=exc.status)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    errs = exc.errors()
    first = errs[0] if errs else {}
    loc = [str(p) for p in first.get("loc", []) if p != "body"]
    if first.get("type") == "json_invalid":
        return JSONResponse(error_body("request body is not valid JSON", "invalid_json"), status_code=400)
    param = ".".join(loc) or None
    return JSONResponse(error_body(f"{param or 'body'}: {first.get('msg', 'invalid request')}", "invalid_value", param),
                        status_code=400)


@app.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception):
    log.exception("unexpected error")  # the replica stays up; the client gets a well-formed 500
    return JSONResponse(error_body("internal error", "internal_error", type_="server_error"), status_code=500)


@dataclass
class ServeSettings:
    model_name: str
    max_tokens_limit: int = 512
    default_max_tokens: int = 128
    max_batch_size: int = 8
    batch_wait_s: float = 0.1
    continuous_batching: bool = True
    max_running: int = 32
    prefix_cache_tokens: int = 4096
    max_body_bytes: int = 1_000_000
    api_key_sha256: str | None = None
    trust_remote_code: bool = False
    base_model: str | None = None
    extra: dict = field(default_factory=dict)


@serve.deployment(max_ongoing_requests=64)
@serve.ingress(app)
class OpenAIServer:
    def __init__(self, model_dir: str, settings: dict):
        self.s = ServeSettings(**settings)
        self.engine = Engine(model_dir, self.s.trust_remote_code, self.s.base_model,
                             continuous=self.s.continuous_batching, max_running=self.s.max_running,
                             prefix_cache_tokens=self.s.prefix_cache_tokens)
        self.created = int(time.time())
        self.active_streams = 0
        self.cancelled_streams = 0  # streams ended early because the client went away
        self.failed_streams = 0  # streams ended by a failure on the server (the error event was their last)
        self.batches = 0
        self.batched_requests = 0
        self._batched.set_max_batch_size(self.s.max_batch_size)
        self._batched.set_batch_wait_timeout_s(self.s.batch_wait_s)

    # -- helpers

    def _check_auth(self, request: Request) -> None:
        if not bearer_ok(request.headers.get("authorization", ""), self.s.api_key_sha256):
            raise unauthorized()

    async def _body(self, request: Request, schema):
        """The body read chunk by chunk and cut off at ``max_body_bytes`` (a chunked request has no
        Content-Length to check first), then parsed and validated (``protocol.parse_body``)."""
        raw = await read_capped(request.headers.get("content-length", ""), request.stream(), self.s.max_body_bytes)
        req = parse_body(raw, schema)
        unsupported(req)
        if req.model != self.s.model_name:  # the cheap checks come before any tokenizing
            raise APIError(404, f"model {req.model!r} does not exist; this server serves {self.s.model_name!r}",
                           "model_not_found", "model")
        self._max_tokens(req)
        return req

    def _max_tokens(self, req: _Common) -> int:
        return check_max_tokens(req.max_completion_tokens or req.max_tokens or self.s.default_max_tokens,
                                self.s.max_tokens_limit)

    def _gen_request(self, req: _Common, input_ids: list[int]) -> GenRequest:
        max_tokens = self._max_tokens(req)
        if len(input_ids) + max_tokens > self.engine.context_length:
            raise APIError(400, f"the prompt is {len(input_ids)} tokens; with max_tokens={max_tokens} that exceeds the "
                                f"model's context of {self.engine.context_length} tokens",
                           "context_length_exceeded", "messages")
        stop = StopStrings(req.stop).stops
        k = req.logprob_count()
        if k is not None and req.stream and self.engine.batcher is None:
            raise APIError(400, "logprobs in a stream need serve.continuous_batching=true (this replica streams through "
                                "generate, which gives no per-token log-probabilities as it goes)",
                           "unsupported_parameter", "logprobs")
        bias = req.biases()
        if bias and max(bias) >= self.engine.vocab_size:
            raise APIError(400, f"logit_bias: token id {max(bias)} is not in the model's vocabulary of "
                                f"{self.engine.vocab_size} tokens", "invalid_value", "logit_bias")
        return GenRequest(input_ids, max_tokens, req.temperature, req.top_p, stop, req.seed, k,
                          req.presence_penalty, req.frequency_penalty, bias)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.1)  # both reset from the config in __init__
    async def _batched(self, reqs: list[GenRequest]) -> list[GenResult]:
        # in a thread: the event loop keeps accepting requests (the next batch) and serving streams
        self.batches += 1
        self.batched_requests += len(reqs)
        return await asyncio.to_thread(self.engine.generate, reqs)

    async def _generate(self, gen: GenRequest) -> GenResult:
        """One answer: through the engine's running batch when it has one (awaited, no thread held), else
        through ``@serve.batch``."""
        if self.engine.batcher is None:
            return await self._batched(gen)
        h = self.engine.batcher.submit(gen, None, asyncio.get_running_loop())
        # with stop strings the text is watched as it comes, and the row leaves the batch at the first one (it used
        # to run on to max_tokens, holding its slot); the batcher then ends it with the ids so far
        stops = gen.stops
        detok = Detokenizer(self.engine.decode) if stops else None
        try:
            while (tok := await h.next_token()) is not None:
                if detok is not None and detok.add(tok) and stops.find(detok.sent) >= 0:
                    h.cancelled.set()
        finally:
            h.cancelled.set()  # a client gone mid-way frees the slot
        if "error" in h.result:
            raise h.result["error"]
        return await asyncio.to_thread(self.engine._finish, gen, h.result["ids"], h.result.get("logprobs"))

    def _start_stream(self, gen: GenRequest, cancelled: threading.Event):
        """(async text pieces, something to join, the result dict) from the running batch or a generate thread."""
        if self.engine.batcher is not None:
            h = self.engine.batcher.submit(gen, cancelled, asyncio.get_running_loop())
            return self.engine.apieces(h, catch_up=gen.logprobs is None), h, h.result
        streamer, thread, result = self.engine.stream(gen, cancelled)

        async def pieces():
            it = iter(streamer)
            while (piece := await asyncio.to_thread(next, it, None)) is not None:
                yield piece, None

        return pieces(), thread, result

    def _chunk(self, cid: str, created: int, kind: str, model: str, piece: str | None, finish: str | None = None,
               lps: list | None = None, offset: int = 0) -> str:
        """One stream message: a chat delta or a completion text piece, with its tokens' log-probabilities."""
        described = self.engine.describe(lps) if lps is not None else None
        if kind == "chat":
            delta = Delta(role="assistant", content="") if piece is None and finish is None else Delta(content=piece)
            choice = ChatChunkChoice(delta=delta, finish_reason=finish,
                                     logprobs=chat_logprobs(described) if described is not None else None)
            return sse(ChatChunk(id=cid, created=created, model=model, choices=[choice]))
        choice = PieceChoice(text=piece or "", finish_reason=finish,
                             logprobs=completion_logprobs(described, offset) if described is not None else None)
        return sse(CompletionChunk(id=cid, created=created, model=model, choices=[choice]))

    async def _stream(self, gen: GenRequest, kind: str, model: str, with_usage: bool,
                      offset: int = 0) -> AsyncIterator[str]:
        cid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())  # when this answer was made (every chunk carries it), as OpenAI's streams do
        cancelled = threading.Event()
        pieces, thread, result = self._start_stream(gen, cancelled)
        stops = gen.stops
        self.active_streams += 1
        sent = ""
        finish = "length"
        completed = failed = False
        given = 0  # tokens whose log-probabilities have been sent

        def lps(n: int | None) -> list | None:
            nonlocal given
            if gen.logprobs is None or n is None:
                return None
            out, given = result.get("logprobs", [])[given:n], n
            return out

        try:
            if kind == "chat":
                yield self._chunk(cid, created, kind, model, None)
            held: list[tuple[str, int | None]] = []  # pieces not sent yet: their text may begin a stop string

            def release() -> str:
                """The held pieces as one stream message, with their tokens' log-probabilities."""
                nonlocal sent, held
                whole = sent + "".join(p for p, _ in held)
                chunk = self._chunk(cid, created, kind, model, whole[len(sent):], None, lps(held[-1][1]),
                                    offset + len(sent))
                sent, held = whole, []
                return chunk

            async for piece, n in pieces:
                if not piece:
                    continue
                held.append((piece, n))
                whole = sent + "".join(p for p, _ in held)
                stop_at = stops.find(whole)
                if stop_at >= 0:  # the text up to it, with the tokens up to the one that completes that text
                    upto, end = None, len(sent)
                    for p, k in held:
                        upto, end = k, end + len(p)
                        if end >= stop_at:
                            break
                    if stop_at > len(sent):
                        yield self._chunk(cid, created, kind, model, whole[len(sent):stop_at], None, lps(upto),
                                          offset + len(sent))
                    sent, finish = whole[:stop_at], "stop"
                    cancelled.set()
                    break
                if not stops.may_begin(whole):
                    yield release()
            if held and finish != "stop":  # the end came while text was held back for a stop string that never came
                yield release()
            if finish != "stop":
                await asyncio.to_thread(thread.join, 30)
                if "error" in result:
                    raise result["error"]
                done = self.engine._finish(gen, result.get("ids", []))
                finish, n_completion = done.finish_reason, done.completion_tokens
            else:
                n_completion = await asyncio.to_thread(self.engine.count_tokens, sent)
            yield self._chunk(cid, created, kind, model, "" if kind == "text" else None, finish)
            if with_usage:
                counts = usage(len(gen.input_ids), n_completion)
                yield sse((ChatChunk if kind == "chat" else CompletionChunk)(id=cid, created=created, model=model,
                                                                             choices=[], usage=counts))
            yield "data: [DONE]\n\n"
            completed = True
        except Exception:  # the 200 is sent: the failure is the stream's last event (the openai client raises it)
            log.exception("a stream failed")
            failed = True
            yield f"data: {json.dumps(error_body(STREAM_FAILED, 'internal_error', type_='server_error'))}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # client gone (cancelled) or done: stop generating, free the slot
            cancelled.set()
            self.active_streams -= 1
            self.cancelled_streams += 0 if completed or failed else 1
            self.failed_streams += 1 if failed else 0
            await asyncio.to_thread(thread.join, 30)

    def _complete(self, kind: str, model: str, res: GenResult, offset: int = 0) -> ChatCompletion | Completion:
        counts = usage(res.prompt_tokens, res.completion_tokens)
        described = self.engine.describe(res.logprobs) if res.logprobs is not None else None
        if kind == "chat":
            choice = ChatChoice(message=AssistantMessage(content=res.text), finish_reason=res.finish_reason,
                                logprobs=chat_logprobs(described) if described is not None else None)
            return ChatCompletion(id=f"chatcmpl-{uuid.uuid4().hex[:24]}", created=int(time.time()), model=model,
                                  choices=[choice], usage=counts)
        choice = CompletionChoice(text=res.text, finish_reason=res.finish_reason,
                                  logprobs=completion_logprobs(described, offset) if described is not None else None)
        return Completion(id=f"cmpl-{uuid.uuid4().hex[:24]}", created=int(time.time()), model=model, choices=[choice],
                          usage=counts)

    # -- routes

    @app.get("/", response_class=HTMLResponse)
    async def playground(self) -> HTMLResponse:
        """The playground page. No key needed: it holds no secret, and its API calls send the key typed into it."""
        return HTMLResponse(PLAYGROUND, headers=PLAYGROUND_HEADERS)

    @app.get("/health")
    async def health(self) -> dict:
        """For load balancers and probes: the replica is up, nothing more (no key needed, nothing to learn)."""
        return {"status": "ok"}

    @app.get("/v1/stats")
    async def stats(self, request: Request) -> dict:
        """This replica's counters, behind the API key like the model routes."""
        self._check_auth(request)
        b = self.engine.batcher
        return {"active_streams": self.active_streams, "cancelled_streams": self.cancelled_streams,
                "failed_streams": self.failed_streams,
                "batches": self.batches, "batched_requests": self.batched_requests,
                "continuous_batching": b is not None, "running": b.running if b else None,
                "most_running": b.most_running if b else None,
                "prefill_forwards": b.prefills if b else None, "prefilled_requests": b.prefilled if b else None,
                "decoded_tokens": b.decoded if b else None,
                "prefix_cache": {"prompts": b.prefixes.hits, "tokens_reused": b.prefixes.reused,
                                 "entries": len(b.prefixes.entries), "tokens_held": b.prefixes.tokens} if b else None}

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict:
        self._check_auth(request)
        return ModelList(data=[Model(id=self.s.model_name, created=self.created)]).model_dump()

    @app.post("/v1/chat/completions")
    async def chat(self, request: Request):
        self._check_auth(request)
        req = await self._body(request, ChatRequest)
        messages = [m.as_template_dict(f"messages[{i}]") for i, m in enumerate(req.messages)]
        return await self._answer(req, "chat", await asyncio.to_thread(self._chat_ids, messages))

    def _chat_ids(self, messages: list[dict]) -> list[int]:
        """The prompt's ids; what the model's chat template refuses (raise_exception: roles that do not
        alternate, a system turn it has no place for) is the request's fault, a 400 with the template's words."""
        from jinja2 import TemplateError

        try:
            return self.engine.chat_ids(messages)
        except TemplateError as e:
            raise APIError(400, f"the model's chat template refused these messages: {e}", "invalid_value",
                           "messages") from None

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        self._check_auth(request)
        req = await self._body(request, CompletionRequest)
        return await self._answer(req, "text", await asyncio.to_thread(self.engine.text_ids, req.prompt),
                                  offset=len(req.prompt))

    async def _answer(self, req: _Common, kind: str, input_ids: list[int], offset: int = 0):
        gen = self._gen_request(req, input_ids)
        if req.stream:
            with_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._stream(gen, kind, req.model, with_usage, offset),
                                     media_type="text/event-stream")
        return JSONResponse(self._complete(kind, req.model, await self._generate(gen), offset).model_dump(mode="json"))
