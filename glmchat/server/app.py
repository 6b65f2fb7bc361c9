"""The FastAPI app: OpenAI-compatible chat completions on top of the batching Engine, and the web page."""

from __future__ import annotations

import asyncio
import functools
import json
import secrets
import time
import uuid
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.background import BackgroundTask
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from ..families import Family
from ..generate import SamplingConfig, TextStream
from .engine import Engine, QueueFullError
from .protocol import BadRequest, ChatRequest, reply_tool_calls, to_glm_messages

STATIC = resources.files("glmchat.server") / "static"


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def error_response(status: int, message: str, type: str = "invalid_request_error", param=None, code=None, headers=None):
    message, param = _printable(message), None if param is None else _printable(param)
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


MAX_BODY_BYTES = 64 * 2**20  # a 1M-token prompt, JSON-escaped, stays well under it


def create_app(engine: Engine, tokenizer, family: Family, *, model_id: str, api_key: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, timeout: float | None = None) -> FastAPI:
    """The app; it starts the engine's thread on startup and stops it on shutdown.

    max_body_bytes: a larger request body is a 413, refused before it is read (or as soon as a
    chunked one passes the limit). timeout: seconds a request may take in all (waiting included);
    then it is cancelled and answered with a 504 (an error event when streaming).
    """

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="glmchat", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine = engine
    created = int(time.time())
    _add_error_handlers(app)

    app.add_middleware(LimitBody, limit=max_body_bytes)
    if api_key is not None:
        app.add_middleware(RequireKey, key=api_key)
    app.add_middleware(CountResponses, counter=engine.metrics.requests)  # added last: runs first, sees every answer

    @app.get("/health")
    def health(request: Request):
        if api_key is not None and not key_matches(request.headers, api_key):
            return {"status": "ok"}  # open as a liveness probe; the details need the key
        return {
            "status": "ok", "model": model_id, "running": engine.running, "queued": engine.queued,
            "max_batch": engine.cache.rows, "steps": engine.steps, "peak_batch": engine.peak_batch,
            "decoded_tokens": engine.decoded_tokens, "decode_seconds": round(engine.decode_seconds, 4),
            "prefix_cache": {"blocks": len(engine.prefix), "bytes": engine.prefix.bytes,
                             "prompt_tokens": engine.prefix.prompt_tokens, "hit_tokens": engine.prefix.hit_tokens},
        }

    @app.get("/metrics", include_in_schema=False)
    def metrics():
        """Prometheus' text format; with --api-key it needs the key, like /v1/."""
        return PlainTextResponse(engine.metrics.render(engine), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "glmchat"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, http_request: Request):
        generation = _start(engine, tokenizer, family, body, timeout)
        reply_id, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = _stream(generation, reply_id, now, model_id, include_usage)
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
                                     background=BackgroundTask(generation.request.cancel))  # also if never iterated
        content = "".join([delta async for delta in generation.deltas(http_request)])
        calls = generation.tool_calls
        message = {"role": "assistant", "content": content if content or not calls else None}
        if calls:
            message["tool_calls"] = calls
        return {
            "id": reply_id, "object": "chat.completion", "created": now, "model": model_id,
            "choices": [{"index": 0, "message": message, "finish_reason": generation.finish_reason, "logprobs": None}],
            "usage": generation.usage(),
        }

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    return app


def _printable(text: str) -> str:
    """text that JSON-encodes as UTF-8: a lone surrogate a client sent becomes its escape."""
    return str(text).encode("utf-8", "backslashreplace").decode("utf-8")


def key_matches(headers: Headers, key: str) -> bool:
    given = headers.get("authorization", "").removeprefix("Bearer ").strip()
    return secrets.compare_digest(given.encode(), key.encode())


class RequireKey:
    """ASGI middleware: /v1/ needs `Authorization: Bearer KEY`, checked before the body is even read.

    So does `/metrics` (load figures; Prometheus sends the key as a bearer token). Open without it:
    `/` and `/static/` (the chat page holds no data and asks for the key itself) and `/health`,
    which then only says `{"status": "ok"}` (a liveness probe; the model id and load counters need
    the key).
    """

    def __init__(self, app, key: str):
        self.app, self.key = app, key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and (scope["path"].startswith("/v1/") or scope["path"] == "/metrics"):
            headers = Headers(scope=scope)
            if not key_matches(headers, self.key):
                given = headers.get("authorization", "").removeprefix("Bearer ").strip()
                what = "Missing API key" if not given else "Incorrect API key provided"
                response = error_response(401, f"{what}: send it as 'Authorization: Bearer KEY'", code="invalid_api_key")
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


class CountResponses:
    """ASGI middleware: counts the answers to /v1/ requests by HTTP status (glmchat_requests_total)."""

    def __init__(self, app, counter):
        self.app, self.counter = app, counter

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.counter.inc(1, str(message["status"]))
            await send(message)

        await self.app(scope, receive, counting_send)


class LimitBody:
    """ASGI middleware: a request body over `limit` bytes is a 413 in OpenAI's shape, refused from
    its Content-Length before it is read, or (chunked) as soon as it passes the limit."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"the request body is larger than this server accepts ({self.limit} bytes)"
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.limit:
            return await error_response(413, message, code="request_too_large")(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            event = await receive()
            if event["type"] == "http.request":
                received += len(event.get("body", b""))
                if received > self.limit:  # FastAPI passes an HTTPException on from reading the body
                    raise HTTPException(413, message)
            return event

        await self.app(scope, limited_receive, send)


class Generation:
    """One request in flight: the engine's records in, content deltas out (asyncio side)."""

    def __init__(self, engine: Engine, family: Family, text: TextStream, tools: bool, prompt: list[int],
                 max_new_tokens: int, sampling: SamplingConfig, logit_bias: dict[int, float] | None = None,
                 timeout: float | None = None):
        loop = asyncio.get_running_loop()
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.queue: asyncio.Queue = asyncio.Queue()
        self.family, self.text, self.tools = family, text, tools
        self.prompt_tokens = len(prompt)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.tool_calls: list[dict] = []
        self._next_check = 0.0
        self.request = engine.submit(
            prompt, max_new_tokens=max_new_tokens, sampling=sampling, stop_ids=text.stop_ids, logit_bias=logit_bias,
            text=text, emit=lambda record: loop.call_soon_threadsafe(self.queue.put_nowait, record),
        )

    async def _next_record(self, http_request: Request | None):
        """The next engine record, or None once the client has gone (checked every half second);
        an APIError once the request has run longer than its timeout."""
        while True:
            if self.deadline is not None and time.monotonic() > self.deadline:
                raise APIError(504, f"the request took longer than this server's limit of {self.timeout:g} s "
                                    "(glmchat serve --timeout)", type="server_error", code="timeout")
            if http_request is not None and time.monotonic() > self._next_check:
                if await http_request.is_disconnected():
                    return None
                self._next_check = time.monotonic() + 0.5
            try:
                return await asyncio.wait_for(self.queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                pass

    async def deltas(self, http_request: Request | None = None):
        """Yield new content text as tokens arrive; at the end, set finish_reason and tool_calls.

        Streaming answers come through the generator being cancelled when the client goes;
        pass http_request to watch for that instead. The engine's request is cancelled if this
        ends early.
        """
        shown = False
        try:
            while self.finish_reason is None:
                record = await self._next_record(http_request)
                if record is None:
                    return
                if record.error is not None or record.finish_reason == "cancelled":
                    raise APIError(500, f"generation failed: {record.error or 'the server is shutting down'}",
                                   type="server_error")
                self.completion_tokens = record.generation_tokens
                text = record.text
                if record.finish_reason is not None:
                    if self.tools and not self.text.stopped:  # a stop string leaves no call
                        self.tool_calls, unread_call = reply_tool_calls(self.family, self.text.text)
                        if unread_call:  # arguments it cannot read: the segment shows as text
                            text += ("\n\n" if shown or text else "") + unread_call
                    self.finish_reason = "tool_calls" if self.tool_calls else record.finish_reason
                if text:
                    shown = True
                    yield text
        finally:
            self.request.cancel()  # a no-op once the engine has finished it

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


def _start(engine: Engine, tokenizer, family: Family, body: ChatRequest, timeout: float | None) -> Generation:
    if body.active_tools() and not family.supports_tools:
        raise APIError(400, f"{family.label} was not trained to call tools", param="tools")
    try:
        turns = to_glm_messages(body, family)
        stop_strings = body.stop_strings()
        prompt = family.prompt_ids(tokenizer, turns)
    except BadRequest as e:
        raise APIError(400, str(e), param=e.param, code=e.code) from None
    except ValueError as e:  # a role the family lacks, or a base model without a chat template
        raise APIError(400, str(e), param="messages") from None
    max_new = body.max_completion_tokens or body.max_tokens
    _check_context(len(prompt), max_new, engine.context_length)
    _check_logit_bias(body.logit_bias or {}, engine.model.config.padded_vocab_size)
    defaults = SamplingConfig()
    sampling = SamplingConfig(temperature=defaults.temperature if body.temperature is None else body.temperature,
                              top_p=defaults.top_p if body.top_p is None else body.top_p,
                              top_k=defaults.top_k if body.top_k is None else body.top_k, seed=body.seed)
    tools = bool(body.active_tools())
    visible = functools.partial(family.visible_text, tool_calls=tools)
    text = TextStream(tokenizer, visible, stop_ids=family.stop_ids(tokenizer), stop_strings=stop_strings)
    try:
        return Generation(engine, family, text, tools, prompt, max_new or engine.context_length - len(prompt),
                          sampling, body.logit_bias, timeout)
    except QueueFullError as e:
        raise APIError(503, f"server overloaded: {e}", type="server_error", code="queue_full") from None


def _check_context(prompt_tokens: int, max_new: int | None, context: int) -> None:
    head = f"This model's maximum context length is {context} tokens. However, "
    if prompt_tokens >= context:
        message = (f"your messages resulted in {prompt_tokens} tokens, {prompt_tokens - context + 1} more than fit "
                   "with at least one token for the reply. Please reduce the length of the messages.")
    elif max_new is not None and prompt_tokens + max_new > context:
        message = (f"you requested {prompt_tokens + max_new} tokens ({prompt_tokens} in the messages, {max_new} in "
                   f"the completion), {prompt_tokens + max_new - context} more than fit. Please reduce the length "
                   "of the messages or completion.")
    else:
        return
    raise APIError(400, head + message, param="messages", code="context_length_exceeded")


def _check_logit_bias(logit_bias: dict[int, float], vocab: int) -> None:
    for token, bias in logit_bias.items():
        if not (0 <= token < vocab and -100 <= bias <= 100):
            raise APIError(400, f"logit_bias: token ids must be in 0..{vocab - 1} and biases in -100..100, "
                                f"got {token}: {bias}", param="logit_bias")


async def _stream(generation: Generation, reply_id: str, created: int, model_id: str, include_usage: bool):
    def chunk(delta: dict, finish_reason=None, **extra) -> str:
        body = {"id": reply_id, "object": "chat.completion.chunk", "created": created, "model": model_id,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}], **extra}
        if include_usage:
            body.setdefault("usage", None)
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    try:
        async for delta in generation.deltas():
            yield chunk({"content": delta})
    except APIError as e:
        yield f"data: {json.dumps({'error': {'message': e.message, 'type': e.type, 'param': None, 'code': e.code}})}\n\n"
        yield "data: [DONE]\n\n"
        return
    calls = generation.tool_calls
    if calls:
        yield chunk({"tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]})
    yield chunk({}, generation.finish_reason)
    if include_usage:
        body = {"id": reply_id, "object": "chat.completion.chunk", "created": created, "model": model_id,
                "choices": [], "usage": generation.usage()}
        yield f"data: {json.dumps(body)}\n\n"
    yield "data: [DONE]\n\n"


# ---- errors in OpenAI's shape ------------------------------------------------------------

_TYPE_TAGS = {"str", "int", "float", "bool", "none", "dict", "list"}


def _field_path(loc) -> str:
    """("body", "messages", 0, "role") -> "messages[0].role"; union-member tags are dropped."""
    path = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in _TYPE_TAGS or "[" in part or "-" in part:
            break
        else:
            path += f".{part}" if path else part
    return path


def _validation_message(errors) -> tuple[str, str | None]:
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}", None
    param = _field_path(first.get("loc", ()))
    if not param:
        return "the request body must be a JSON object with 'messages'", None
    messages = list(dict.fromkeys(e["msg"] for e in errors if _field_path(e.get("loc", ())) == param))
    return f"{param}: {' or '.join(messages)}", param


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        message, param = _validation_message(exc.errors())
        return error_response(400, message, param=param)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        message = str(exc.detail)
        if exc.status_code == 400 and message == "There was an error parsing the body":  # FastAPI's, for any reason
            message = "the request body could not be read as JSON (invalid UTF-8, or nested too deeply)"
        code = "request_too_large" if exc.status_code == 413 else None
        return error_response(exc.status_code, message, code=code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request, exc: Exception):
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")
