"""The front door every backend shares: the API key, the body limit, and the max_tokens limit and default.

The transformers app checks these inside its routes (``app.py``); vLLM's app (ray.serve.llm's OpenAI ingress) has
no such checks, so there they run as ``Guard``, an ASGI middleware put in front of the ingress's routes
(``deploy.build_vllm``): it reads the body itself, at most ``max_body_bytes`` of it whether or not a length is
declared, checks it, and hands the ingress the same bytes (with ``max_tokens`` filled in when the request has
none, so that vLLM does not generate up to the whole context).
"""

# no `from __future__ import annotations` needed: nothing here is read by FastAPI

import hashlib
import hmac
import json
from typing import Any

from sft_ray.serve.protocol import MAX_JSON_DEPTH, APIError, _depth, error_body

GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")


def bearer_ok(authorization: str, key_sha256: str | None) -> bool:
    """True without a key configured; else the header must be ``Bearer KEY`` (compared by hash, in constant time)."""
    if not key_sha256:
        return True
    given = authorization[7:].strip() if authorization.lower().startswith("bearer ") else ""
    return bool(given) and hmac.compare_digest(hashlib.sha256(given.encode()).hexdigest(), key_sha256)


def unauthorized() -> APIError:
    return APIError(401, "invalid or missing API key (Authorization: Bearer ...)", "invalid_api_key")


def too_large(limit: int) -> APIError:
    return APIError(413, f"request body over {limit} bytes", "request_too_large")


def check_max_tokens(max_tokens: int, limit: int) -> int:
    if max_tokens > limit:
        raise APIError(400, f"max_tokens={max_tokens} is above this server's limit of {limit}",
                       "max_tokens_too_large", "max_tokens")
    return max_tokens


async def read_capped(declared: str, chunks, limit: int) -> bytes:
    """A body read chunk by chunk and cut off past ``limit`` bytes: a declared Content-Length over it is refused
    first, and a chunked body (no length to check) as soon as it passes it; the rest never reaches memory."""
    if declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > limit:
            raise too_large(limit)
    return bytes(body)


class Guard:
    """ASGI middleware: key, body limit and max_tokens for an app that has none of its own."""

    def __init__(self, app, key_sha256: str | None = None, max_body_bytes: int = 1_000_000,
                 max_tokens_limit: int = 512, default_max_tokens: int = 128, open_paths: tuple[str, ...] = ("/health",)):
        self.app, self.key, self.limit = app, key_sha256, max_body_bytes
        self.max_tokens_limit, self.default_max_tokens, self.open_paths = max_tokens_limit, default_max_tokens, open_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        try:
            path = scope["path"].rstrip("/")  # under a route prefix the path ends with the route's own
            if not path.endswith(self.open_paths) and not bearer_ok(headers.get("authorization", ""), self.key):
                raise unauthorized()
            if scope["method"] != "POST":
                return await self.app(scope, receive, send)
            body = await self._read(headers, receive)
            if body is None:  # the client went away
                return
            new = self._checked(body, path)
        except APIError as e:
            return await _reply(scope, receive, send, e)
        if new is not body:
            scope = dict(scope, headers=[(k, v) for k, v in scope["headers"]
                                         if k.lower() not in (b"content-length", b"transfer-encoding")]
                         + [(b"content-length", str(len(new)).encode())])
        await self.app(scope, _replay(new, receive), send)

    async def _read(self, headers: dict[str, str], receive) -> bytes | None:
        gone = False

        async def chunks():
            nonlocal gone
            more = True
            while more:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    gone = True
                    return
                yield msg.get("body", b"")
                more = msg.get("more_body", False)

        body = await read_capped(headers.get("content-length", ""), chunks(), self.limit)
        return None if gone else body

    def _checked(self, body: bytes, path: str) -> bytes:
        """The body to hand on: as it came, or with the default max_tokens; APIError for what is refused here.
        What is not JSON passes unchanged (the app behind says why it is a bad request)."""
        try:
            data: Any = json.loads(body)
        except RecursionError:
            raise APIError(400, f"request body is nested more than {MAX_JSON_DEPTH} levels deep", "invalid_json") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            return body
        except ValueError as e:  # valid JSON Python will not read (an integer of thousands of digits)
            raise APIError(400, f"request body cannot be read: {e}", "invalid_json") from None
        if not isinstance(data, dict):
            return body
        if _depth(data, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
            raise APIError(400, f"request body is nested more than {MAX_JSON_DEPTH} levels deep", "invalid_json")
        asked = {k: data[k] for k in ("max_tokens", "max_completion_tokens") if data.get(k) is not None}
        for k, v in asked.items():
            if not isinstance(v, int) or isinstance(v, bool):  # "100000" or 1e5 would pass lax parsing behind
                raise APIError(400, f"{k} must be an integer, got {json.dumps(v)}", "invalid_value", k)
            check_max_tokens(v, self.max_tokens_limit)
        check_sequences(data)
        if asked or not path.endswith(GENERATION_PATHS):
            return body
        return json.dumps({**data, "max_tokens": self.default_max_tokens}).encode()


MAX_SEQUENCES = 16  # answers one request may ask vLLM for: n (or best_of) x prompts


def check_sequences(data: dict) -> None:
    """``max_tokens`` bounds one answer; ``n``, ``best_of`` and a list of prompts multiply it."""
    for k in ("n", "best_of"):
        v = data.get(k)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise APIError(400, f"{k} must be a positive integer, got {json.dumps(v)}", "invalid_value", k)
    prompt = data.get("prompt")
    prompts = len(prompt) if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else 1
    each = max(data.get("n") or 1, data.get("best_of") or 1)
    if each * prompts > MAX_SEQUENCES:
        param = "prompt" if prompts > 1 else ("best_of" if (data.get("best_of") or 1) >= each else "n")
        raise APIError(400, f"this request asks for {each * prompts} answers ({prompts} prompt(s) x {each}); this "
                            f"server generates at most {MAX_SEQUENCES} per request", "invalid_value", param)


def _replay(body: bytes, receive):
    """The ASGI receive channel with the body already read: the body once, then whatever the client sends next
    (a disconnect)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _reply(scope, receive, send, e: APIError) -> None:
    from starlette.responses import JSONResponse

    await JSONResponse(error_body(e.message, e.code, e.param, e.type), status_code=e.status)(scope, receive, send)
