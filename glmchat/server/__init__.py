"""OpenAI-compatible HTTP server with continuous batching (needs the `server` extra: fastapi, uvicorn)."""

from __future__ import annotations

import socket
import threading
import time

INSTALL_HINT = "the server needs FastAPI and uvicorn: pip install 'glmchat[server]'"


def build_app(model, tokenizer, *, model_id: str, api_key: str | None = None, max_batch: int = 8,
              max_queue: int = 64, vocab_limit: int | None = None):
    """The FastAPI app serving `model`; its engine thread runs while the app does.

    vocab_limit: never generate ids >= this (e.g. a stand-in tokenizer's size with random weights).
    """
    from .app import create_app
    from .engine import Engine

    engine = Engine(model, max_batch=max_batch, max_queue=max_queue, vocab_limit=vocab_limit)
    return create_app(engine, tokenizer, model_id=model_id, api_key=api_key)


def run(app, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve until interrupted; Ctrl-C stops the engine cleanly."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level)


class BackgroundServer:
    """uvicorn in a thread on a free loopback port (for tests and benchmarks); a context manager."""

    def __init__(self, app, log_level: str = "warning"):
        import uvicorn

        self._sock = socket.socket()
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
