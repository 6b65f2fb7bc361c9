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
from .protocol import (INT64, BadRequest, ChatRequest, CompletionRequest, reply_tool_calls, to_glm_messages,
                       unencodable_text)

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
        generations = _start(engine, tokenizer, family, body, timeout)
        return await _answer(generations, body, ChatReply(f"chatcmpl-{uuid.uuid4().hex}", model_id, tokenizer),
                             http_request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http_request: Request):
        generations = _start_completion(engine, tokenizer, family, body, timeout)
        return await _answer(generations, body, TextReply(f"cmpl-{uuid.uuid4().hex}", model_id, tokenizer),
                             http_request)

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

    def __init__(self, engine: Engine, family: Family, tokenizer, text: TextStream, tools: bool, prompt: list[int],
                 max_new_tokens: int, sampling: SamplingConfig, body, timeout: float | None = None,
                 reasoning: bool = False):
        """body: the request (its logit_bias, penalties and logprobs); reasoning: report a reasoning
        model's thinking (`reasoning`, None for other families)."""
        loop = asyncio.get_running_loop()
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.queue: asyncio.Queue = asyncio.Queue()
        self.family, self.tokenizer, self.text, self.tools = family, tokenizer, text, tools
        self.prompt_tokens = len(prompt)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.tool_calls: list[dict] = []
        self.logprobs: list[tuple[int, float, list]] | None = [] if body.top_alternatives is not None else None
        # A reasoning model's thinking so far (None: not asked for, or the family does not reason).
        self.reasoning: str | None = "" if reasoning and family.reasons else None
        self._logprobs_taken = 0
        self._next_check = 0.0
        self.request = engine.submit(
            prompt, max_new_tokens=max_new_tokens, sampling=sampling, stop_ids=text.stop_ids, text=text,
            logit_bias=body.logit_bias, presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0, logprobs=body.top_alternatives,
            emit=lambda record: loop.call_soon_threadsafe(self.queue.put_nowait, record),
        )

    def take_logprobs(self) -> list[tuple[int, float, list]] | None:
        """(id, log-probability, [(id, log-probability), ...]) of the ids since the last call (None:
        the request did not ask for them)."""
        if self.logprobs is None:
            return None
        taken = self.logprobs[self._logprobs_taken :]
        self._logprobs_taken = len(self.logprobs)
        return taken

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
        """Yield (new content text, new reasoning text) as tokens arrive; at the end, set
        finish_reason and tool_calls.

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
                if self.logprobs is not None and record.logprob is not None and record.token not in self.text.stop_ids:
                    self.logprobs.append((record.token, record.logprob, record.top_logprobs))
                text = record.text
                if record.finish_reason is not None:
                    if self.tools and not self.text.stopped:  # a stop string leaves no call
                        self.tool_calls, unread_call = reply_tool_calls(self.family, self.text.text)
                        if unread_call:  # arguments it cannot read: the segment shows as text
                            text += ("\n\n" if shown or text else "") + unread_call
                    self.finish_reason = "tool_calls" if self.tool_calls else record.finish_reason
                thought = record.reasoning if self.reasoning is not None else ""
                if self.reasoning is not None:
                    self.reasoning += thought
                if text or thought:
                    shown = shown or bool(text)
                    yield text, thought
        finally:
            self.request.cancel()  # a no-op once the engine has finished it


def _start(engine: Engine, tokenizer, family: Family, body: ChatRequest, timeout: float | None) -> list[Generation]:
    """The request's n generations (seeds seed, seed + 1, ... when sampling with a seed)."""
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
    tools = bool(body.active_tools())
    visible = functools.partial(family.visible_text, tool_calls=tools)
    return _submit(engine, tokenizer, family, body, prompt, body.max_completion_tokens or body.max_tokens, timeout,
                   lambda: TextStream(tokenizer, visible, stop_ids=family.stop_ids(tokenizer), stop_strings=stop_strings,
                                      reasoning=family.reasoning_rule),
                   tools, reasoning=body.include_reasoning is not False)


def _start_completion(engine: Engine, tokenizer, family: Family, body: CompletionRequest,
                      timeout: float | None) -> list[Generation]:
    """A raw prompt's n generations: no chat template (the way to serve base models)."""
    try:
        body.unsupported_fields()
        stop_strings = body.stop_strings()
        prompt = body.prompt[0] if isinstance(body.prompt, list) and isinstance(body.prompt[0], str) else body.prompt
        if isinstance(prompt, str):
            if unencodable_text(prompt) is not None:
                raise BadRequest("prompt: the text holds a lone UTF-16 surrogate (e.g. \\ud800), which is not "
                                 "valid Unicode", "prompt")
            prompt = tokenizer.encode(prompt)  # the prefix ([gMASK] sop) and the text, as the reference's tokenizer
        elif not all(0 <= i < engine.model.config.padded_vocab_size for i in prompt):
            raise BadRequest("prompt: token ids must be within the vocabulary", "prompt")
    except BadRequest as e:
        raise APIError(400, str(e), param=e.param, code=e.code) from None
    return _submit(engine, tokenizer, family, body, list(prompt), body.max_tokens, timeout,
                   lambda: TextStream(tokenizer, stop_ids=family.stop_ids(tokenizer), stop_strings=stop_strings), False)


def _submit(engine: Engine, tokenizer, family: Family, body, prompt: list[int], max_new: int | None,
            timeout: float | None, text_stream, tools: bool, reasoning: bool = False) -> list[Generation]:
    _check_context(len(prompt), max_new, engine.context_length)
    _check_logit_bias(body.logit_bias or {}, engine.model.config.padded_vocab_size)
    defaults = SamplingConfig()
    generations = []
    try:
        for i in range(body.n or 1):
            sampling = SamplingConfig(
                temperature=defaults.temperature if body.temperature is None else body.temperature,
                top_p=defaults.top_p if body.top_p is None else body.top_p,
                top_k=defaults.top_k if body.top_k is None else body.top_k,
                seed=None if body.seed is None else (body.seed + i + INT64) % (2 * INT64) - INT64)
            generations.append(Generation(engine, family, tokenizer, text_stream(), tools, prompt,
                                          max_new or engine.context_length - len(prompt), sampling, body, timeout,
                                          reasoning))
    except QueueFullError as e:
        for generation in generations:
            generation.request.cancel()
        raise APIError(503, f"server overloaded: {e}", type="server_error", code="queue_full") from None
    return generations


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


async def _answer(generations: list[Generation], body, reply, http_request: Request):
    """The response: one JSON body, or a stream of chunks (every choice's, interleaved)."""
    def cancel_all():
        for generation in generations:
            generation.request.cancel()

    if body.stream:
        return StreamingResponse(_stream(generations, reply, body.include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"},
                                 background=BackgroundTask(cancel_all))  # also if never iterated

    async def text(generation: Generation) -> str:
        return "".join([content async for content, _ in generation.deltas(http_request)])

    try:
        texts = await asyncio.gather(*map(text, generations))
    finally:
        cancel_all()
    return reply.body([reply.choice(i, g, text, g.take_logprobs()) for i, (g, text) in enumerate(zip(generations, texts))],
                      _usage(generations))


def _usage(generations: list[Generation]) -> dict:
    prompt, completion = generations[0].prompt_tokens, sum(g.completion_tokens for g in generations)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _stream(generations: list[Generation], reply, include_usage: bool):
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, generation: Generation):
        try:
            async for content, thought in generation.deltas():
                await queue.put((index, reply.delta(content, thought), None))
            await queue.put((index, None, None))
        except APIError as e:
            await queue.put((index, None, e))

    def event(body: dict) -> str:
        if include_usage:
            body.setdefault("usage", None)
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    for index in range(len(generations)):
        if reply.opening is not None:
            yield event(reply.chunk(index, reply.opening))
    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(generations)]
    try:
        for _ in generations:
            while True:
                index, delta, error = await queue.get()
                generation = generations[index]
                if error is not None:
                    yield f"data: {json.dumps({'error': {'message': error.message, 'type': error.type, 'param': None, 'code': error.code}})}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                if delta is None:
                    break
                yield event(reply.chunk(index, delta, logprobs=reply.logprobs(generation.take_logprobs())))
            for delta in reply.closing(generation):
                yield event(reply.chunk(index, delta))
            yield event(reply.chunk(index, reply.delta(""), generation.finish_reason,
                                    logprobs=reply.logprobs(generation.take_logprobs())))
        if include_usage:
            yield f"data: {json.dumps({**reply.chunk(0, None), 'choices': [], 'usage': _usage(generations)})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        for task in tasks:
            task.cancel()


class ChatReply:
    """The chat-completions shapes of an answer and of its stream's chunks."""

    object, chunk_object = "chat.completion", "chat.completion.chunk"
    opening = {"role": "assistant", "content": ""}

    def __init__(self, reply_id: str, model_id: str, tokenizer):
        self.id, self.model_id, self.created, self.tokenizer = reply_id, model_id, int(time.time()), tokenizer

    def body(self, choices: list[dict], usage: dict) -> dict:
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model_id,
                "choices": choices, "usage": usage}

    def chunk(self, index: int, delta: dict | None, finish_reason=None, logprobs=None) -> dict:
        choices = [] if delta is None else [{"index": index, **self.delta_field(delta), "finish_reason": finish_reason,
                                             "logprobs": logprobs}]
        return {"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model_id,
                "choices": choices}

    @staticmethod
    def delta_field(delta: dict) -> dict:
        """Where a stream chunk's choice holds its delta."""
        return {"delta": delta}

    @staticmethod
    def delta(text: str, reasoning: str = "") -> dict:
        return {**({"reasoning_content": reasoning} if reasoning else {}), **({"content": text} if text else {})}

    @staticmethod
    def closing(generation: Generation) -> list[dict]:
        calls = generation.tool_calls
        return [{"tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]}] if calls else []

    def choice(self, index: int, generation: Generation, text: str, logprobs: list) -> dict:
        calls = generation.tool_calls
        message = {"role": "assistant", "content": text if text or not calls else None}
        if generation.reasoning is not None:
            message["reasoning_content"] = generation.reasoning
        if calls:
            message["tool_calls"] = calls
        return {"index": index, "message": message, "finish_reason": generation.finish_reason,
                "logprobs": self.logprobs(logprobs)}

    def logprobs(self, entries: list | None) -> dict | None:
        """OpenAI's logprobs of the ids in entries (None: not asked for)."""
        if entries is None:
            return None
        token = self._token_text
        return {"content": [{**token(t, lp), "top_logprobs": [token(a, alp) for a, alp in top]}
                            for t, lp, top in entries]}

    def _token_text(self, token: int, logprob: float) -> dict:
        text = self.tokenizer.decode([token])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


class TextReply(ChatReply):
    """The text-completions shapes (OpenAI's legacy API)."""

    object = chunk_object = "text_completion"
    opening = None

    @staticmethod
    def delta_field(delta: dict) -> dict:
        return delta  # {"text": ...} in the choice itself

    @staticmethod
    def delta(text: str, reasoning: str = "") -> dict:
        return {"text": text}

    @staticmethod
    def closing(generation: Generation) -> list[dict]:
        return []

    def choice(self, index: int, generation: Generation, text: str, logprobs: list) -> dict:
        return {"index": index, "text": text, "logprobs": self.logprobs(logprobs),
                "finish_reason": generation.finish_reason}

    def logprobs(self, entries: list | None) -> dict | None:
        if entries is None:
            return None
        decode = self.tokenizer.decode
        return {"tokens": [decode([t]) for t, _, _ in entries], "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [{decode([a]): alp for a, alp in top} for _, _, top in entries]}


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
