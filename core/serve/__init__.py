"""GPT Lab over HTTP, in OpenAI's API: a server for any model spec (``python -m core serve``), and
the client side the remote explainer uses to talk to any OpenAI-compatible server.

- :mod:`.config`: :class:`ServeConfig` and :class:`EndpointConfig`, every default once (torch-free).
- :mod:`.protocol`: request bodies -> checked :class:`~core.generation.config.SamplingConfig`.
- :mod:`.chat`: chat messages -> one prompt (the tokenizer's chat template, or a plain transcript).
- :mod:`.engine`: one request at a time on the model, a bounded queue, one completion per choice.
- :mod:`.responses`: OpenAI's JSON shapes, log-probabilities and streamed chunks.
- :mod:`.app`: the FastAPI routes, the API key, OpenAI-style errors.
- :mod:`.server`: uvicorn in the foreground or on a background thread (:func:`start_server`).
- :mod:`.client`: :class:`Endpoint`, a client with timeouts, retries and rate-limit backoff.
"""
from ..lazy import lazy_exports, names

__getattr__, __dir__ = lazy_exports(__name__, {
    **names(".config", "ServeConfig", "EndpointConfig", "API_KEY_ENV", "EXPLAINER_KEY_ENVS"),
    **names(".app", "create_app"),
    **names(".server", "serve", "start_server", "RunningServer"),
    **names(".client", "Endpoint", "connect"),
})
