"""The OpenAI-compatible HTTP API, as a FastAPI application: ``/v1/models``, ``/v1/completions`` and
``/v1/chat/completions`` (streaming with server-sent events), plus ``/health``.

Every failure answers with OpenAI's error JSON, ``{"error": {"message", "type", "param", "code"}}``,
never a traceback: 400 for a bad parameter (the message is the :class:`~core.errors.LabError`'s
sentence), 401 for a missing or wrong key, 404 for a model or path that is not here, 503 with a
Retry-After when the queue is full, 500 for a bug (its traceback goes to the server's log only).
A request is checked before it waits for the model, so a stream that starts has a valid request.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, AsyncIterator

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from ..errors import LabError, is_out_of_memory, one_line
from ..files import parse_json
from .chat import chat_prompt
from .config import API_KEY_ENV, ServeConfig
from .engine import Busy, ModelWorker, Prepared, prepare, run_choice
from .protocol import GenerationRequest, parse_chat, parse_completion
from .responses import (DeltaBuffer, chat_chunk, chat_logprobs, chat_response, completion_chunk, completion_logprobs,
                        completion_response, error_body, model_card, models_response, new_id, now, usage, usage_chunk)

if TYPE_CHECKING:
    from ..models.loading import LoadedModel

log = logging.getLogger("uvicorn.error")
RETRY_AFTER_S = 1
ROUTES = "GET /v1/models, POST /v1/completions and POST /v1/chat/completions"


class APIError(Exception):
    """An answer other than 200, in OpenAI's error format."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.headers = status, message, kind, code, headers


def _as_api_error(e: BaseException) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, Busy):
        return APIError(503, str(e), "server_error", "queue_full", {"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(e, LabError):
        return APIError(400, one_line(e), "invalid_request_error", "invalid_parameter")
    if is_out_of_memory(e):
        return APIError(503, "The device ran out of memory; ask for fewer tokens, fewer choices or a shorter prompt.",
                        "server_error", "out_of_memory")
    log.error("unexpected error while serving a request", exc_info=e)
    return APIError(500, f"Unexpected {type(e).__name__} ({one_line(e)[:200]}); this is a bug in GPT Lab, and the "
                         f"server's log has its traceback.", "server_error", "internal_error")


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.kind, e.code), status_code=e.status, headers=e.headers)


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _body(request: Request) -> Any:
    raw = await request.body()
    try:
        return parse_json(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise LabError(f"The request body is not valid JSON ({one_line(e)}); send a JSON object.") from None


class Server:
    """The routes' shared state: the model, its worker, the served name and the key."""

    def __init__(self, lm: "LoadedModel", config: ServeConfig):
        self.lm, self.config = lm, config
        self.worker = ModelWorker(lm, config.max_queue, config.queue_timeout_s)
        self.name = config.model_name or lm.spec
        self.key = config.key()
        self.created = now()

    # -- checks ----------------------------------------------------------------------------------------
    async def require_key(self, request: Request) -> None:
        if self.key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.key.encode()):
            raise APIError(401, f"Missing or wrong API key; send the server's key (--api-key or {API_KEY_ENV}) as "
                                f"'Authorization: Bearer KEY'.", "invalid_request_error", "invalid_api_key")

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.name:
            raise APIError(404, f"The model '{name}' is not served here; this server serves '{self.name}' "
                                f"(GET /v1/models).", "invalid_request_error", "model_not_found")

    # -- endpoints -------------------------------------------------------------------------------------
    async def completions(self, request: Request):
        req = parse_completion(await _body(request))
        self.check_model(req.model)
        return await self.respond(req, prepare(self.lm, req))

    async def chat(self, request: Request):
        req, messages = parse_chat(await _body(request))
        self.check_model(req.model)
        prompt, stops = chat_prompt(self.lm, messages)
        req.prompts, req.extra_stop = [prompt], stops
        # a chat template writes the model's BOS into its text, so it is not added again (transformers'
        # apply_chat_template(tokenize=True) encodes the same way); the plain transcript (it comes with its
        # stop string) is encoded like any prompt
        req.add_special_tokens = bool(stops)
        return await self.respond(req, prepare(self.lm, req))

    async def respond(self, req: GenerationRequest, preps: list[Prepared]):
        plan = [(i * req.n + j, prep, req.choice_config(j, prep.max_new_tokens))
                for i, prep in enumerate(preps) for j in range(req.n)]
        n_prompt = sum(len(p.ids) for p in preps)
        if req.stream:
            return self.stream(req, plan, n_prompt)

        def job():
            return [run_choice(self.lm, prep, cfg, idx, logprobs=req.logprobs, echo=req.echo) for idx, prep, cfg in plan]

        choices = await asyncio.wrap_future(self.worker.submit(job))
        if req.chat:
            return JSONResponse(chat_response(self.name, choices, req.logprobs, n_prompt))
        return JSONResponse(completion_response(self.name, req.prompts, choices, req.n, req.logprobs, req.echo,
                                                n_prompt))

    def stream(self, req: GenerationRequest, plan: list, n_prompt: int) -> StreamingResponse:
        """Server-sent events in OpenAI's format: one chunk per token (its text may be held back while
        it could still be the start of a stop string), a last chunk per choice with its finish
        reason, the usage chunk when asked, then ``data: [DONE]``. A client that disconnects stops
        the generation after the current token."""
        loop = asyncio.get_running_loop()
        items: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()

        def put(item: tuple) -> None:
            try:
                loop.call_soon_threadsafe(items.put_nowait, item)
            except RuntimeError:  # the event loop is gone: the server is stopping
                cancelled.set()

        def job() -> None:
            try:
                for idx, prep, cfg in plan:
                    if cancelled.is_set():
                        return
                    put(("start", idx, cfg))
                    result = run_choice(self.lm, prep, cfg, idx, logprobs=req.logprobs, echo=req.echo,
                                        on_token=lambda tok, text, idx=idx: put(("token", idx, tok, text)),
                                        cancelled=cancelled)
                    put(("done", idx, result))
                put(("end",))
            except BaseException as e:  # reported to the client as the stream's last event
                put(("error", e))

        def never_ran(future) -> None:  # dropped at shutdown, or waited past the queue timeout
            if future.cancelled():
                put(("error", Busy("The server stopped before this request started; retry.")))
            elif future.exception() is not None:
                put(("error", future.exception()))

        self.worker.submit(job).add_done_callback(never_ran)  # Busy here is a 503 before any byte is sent
        return StreamingResponse(self._events(req, plan, n_prompt, items, cancelled), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _events(self, req: GenerationRequest, plan: list, n_prompt: int, items: asyncio.Queue,
                      cancelled: threading.Event) -> AsyncIterator[str]:
        ident, created = new_id("chatcmpl" if req.chat else "cmpl"), now()
        buffers: dict[int, DeltaBuffer] = {}
        offsets: dict[int, int] = {}
        generated = 0

        def chunk(idx: int, text: str, logprobs: dict | None = None, finish: str | None = None,
                  first: bool = False) -> str:
            if req.chat:
                delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
                return _sse(chat_chunk(ident, self.name, created, idx, delta, logprobs, finish))
            return _sse(completion_chunk(ident, self.name, created, idx, text, logprobs, finish))

        try:
            while True:
                item = await items.get()
                kind = item[0]
                if kind == "start":
                    _, idx, cfg = item
                    buffers[idx], offsets[idx] = DeltaBuffer(cfg.stop), 0
                    echo = req.prompts[idx // req.n] if req.echo else ""
                    if req.chat or echo:
                        yield chunk(idx, echo, first=True)
                        offsets[idx] = len(echo)
                elif kind == "token":
                    _, idx, tok, text = item
                    delta = buffers[idx].update(text)
                    lp = None
                    if req.logprobs is not None:
                        lp = chat_logprobs([tok]) if req.chat else completion_logprobs([tok], offset=offsets[idx])
                        offsets[idx] += len(tok.text)
                    if delta or lp is not None:
                        yield chunk(idx, delta, lp)
                elif kind == "done":
                    _, idx, result = item
                    generated += result.n_generated
                    yield chunk(idx, buffers[idx].finish(result.text), finish=result.finish_reason)
                elif kind == "end":
                    if req.include_usage:
                        yield _sse(usage_chunk(ident, self.name, created, req.chat, usage(n_prompt, generated)))
                    yield "data: [DONE]\n\n"
                    return
                else:
                    err = _as_api_error(item[1])
                    yield _sse(error_body(err.message, err.kind, err.code))
                    return
        finally:
            cancelled.set()


def create_app(lm: "LoadedModel", config: ServeConfig | None = None) -> FastAPI:
    """The API serving ``lm``; ``app.state.server`` holds its :class:`Server` (and worker)."""
    config = config or ServeConfig()
    config.check()
    server = Server(lm, config)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        server.worker.close()

    app = FastAPI(title="GPT Lab", summary="OpenAI-compatible API for a GPT Lab model", lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError):
        return _error_response(e)

    @app.exception_handler(LabError)
    async def _lab_error(_: Request, e: LabError):
        return _error_response(_as_api_error(e))

    @app.exception_handler(Busy)
    async def _busy(_: Request, e: Busy):
        return _error_response(_as_api_error(e))

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException):
        if e.status_code == 404:
            message = f"There is no {request.method} {request.url.path} here; this server answers {ROUTES}."
        elif e.status_code == 405:
            message = f"{request.url.path} does not take {request.method}; this server answers {ROUTES}."
        else:
            message = one_line(e.detail)
        return _error_response(APIError(e.status_code, message, "invalid_request_error", None,
                                        dict(e.headers or {}) or None))

    def guarded(handler):
        """Routes answer every unexpected exception as a 500 in OpenAI's format (traceback to the log)."""
        async def route(request: Request):
            try:
                return await handler(request)
            except (APIError, LabError, Busy):
                raise
            except Exception as e:
                raise _as_api_error(e) from e
        return route

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(server.require_key)])
    v1.add_api_route("/models", guarded(_models(server)), methods=["GET"])
    v1.add_api_route("/models/{model_id:path}", guarded(_model(server)), methods=["GET"])
    v1.add_api_route("/completions", guarded(server.completions), methods=["POST"])
    v1.add_api_route("/chat/completions", guarded(server.chat), methods=["POST"])
    app.include_router(v1)
    app.add_api_route("/health", _health, methods=["GET"])
    return app


def _models(server: Server):
    async def models(request: Request):
        return JSONResponse(models_response(server.name, server.lm.stack.context_length, server.created))
    return models


def _model(server: Server):
    async def model(request: Request):
        name = request.path_params["model_id"]
        server.check_model(name)
        return JSONResponse(model_card(server.name, server.lm.stack.context_length, server.created))
    return model


async def _health():
    """Liveness for load balancers and scripts; needs no key and says nothing about the model."""
    return {"status": "ok"}


__all__ = ["APIError", "Server", "create_app"]
