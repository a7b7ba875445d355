"""Running the API with uvicorn: in the foreground for ``python -m core serve``, or on a background
thread for notebooks and tests (:func:`start_server`).

The listening socket is bound here, before uvicorn starts, so a port in use is one sentence (not
uvicorn's log and exit), and ``port=0`` picks a free port whose number is known at once.
"""
from __future__ import annotations

import socket
import threading
import time
from typing import TYPE_CHECKING

from ..errors import LabError
from .config import ServeConfig

if TYPE_CHECKING:
    from fastapi import FastAPI

    from ..models.loading import LoadedModel

START_TIMEOUT_S = 30.0


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (IPv4 or IPv6), or a LabError saying what to change."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise LabError(f"Cannot listen on host '{host}' ({e.strerror}); pass --host 127.0.0.1, or an address "
                       f"of this machine.") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise LabError(f"Cannot listen on {host}:{port} ({e.strerror}); pass another --port (0 picks a free one) "
                       f"or stop what holds it.") from None
    sock.setblocking(False)
    return sock


def url_of(sock: socket.socket, host: str) -> str:
    """``http://HOST:PORT/v1`` for a bound socket (the real port when 0 was asked for)."""
    port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"http://{shown}:{port}/v1"


def _uvicorn(app: "FastAPI", config: ServeConfig):
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, log_level=config.log_level, lifespan="on", timeout_graceful_shutdown=5))


def serve(lm: "LoadedModel", config: ServeConfig, sock: socket.socket | None = None) -> None:
    """Serve ``lm`` until Ctrl-C or SIGTERM (uvicorn stops gracefully on both)."""
    from .app import create_app

    sock = sock or bind(config.host, config.port)
    _uvicorn(create_app(lm, config), config).run(sockets=[sock])


class RunningServer:
    """A server on a background thread: ``url`` is its ``/v1`` base, :meth:`stop` ends it."""

    def __init__(self, app: "FastAPI", config: ServeConfig, sock: socket.socket):
        self.app, self.url, self._sock = app, url_of(sock, config.host), sock
        self._server = _uvicorn(app, config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True,
                                        name="gptlab-serve")

    @property
    def worker(self):
        return self.app.state.server.worker

    def start(self, timeout_s: float = START_TIMEOUT_S) -> "RunningServer":
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise LabError(f"The server did not start within {timeout_s:.0f}s; see its log above.")
            time.sleep(0.01)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self._sock.close()

    def __enter__(self) -> "RunningServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_server(lm: "LoadedModel", config: ServeConfig | None = None) -> RunningServer:
    """Serve ``lm`` on a background thread and return once it accepts connections (``port=0``: a free port)."""
    from .app import create_app

    config = config or ServeConfig(port=0)
    app = create_app(lm, config)
    return RunningServer(app, config, bind(config.host, config.port)).start()


__all__ = ["bind", "url_of", "serve", "start_server", "RunningServer"]
