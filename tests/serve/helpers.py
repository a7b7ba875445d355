"""Shared by the server's tests and the remote explainer's: a real server on a free loopback port,
raw HTTP for the bodies the openai client would refuse to send, and a worker held busy on purpose."""
from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from contextlib import contextmanager
from typing import Any, Iterator

from core.serve.config import ServeConfig
from core.serve.server import RunningServer, start_server

TIMEOUT_S = 60  # every request in these tests; nothing waits longer


@contextmanager
def serving(lm, **config) -> Iterator[RunningServer]:
    """``lm`` served on 127.0.0.1 and a free port for the block; stopped however it ends."""
    server = start_server(lm, ServeConfig(port=0, log_level="warning", **config))
    try:
        yield server
    finally:
        server.stop()


def client(url: str, key: str = "unused", **kwargs):
    """The official openai client against ``url``: no retries (a test wants the first answer)."""
    import openai

    return openai.OpenAI(base_url=url, api_key=key, max_retries=kwargs.pop("max_retries", 0),
                         timeout=kwargs.pop("timeout", TIMEOUT_S), **kwargs)


def post(url: str, path: str, body: Any, key: str | None = None, method: str = "POST") -> tuple[int, Any, dict]:
    """``(status, parsed JSON, headers)`` of a raw request; ``body`` may be bytes (sent as they are)."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method=method, headers={"Content-Type": "application/json"})
    if key is not None:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as r:
            return r.status, json.loads(r.read() or b"null"), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null"), dict(e.headers)


@contextmanager
def busy(server: RunningServer, jobs: int = 1) -> Iterator[threading.Event]:
    """Hold the model worker with ``jobs`` blocking jobs (one running, the rest queued) until the
    block ends or the yielded event is set."""
    release = threading.Event()
    started = threading.Event()

    def hold():
        started.set()
        release.wait(TIMEOUT_S)

    futures = [server.worker.submit(hold) for _ in range(jobs)]
    started.wait(TIMEOUT_S)
    try:
        yield release
    finally:
        release.set()
        for f in futures:
            f.result(TIMEOUT_S)
