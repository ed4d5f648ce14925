"""The FastAPI app: OpenAI-compatible routes over one engine, plus /v1/models, /health and /metrics."""

from __future__ import annotations

import contextlib
import hmac
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.api import translate
from server.api.errors import APIError, error_response, install_handlers
from server.api.protocol import ChatCompletionRequest, CompletionRequest
from server.api.responses import collect, composition_header, stream
from server.api.serving import Call, Runner
from server.metrics import Metrics

OPEN_PATHS = {"/health"}


def create_app(engine, api_key: str | None = None) -> FastAPI:
    """An app serving `engine`; with `api_key`, every route but /health needs `Authorization: Bearer KEY`."""
    metrics = Metrics()
    engine.step_observer = metrics.observe_step
    metrics.observe_step(engine.stats())

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.shutdown()

    app = FastAPI(title="Tessera", lifespan=lifespan)
    app.state.engine, app.state.metrics = engine, metrics
    runner = Runner(engine, metrics)
    install_handlers(app)
    if api_key:
        _require_key(app, api_key)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics_route():
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": _model_cards(engine)}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        prompt = translate.chat_prompt(body, engine.tokenizer)
        return await _serve(runner, "chat", body, [prompt] * body.n, request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        prompts = translate.completion_prompts(body, engine.tokenizer)
        return await _serve(runner, "text", body, [p for p in prompts for _ in range(body.n)], request)

    return app


async def _serve(runner: Runner, kind: str, body, prompts: list[list[int]], request: Request):
    engine = runner.engine
    composition = translate.resolve_composition(
        body, request.headers.get(translate.TASK_HEADER), engine.model_name, engine.library, engine.config.max_k
    )
    default_max = None if kind == "chat" else 16
    params = [
        translate.sampling_params(body, len(p), engine.max_model_len, i % body.n, default_max)
        for i, p in enumerate(prompts)
    ]
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    call = Call(kind, body.model, prompts, params, composition, include_usage)
    headers = composition_header(call)
    if body.stream:
        return StreamingResponse(stream(runner, call), media_type="text/event-stream", headers=headers)
    return JSONResponse(await collect(runner, call), headers=headers)


def _model_cards(engine) -> list[dict]:
    created = int(time.time())
    card = {"object": "model", "created": created, "owned_by": "tessera"}
    cards = [card | {"id": engine.model_name, "tessera": {"kind": "backbone"}, "max_model_len": engine.max_model_len}]
    library = engine.library
    if library is not None:
        for task in library.tasks.values():
            cards.append(card | {"id": task.name, "root": engine.model_name, "parent": engine.model_name,
                                 "tessera": {"kind": "task", "description": task.description}})
        for module in library.modules.values():
            cards.append(card | {"id": module.name, "root": engine.model_name, "parent": engine.model_name,
                                 "tessera": {"kind": "module", "rank": module.rank, "description": module.description}})
    return cards


def _require_key(app: FastAPI, api_key: str) -> None:
    expected = f"Bearer {api_key}".encode()

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if request.url.path not in OPEN_PATHS:
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return error_response(APIError(401, "invalid or missing API key", None, "invalid_api_key"))
        return await call_next(request)
