"""OpenAI response bodies: one JSON body, or a stream of SSE chunks ending in `data: [DONE]`."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from server.api.errors import APIError
from server.api.serving import Call, Runner, sse, usage
from server.api.tools import auto_calls, new_call_id, tool_calls


def _tessera(call: Call) -> dict:
    return {"composition": call.composition.as_dict()}


def composition_header(call: Call) -> dict[str, str]:
    return {"X-Tessera-Composition": json.dumps(call.composition.as_dict(), separators=(",", ":"))}


async def collect(runner: Runner, call: Call) -> dict:
    """The non-streaming body of a call."""
    n = len(call.prompts)
    texts, logprobs, reasons, stop_reasons = [""] * n, [[] for _ in range(n)], [None] * n, [None] * n
    text_lp = [{"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []} for _ in range(n)]
    completion_tokens, cached_tokens, echoed, scored = [0] * n, [0] * n, set(), [None] * n
    async for index, output in runner.outputs(call):
        echo = _echoes(call, index, echoed)
        if output.prompt_logprobs is not None:
            scored[index] = output.prompt_logprobs
        if call.params[index].logprobs is not None:
            if call.kind == "chat":
                logprobs[index] += runner.chat_logprobs(output)
            else:
                part = runner.text_logprobs(output, len(texts[index]), call.prompts[index] if echo else None)
                for key in text_lp[index]:
                    text_lp[index][key] += part[key]
        texts[index] += (call.echo_texts[index] if echo else "") + output.text
        completion_tokens[index] = output.num_output_tokens
        cached_tokens[index] = output.num_cached_tokens
        reasons[index], stop_reasons[index] = output.finish_reason, output.stop_reason
    choices = []
    for i in range(n):
        wants = call.params[i].logprobs is not None
        if call.kind == "chat":
            message, reason = _reply(call, texts[i], reasons[i])
            choices.append({"index": i, "message": message, "logprobs": {"content": logprobs[i]} if wants else None,
                            "finish_reason": reason, "stop_reason": stop_reasons[i]})
        else:
            choices.append({"index": i, "text": texts[i], "logprobs": text_lp[i] if wants else None,
                            "finish_reason": reasons[i], "stop_reason": stop_reasons[i]})
            if call.prompt_logprobs:
                choices[-1]["prompt_logprobs"] = runner.vllm_prompt_logprobs(scored[i] or ())
    body = call.envelope(stream=False)
    total = usage(call.num_prompt_tokens, sum(completion_tokens), call.num_cached_tokens(cached_tokens))
    body.update(choices=choices, usage=total, tessera=_tessera(call))
    if call.prompt_logprobs and call.kind == "chat":  # one prompt for every choice: at the top, as vLLM
        body["prompt_logprobs"] = runner.vllm_prompt_logprobs(scored[0] or ())
    return body


def _reply(call: Call, text: str, reason: str | None) -> tuple[dict, str | None]:
    """A chat choice's message and finish reason: its text, or the tool calls it made (`api.tools`)."""
    if call.tool_mode == "auto":
        content, calls = auto_calls(call.tool_parser, text, call.tool_names)
        if calls is None:
            return {"role": "assistant", "content": text}, reason
        return {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls"
    calls = tool_calls(call.tool_mode, text, reason == "stop") if call.tool_mode is not None else None
    if calls is None:
        return {"role": "assistant", "content": text}, reason
    return {"role": "assistant", "content": None, "tool_calls": calls}, \
        "tool_calls" if call.tool_mode == "required" else reason


def _tool_chunk(call: Call, index: int, text: str, reason: str | None, sent: int = 0) -> dict:
    """The last chunk of a streamed tool-calling choice, sent when it ends: its calls, or the rest of its
    text after the `sent` characters streamed already."""
    message, reason = _reply(call, text, reason)
    if "tool_calls" in message:
        delta = {"tool_calls": [{"index": j} | c for j, c in enumerate(message["tool_calls"])]}
    else:
        delta = {"content": text[sent:]}
    return call.envelope(stream=True) | {"choices": [{"index": index, "delta": delta, "logprobs": None,
                                                      "finish_reason": reason}], "tessera": _tessera(call)}


def _named_call_chunks(call: Call, index: int, output, call_id: str | None) -> list[dict]:
    """A streamed named-function choice: its call's id and name first (when `call_id` is given, on its first
    increment), then its arguments as they are generated, as OpenAI streams them."""
    deltas = []
    if call_id is not None:
        deltas.append({"index": 0, "id": call_id, "type": "function",
                       "function": {"name": call.tool_mode, "arguments": ""}})
    if output.text or output.finished:
        deltas.append({"index": 0, "function": {"arguments": output.text}})
    chunks = [call.envelope(stream=True) | {"choices": [{"index": index, "delta": {"tool_calls": [d]},
                                                         "logprobs": None, "finish_reason": None}]} for d in deltas]
    if output.finished:
        chunks[-1]["choices"][0]["finish_reason"] = output.finish_reason
        chunks[-1]["tessera"] = _tessera(call)
    return chunks


def _echoes(call: Call, index: int, echoed: set[int]) -> bool:
    """Whether this increment of choice `index` is its first of a completion with `echo` (marks it seen)."""
    if call.echo_texts is None or index in echoed:
        return False
    echoed.add(index)
    return True


def _chunk(call: Call, runner: Runner, index: int, output, text_offset: int, echo: bool = False) -> dict:
    if call.kind == "chat":
        text = (call.echo_texts[index] if echo else "") + output.text
        choice = {"index": index, "delta": {"content": text} if text else {},
                  "logprobs": {"content": runner.chat_logprobs(output)} if output.logprobs is not None else None,
                  "finish_reason": output.finish_reason}
    else:
        prompt = call.prompts[index] if echo else None
        choice = {"index": index, "text": (call.echo_texts[index] if echo else "") + output.text,
                  "logprobs": runner.text_logprobs(output, text_offset, prompt) if output.logprobs is not None
                  else None, "finish_reason": output.finish_reason}
    chunk = call.envelope(stream=True) | {"choices": [choice]}
    if output.finished:
        choice["stop_reason"] = output.stop_reason
        chunk["tessera"] = _tessera(call)
    return chunk


async def stream(runner: Runner, call: Call) -> AsyncIterator[str]:
    """SSE chunks: a role chunk per choice (chat), content increments, usage if asked, [DONE]."""
    if call.kind == "chat":
        for i in range(len(call.prompts)):
            first = {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            yield sse(call.envelope(stream=True) | {"choices": [first], "tessera": _tessera(call)})
    n = len(call.prompts)
    completion_tokens, cached_tokens, text_offsets, echoed = [0] * n, [0] * n, [0] * n, set()
    calls_text, opened, sent = [""] * n, set(), [0] * n
    try:
        async for index, output in runner.outputs(call):
            completion_tokens[index] = output.num_output_tokens
            cached_tokens[index] = output.num_cached_tokens
            if call.tool_mode not in (None, "required", "auto"):  # a named call: arguments stream as they come
                first = index not in opened
                opened.add(index)
                for chunk in _named_call_chunks(call, index, output, new_call_id() if first else None):
                    yield sse(chunk)
                continue
            if call.tool_mode == "auto":  # text streams until a call block may begin; calls come at the end
                calls_text[index] += output.text
                ready = call.tool_parser.streamable(calls_text[index])
                if len(ready) > sent[index] and not output.finished:
                    delta = {"index": index, "delta": {"content": ready[sent[index]:]}, "logprobs": None,
                             "finish_reason": None}
                    yield sse(call.envelope(stream=True) | {"choices": [delta]})
                    sent[index] = len(ready)
                if output.finished:
                    yield sse(_tool_chunk(call, index, calls_text[index], output.finish_reason, sent[index]))
                continue
            if call.tool_mode is not None:  # required: the calls are parsed whole and sent when the choice ends
                calls_text[index] += output.text
                if output.finished:
                    yield sse(_tool_chunk(call, index, calls_text[index], output.finish_reason))
                continue
            echo = _echoes(call, index, echoed)
            if output.text or output.finished or output.logprobs or echo:
                yield sse(_chunk(call, runner, index, output, text_offsets[index], echo))
            text_offsets[index] += len(output.text) + (len(call.echo_texts[index]) if echo else 0)
    except APIError as error:
        yield sse(error.body())
        return
    if call.include_usage:
        total = usage(call.num_prompt_tokens, sum(completion_tokens), call.num_cached_tokens(cached_tokens))
        yield sse(call.envelope(stream=True) | {"choices": [], "usage": total, "tessera": _tessera(call)})
    yield sse("[DONE]")
