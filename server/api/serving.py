"""Running one API call on the engine: n choices, streamed as SSE chunks or collected into one body."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

from router.composition import Composition
from router.errors import CompositionError, UnknownModuleError

from server.api.errors import APIError, from_router
from server.engine.engine import EngineDeadError
from server.engine.request import NoDrawableTokenError, Request, RequestOutput, SamplingParams
from server.metrics import Metrics, RequestTiming, task_label

T = TypeVar("T")
logger = logging.getLogger(__name__)


@dataclass
class Call:
    """One API call: its kind (chat or text), prompts and params per choice, composition."""

    kind: str
    model: str
    prompts: list[list[int]]
    """One prompt per choice: each distinct prompt repeated `n` times in a row."""
    params: list[SamplingParams]
    composition: Composition
    n: int = 1
    include_usage: bool = False
    grammar: object | None = None
    """The compiled structured-output constraint every choice follows (`Engine.compile_grammar`), or None."""
    echo_texts: list[str] | None = None
    """With `echo`: per choice, the text its output starts with (a completion's prompt, a chat's open
    assistant turn)."""
    tool_mode: str | None = None
    """Chat with tools: `required`, the function named by tool_choice, or `auto` (`api.tools`); None for text."""
    prompt_logprobs: bool = False
    """vLLM's `prompt_logprobs` was asked: the response carries them in vLLM's form."""
    tool_schemas: dict[str, dict] = field(default_factory=dict)
    """The request's tools, name -> parameters schema (an `auto` reply may call only these)."""
    tool_parser: object | None = None
    """The `tool_parsers.ToolParser` that reads the calls out of the reply: with tool_mode `auto`, and with a forced
    tool_mode whose calls are generated in the parser's format (`tools.call_tool_grammar`)."""
    calls_held: bool = False
    """With `tool_parser`: the reply is generated under the parser's structural tag, so each call it starts follows
    the format (complete unless max_tokens cuts it), and a format of JSON calls streams their arguments as they
    come (`held_keys`)."""
    held_keys: tuple[str, ...] | None = None
    """With `calls_held`, for a format of JSON calls: the keys their arguments sit under (`ToolParser.held_call_keys`
    for the model's format); None where calls are read whole."""
    reasoning: object | None = None
    """A chat call's `reasoning.ReasoningParser`, which splits each reply into reasoning and content; or None."""
    reasoning_start: str | None = None
    """With `reasoning`: where the replies start (`reasoning.Start`)."""
    grammar_after: int | None = None
    """With `grammar`: the token id it begins after (`Request.grammar_after`)."""
    priority: int = 0
    """`Request.priority` of every choice."""
    reasoning_close: int | None = None
    """With `reasoning`: the id of the `</think>` token, or None where the tokenizer has no such single token."""
    tokens_as_ids: bool = False
    """vLLM's `return_tokens_as_token_ids`: logprobs name tokens `token_id:<id>`."""
    continuous_usage: bool = False
    """Streamed with vLLM's `continuous_usage_stats`: every chunk carries the usage so far."""
    cache_salt: str | None = None
    """`Request.cache_salt` of every choice."""
    prediction: tuple[int, ...] | None = None
    """`Request.prediction` of every choice (OpenAI's Predicted Outputs, tokenized); None when none was given."""
    ignored_fields: tuple[str, ...] = ()
    """Top-level body fields nothing reads (`protocol.ignored_fields`): logged, and named in a response header."""
    request_id: str | None = None
    """The client's id for the call (an `X-Request-Id` header or vLLM's `request_id` field): the response's id
    is built from it; the engine's request ids stay `call_id`'s, unique whatever clients send."""
    call_id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def public_id(self) -> str:
        """The id clients see: theirs where they gave one, else `call_id`."""
        return self.request_id if self.request_id is not None else self.call_id

    @property
    def object_id(self) -> str:
        return ("chatcmpl-" if self.kind == "chat" else "cmpl-") + self.public_id

    @property
    def num_prompt_tokens(self) -> int:
        """Prompt tokens of the call, each distinct prompt counted once however many choices it has."""
        return sum(len(p) for p in self.prompts[:: self.n])

    def num_cached_tokens(self, per_choice: list[int]) -> int:
        """Prompt tokens of the call served from the prefix cache, from each choice's count: per distinct
        prompt, the fewest of its choices (the prompt was computed at least that far once)."""
        return sum(min(per_choice[i : i + self.n]) for i in range(0, len(per_choice), self.n))

    def envelope(self, stream: bool) -> dict:
        kind = {"chat": "chat.completion", "text": "text_completion"}[self.kind]
        body = {"id": self.object_id, "object": kind + (".chunk" if stream and self.kind == "chat" else ""),
                "created": self.created, "model": self.model}
        if stream and self.include_usage:
            body["usage"] = None
        return body


def _checked(item: RequestOutput | Exception) -> RequestOutput:
    """An increment, or the API error a choice's failure is."""
    if isinstance(item, (UnknownModuleError, CompositionError)):  # refused by the engine at admission
        raise from_router(item, "model")
    if isinstance(item, NoDrawableTokenError):  # the request's own parameters conflict
        raise APIError(400, str(item), None, "no_drawable_token")
    if isinstance(item, EngineDeadError):
        raise APIError(503, str(item), None, "engine_dead")
    if isinstance(item, Exception):
        raise APIError(500, f"generation failed: {item}", None, "internal_error")
    return item


class Runner:
    """Drives the engine for API calls and records metrics."""

    def __init__(self, engine, metrics: Metrics, log_requests: bool = False):
        self.engine = engine
        self.metrics = metrics
        self.tokenizer = engine.tokenizer
        self.log_requests = log_requests
        """Log one line per finished request (`--enable-log-requests`): id, composition, tokens, latencies."""

    async def _choice(self, call: Call, index: int) -> AsyncIterator[RequestOutput | Exception]:
        """Choice `index`'s increments, then the error that ended it, if any; its metrics when it ends."""
        request = Request(f"{call.call_id}-{index}", call.prompts[index], call.params[index], call.composition,
                          grammar=call.grammar, grammar_after=call.grammar_after, priority=call.priority,
                          cache_salt=call.cache_salt, prediction=call.prediction or ())
        timing = RequestTiming(time.monotonic())
        timing.num_prompt_tokens = len(call.prompts[index])
        status = "abort"
        try:
            async with contextlib.aclosing(self.engine.generate(request)) as increments:
                async for output in increments:
                    if output.token_ids and timing.first_token is None:
                        timing.first_token = time.monotonic()
                    timing.num_output_tokens = output.num_output_tokens
                    if output.finished:
                        status = output.finish_reason or "stop"
                    yield output
        except NoDrawableTokenError as error:  # the client's to fix: no stack trace
            logger.info("request %s failed: %s", request.request_id, error)
            status = "error"
            yield error
        except Exception as error:  # noqa: BLE001 - reported to the client through the stream
            logger.exception("request %s failed", request.request_id)
            status = "error"
            yield error
        finally:
            timing.end = time.monotonic()
            self.metrics.observe_request(task_label(call.composition), status, timing, call.composition.module_ids)
            if self.log_requests:
                _log_request(call, request, status, timing)

    async def _feed(self, call: Call, index: int, sink: asyncio.Queue) -> None:
        async with contextlib.aclosing(self._choice(call, index)) as choice:
            async for item in choice:
                await sink.put((index, item))

    async def outputs(self, call: Call) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Every choice's increments as they come; leaving early aborts every choice. One choice is read in the
        caller's task; several each have a task of their own, merged through a queue."""
        if len(call.prompts) == 1:
            async with contextlib.aclosing(self._choice(call, 0)) as choice:
                async for item in choice:
                    yield 0, _checked(item)
            return
        sink: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.create_task(self._feed(call, i, sink)) for i in range(len(call.prompts))]
        remaining = len(tasks)
        try:
            while remaining:
                index, item = await sink.get()
                if _checked(item).finished:
                    remaining -= 1
                yield index, item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- logprobs ---------------------------------------------------------------------------------

    def _token(self, token_id: int, as_id: bool = False) -> str:
        """A token's text in logprobs; `as_id`: vLLM's `token_id:<id>` (`return_tokens_as_token_ids`), which
        stays exact where a token's bytes are not text on their own."""
        return f"token_id:{token_id}" if as_id else self.tokenizer.decode([token_id])

    def chat_logprobs(self, output: RequestOutput, as_ids: bool = False) -> list[dict]:
        entries = []
        for lp in output.logprobs or ():
            token = self._token(lp.token_id, as_ids)
            top = [{"token": self._token(t, as_ids), "logprob": v, "bytes": list(self._token(t, as_ids).encode())}
                   for t, v in lp.top]
            entries.append({"token": token, "logprob": lp.logprob, "bytes": list(token.encode()), "top_logprobs": top})
        return entries

    def _scored(self, logprob: float, rank: int | None, token_id: int) -> dict:
        return {"logprob": logprob, "rank": rank, "decoded_token": self._token(token_id)}

    def vllm_prompt_logprobs(self, scored) -> list[dict | None]:
        """vLLM's `prompt_logprobs`: per prompt token (None for the first), {token id: {logprob, rank,
        decoded_token}} for the prompt's own token and the top alternatives."""
        entries = []
        for lp in scored:
            if lp is None:
                entries.append(None)
                continue
            entry = {str(lp.token_id): self._scored(lp.logprob, lp.rank, lp.token_id)}
            for rank, (token_id, value) in enumerate(lp.top, start=1):
                entry.setdefault(str(token_id), self._scored(value, rank, token_id))
            entries.append(entry)
        return entries

    def text_logprobs(self, output: RequestOutput, offset: int, echoed: list[int] | None = None,
                      as_ids: bool = False) -> dict:
        """Completion-style logprobs of an increment; with `echoed` (the prompt's token ids, for `echo`) the
        prompt's tokens come first, from the output's prompt logprobs, the first one unscored (None). Text
        offsets count the tokens' text, also where `as_ids` names them by id."""
        entries = [(lp.token_id, lp) for lp in output.logprobs or ()]
        if echoed is not None:
            entries = list(zip(echoed, output.prompt_logprobs or [None] * len(echoed))) + entries
        tokens, values, tops, offsets = [], [], [], []
        for token_id, lp in entries:
            token = self._token(token_id)
            tokens.append(self._token(token_id, as_ids))
            values.append(lp.logprob if lp is not None else None)
            tops.append({self._token(t, as_ids): v for t, v in lp.top} if lp is not None else None)
            offsets.append(offset)
            offset += len(token)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def _log_request(call: Call, request: Request, status: str, timing: RequestTiming) -> None:
    ttft = f"{timing.first_token - timing.start:.3f}s" if timing.first_token is not None else "-"
    logger.info("request %s (%s) %s: model %s, modules %s, %d prompt + %d generated tokens, ttft %s, e2e %.3fs",
                request.request_id, call.public_id, status, call.model, call.composition.as_dict()["modules"] or "-",
                timing.num_prompt_tokens, timing.num_output_tokens, ttft, timing.end - timing.start)


async def until_disconnected(request, work: Awaitable[T]) -> T | None:
    """`work`'s result, or None (with `work` cancelled) if the client disconnects first."""
    job = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({job, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not job.done():
            job.cancel()
        await asyncio.gather(job, watch, return_exceptions=True)
    return None if job.cancelled() else job.result()


async def _disconnected(request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int, reasoning_tokens: int | None = None,
          predicted: tuple[int, int] | None = None) -> dict:
    """OpenAI's usage object; `prompt_tokens_details.cached_tokens` counts prompt tokens whose KV came from
    the prefix cache, `completion_tokens_details.reasoning_tokens` (when counted) the generated tokens of the
    reasoning, before the token that closed it, and, for a call with a prediction, `accepted_prediction_tokens`
    and `rejected_prediction_tokens` the drafted tokens the model drew as predicted and those it did not
    (`predicted`: (drafted, accepted), as `RequestOutput.speculation`)."""
    body = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}
    details = {}
    if reasoning_tokens is not None:
        details["reasoning_tokens"] = reasoning_tokens
    if predicted is not None:
        drafted, accepted = predicted
        details |= {"accepted_prediction_tokens": accepted, "rejected_prediction_tokens": drafted - accepted}
    if details:
        body["completion_tokens_details"] = details
    return body


def predicted(call: "Call", drafts: list[tuple[int, int]]) -> tuple[int, int] | None:
    """(drafted, accepted) tokens over a call's choices, from each choice's last `RequestOutput.speculation`; None
    for a call without a prediction."""
    if call.prediction is None:
        return None
    return sum(drafted for drafted, _ in drafts), sum(accepted for _, accepted in drafts)


def reasoning_tokens(call: "Call", token_ids: list[int], reasoned: bool) -> int | None:
    """How many of a choice's generated tokens are reasoning (`reasoned`: it has any): those before the `</think>`
    token, or all of them when the reply ended inside its reasoning; None where the tokenizer spells `</think>`
    with several tokens (they are not counted then)."""
    if not reasoned:
        return 0
    if call.reasoning_close is None:
        return None
    return token_ids.index(call.reasoning_close) if call.reasoning_close in token_ids else len(token_ids)


def total_reasoning_tokens(call: "Call", counts: list[int | None]) -> int | None:
    """The call's reasoning tokens over its choices (None without a reasoning parser, or where uncounted)."""
    if call.reasoning is None or any(count is None for count in counts):
        return None
    return sum(counts)


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"
