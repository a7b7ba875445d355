"""Serve a model over HTTP in OpenAI's API, so any OpenAI client, an evaluation harness, or GPT Lab's
own remote explainer (`transcoders describe --explainer URL`) can use it.

Routes: GET /v1/models (with the context as max_model_len), POST /v1/completions and
POST /v1/chat/completions (streaming with "stream": true), GET /health. Every sampling control of
the Generate page is a request field: temperature (0 = greedy), top_p, top_k, min_p,
repetition_penalty, max_tokens, stop, seed, n, and logprobs (completions: 0-20 alternatives;
chat: "logprobs": true with top_logprobs). Chat messages become a "role: content" transcript
ending in "assistant:", unless the tokenizer has a chat template.

The server listens on 127.0.0.1 (this machine only) unless --host says otherwise. With a key
(--api-key, or better the GPTLAB_API_KEY variable, which `ps` does not show) every /v1 request
must send "Authorization: Bearer KEY"; others get 401. The model answers one request at a time;
--max-queue more may wait, and the next is refused at once with 503, never left hanging.

Examples:
  python -m core serve                                   # the shipped model on http://127.0.0.1:8000/v1
  GPTLAB_API_KEY=secret python -m core serve --model gpt2 --host 0.0.0.0 --port 8080
  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
      -d '{"model": "default", "prompt": "ROMEO:", "max_tokens": 20, "temperature": 0}'
"""
from __future__ import annotations

import argparse
import sys

from .cli import add_model_args, float_arg, int_arg, load_from_args
from ..serve.config import API_KEY_ENV, LOG_LEVELS, ServeConfig, is_loopback

NAME = "serve"
HELP = "Serve a model over an OpenAI-compatible HTTP API (/v1/models, /v1/completions, /v1/chat/completions)."
SERVE = ServeConfig()  # every flag's default comes from here


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    g = parser.add_argument_group("server")
    g.add_argument("--host", default=SERVE.host,
                   help="address to listen on; 0.0.0.0 for every interface (default: %(default)s, this machine only)")
    g.add_argument("--port", type=int_arg(0, 65535, note="; 0 picks a free port"), default=SERVE.port,
                   help="(default: %(default)s)")
    g.add_argument("--api-key", dest="api_key", metavar="KEY",
                   help=f"require 'Authorization: Bearer KEY' on every /v1 request (default: the {API_KEY_ENV} "
                        f"variable, which other users cannot see in `ps`; neither: no key)")
    g.add_argument("--served-model-name", dest="model_name", metavar="NAME",
                   help="the model id clients send and /v1/models lists (default: the model spec)")
    g.add_argument("--max-queue", dest="max_queue", type=int_arg(0), default=SERVE.max_queue, metavar="N",
                   help="requests that may wait while one runs; more are refused with 503 (default: %(default)s)")
    g.add_argument("--queue-timeout", dest="queue_timeout_s", type=float_arg(0, low_open=True),
                   default=SERVE.queue_timeout_s, metavar="SECONDS",
                   help="a request that waited this long without starting is refused with 503 (default: %(default)s)")
    g.add_argument("--log-level", dest="log_level", choices=LOG_LEVELS, default=SERVE.log_level,
                   help="uvicorn's log: one line per request at info (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    from ..serve.server import bind, serve, url_of  # FastAPI and uvicorn load only when serving

    config = ServeConfig(host=args.host, port=args.port, api_key=args.api_key, model_name=args.model_name,
                         max_queue=args.max_queue, queue_timeout_s=args.queue_timeout_s, log_level=args.log_level)
    config.check()
    sock = bind(config.host, config.port)  # a port in use fails before the model loads
    try:
        lm = load_from_args(args)
        key = config.key()
        if key is None and not is_loopback(config.host):
            print(f"warning: listening on {config.host} without an API key: anyone who can reach this machine can "
                  f"use the model; set {API_KEY_ENV}.", file=sys.stderr)
        if lm.untrained:
            print(f"note: {lm.name} has random weights, so its text is noise.", file=sys.stderr)
        name = config.model_name or lm.spec
        print(f"serving {name} ({lm.family}, context {lm.stack.context_length}) at {url_of(sock, config.host)} "
              f"({'API key required' if key else 'no API key'}); Ctrl-C stops", flush=True)
        serve(lm, config, sock)
    finally:
        sock.close()
    return 0
