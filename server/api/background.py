"""Serve an engine over HTTP from a background thread of this process (benchmarks, tests).

`tessera serve` runs uvicorn in the foreground; a benchmark that builds its engine in memory (random
weights, no checkpoint) and then measures it through the real HTTP stack needs the server beside it.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from server.api.app import create_app


@contextmanager
def serve_in_background(engine, api_key: str | None = None, startup_timeout: float = 60.0,
                        **app_options) -> Iterator[str]:
    """Serve `engine` with uvicorn on a free port of 127.0.0.1 until the block ends; yields the base URL.
    `app_options` go to `create_app` (log_requests, allowed_origins).

    The app's lifespan starts the engine's step loop on entry and shuts it down on exit.
    """
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    app = create_app(engine, api_key, **app_options)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="tessera-http")
    thread.start()
    deadline = time.monotonic() + startup_timeout
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("uvicorn stopped during start-up (its log says why)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start within {startup_timeout:.0f} s")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
