"""The HTTP server of ``charlm serve``: OpenAI's completions API (so the official clients work
unchanged), ``/v1/models``, ``/health`` and the charlm page at ``/``; a Starlette app run by
uvicorn. Every request is checked and bounded before it reaches a model; every error is one
JSON object in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, and never
a traceback. No request field names a file.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import math
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from charlm.errors import CharlmError, ConfigError, printable
from charlm.extras import require

require("starlette", "serve", "charlm serve")
require("uvicorn", "serve", "charlm serve")

import uvicorn  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import HTMLResponse, JSONResponse, Response  # noqa: E402
from starlette.routing import Route  # noqa: E402

from charlm.sampling.draws import fresh_seed, stream_keys  # noqa: E402
from charlm.sampling.options import start_ids  # noqa: E402
from charlm.serving.batcher import Batcher, Busy, Stream  # noqa: E402
from charlm.serving.models import Served  # noqa: E402

MAX_STOPS = 4  # as OpenAI's API
MAX_STOP_CHARS = 64
MAX_PROMPTS = 64  # strings in a list prompt
DEFAULT_MAX_TOKENS = 500  # as charlm sample --length
DEFAULT_TEMPERATURE = 0.8  # as charlm sample
STREAM_INTERVAL = 0.01  # seconds: a streamed response sends at most one chunk per interval
IGNORED = {"user", "stream_options", "logit_bias", "suffix", "best_of", "logprobs",
           "presence_penalty", "frequency_penalty"}


@dataclass
class Limits:
    """What one request, and the server, may ask for (each a ``charlm serve`` option)."""

    max_body_bytes: int = 1 << 20
    max_prompt_chars: int = 8192
    max_tokens: int = 4096
    max_n: int = 16  # choices per request (prompts x n)
    max_streams: int = 256  # stepped together, per model
    max_queue: int = 1024  # waiting for a place, per model
    timeout: float = 300.0  # seconds per request

    def check(self) -> None:
        for name, value, low, high in (
            ("--max-body-bytes", self.max_body_bytes, 1024, 1 << 30),
            ("--max-prompt-chars", self.max_prompt_chars, 1, 1 << 24),
            ("--max-tokens", self.max_tokens, 1, 10_000_000),
            ("--max-n", self.max_n, 1, 4096),
            ("--max-streams", self.max_streams, 1, 65536),
            ("--max-queue", self.max_queue, 0, 1 << 20),
            ("--timeout", self.timeout, 0.001, 7 * 86400),
        ):
            if not low <= value <= high:
                raise ConfigError(f"{name} must be in [{low}, {high}]; got {value}")


class ApiError(Exception):
    """An error answered as OpenAI's JSON error object."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
             405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
             500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(error_body(self.status, self.message, self.param, self.code),
                            self.status, headers=headers)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": ApiError.TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


# ------------------------------------------------------------------------ request checks
def _shown(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return printable(text[:40] + ("..." if len(text) > 40 else ""))


def _type_error(name: str, want: str, value: Any) -> ApiError:
    return ApiError(400, f"{name} must be {want}; got {_shown(value)}", name, "invalid_type")


def _int(body: dict, name: str, default: int | None, low: int, high: int, hint: str = "") -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or (
            isinstance(value, float) and not value.is_integer()):
        raise _type_error(name, "an integer", value)
    if not low <= value <= high:
        raise ApiError(400, f"{name} must be in [{low}, {high}]{hint}; got {value}", name,
                       "out_of_range")
    return int(value)


def _number(body: dict, name: str, default: float, low: float, high: float,
            low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _type_error(name, "a number", value)
    if not (low < value if low_open else low <= value) or value > high:
        raise ApiError(400, f"{name} must be in {'(' if low_open else '['}{low:g}, {high:g}]; "
                       f"got {value}", name, "out_of_range")
    return float(value)


def _bool(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _type_error(name, "true or false", value)
    return value


@dataclass
class Completion:
    """A checked completions request."""

    served: Served
    prompts: list[str]
    prompt_ids: list[list[int]]
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    n: int
    stops: list[str]
    stream: bool
    seed: int | None
    echo: bool


def parse_completion(body: Any, models: dict[str, Served], limits: Limits) -> Completion:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", None, "invalid_body")
    name = body.get("model")
    if name is None and len(models) == 1:
        name = next(iter(models))
    if not isinstance(name, str):
        raise _type_error("model", "the name of a served model (GET /v1/models)", name)
    served = models.get(name)
    if served is None:
        raise ApiError(404, f"the model {_shown(name)} is not served here; the models are: "
                       f"{', '.join(models)}", "model", "model_not_found")
    vocab = served.model.vocab
    prompt = body.get("prompt", "")
    if prompt is None:
        prompt = ""
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    else:
        raise _type_error("prompt", "a string or a non-empty list of strings (charlm takes text, "
                          "not token ids)", prompt)
    if len(prompts) > MAX_PROMPTS:
        raise ApiError(400, f"prompt may hold at most {MAX_PROMPTS} strings; got {len(prompts)}",
                       "prompt", "out_of_range")
    for p in prompts:
        if len(p) > limits.max_prompt_chars:
            raise ApiError(400, f"a prompt may be at most {limits.max_prompt_chars:,} characters "
                           f"(--max-prompt-chars); got {len(p):,}", "prompt", "prompt_too_long")
    drop_unknown = _bool(body, "drop_unknown")
    prompt_ids = []
    for i, p in enumerate(prompts):
        missing = vocab.unknown_chars(p) if p else []
        if missing and not drop_unknown:
            shown = ", ".join(printable(repr(c)) for c in missing[:20])
            raise ApiError(400, f"the prompt has characters not in the model's vocabulary: {shown}; "
                           'send "drop_unknown": true to drop them', "prompt", "unknown_characters")
        if missing:
            gone = set(missing)
            p = prompts[i] = "".join(c for c in p if c not in gone)
        prompt_ids.append(vocab.encode(p).tolist() if p else [])
    max_tokens = _int(body, "max_tokens", min(DEFAULT_MAX_TOKENS, limits.max_tokens), 0,
                      limits.max_tokens, " (--max-tokens)")
    temperature = _number(body, "temperature", DEFAULT_TEMPERATURE, 0.0, 100.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
    top_k = _int(body, "top_k", 0, 0, 1 << 30)
    n = _int(body, "n", 1, 1, limits.max_n, " (--max-n)")
    if n * len(prompts) > limits.max_n:
        raise ApiError(400, f"n x prompts is {n * len(prompts)} texts; at most {limits.max_n} "
                       "per request (--max-n)", "n", "out_of_range")
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _type_error("stop", "a string or a list of strings", stop)
    if len(stops) > MAX_STOPS:
        raise ApiError(400, f"stop may hold at most {MAX_STOPS} texts; got {len(stops)}", "stop",
                       "out_of_range")
    for s in stops:
        if not 1 <= len(s) <= MAX_STOP_CHARS:
            raise ApiError(400, f"each stop text must be 1 to {MAX_STOP_CHARS} characters; got "
                           f"{len(s)}", "stop", "out_of_range")
    seed = _int(body, "seed", None, 0, 2**63 - 1)
    for name in ("logprobs", "suffix"):
        if body.get(name) not in (None, 0, ""):
            raise ApiError(400, f"{name} is not supported by charlm serve", name, "unsupported")
    if body.get("best_of") not in (None, 1):
        raise ApiError(400, "best_of is not supported by charlm serve (use n)", "best_of",
                       "unsupported")
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise ApiError(400, f"{name} is not supported by charlm serve", name, "unsupported")
    return Completion(served, prompts, prompt_ids, max_tokens, temperature, top_k, top_p, n,
                      stops, _bool(body, "stream"), seed, _bool(body, "echo"))


# --------------------------------------------------------------------------------- the app
class Server:
    """The state of a running server: its models, their batchers, limits and key."""

    def __init__(self, served: list[Served], limits: Limits, api_key: str | None = None,
                 log: Callable[[str], None] | None = None):
        self.models = {s.name: s for s in served}
        self.limits, self.log = limits, log
        self.api_key = api_key.encode() if api_key else None
        self.batchers: dict[str, Batcher] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        # Bound to a loopback address: only requests that name it (or localhost) are served,
        # so a web page cannot reach the server through a DNS name rebound to 127.0.0.1.
        self.loopback_only = False
        self.created = int(time.time())

    # lifespan
    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        for name, s in self.models.items():
            b = Batcher(s.model.network, s.model.vocab, self._deliver, self.limits.max_streams,
                        self.limits.max_queue, name)
            b.start()
            self.batchers[name] = b

    def stop(self) -> None:
        for b in self.batchers.values():
            b.close()

    def _deliver(self, events: list) -> None:
        """From a model's thread: hand a step's events to the event loop, in one call."""
        loop = self.loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(_dispatch, events)
        except RuntimeError:  # the loop closed meanwhile (shutdown)
            pass

    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.api_key):
            raise ApiError(401, "this server needs an API key: send the header "
                           "'Authorization: Bearer KEY' (the key of --api-key or CHARLM_API_KEY)",
                           None, "invalid_api_key")

    # routes
    async def health(self, request: Request) -> Response:
        load = {name: dict(zip(("running", "waiting"), b.load(), strict=True))
                for name, b in self.batchers.items()}
        return JSONResponse({"status": "ok", "models": list(self.models), "streams": load})

    def model_object(self, s: Served) -> dict:
        return {"id": s.name, "object": "model", "created": self.created, "owned_by": "charlm",
                **s.card}

    async def list_models(self, request: Request) -> Response:
        self.authorize(request)
        return JSONResponse({"object": "list",
                             "data": [self.model_object(s) for s in self.models.values()]})

    async def get_model(self, request: Request) -> Response:
        self.authorize(request)
        name = request.path_params["name"]
        if name not in self.models:
            raise ApiError(404, f"the model {_shown(name)} is not served here", "model",
                           "model_not_found")
        return JSONResponse(self.model_object(self.models[name]))

    async def page(self, request: Request) -> Response:
        from charlm import web

        models = [{"id": s.name, "card": {**s.card, "run": str(s.path)}}
                  for s in self.models.values()]
        html = web.page(PAGE_BACKEND, title="charlm serve", connect_src="'self'",
                        data={"charlm-server": {"models": models, "auth": self.api_key is not None}})
        return HTMLResponse(html, headers={"Cache-Control": "no-store",
                                           "X-Content-Type-Options": "nosniff"})

    async def read_json(self, request: Request) -> Any:
        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"the request body is larger than {limit:,} bytes "
                           "(--max-body-bytes)", None, "body_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"the request body is larger than {limit:,} bytes "
                               "(--max-body-bytes)", None, "body_too_large")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks).decode("utf-8"),
                              parse_constant=_no_constant)
        except (ValueError, RecursionError) as exc:
            detail = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8 JSON"
            raise ApiError(400, f"the request body is not valid JSON: {printable(str(detail))[:100]}",
                           None, "invalid_json") from None

    async def completions(self, request: Request) -> Response:
        self.authorize(request)
        body = await self.read_json(request)
        c = parse_completion(body, self.models, self.limits)
        batcher = self.batchers[c.served.name]
        vocab = c.served.model.vocab
        rid = "cmpl-" + secrets.token_hex(12)
        created = int(time.time())
        seed = fresh_seed() if c.seed is None else c.seed
        keys = stream_keys(seed, c.n)
        queue: asyncio.Queue = asyncio.Queue()
        deadline = time.monotonic() + self.limits.timeout
        streams = []
        for p, ids in enumerate(c.prompt_ids):
            warm_ids = start_ids(vocab, ids)
            for j in range(c.n):
                index = p * c.n + j
                s = Stream(warm_ids, int(keys[j]), c.max_tokens, c.temperature, c.top_k, c.top_p,
                           c.stops, _emitter(queue, index), deadline)
                streams.append(s)
        if c.max_tokens == 0:
            for i in range(len(streams)):
                queue.put_nowait((i, "", "length"))
        else:
            try:
                batcher.submit(streams)
            except Busy as exc:
                raise ApiError(429, f"the server is busy: {exc}; try again later", None,
                               "too_many_streams") from None
        state = request.scope.setdefault("state", {})
        usage_prompt = sum(len(ids) for ids in c.prompt_ids)
        echo = [c.prompts[i // c.n] if c.echo else "" for i in range(len(streams))]

        def cancel() -> None:
            if not streams[0].cancelled:
                for s in streams:
                    s.cancelled = True
                queue.put_nowait(_GONE)  # wakes the response: it ends at once

        if c.stream:
            return EventStream(self._events(c, rid, created, queue, streams, echo, state), cancel)
        texts = list(echo)
        finish: list[str | None] = [None] * len(streams)
        async with _watch_disconnect(request, cancel):
            while any(f is None for f in finish):
                index, text, fin = await queue.get()
                if index is None:
                    break
                texts[index] += text
                state["chars"] = state.get("chars", 0) + len(text)
                if fin is not None:
                    finish[index] = fin
        if request.scope.get("charlm_disconnected"):
            return Response(status_code=499)
        _raise_for(finish)
        generated = sum(s.generated for s in streams)
        return JSONResponse({
            "id": rid, "object": "text_completion", "created": created, "model": c.served.name,
            "choices": [{"text": texts[i], "index": i, "logprobs": None, "finish_reason": finish[i]}
                        for i in range(len(streams))],
            "usage": {"prompt_tokens": usage_prompt, "completion_tokens": generated,
                      "total_tokens": usage_prompt + generated},
        })

    async def _events(self, c: Completion, rid: str, created: int, queue: asyncio.Queue,
                      streams: list[Stream], echo: list[str], state: dict) -> AsyncIterator[bytes]:
        def chunk(index: int, text: str, finish: str | None) -> bytes:
            return _sse({"id": rid, "object": "text_completion", "created": created,
                         "model": c.served.name, "choices": [
                             {"text": text, "index": index, "logprobs": None,
                              "finish_reason": finish}]})

        for i, text in enumerate(echo):
            if text:
                yield chunk(i, text, None)
        open_ = len(streams)
        sent = 0.0
        while open_:
            items = [await queue.get()]
            # At most one chunk per STREAM_INTERVAL: what the model generates meanwhile goes
            # out together, so many streams cost the server and their clients one write and
            # one parse per interval instead of one per character.
            wait = sent + STREAM_INTERVAL - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            while not queue.empty():  # coalesce what came meanwhile, per choice, in order
                items.append(queue.get_nowait())
            sent = time.monotonic()
            if any(index is None for index, _, _ in items):
                return  # the client went away
            merged: dict[int, list] = {}
            for index, text, fin in items:
                entry = merged.setdefault(index, ["", None])
                entry[0] += text
                entry[1] = fin or entry[1]
            out = []
            for index, (text, fin) in merged.items():
                state["chars"] = state.get("chars", 0) + len(text)
                if fin in ("timeout", "error", "cancelled"):
                    out.append(_sse(error_body(503, _FAILED[fin], None, fin)))
                    fin = "length"
                if text or fin is not None:
                    out.append(chunk(index, text, fin))
                if fin is not None:
                    open_ -= 1
            yield b"".join(out)
        yield b"data: [DONE]\n\n"


_GONE = (None, "", None)  # in a request's queue: its client went away

_FAILED = {
    "timeout": "the request took longer than the server's time limit (--timeout)",
    "error": "the model failed to generate (see the server's log)",
    "cancelled": "the server is shutting down",
}


def _raise_for(finish: list) -> None:
    for reason in ("error", "timeout", "cancelled"):
        if reason in finish:
            raise ApiError(503, _FAILED[reason], None, reason)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def _emitter(queue: asyncio.Queue, index: int) -> Callable[[str, str | None], None]:
    def emit(text: str, finish: str | None) -> None:
        queue.put_nowait((index, text, finish))

    return emit


def _dispatch(events: list) -> None:
    for stream, text, finish in events:
        stream.emit(text, finish)


class _watch_disconnect:
    """While a plain (not streamed) response is being made: a client that goes away cancels
    its streams at once (``on_gone``)."""

    def __init__(self, request: Request, on_gone: Callable[[], None]):
        self.request, self.on_gone = request, on_gone

    async def __aenter__(self):
        async def listen() -> None:
            while True:
                message = await self.request.receive()
                if message["type"] == "http.disconnect":
                    self.request.scope["charlm_disconnected"] = True
                    self.on_gone()
                    return

        self.task = asyncio.ensure_future(listen())
        return self

    async def __aexit__(self, *exc) -> None:
        self.task.cancel()
        try:
            await self.task
        except (asyncio.CancelledError, Exception):  # noqa: BLE001
            pass
        if exc[0] is not None:
            self.on_gone()


class EventStream(Response):
    """Server-sent events from an async iterator of bytes. A client that disconnects cancels
    its streams at once (``on_gone``), whether or not a chunk was being sent."""

    media_type = "text/event-stream"

    def __init__(self, chunks: AsyncIterator[bytes], on_gone: Callable[[], None]):
        self.status_code, self.background = 200, None
        self.raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8"),
                            (b"cache-control", b"no-store"), (b"x-accel-buffering", b"no")]
        self.chunks, self.on_gone = chunks, on_gone

    async def __call__(self, scope, receive, send) -> None:
        gone = False

        async def listen() -> None:
            nonlocal gone
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    gone = True
                    self.on_gone()  # the streams leave the batch; the chunks end
                    return

        listener = asyncio.ensure_future(listen())
        try:
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": self.raw_headers})
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            if not gone:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client went away while a chunk was sent
            pass
        finally:
            self.on_gone()
            listener.cancel()
            await self.chunks.aclose()


class Guard:
    """ASGI middleware: a request-body bound on the declared length (413), errors as OpenAI
    JSON objects (never a traceback: an unexpected one is logged as one line), and one
    uvicorn-style access log line per request (client, method, path, status, characters
    generated, time)."""

    def __init__(self, app, server: Server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        scope.setdefault("state", {})
        status = {"code": 0}
        if self.server.loopback_only and not _loopback_host(scope):
            response = JSONResponse(error_body(400, "this server answers only requests to "
                                               "127.0.0.1, [::1] or localhost (it was started "
                                               "without --host)", None, "bad_host"), 400)
            await response(scope, receive, send)
            self._access(scope, 400, time.perf_counter() - started)
            return

        async def send_status(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except Exception as exc:  # noqa: BLE001 - the last line of defence against tracebacks
            if not isinstance(exc, ApiError) and type(exc).__name__ != "ClientDisconnect":
                self._log(f"error: {type(exc).__name__}: {printable(str(exc))[:200]} "
                          f"({scope.get('method', '')} {printable(scope.get('path', ''))[:100]})")
            if not status["code"]:
                response = (exc.response() if isinstance(exc, ApiError) else JSONResponse(
                    error_body(500, "internal error (see the server's log)"), 500))
                try:
                    await response(scope, receive, send_status)
                except OSError:
                    pass
        finally:
            self._access(scope, status["code"], time.perf_counter() - started)

    def _log(self, line: str) -> None:
        if self.server.log is not None:
            self.server.log(line)

    def _access(self, scope, code: int, seconds: float) -> None:
        if self.server.log is None:
            return
        client = scope.get("client") or ("-", 0)
        path = printable(scope.get("path", ""))[:200]
        chars = scope["state"].get("chars", 0)
        self.server.log(f'INFO:     {client[0]}:{client[1]} - "{scope.get("method", "")} {path} '
                        f'HTTP/{scope.get("http_version", "1.1")}" {code or 499} '
                        f"{chars} chars {seconds:.3f}s")


def _loopback_host(scope) -> bool:
    for name, value in scope.get("headers", []):
        if name == b"host":
            host = value.decode("latin-1").lower()
            host = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            return host in ("127.0.0.1", "localhost", "[::1]") or host.startswith("127.")
    return True  # HTTP/1.0 without a Host header: not a browser's request


def build_app(server: Server):
    """The ASGI app of ``server``."""

    async def not_found(request: Request, exc) -> Response:
        code = getattr(exc, "status_code", 404)
        message = ("method not allowed" if code == 405
                   else f"no such route: {printable(request.url.path)[:100]}")
        return JSONResponse(error_body(code, message), code)

    async def api_error(request: Request, exc: ApiError) -> Response:
        return exc.response()

    async def internal(request: Request, exc: Exception) -> Response:
        return JSONResponse(error_body(500, "internal error (see the server's log)"), 500)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.start()
        try:
            yield
        finally:
            server.stop()

    from starlette.exceptions import HTTPException

    app = Starlette(
        routes=[
            Route("/", server.page, methods=["GET"]),
            Route("/health", server.health, methods=["GET"]),
            Route("/v1/models", server.list_models, methods=["GET"]),
            Route("/v1/models/{name:path}", server.get_model, methods=["GET"]),
            Route("/v1/completions", server.completions, methods=["POST"]),
        ],
        exception_handlers={HTTPException: not_found, ApiError: api_error, Exception: internal},
        lifespan=lifespan,
    )
    return Guard(app, server)


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (0: a free port), or a one-line error."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise ConfigError(f"--host {printable(host)!r} is not an address this machine has: "
                          f"{exc}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise CharlmError(f"cannot listen on {printable(host)}:{port}: {exc.strerror or exc}; "
                          "pick another --port (0: any free one)") from None
    sock.set_inheritable(True)
    return sock


class _Uvicorn(uvicorn.Server):
    """uvicorn's server; SIGTERM and Ctrl-C stop it gracefully (stop accepting, let the
    streams in flight finish, up to --timeout), and the command then exits 0 instead of the
    signal being raised again."""

    def handle_exit(self, sig, frame) -> None:
        super().handle_exit(sig, frame)
        self._captured_signals.clear()


def run(server: Server, sock: socket.socket, graceful_seconds: float = 30.0) -> None:
    """Serve on ``sock`` until SIGTERM or Ctrl-C."""
    config = uvicorn.Config(
        build_app(server), log_config=None, log_level="warning", access_log=False,
        timeout_graceful_shutdown=max(1, int(graceful_seconds)), lifespan="on",
        server_header=False, proxy_headers=False,
    )
    _Uvicorn(config).run(sockets=[sock])


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    if ":" in host:
        host = f"[{host}]"
    if host in ("0.0.0.0", "[::]"):
        host = "127.0.0.1" if host == "0.0.0.0" else "[::1]"
    return f"http://{host}:{port}"


def api_key_from(option: str | None) -> str | None:
    """--api-key, or CHARLM_API_KEY (an empty one is no key)."""
    key = option if option is not None else os.environ.get("CHARLM_API_KEY")
    if key is not None and option is not None and not key:
        raise ConfigError("--api-key must not be empty")
    if key and (len(key) > 512 or not key.isprintable() or " " in key):
        raise ConfigError("the API key must be up to 512 printable characters without spaces")
    return key or None


# The page's back end (see charlm/web/__init__.py): /v1/completions, streamed.
PAGE_BACKEND = r"""
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("charlm-server").textContent);
  const wanted = new URLSearchParams(location.search).get("model");
  const model = data.models.find((m) => m.id === wanted) || data.models[0];
  let key = null;
  async function post(body, signal) {
    for (let attempt = 0; attempt < 2; attempt++) {
      const headers = {"Content-Type": "application/json"};
      if (key) headers["Authorization"] = "Bearer " + key;
      const response = await fetch("v1/completions", {method: "POST", headers, body, signal});
      if (response.status === 401 && data.auth && attempt === 0) {
        key = window.prompt("This server needs its API key:") || null;
        if (key) continue;
      }
      return response;
    }
  }
  window.charlmBackend = {
    card() { return Promise.resolve(Object.assign({model: model.id}, model.card)); },
    async generate(prompt, options, onText, signal) {
      const body = JSON.stringify({
        model: model.id, prompt: prompt, max_tokens: options.length,
        temperature: options.temperature, top_k: options.top_k, top_p: options.top_p,
        seed: options.seed, stop: options.stop && options.stop.length ? options.stop : null,
        stream: true,
      });
      let text = "";
      try {
        const response = await post(body, signal);
        if (!response.ok) {
          let message = "HTTP " + response.status;
          try { message = (await response.json()).error.message; } catch (e) { /* not JSON */ }
          throw new Error(message);
        }
        const reader = response.body.getReader();
        const decoder = new TextDecoder();
        let buffer = "";
        for (;;) {
          const {value, done} = await reader.read();
          if (done) break;
          buffer += decoder.decode(value, {stream: true});
          let cut;
          while ((cut = buffer.indexOf("\n\n")) >= 0) {
            const line = buffer.slice(0, cut);
            buffer = buffer.slice(cut + 2);
            if (!line.startsWith("data: ")) continue;
            const payload = line.slice(6);
            if (payload === "[DONE]") return text;
            const event = JSON.parse(payload);
            if (event.error) throw new Error(event.error.message);
            for (const choice of event.choices) {
              if (choice.index === 0 && choice.text) {
                text += choice.text;
                onText(choice.text);
              }
            }
          }
        }
        return text;
      } catch (e) {
        if (signal.aborted) return text;
        throw e;
      }
    },
  };
})();
"""
