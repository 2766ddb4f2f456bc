"""Ray Serve deployment: an OpenAI-compatible HTTP API for a trained model.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``, ``GET /health``.
Non-streaming requests are batched dynamically (``@serve.batch``) and generated together with left
padding; streaming requests are generated token by token (Server-Sent Events) and stop as soon as the
client goes away. Bad requests get an OpenAI-style error body and a 4xx; the replica keeps serving.
This is the transformers backend (CPU and GPU); on GPU clusters ``serve.backend=vllm`` uses ray.serve.llm.
"""

# no `from __future__ import annotations`: Serve's FastAPI class views need real annotation objects

import asyncio
import hashlib
import hmac
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

log = logging.getLogger("sft_ray.serve")


# ----------------------------------------------------------------------------- request schema (OpenAI)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        """OpenAI content parts ([{type: text, text: ...}]) flattened; this backend is text-only."""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.get("text", "") for p in self.content if p.get("type") == "text")


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (e.g. user)
    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1)


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(_Common):
    prompt: str = Field(min_length=1)


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str, param: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.type = status, message, code, param, type_


def error_body(message: str, code: str, param: str | None = None, type_: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# ----------------------------------------------------------------------------- generation engine


@dataclass
class GenRequest:
    input_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int | None

    def group_key(self) -> tuple:
        """Requests that can share one ``generate`` call (seeded sampling runs alone)."""
        greedy = self.temperature == 0
        return (greedy, None if greedy else (self.temperature, self.top_p, self.seed, id(self) if self.seed is not None else None))


@dataclass
class GenResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


class Engine:
    """A transformers model answering batches of prompts; no Serve or HTTP in here."""

    def __init__(self, model_dir: str, trust_remote_code: bool = False, base_model: str | None = None):
        import torch

        from sft_ray.modeling import load_for_inference

        self.torch = torch
        self.model, self.tok = load_for_inference(model_dir, trust_remote_code, base_model)
        self.device = self.model.device
        cfg = self.model.config.get_text_config()
        self.context_length = int(getattr(cfg, "max_position_embeddings", 2048))
        self.eos_ids = {self.tok.eos_token_id}
        gen_eos = self.model.generation_config.eos_token_id if self.model.generation_config else None
        self.eos_ids |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
        self.eos_ids.discard(None)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def text_ids(self, prompt: str) -> list[int]:
        return self.tok(prompt, add_special_tokens=True)["input_ids"]

    def _gen_kwargs(self, r: GenRequest, max_new: int) -> dict[str, Any]:
        kw: dict[str, Any] = dict(max_new_tokens=max_new, pad_token_id=self.tok.pad_token_id,
                                  eos_token_id=sorted(self.eos_ids))
        if r.temperature == 0:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kw.update(do_sample=True, temperature=r.temperature, top_p=r.top_p, top_k=None)
        return kw

    def _finish(self, r: GenRequest, ids: list[int]) -> GenResult:
        """Cut at end-of-sequence, the request's own max_tokens, and its stop strings."""
        reason = "length"
        for i, t in enumerate(ids):
            if t in self.eos_ids:
                ids, reason = ids[:i], "stop"
                break
        if len(ids) >= r.max_tokens:
            ids, reason = ids[: r.max_tokens], "length" if reason != "stop" or len(ids) > r.max_tokens else reason
        text = self.tok.decode(ids, skip_special_tokens=True)
        n = len(ids)
        cut = min((text.find(s) for s in r.stop if s and s in text), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
            n = len(self.tok(text, add_special_tokens=False)["input_ids"])
        return GenResult(text=text, prompt_tokens=len(r.input_ids), completion_tokens=n, finish_reason=reason)

    def generate(self, reqs: list[GenRequest]) -> list[GenResult]:
        """Generate for several requests, batching those with the same sampling settings."""
        torch = self.torch
        results: list[GenResult | None] = [None] * len(reqs)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(reqs):
            groups.setdefault(r.group_key(), []).append(i)
        for idx in groups.values():
            batch = [reqs[i] for i in idx]
            width = max(len(r.input_ids) for r in batch)
            pad = self.tok.pad_token_id
            input_ids = torch.tensor([[pad] * (width - len(r.input_ids)) + r.input_ids for r in batch])
            attn = torch.tensor([[0] * (width - len(r.input_ids)) + [1] * len(r.input_ids) for r in batch])
            if batch[0].seed is not None:
                torch.manual_seed(batch[0].seed)
            with torch.inference_mode():
                out = self.model.generate(
                    input_ids=input_ids.to(self.device), attention_mask=attn.to(self.device),
                    **self._gen_kwargs(batch[0], max(r.max_tokens for r in batch)),
                )
            for j, i in enumerate(idx):
                results[i] = self._finish(reqs[i], out[j, width:].tolist())
        return results  # type: ignore[return-value]

    def stream(self, r: GenRequest, cancelled: threading.Event):
        """Yield text pieces as they are generated; stops early when ``cancelled`` is set."""
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        torch = self.torch

        class _Cancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kw):
                return cancelled.is_set()

        streamer = TextIteratorStreamer(self.tok, skip_prompt=True, skip_special_tokens=True)
        ids = torch.tensor([r.input_ids], device=self.device)
        kwargs = self._gen_kwargs(r, r.max_tokens)
        result: dict[str, Any] = {}

        def run():
            try:
                if r.seed is not None:
                    torch.manual_seed(r.seed)
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


# ----------------------------------------------------------------------------- HTTP app


app = FastAPI(title="sft-ray", docs_url=None, redoc_url=None)


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


def _sse(cid: str, kind: str, model: str, created: int, delta: str | dict | None, finish: str | None = None) -> str:
    if kind == "chat":
        d = delta if isinstance(delta, dict) else ({"content": delta} if delta is not None else {})
        chunk = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                 "choices": [{"index": 0, "delta": d, "finish_reason": finish, "logprobs": None}]}
    else:
        chunk = {"id": cid, "object": "text_completion", "created": created, "model": model,
                 "choices": [{"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}]}
    return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"


@dataclass
class ServeSettings:
    model_name: str
    max_tokens_limit: int = 512
    default_max_tokens: int = 128
    max_batch_size: int = 8
    batch_wait_s: float = 0.1
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
        self.engine = Engine(model_dir, self.s.trust_remote_code, self.s.base_model)
        self.created = int(time.time())
        self.active_streams = 0
        self.cancelled_streams = 0  # streams ended early because the client went away
        self.batches = 0
        self.batched_requests = 0
        self._batched.set_max_batch_size(self.s.max_batch_size)
        self._batched.set_batch_wait_timeout_s(self.s.batch_wait_s)

    # -- helpers

    def _check_auth(self, request: Request) -> None:
        if not self.s.api_key_sha256:
            return
        header = request.headers.get("authorization", "")
        given = header[7:].strip() if header.lower().startswith("bearer ") else ""
        digest = hashlib.sha256(given.encode()).hexdigest()
        if not given or not hmac.compare_digest(digest, self.s.api_key_sha256):
            raise APIError(401, "invalid or missing API key (Authorization: Bearer ...)", "invalid_api_key")

    async def _body(self, request: Request, schema: type[BaseModel]):
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.s.max_body_bytes:
            raise APIError(413, f"request body over {self.s.max_body_bytes} bytes", "request_too_large")
        raw = await request.body()
        if len(raw) > self.s.max_body_bytes:
            raise APIError(413, f"request body over {self.s.max_body_bytes} bytes", "request_too_large")
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise APIError(400, "request body is not valid JSON", "invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "request body must be a JSON object", "invalid_json")
        try:
            return schema.model_validate(data)
        except Exception as e:  # pydantic.ValidationError
            err = e.errors()[0] if hasattr(e, "errors") else {}
            param = ".".join(str(p) for p in err.get("loc", [])) or None
            raise APIError(400, f"{param or 'body'}: {err.get('msg', str(e))}", "invalid_value", param) from None

    def _gen_request(self, req: _Common, input_ids: list[int]) -> GenRequest:
        if req.model != self.s.model_name:
            raise APIError(404, f"model {req.model!r} does not exist; this server serves {self.s.model_name!r}",
                           "model_not_found", "model")
        max_tokens = req.max_completion_tokens or req.max_tokens or self.s.default_max_tokens
        if max_tokens > self.s.max_tokens_limit:
            raise APIError(400, f"max_tokens={max_tokens} is above this server's limit of {self.s.max_tokens_limit}",
                           "max_tokens_too_large", "max_tokens")
        if len(input_ids) + max_tokens > self.engine.context_length:
            raise APIError(400, f"the prompt is {len(input_ids)} tokens; with max_tokens={max_tokens} that exceeds the "
                                f"model's context of {self.engine.context_length} tokens",
                           "context_length_exceeded", "messages")
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        return GenRequest(input_ids, max_tokens, req.temperature, req.top_p, stop, req.seed)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.1)  # both reset from the config in __init__
    async def _batched(self, reqs: list[GenRequest]) -> list[GenResult]:
        # in a thread: the event loop keeps accepting requests (the next batch) and serving streams
        self.batches += 1
        self.batched_requests += len(reqs)
        return await asyncio.to_thread(self.engine.generate, reqs)

    async def _stream(self, gen: GenRequest, kind: str, model: str) -> AsyncIterator[str]:
        cid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        cancelled = threading.Event()
        streamer, thread, result = self.engine.stream(gen, cancelled)
        self.active_streams += 1
        sent = ""
        finish = "length"
        completed = False
        try:
            if kind == "chat":
                yield _sse(cid, kind, model, self.created, {"role": "assistant", "content": ""})
            it = iter(streamer)
            while True:
                piece = await asyncio.to_thread(next, it, None)
                if piece is None:
                    break
                if not piece:
                    continue
                stop_at = min(((sent + piece).find(s) for s in gen.stop if s and s in sent + piece), default=-1)
                if stop_at >= 0:
                    piece, finish = (sent + piece)[len(sent):stop_at], "stop"
                    if piece:
                        yield _sse(cid, kind, model, self.created, piece)
                    cancelled.set()
                    break
                sent += piece
                yield _sse(cid, kind, model, self.created, piece)
            if finish != "stop":
                await asyncio.to_thread(thread.join, 30)
                if "error" in result:
                    raise result["error"]
                finish = self.engine._finish(gen, result.get("ids", [])).finish_reason
            yield _sse(cid, kind, model, self.created, None, finish)
            yield "data: [DONE]\n\n"
            completed = True
        finally:  # client gone (cancelled) or done: stop generating, free the slot
            cancelled.set()
            self.active_streams -= 1
            self.cancelled_streams += 0 if completed else 1
            await asyncio.to_thread(thread.join, 30)

    def _complete(self, kind: str, model: str, res: GenResult) -> dict:
        usage = {"prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens,
                 "total_tokens": res.prompt_tokens + res.completion_tokens}
        if kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": res.text},
                      "finish_reason": res.finish_reason, "logprobs": None}
            return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
                    "model": model, "choices": [choice], "usage": usage}
        choice = {"index": 0, "text": res.text, "finish_reason": res.finish_reason, "logprobs": None}
        return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": model, "choices": [choice], "usage": usage}

    # -- routes

    @app.get("/health")
    async def health(self) -> dict:
        return {"status": "ok", "model": self.s.model_name, "active_streams": self.active_streams,
                "cancelled_streams": self.cancelled_streams, "batches": self.batches,
                "batched_requests": self.batched_requests}

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict:
        self._check_auth(request)
        return {"object": "list", "data": [{"id": self.s.model_name, "object": "model", "created": self.created,
                                            "owned_by": "sft-ray"}]}

    @app.post("/v1/chat/completions")
    async def chat(self, request: Request):
        self._check_auth(request)
        req = await self._body(request, ChatRequest)
        gen = self._gen_request(req, self.engine.chat_ids([{"role": m.role, "content": m.text()} for m in req.messages]))
        if req.stream:
            return StreamingResponse(self._stream(gen, "chat", req.model), media_type="text/event-stream")
        return self._complete("chat", req.model, await self._batched(gen))

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        self._check_auth(request)
        req = await self._body(request, CompletionRequest)
        gen = self._gen_request(req, self.engine.text_ids(req.prompt))
        if req.stream:
            return StreamingResponse(self._stream(gen, "text", req.model), media_type="text/event-stream")
        return self._complete("text", req.model, await self._batched(gen))


def build(model_dir: str, serve_cfg, trust_remote_code: bool = False, api_key: str | None = None):
    """The Serve application for ``model_dir`` (replicas, autoscaling and resources from the config)."""
    from pathlib import Path

    settings = ServeSettings(
        model_name=serve_cfg.model_name or Path(model_dir).name,
        max_tokens_limit=serve_cfg.max_tokens_limit,
        default_max_tokens=serve_cfg.default_max_tokens,
        max_batch_size=serve_cfg.max_batch_size,
        batch_wait_s=serve_cfg.batch_wait_s,
        max_body_bytes=serve_cfg.max_body_bytes,
        # only a hash of the key travels to the replicas (and so into Serve's config and logs)
        api_key_sha256=hashlib.sha256(api_key.encode()).hexdigest() if api_key else None,
        trust_remote_code=trust_remote_code,
        base_model=serve_cfg.base_model,
    )
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": serve_cfg.cpus_per_replica, "num_gpus": serve_cfg.gpus_per_replica},
    }
    if serve_cfg.max_replicas > serve_cfg.min_replicas:
        options["autoscaling_config"] = {"min_replicas": serve_cfg.min_replicas, "max_replicas": serve_cfg.max_replicas,
                                         "target_ongoing_requests": serve_cfg.max_batch_size}
    else:
        options["num_replicas"] = serve_cfg.min_replicas
    return OpenAIServer.options(**options).bind(model_dir, settings.__dict__)


def app_builder(args: dict[str, str]):
    """Entry for Serve config files: ``import_path: sft_ray.serve:app_builder`` with ``args: {model_dir: ...}``.

    Other args are ``serve.*`` config keys (e.g. ``max_tokens_limit: 256``); the API key is read from the
    environment variable named by ``api_key_env``, and the build fails when that variable is unset or empty.
    """
    from sft_ray.config import ServeConfig

    args = dict(args)
    model_dir = args.pop("model_dir")
    trust = str(args.pop("trust_remote_code", "false")).lower() == "true"
    cfg = ServeConfig.model_validate(args)
    return build(model_dir, cfg, trust, api_key_from_env(cfg))


def api_key_from_env(serve_cfg) -> str | None:
    """The API key named by ``api_key_env``, for every way of starting the app (CLI, config file). Fails closed:
    a config that names a key variable never serves without a key."""
    import os

    from sft_ray.config import ConfigError

    if not serve_cfg.api_key_env:
        return None
    key = os.environ.get(serve_cfg.api_key_env, "").strip()
    if not key:
        raise ConfigError(f"api_key_env names {serve_cfg.api_key_env!r}, which is unset or empty where the app is "
                          "built; set it (on a cluster, e.g. in the application's runtime_env), or leave "
                          "api_key_env out to serve without authentication")
    return key


def build_vllm(model_dir: str, serve_cfg, trust_remote_code: bool = False):
    """GPU clusters: vLLM through ray.serve.llm's OpenAI app (``pip install sft-ray[vllm]``)."""
    try:
        from ray.serve.llm import LLMConfig, build_openai_app
    except ImportError as e:  # vllm missing
        raise RuntimeError("serve.backend=vllm needs vLLM on a GPU node: pip install 'sft-ray[vllm]'") from e
    from pathlib import Path

    deployment: dict[str, Any] = {"autoscaling_config": {"min_replicas": serve_cfg.min_replicas,
                                                         "max_replicas": serve_cfg.max_replicas}}
    llm = LLMConfig(
        model_loading_config={"model_id": serve_cfg.model_name or Path(model_dir).name, "model_source": model_dir},
        deployment_config=deployment,
        engine_kwargs={"trust_remote_code": trust_remote_code, "max_num_seqs": max(serve_cfg.max_batch_size, 8)},
    )
    return build_openai_app({"llm_configs": [llm]})


def start(model_dir: str, cfg, api_key: str | None = None) -> str:
    """Deploy on the Ray cluster (local if none) and return the OpenAI base URL."""
    from pathlib import Path

    from sft_ray.modeling import is_model_dir, resolve_model_path
    from sft_ray.cluster import init_ray

    sc = cfg.serve
    model_dir = resolve_model_path(model_dir)
    if not is_model_dir(model_dir):
        raise FileNotFoundError(f"{model_dir}: not a model folder (no config.json) nor a LoRA adapter "
                                "(no adapter_config.json)")
    if sc.backend == "vllm" and not Path(model_dir, "config.json").is_file():
        raise RuntimeError("serve.backend=vllm serves full models: export with export.merge_lora=true, "
                           "or use the transformers backend for an adapter")
    init_ray(cfg)
    serve.start(http_options={"host": sc.host, "port": sc.port})
    if sc.backend == "vllm":
        if sc.api_key_env:
            raise RuntimeError("serve.api_key_env is implemented by the transformers backend only")
        application = build_vllm(model_dir, sc, cfg.model.trust_remote_code)
    else:
        application = build(model_dir, sc, cfg.model.trust_remote_code, api_key)
    serve.run(application, name="sft-ray", route_prefix="/", blocking=False)
    return f"http://{sc.host}:{sc.port}/v1"
