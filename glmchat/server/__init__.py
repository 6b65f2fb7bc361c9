"""OpenAI-compatible HTTP server with continuous batching (needs the `server` extra: fastapi, uvicorn)."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time

from ..options import number

INSTALL_HINT = "the server needs FastAPI and uvicorn: pip install 'glmchat[server]'"


def missing_dependencies() -> str | None:
    """INSTALL_HINT when FastAPI or uvicorn cannot be imported, else None."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        return INSTALL_HINT
    return None


_gigabytes, _seconds = number(float, 0, what="gigabytes"), number(float, 0, low_open=True, what="seconds")


def add_server_options(parser) -> None:
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    g.add_argument("--port", type=number(int, 1, 65535), default=8000, help="port (default 8000)")
    g.add_argument("--api-key", default=os.environ.get("GLMCHAT_API_KEY") or None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $GLMCHAT_API_KEY, else no key)")
    g.add_argument("--max-batch", type=number(int, 1), default=8, metavar="N",
                   help="requests generated together in one batch (default 8)")
    g.add_argument("--max-queue", type=number(int, 0), default=64, metavar="N",
                   help="requests that may wait for a free batch slot; more get 503 (default 64)")
    g.add_argument("--cache-gb", type=_gigabytes, default=2.0, metavar="GB",
                   help="memory for the KV of prompt prefixes reused across requests (default 2; 0: off)")
    g.add_argument("--shutdown-timeout", type=number(float, 0, what="seconds"), default=30.0, metavar="SECONDS",
                   help="on SIGTERM / Ctrl-C: how long requests in flight may take to finish before they are "
                        "cancelled (default 30); no new ones are accepted")
    g.add_argument("--timeout", type=_seconds, default=None, metavar="SECONDS",
                   help="cancel a request still unanswered after this long, waiting included, with a 504 "
                        "(default: no limit)")


def serve(chat_model, args, lockstep=None) -> None:
    """Serve a loaded glmchat.chat.ChatModel with the options of add_server_options, until Ctrl-C.
    lockstep: rank 0 of a tensor-parallel group (glmchat.server.engine.Lockstep), the others `follow`."""
    tokenizer = chat_model.tokenizer
    app = build_app(chat_model.model, tokenizer, chat_model.family, model_id=args.model, api_key=args.api_key,
                    max_batch=args.max_batch, max_queue=args.max_queue, cache_gb=args.cache_gb, timeout=args.timeout,
                    vocab_limit=tokenizer.vocab_size if chat_model.standin_tokenizer else None, lockstep=lockstep)
    if args.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"glmchat: warning: listening on {args.host} without --api-key: anyone who can reach it may use it",
              file=sys.stderr)
    print(f"glmchat: web chat at http://{args.host}:{args.port}/ , OpenAI API at http://{args.host}:{args.port}/v1",
          file=sys.stderr, flush=True)
    run(app, host=args.host, port=args.port, shutdown_timeout=args.shutdown_timeout)


def follow(chat_model, args, lockstep) -> None:
    """A tensor-parallel rank other than 0 under `glmchat serve --tp N`: an engine with rank 0's
    options doing the steps rank 0's engine tells it (Engine.follow), until rank 0 stops."""
    _engine(chat_model.model, max_batch=args.max_batch, max_queue=args.max_queue, cache_gb=args.cache_gb,
            lockstep=lockstep).follow()


def _engine(model, *, max_batch: int, max_queue: int, cache_gb: float, vocab_limit: int | None = None,
            prefill_chunk: int | None = None, lockstep=None):
    from .engine import Engine

    return Engine(model, max_batch=max_batch, max_queue=max_queue, vocab_limit=vocab_limit, lockstep=lockstep,
                  cache_bytes=int(cache_gb * 2**30), **({"prefill_chunk": prefill_chunk} if prefill_chunk else {}))


def build_app(model, tokenizer, family, *, model_id: str, api_key: str | None = None, max_batch: int = 8,
              max_queue: int = 64, vocab_limit: int | None = None, max_body_bytes: int | None = None,
              cache_gb: float = 2.0, prefill_chunk: int | None = None, timeout: float | None = None, lockstep=None):
    """The FastAPI app serving `model`; its engine thread runs while the app does.

    family: the model's family (glmchat.families), which decides prompts, stops and replies.
    vocab_limit: never generate ids >= this (e.g. a stand-in tokenizer's size with random weights).
    max_body_bytes: larger request bodies get a 413 (default glmchat.server.app.MAX_BODY_BYTES).
    cache_gb: memory for the prefix cache (KV of prompt prefixes reused across requests; 0: off).
    prefill_chunk: tokens per prefill chunk and cache block (default glmchat.server.prefix_cache.BLOCK).
    timeout: seconds a request may take in all before it is cancelled with a 504 (None: no limit).
    lockstep: rank 0's engine of a tensor-parallel group tells the other ranks its steps.
    """
    from .app import create_app

    engine = _engine(model, max_batch=max_batch, max_queue=max_queue, vocab_limit=vocab_limit, cache_gb=cache_gb,
                     prefill_chunk=prefill_chunk, lockstep=lockstep)
    limit = {} if max_body_bytes is None else {"max_body_bytes": max_body_bytes}
    return create_app(engine, tokenizer, family, model_id=model_id, api_key=api_key, timeout=timeout, **limit)


def run(app, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
        shutdown_timeout: float = 30) -> None:
    """Serve until SIGTERM or Ctrl-C, then shut down gracefully: stop accepting connections, give
    the requests in flight up to shutdown_timeout seconds to finish, cancel those still running
    (a stream ends with an error event), stop the engine and return. A second signal exits at once."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level))

    def on_signal(sig, frame):  # instead of uvicorn's, which re-raises the signal once shut down
        if server.should_exit:
            server.force_exit = True
            return
        server.should_exit = True
        timer = threading.Timer(shutdown_timeout, app.state.engine.cancel_all)
        timer.daemon = True
        timer.start()

    server.handle_exit = on_signal
    server.run()


class BackgroundServer:
    """uvicorn in a thread on a free loopback port (for tests and benchmarks); a context manager."""

    def __init__(self, app, log_level: str = "warning"):
        import uvicorn

        # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on such sockets (and on the
        # connections they accept); without it every small request waits ~40 ms for a delayed ACK
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._server = uvicorn.Server(uvicorn.Config(app, log_level=log_level))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    def __enter__(self) -> "BackgroundServer":
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(30)
        self._sock.close()
