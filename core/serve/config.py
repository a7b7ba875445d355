"""What decides the OpenAI-compatible server and the client that talks to such servers, torch-free.

Every default is stated here once: ``python -m core serve`` and ``python -m core transcoders
describe --explainer URL`` take their flags' defaults from these dataclasses, and importing this
module loads neither torch nor FastAPI, so ``--help`` stays fast.
"""
from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field

from ..errors import LabError

API_KEY_ENV = "GPTLAB_API_KEY"                              # the server's key, when --api-key is not given
EXPLAINER_KEY_ENVS = ("GPTLAB_EXPLAINER_KEY", "OPENAI_API_KEY")  # the explainer client's key, first one set wins
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")

COMPLETIONS_MAX_TOKENS = 16     # /v1/completions without max_tokens (OpenAI's documented default);
                                # /v1/chat/completions without it may use all the room the context leaves
MAX_N = 16                      # completions per request
MAX_TOP_LOGPROBS = 20           # alternatives per token (OpenAI's limit for top_logprobs)
LOGPROB_FLOOR = -9999.0         # what an impossible token's log-probability reads as in JSON (no -inf there)


def is_loopback(host: str) -> bool:
    """Whether ``host`` only listens on this machine (``localhost``, ``127.x``, ``::1``)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass
class ServeConfig:
    """How ``python -m core serve`` listens and how much it lets wait (errors name the CLI's flags).

    The model answers one request at a time; up to ``max_queue`` more wait their turn, and a
    request beyond that is answered at once with 503 (and a Retry-After), so a busy server never
    leaves a client hanging. A request that has waited ``queue_timeout_s`` without starting gets
    the same answer.
    """

    host: str = "127.0.0.1"            # loopback unless told otherwise
    port: int = 8000                   # 0: any free port (printed at start)
    api_key: str | None = field(default=None, repr=False)  # None: read API_KEY_ENV; neither: no key needed
    model_name: str | None = None      # the id clients send as "model" (default: the model spec)
    max_queue: int = 8                 # requests waiting beyond the one running
    queue_timeout_s: float = 300.0
    log_level: str = "info"

    def check(self) -> None:
        if not self.host.strip():
            raise LabError("--host is empty; pass 127.0.0.1 (this machine only) or 0.0.0.0 (every interface).")
        if not 0 <= self.port <= 65535:
            raise LabError(f"--port must be between 0 and 65535 (got {self.port}); 0 picks a free one.")
        if self.max_queue < 0:
            raise LabError(f"--max-queue must be 0 or more (got {self.max_queue}).")
        if not self.queue_timeout_s > 0:
            raise LabError(f"--queue-timeout must be above 0 seconds (got {self.queue_timeout_s}).")
        if self.log_level not in LOG_LEVELS:
            raise LabError(f"--log-level must be one of {', '.join(LOG_LEVELS)} (got '{self.log_level}').")
        if self.model_name is not None and not self.model_name.strip():
            raise LabError("--served-model-name is empty; pass a name or leave it out to use the model spec.")

    def key(self) -> str | None:
        """The key requests must carry: ``api_key``, else the ``GPTLAB_API_KEY`` variable, else none."""
        return self.api_key or os.environ.get(API_KEY_ENV) or None


@dataclass
class EndpointConfig:
    """How the client side (the explainer behind ``--explainer URL``) talks to an OpenAI-compatible
    server. The key is never part of it: it is read from :data:`EXPLAINER_KEY_ENVS` when the
    connection is made, so no config file, log line or store ever holds it."""

    url: str                           # http://HOST:PORT/v1; ending in /completions or /chat/completions picks that API
    model: str | None = None           # None: the one model the server lists
    timeout_s: float = 120.0           # per request
    max_retries: int = 4               # on timeouts, 429 rate limits, 5xx and lost connections, with backoff
    concurrency: int = 4               # requests in flight at once
    max_new_tokens: int = 32           # per answer (an explanation is a few words)
    context_tokens: int = 2048         # assumed context when the server does not list its max_model_len

    def check(self) -> None:
        if not self.url.lower().startswith(("http://", "https://")):
            raise LabError(f"The explainer URL must start with http:// or https:// (got '{self.url}').")
        if not self.timeout_s > 0:
            raise LabError(f"The explainer timeout must be above 0 seconds (got {self.timeout_s}).")
        if self.max_retries < 0 or self.concurrency < 1 or self.max_new_tokens < 1:
            raise LabError("The explainer's retries must be 0 or more, and its concurrency and answer length at "
                           "least 1.")
        if self.model is not None and not self.model.strip():
            raise LabError("--explainer-model is empty; name the model the server serves.")


__all__ = ["API_KEY_ENV", "EXPLAINER_KEY_ENVS", "LOG_LEVELS", "COMPLETIONS_MAX_TOKENS", "MAX_N", "MAX_TOP_LOGPROBS",
           "LOGPROB_FLOOR", "ServeConfig", "EndpointConfig", "is_loopback"]
