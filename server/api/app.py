"""The FastAPI app: OpenAI-compatible routes over one engine, plus /v1/models, /health and /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.metadata
import logging
import time

from typing import Literal

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from router.text import AUTO

from server.api import beam_search, openai_responses, tools, translate
from server.api.auth import APIKeyMiddleware
from server.api.limits import ConcurrencyLimit
from server.api.errors import APIError, from_router, install_handlers
from server.api.reasoning import reasoning_parser_named
from server.api.resolver import AdapterResolver
from server.api.response_store import ResponseStore
from server.api.protocol import (
    ChatCompletionRequest, CompletionRequest, DetokenizeRequest, LoadAdapterRequest, ResponsesRequest,
    TokenizeRequest, UnloadAdapterRequest, ignored_fields,
)
from server.api.responses import collect, composition_header, stream
from server.api.serving import Call, Runner, until_disconnected
from server.metrics import Metrics

logger = logging.getLogger(__name__)

CLIENT_CLOSED = 499
"""Status logged for a non-streaming request whose client left before the answer (nginx's convention)."""


def create_app(engine, api_key: str | None = None, allowed_origins: list[str] | None = None,
               log_requests: bool = False, max_concurrent_requests: int | None = None) -> FastAPI:
    """An app serving `engine`; with `api_key`, every route but the probes needs `Authorization: Bearer KEY`;
    with `allowed_origins`, browsers on those origins may call it (CORS; `*` for any), preflights answered
    before the key is checked; with `log_requests`, every finished request is logged in one line; with
    `max_concurrent_requests`, generation calls past that many in flight get a 429 (`api.limits`).

    The app's lifespan loads the library's text encoder (if it has a text router, so a missing encoder
    fails at start-up, not on the first `auto` request), starts the engine's step loop and shuts it
    down. Metrics live in a registry of
    the app's own (`app.state.metrics.registry`), fed by the engine's step observer.
    """
    tools.parser_named(engine.config.tool_call_parser)  # an unknown parser fails at start-up
    reasoning = reasoning_parser_named(engine.config.reasoning_parser)
    metrics = Metrics(engine.model_name, engine.num_module_slots)
    engine.step_observer = metrics.observe_step
    metrics.observe_step(engine.stats())

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        router = text_router(engine)
        if router is not None:
            await asyncio.to_thread(router.encoder.load)
        engine.start()
        try:
            yield
        finally:
            engine.shutdown()

    app = FastAPI(title="Tessera", lifespan=lifespan)
    app.state.engine, app.state.metrics = engine, metrics
    created = int(time.time())  # the cards' `created`: one time for every card and every call
    resolver_dir = engine.config.lora_resolver_dir
    app.state.resolver = AdapterResolver(engine, resolver_dir) if resolver_dir is not None else None
    runner = Runner(engine, metrics, log_requests)
    install_handlers(app, metrics.observe_error)
    if max_concurrent_requests is not None:  # inside the key check: a caller without the key takes no slot
        app.add_middleware(ConcurrencyLimit, limit=max_concurrent_requests, on_error=metrics.observe_error)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key, on_error=metrics.observe_error)
    if allowed_origins:  # added last, so outermost: a preflight carries no key
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["X-Request-Id", "X-Tessera-Composition",
                                                                "X-Tessera-Ignored-Fields"])

    @app.get("/health")
    async def health():
        """200 while the engine serves; 503 once its loop died (an orchestrator should restart the server)."""
        if not engine.healthy():
            raise APIError(503, f"the engine stopped serving: {engine.dead}", None, "engine_dead")
        return {"status": "ok"}

    @app.api_route("/ping", methods=["GET", "POST"])
    async def ping():
        """vLLM's (and SageMaker's) liveness probe."""
        return Response(status_code=200)

    @app.get("/version")
    async def version():
        return {"version": _version()}

    @app.get("/metrics")
    async def metrics_route():
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": model_cards(engine, created)}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        """OpenAI's model retrieval: one card of /v1/models."""
        for card in model_cards(engine, created):
            if card["id"] == model_id:
                return card
        raise APIError(404, f"The model '{model_id}' does not exist.", "model", "model_not_found")

    async def chat_call(body: ChatCompletionRequest, request: Request) -> Call:
        mode = tools.tool_mode(body, engine.config.tool_call_parser)
        prompt = translate.chat_prompt(body, engine.tokenizer, bool(body.add_special_tokens))
        prompt = translate.truncated(prompt, body, engine.max_model_len)
        echo = translate.chat_echo(body, mode, reasoning is not None)
        start = reasoning.start(engine.tokenizer.decode(prompt)) if reasoning is not None else None
        return await _call(runner, "chat", body, [prompt] * body.n, request,
                           None if echo is None else [echo] * body.n, mode, start)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        if body.use_beam_search:
            beam_search.check(body)
        return await _respond(runner, await chat_call(body, request), body.stream, request, body)

    store = ResponseStore(engine.config.responses_store_size)
    app.state.responses = store

    @app.post("/v1/responses")
    async def responses(body: ResponsesRequest, request: Request):
        whole, items = openai_responses.with_history(body, store)
        call = await chat_call(openai_responses.chat_request(whole), request)
        _note_ignored(call, body)
        keep = None
        if store.enabled and body.store is not False:
            keep = lambda response: store.put(response, items, body.previous_response_id)  # noqa: E731
        if body.stream:
            return StreamingResponse(openai_responses.events(runner, call, body, keep),
                                     media_type="text/event-stream", headers=composition_header(call))
        result = await until_disconnected(request, collect(runner, call))
        if result is None:
            return Response(status_code=CLIENT_CLOSED)
        return JSONResponse(openai_responses.response_body(result, body, call, keep), headers=composition_header(call))

    @app.get("/v1/responses/{response_id}")
    async def get_response(response_id: str):
        return _stored(store, response_id).response

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str):
        _stored(store, response_id)
        store.delete(response_id)
        return {"id": response_id, "object": "response", "deleted": True}

    @app.get("/v1/responses/{response_id}/input_items")
    async def input_items(response_id: str, order: Literal["asc", "desc"] = "desc", limit: int = Query(20, ge=1, le=100),
                          after: str | None = None):
        """OpenAI's list of a response's input items (its own turn's), newest first unless `order` is asc."""
        items = list(_stored(store, response_id).input_items)
        items = items[::-1] if order == "desc" else items
        if after is not None:
            at = next((i for i, item in enumerate(items) if item["id"] == after), None)
            if at is None:
                raise APIError(400, f"no input item {after!r} in response {response_id!r}", "after")
            items = items[at + 1:]
        page = items[:limit]
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        if body.use_beam_search:
            beam_search.check(body)
        prompts = translate.completion_prompts(body, engine.tokenizer, engine.max_model_len)
        echo = translate.echo_texts(body, prompts, engine.tokenizer)
        echo = [text for text in echo for _ in range(body.n)] if echo is not None else None
        call = await _call(runner, "text", body, [p for p in prompts for _ in range(body.n)], request, echo)
        return await _respond(runner, call, body.stream, request, body)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        tokenizer = engine.tokenizer
        if body.messages is not None:
            ids = translate.chat_prompt(body, tokenizer, body.add_special_tokens and
                                        "add_special_tokens" in body.model_fields_set)
        else:
            ids = tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        strs = tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids, "token_strs": strs}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        translate.check_token_ids(body.tokens, len(engine.tokenizer), "tokens")
        return {"prompt": engine.tokenizer.decode(body.tokens)}

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache():
        """vLLM's: forget every cached prefix (running requests keep their blocks), say between benchmark runs."""
        forgotten = await asyncio.wrap_future(engine.reset_prefix_cache())
        return {"blocks_forgotten": forgotten}

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(body: LoadAdapterRequest):
        await _change_modules(engine, _load_adapter, body)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(body: UnloadAdapterRequest):
        await _change_modules(engine, lambda engine, body: engine.remove_module(body.lora_name), body)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    return app


RUNTIME_OFF = "loading adapters while serving is off; start the server with --runtime-modules"


def _load_adapter(engine, body: LoadAdapterRequest):
    """Read and check the PEFT directory (in a worker thread), then add it between steps."""
    from router.info import check_name
    from router.peft_io import import_peft

    name = check_name("module", body.lora_name)
    description = f"PEFT adapter {body.lora_path}, added while serving"
    info, weights = import_peft(body.lora_path, engine.fingerprint, name, description)
    return engine.add_module(info, weights, replace=body.load_inplace)


async def _change_modules(engine, change, body) -> None:
    """Apply a module change; an unknown module is a 404, a bad adapter or a refused change a 400."""
    if not engine.config.runtime_modules:
        raise APIError(400, RUNTIME_OFF, "lora_name", "runtime_modules_off")
    try:
        future = await asyncio.to_thread(change, engine, body)
        await asyncio.wrap_future(future)
    except LookupError as error:
        raise from_router(error, "lora_name") from None
    except (ValueError, OSError) as error:
        raise APIError(400, str(error), None, "invalid_adapter") from None


async def _call(runner: Runner, kind: str, body, prompts: list[list[int]], request: Request,
                echo_texts: list[str] | None = None, tool_mode: str | None = None,
                reasoning_start: str | None = None) -> Call:
    """The call a body asks for: the composition and sampling params of every choice, its constraint (a chat
    reply of a reasoning model starts where `reasoning_start` says: `server.api.reasoning`)."""
    engine = runner.engine
    composition = await _composition(engine, body, request)
    default_max = None if kind == "chat" else 16
    bad_words = translate.bad_word_ids(body, engine.tokenizer)  # once per call, not per choice
    allowed = translate.allowed_token_ids(body, len(engine.tokenizer))
    params = [
        translate.sampling_params(body, len(p), engine.max_model_len, i % body.n, default_max, len(engine.tokenizer),
                                  bad_words, engine.sampling_defaults, allowed)
        for i, p in enumerate(prompts)
    ]
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    configured = tools.parser_named(engine.config.tool_call_parser)
    forced = tool_mode not in (None, "auto")  # required or a named function
    native = (configured if forced and configured is not None and configured.tag_format(engine.tokenizer) is not None
              and engine.config.tool_call_structural_tags else None)  # forced calls in the model's own format
    parser = configured if tool_mode == "auto" else native
    if parser is not None and parser.keeps_special_tokens:  # its markers are special tokens
        params = [dataclasses.replace(p, skip_special_tokens=False) for p in params]
    reasoning = reasoning_parser_named(engine.config.reasoning_parser) if reasoning_start is not None else None
    thinks = reasoning is not None and reasoning_start != "answer"
    after_reasoning = _single_token(engine.tokenizer, reasoning.CLOSE) if thinks else None
    tagged = tool_mode == "auto" or (getattr(body, "tools", None) and body.tool_choice == "none")
    tag_parser = native if forced else (
        configured if tagged and engine.config.tool_call_structural_tags and (not thinks or after_reasoning) else None)
    grammar, in_format = await _grammar(engine, body, tool_mode, tag_parser)  # (no tag binding the reasoning too)
    held = parser is not None and in_format  # the reply is under the parser's tag
    grammar_after = None
    if thinks and grammar is not None:
        grammar_after = after_reasoning  # the grammar shapes the answer only
        if grammar_after is None:  # no `</think>` token to start it at: constrained from the first token
            reasoning_start = "answer"
    call = Call(
        kind, body.model, prompts, params, composition, body.n, include_usage, grammar, echo_texts, tool_mode,
        prompt_logprobs=body.prompt_logprobs is not None,
        tool_schemas={t.function.name: t.function.parameters or {} for t in getattr(body, "tools", None) or ()},
        tool_parser=parser, calls_held=held, held_keys=parser.held_call_keys(engine.tokenizer) if held else None,
        reasoning=reasoning, reasoning_start=reasoning_start,
        grammar_after=grammar_after,
        priority=_priority(engine, body),
        reasoning_close=_single_token(engine.tokenizer, reasoning.CLOSE) if reasoning is not None else None,
        tokens_as_ids=body.return_tokens_as_token_ids,
        continuous_usage=include_usage and body.stream_options.continuous_usage_stats,
        request_id=request.headers.get("x-request-id") or body.request_id, cache_salt=body.cache_salt,
        prediction=_prediction(engine, body))
    _note_ignored(call, body)
    return call


def _prediction(engine, body) -> tuple[int, ...] | None:
    """A body's OpenAI `prediction`, tokenized as reply text is (no special tokens); None when it has none. One
    longer than the context (which no reply can fill) is a 400."""
    if getattr(body, "prediction", None) is None:
        return None
    text = body.prediction.text()
    if len(text) > 64 * engine.max_model_len:  # before tokenizing: no token is 64 characters long
        raise APIError(400, f"prediction has {len(text)} characters, more than a reply of max_model_len "
                            f"{engine.max_model_len} tokens can hold", "prediction")
    ids = tuple(engine.tokenizer.encode(text, add_special_tokens=False))
    if len(ids) > engine.max_model_len:
        raise APIError(400, f"prediction has {len(ids)} tokens, more than max_model_len {engine.max_model_len}",
                       "prediction")
    return ids


def _note_ignored(call: Call, body) -> None:
    """Record the body fields nothing reads; as vLLM does, warn: a field a client relies on (an old constraint,
    say) does nothing here."""
    call.ignored_fields = ignored_fields(body)
    if call.ignored_fields:
        logger.warning("request %s: ignored fields %s", call.public_id, ", ".join(call.ignored_fields))


def _priority(engine, body) -> int:
    if body.priority and engine.config.scheduling_policy != "priority":
        raise APIError(400, "priority needs the server started with --scheduling-policy priority", "priority")
    return body.priority


async def _respond(runner: Runner, call: Call, streamed: bool, request: Request, body=None):
    """Stream `call`'s chunks, or collect them into one body (nothing if the client left first); a beam search
    when `body` asks for one."""
    headers = composition_header(call)
    if streamed:
        return StreamingResponse(stream(runner, call), media_type="text/event-stream", headers=headers)
    if body is not None and body.use_beam_search:
        work = beam_search.collect(runner, call, body.length_penalty)
    else:
        work = collect(runner, call)
    result = await until_disconnected(request, work)
    if result is None:
        return Response(status_code=CLIENT_CLOSED)
    return JSONResponse(result, headers=headers)


def _stored(store: ResponseStore, response_id: str):
    stored = store.get(response_id)
    if stored is None:
        raise APIError(404, f"Response with id '{response_id}' not found.", "response_id", "response_not_found")
    return stored


def _version() -> str:
    try:
        return importlib.metadata.version("tessera-serve")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree without installing
        return "unknown"


def _single_token(tokenizer, text: str) -> int | None:
    """The id of the one token that is `text`, or None where the tokenizer spells it with several."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


async def _grammar(engine, body, tool_mode: str | None, parser=None):
    """(the compiled structured-output constraint of `body` or of its tool calls, or None; whether it is `parser`'s
    call format), compiled in a worker thread. Where no other constraint was asked for, `parser`'s structural tag
    (`tools.call_tool_grammar`): with tool_choice auto, each call the model starts held to its format; required
    and named, nothing but calls in it (without a tag, required and named are JSON: `tools.tool_grammar`); with
    none, no call opened (`tools.no_call_grammar`). A parser without a tag, or None, leaves auto's text free."""
    asked = translate.grammar_spec(body)
    forced = tool_mode not in (None, "auto")
    if forced and asked is not None:
        raise APIError(400, "tool calls are generated under the tools' schemas; drop response_format and "
                            "structured_outputs, or tool_choice", "tool_choice")
    spec = None
    if asked is None and parser is not None:
        if tool_mode is not None:  # (xgrammar builds the tag: off the event loop)
            spec = await asyncio.to_thread(tools.call_tool_grammar, body, parser, tool_mode, engine.tokenizer)
        else:
            spec = tools.no_call_grammar(parser, engine.tokenizer)
        asked = (spec, "tools") if spec is not None else None
    held = spec is not None and tool_mode is not None
    if forced and asked is None:
        asked = tools.tool_grammar(body, tool_mode), "tools"
    if asked is None:
        return None, False
    spec, param = asked
    try:
        return await asyncio.to_thread(engine.compile_grammar, spec), held
    except ValueError as error:
        raise APIError(400, str(error), param, "invalid_structured_output") from None


async def _composition(engine, body, request: Request):
    """The request's composition; text routing (`auto`) runs its blocking encoder in a worker thread, and
    adapters of the LoRA resolver directory load first (`api.resolver`)."""
    if request.app.state.resolver is not None:
        await request.app.state.resolver.resolve(body)
    tags = translate.requested_tags(body, request.headers.get(translate.TASK_HEADER), engine.model_name,
                                    engine.library)
    if tags.task != AUTO or text_router(engine) is None:
        return translate.compose_tags(tags, engine.library, engine.config.max_k)
    text = translate.routing_text(body, engine.tokenizer)
    composition = await asyncio.to_thread(translate.compose_tags, tags, engine.library, engine.config.max_k, text)
    logger.debug("auto routed request to task %r", composition.task)
    return composition


def text_router(engine):
    """The engine's library's text router, or None."""
    return engine.library.controller.text_router if engine.library is not None else None


def model_cards(engine, created: int) -> list[dict]:
    """/v1/models: the backbone, every task, every module, and `auto` if the library has a text router.

    Every card says what it is in `tessera.kind`; a task's card also gives the modules and gates its tag serves.
    """
    card = {"object": "model", "created": created, "owned_by": "tessera"}
    backbone = engine.model_name
    cards = [card | {"id": backbone, "root": backbone, "parent": None, "max_model_len": engine.max_model_len,
                     "tessera": {"kind": "backbone"}}]
    library = engine.library
    if library is None:
        return cards
    child = card | {"root": backbone, "parent": backbone, "max_model_len": engine.max_model_len}
    for task in library.tasks.values():
        modules = library.controller.gates_for_task(task.name).as_dict()["modules"]  # what a tag of it serves
        cards.append(child | {"id": task.name, "tessera": {"kind": "task", "description": task.description,
                                                           "modules": modules}})
    for module in library.modules.values():
        info = {"kind": "module", "rank": module.rank, "description": module.description}
        cards.append(child | {"id": module.name, "tessera": info})
    router = text_router(engine)
    if router is not None:
        info = {"kind": "router", "encoder": router.settings.encoder, "tasks": list(library.tasks),
                "min_confidence": router.settings.min_confidence}
        cards.append(child | {"id": AUTO, "tessera": info})
    return cards
