"""Sending one streamed request with httpx and timing every chunk of its server-sent events.

SSE framing (per the HTML spec): an event is a run of lines ended by a blank line; `data:` lines carry
the payload (one optional space after the colon is dropped; several data lines join with newlines);
lines starting with `:` are comments; other fields (`event:`, `id:`, `retry:`) are ignored here. The
OpenAI stream ends with the event `data: [DONE]`; a JSON event with an `error` key is a failure even
after a 200 status. A stream that closes without `[DONE]` failed too. A Responses API stream (typed
events) ends with `response.completed` (or `response.incomplete`), which carries the usage, and fails
with an `error` or `response.failed` event.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

import httpx

from benchmarks.serving.metrics import RequestRecord
from benchmarks.serving.workload import BenchRequest

DONE = "[DONE]"


async def sse_events(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The data of each event in a stream of lines (line endings already removed)."""
    data: list[str] = []
    async for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        if name == "data":
            data.append(value[1:] if value.startswith(" ") else value)
    if data:
        yield "\n".join(data)


RESPONSE_ENDS = ("response.completed", "response.incomplete")


def _text(chunk: dict) -> str:
    """The output text of a chat or completion chunk (first choice; the benchmark sends n=1), or of a
    Responses API event (its text, function-call argument or reasoning delta)."""
    if "type" in chunk and "choices" not in chunk:
        kind = chunk["type"]
        deltas = ("response.output_text.delta", "response.function_call_arguments.delta",
                  "response.reasoning_text.delta")
        return chunk.get("delta") or "" if kind in deltas else ""
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if "delta" in choice:
        return (choice.get("delta") or {}).get("content") or ""
    return choice.get("text") or ""


class _Timer:
    """Timestamps of one request's chunks, relative to when it was sent."""

    def __init__(self, record: RequestRecord):
        self.record = record
        self.sent = time.perf_counter()
        self.last: float | None = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.sent

    def chunk(self, payload: dict) -> None:
        """Account one parsed JSON event."""
        record, now = self.record, self.elapsed()
        if _text(payload):
            if record.ttft is None:
                record.ttft = now
            else:
                record.itl.append(now - self.last)
            self.last = now
            record.num_chunks += 1
        if payload.get("type") in RESPONSE_ENDS:  # the Responses API's usage, in its own names
            usage = (payload.get("response") or {}).get("usage") or {}
            if isinstance(usage.get("output_tokens"), int):
                record.output_tokens, record.prompt_tokens = usage["output_tokens"], usage.get("input_tokens")
                cached = (usage.get("input_tokens_details") or {}).get("cached_tokens")
                if isinstance(cached, int):
                    record.cached_tokens = cached
                record.tokens_from = "usage"
            return
        usage = payload.get("usage")
        if isinstance(usage, dict) and "completion_tokens" in usage:
            record.output_tokens = int(usage["completion_tokens"])
            record.prompt_tokens = usage.get("prompt_tokens")
            details = usage.get("prompt_tokens_details")
            if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
                record.cached_tokens = details["cached_tokens"]
            completion = usage.get("completion_tokens_details") or {}
            accepted = completion.get("accepted_prediction_tokens")
            rejected = completion.get("rejected_prediction_tokens")
            if isinstance(accepted, int) and isinstance(rejected, int):
                record.prediction_tokens = (accepted, rejected)
            record.tokens_from = "usage"


async def _read_stream(response: httpx.Response, timer: _Timer) -> None:
    """Consume the events of a 200 response into the record; sets `error` when the stream fails."""
    record = timer.record
    async for data in sse_events(response.aiter_lines()):
        if data == DONE:
            if record.tokens_from == "chunks":
                record.output_tokens = record.num_chunks
            return
        try:
            payload = json.loads(data)
        except json.JSONDecodeError:
            record.error = f"not JSON in the stream: {data[:500]}"
            return
        if not isinstance(payload, dict) or "error" in payload or payload.get("type") in ("error", "response.failed"):
            record.error = data
            return
        timer.chunk(payload)
        if payload.get("type") in RESPONSE_ENDS:
            if record.tokens_from == "chunks":
                record.output_tokens = record.num_chunks
            return
    record.error = "the stream ended without data: [DONE] (or a Responses API end event)"


async def send(client: httpx.AsyncClient, url: str, request: BenchRequest, index: int,
               run_start: float) -> RequestRecord:
    """Send one request to `url`, stream its answer, and return its record (never raises on HTTP errors)."""
    record = RequestRecord(index, request.label, start=time.perf_counter() - run_start)
    timer = _Timer(record)
    try:
        async with client.stream("POST", url, json=request.body, headers=request.headers) as response:
            record.status = response.status_code
            if response.status_code != 200:
                record.error = (await response.aread()).decode("utf-8", errors="replace")
            else:
                await _read_stream(response, timer)
    except httpx.HTTPError as error:
        record.error = f"{type(error).__name__}: {error}"
    record.e2e = timer.elapsed()
    return record
