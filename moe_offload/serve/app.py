"""The ASGI app (Starlette, server-sent events through sse-starlette): the OpenAI routes, /health and
/metrics over one BatchEngine (in a child process, EngineProcess, or a thread of this one).

Each generation request is checked, queued on the engine (a full queue answers 429 at once) and
then either streamed as server-sent events ending in ``data: [DONE]`` or answered whole. The engine
thread hands updates to the request's asyncio queue through ``call_soon_threadsafe``. When the
client goes away (the stream is cancelled, or a whole-answer client disconnects) the request is
cancelled in the engine and leaves the batch at the next step boundary.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json

from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from .engine import BatchEngine, GenerationRequest, QueueFull, Update
from .engine_process import EngineProcess
from .logprobs import LogprobsShape
from .metrics import render_metrics
from .openai_api import (
    DEFAULT_COMPLETION_TOKENS,
    ApiError,
    ResponseShape,
    ServedModel,
    chat_prompt,
    check_model,
    completion_prompt,
    include_usage,
    sampling_params,
)

Engine = BatchEngine | EngineProcess  # the same interface: submit, cancel, queue_depth, running, start, stop
DISCONNECT_POLL_S = 0.5  # how often a whole-answer request checks that its client is still there


class ServerState:
    """What the routes share: the engine, the served model and the optional API key."""

    def __init__(self, engine: Engine, served: ServedModel, api_key: str | None) -> None:
        self.engine, self.served, self.api_key = engine, served, api_key

    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise ApiError(401, "Incorrect API key provided", None, "invalid_api_key")


async def _json_body(request: Request) -> dict:
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(400, f"The request body is not valid JSON: {err}", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object", None, "invalid_json")
    return body


async def _generate(request: Request, chat: bool):
    state: ServerState = request.app.state.server
    state.authorize(request)
    body = await _json_body(request)
    check_model(body, state.served)
    prompt = chat_prompt(body, state.served) if chat else completion_prompt(body, state.served)
    default_max = None if chat else DEFAULT_COMPLETION_TOKENS  # chat: the context left
    params = sampling_params(body, state.served, len(prompt), default_max, chat)
    with_usage = include_usage(body)
    loop, updates = asyncio.get_running_loop(), asyncio.Queue()
    job = GenerationRequest(prompt, params, state.served.tokenizer,
                            lambda update: loop.call_soon_threadsafe(updates.put_nowait, update))
    try:
        state.engine.submit(job)
    except QueueFull as err:
        raise ApiError(429, f"The server is busy ({err}); retry later", None, "queue_full",
                       type="rate_limit_error") from None
    logprobs = None if params.logprobs is None else LogprobsShape(state.served.tokenizer, chat)
    shape = ResponseShape(chat, state.served.name, logprobs)
    if body.get("stream"):
        return EventSourceResponse(_stream(state.engine, job, updates, shape, with_usage), ping=15)
    return await _whole(request, state.engine, job, updates, shape)


async def _stream(engine: Engine, job: GenerationRequest, updates: asyncio.Queue, shape: ResponseShape,
                  with_usage: bool = False):
    """The SSE events of one request (with ``with_usage``, a usage chunk before ``[DONE]``); cancelled (client
    gone) -> the request leaves the engine."""
    try:
        while True:
            update: Update = await updates.get()
            if update.error is not None:
                yield {"data": json.dumps(ApiError(500, update.error, code="generation_failed",
                                                   type="server_error").body())}
                break
            if update.text or update.finish_reason or update.logprobs is not None:
                yield {"data": json.dumps(shape.chunk(update))}
            if update.finish_reason:
                if with_usage:
                    yield {"data": json.dumps(shape.usage_chunk(update))}
                break
        yield {"data": "[DONE]"}
    finally:
        if not job.finished:
            engine.cancel(job)


async def _whole(request: Request, engine: Engine, job: GenerationRequest, updates: asyncio.Queue,
                 shape: ResponseShape) -> JSONResponse:
    """Wait for the whole answer, checking every DISCONNECT_POLL_S that the client is still there."""
    loop, pieces, tokens = asyncio.get_running_loop(), [], []
    next_check = loop.time() + DISCONNECT_POLL_S
    try:
        while True:
            try:
                update: Update | None = await asyncio.wait_for(updates.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                update = None
            if loop.time() >= next_check:
                if await request.is_disconnected():
                    return JSONResponse({}, status_code=499)  # nobody reads it
                next_check = loop.time() + DISCONNECT_POLL_S
            if update is None:
                continue
            if update.error is not None:
                raise ApiError(500, update.error, code="generation_failed", type="server_error")
            pieces.append(update.text)
            if update.logprobs is not None:
                tokens.append(update.logprobs)
            if update.finish_reason:
                return JSONResponse(shape.full("".join(pieces), update, tokens))
    finally:
        if not job.finished:
            engine.cancel(job)


async def completions(request: Request):
    return await _generate(request, chat=False)


async def chat_completions(request: Request):
    return await _generate(request, chat=True)


async def models(request: Request) -> JSONResponse:
    state: ServerState = request.app.state.server
    state.authorize(request)
    card = {"id": state.served.name, "object": "model", "created": state.served.created, "owned_by": "moe-offload"}
    return JSONResponse({"object": "list", "data": [card]})


async def health(request: Request) -> JSONResponse:
    """Liveness, open without the API key so that probes need no secret."""
    engine: Engine = request.app.state.server.engine
    return JSONResponse({"status": "ok", "queue_depth": engine.queue_depth, "running": engine.running})


async def metrics(request: Request) -> PlainTextResponse:
    state: ServerState = request.app.state.server
    state.authorize(request)
    text = await asyncio.to_thread(_metrics_text, state.engine)
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4")


def _metrics_text(engine: Engine) -> str:
    """An engine process renders its own metrics (its counters live there); an engine thread's are rendered here."""
    return engine.metrics_text() if isinstance(engine, EngineProcess) else render_metrics(engine)


async def _api_error(request: Request, err: ApiError) -> JSONResponse:
    headers = {"Retry-After": "1"} if err.status == 429 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


async def _http_error(request: Request, err: HTTPException) -> JSONResponse:
    """Starlette's own 404/405 in the OpenAI error shape."""
    return await _api_error(request, ApiError(err.status_code, f"{request.method} {request.url.path}: {err.detail}",
                                              code="not_found" if err.status_code == 404 else None))


async def _internal_error(request: Request, err: Exception) -> JSONResponse:
    return JSONResponse(ApiError(500, f"internal error: {err}", type="server_error").body(), status_code=500)


def create_app(engine: Engine, served: ServedModel, api_key: str | None = None) -> Starlette:
    """The server's ASGI app; it starts ``engine`` on startup and stops it on shutdown."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)

    routes = [Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]),
              Route("/health", health, methods=["GET"]),
              Route("/metrics", metrics, methods=["GET"])]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={ApiError: _api_error, HTTPException: _http_error,
                                        Exception: _internal_error})
    app.state.server = ServerState(engine, served, api_key)
    return app
