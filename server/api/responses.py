"""OpenAI response bodies: one JSON body, or a stream of SSE chunks ending in `data: [DONE]`."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from server.api.errors import APIError
from server.api.reasoning import ReasoningStream
from server.api.serving import Call, Runner, predicted, reasoning_tokens, sse, total_reasoning_tokens, usage
from server.api.tools import JsonCallsReader, auto_calls, new_call_id, tool_call_entry, tool_calls


def tessera_field(call: Call) -> dict:
    return {"composition": call.composition.as_dict()}


def composition_header(call: Call) -> dict[str, str]:
    """The response headers of a call: its composition, its id (vLLM's `X-Request-Id`), and the body fields it
    ignored, if any."""
    headers = {"X-Tessera-Composition": json.dumps(call.composition.as_dict(), separators=(",", ":")),
               "X-Request-Id": call.public_id}
    if call.ignored_fields:
        headers["X-Tessera-Ignored-Fields"] = ",".join(call.ignored_fields)
    return headers


async def collect(runner: Runner, call: Call) -> dict:
    """The non-streaming body of a call."""
    n = len(call.prompts)
    pieces, lengths = [[] for _ in range(n)], [0] * n  # each choice's text, joined at the end (a string grown
    # piece by piece would be copied whole at every token)
    logprobs, reasons, stop_reasons = [[] for _ in range(n)], [None] * n, [None] * n
    text_lp = [{"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []} for _ in range(n)]
    completion_tokens, cached_tokens, echoed, scored = [0] * n, [0] * n, set(), [None] * n
    drafts = [(0, 0)] * n
    token_ids: list[list[int]] = [[] for _ in range(n)]
    async for index, output in runner.outputs(call):
        if call.reasoning is not None:  # its usage counts reasoning tokens by id
            token_ids[index] += output.token_ids
        echo = _echoes(call, index, echoed)
        if output.prompt_logprobs is not None:
            scored[index] = output.prompt_logprobs
        if call.params[index].logprobs is not None:
            if call.kind == "chat":
                logprobs[index] += runner.chat_logprobs(output, call.tokens_as_ids)
            else:
                part = runner.text_logprobs(output, lengths[index], call.prompts[index] if echo else None,
                                            call.tokens_as_ids)
                for key in text_lp[index]:
                    text_lp[index][key] += part[key]
        piece = (call.echo_texts[index] if echo else "") + output.text
        pieces[index].append(piece)
        lengths[index] += len(piece)
        completion_tokens[index] = output.num_output_tokens
        cached_tokens[index] = output.num_cached_tokens
        drafts[index] = output.speculation or (0, 0)
        reasons[index], stop_reasons[index] = output.finish_reason, output.stop_reason
    choices, thought = [], []
    texts = ["".join(choice) for choice in pieces]
    for i in range(n):
        wants = call.params[i].logprobs is not None
        if call.kind == "chat":
            message, reason = reply(call, texts[i], reasons[i])
            thought.append(reasoning_tokens(call, token_ids[i], bool(message.get("reasoning"))))
            choices.append({"index": i, "message": message, "logprobs": {"content": logprobs[i]} if wants else None,
                            "finish_reason": reason, "stop_reason": stop_reasons[i]})
        else:
            choices.append({"index": i, "text": texts[i], "logprobs": text_lp[i] if wants else None,
                            "finish_reason": reasons[i], "stop_reason": stop_reasons[i]})
            if call.prompt_logprobs:
                choices[-1]["prompt_logprobs"] = runner.vllm_prompt_logprobs(scored[i] or ())
    body = call.envelope(stream=False)
    total = usage(call.num_prompt_tokens, sum(completion_tokens), call.num_cached_tokens(cached_tokens),
                  total_reasoning_tokens(call, thought), predicted(call, drafts))
    body.update(choices=choices, usage=total, tessera=tessera_field(call))
    if call.prompt_logprobs and call.kind == "chat":  # one prompt for every choice: at the top, as vLLM
        body["prompt_logprobs"] = runner.vllm_prompt_logprobs(scored[0] or ())
    return body


def reply(call: Call, text: str, reason: str | None) -> tuple[dict, str | None]:
    """A whole chat choice's message and finish reason; a reasoning model's reasoning apart (`api.reasoning`)."""
    if call.reasoning is None:
        return _message(call, text, reason)
    reasoning, content = call.reasoning.split(text, call.reasoning_start, finished=True)
    message, reason = _message(call, content, reason)
    if message["content"] == "":
        message["content"] = None
    return message | _reasoning(reasoning or None), reason


def _reasoning(text: str | None) -> dict:
    """The reasoning fields of a message or delta: vLLM's current `reasoning` and the older `reasoning_content`."""
    return {"reasoning": text, "reasoning_content": text}


def _message(call: Call, text: str, reason: str | None) -> tuple[dict, str | None]:
    """A chat choice's message and finish reason from its content: its text, or the tool calls it made
    (`api.tools`)."""
    if call.tool_parser is not None:  # auto, or a forced choice in the parser's format
        reader = _held_reader(call)
        content, calls = (_held_calls(call.tool_parser, reader, text) if reader is not None
                          else auto_calls(call.tool_parser, text, call.tool_schemas))
        if calls is None:
            return {"role": "assistant", "content": text}, reason
        return {"role": "assistant", "content": content, "tool_calls": calls}, _calls_reason(call, reason)
    calls = tool_calls(call.tool_mode, text, reason == "stop") if call.tool_mode is not None else None
    if calls is None:
        return {"role": "assistant", "content": text}, reason
    return {"role": "assistant", "content": None, "tool_calls": calls}, \
        "tool_calls" if call.tool_mode == "required" else reason


def _held_reader(call: Call) -> JsonCallsReader | None:
    """A reader of the calls of a reply held to a format of JSON calls by its tag (`Call.calls_held`), or None."""
    keys = call.held_keys if call.tool_parser is not None and call.calls_held else None
    return JsonCallsReader(keys, array=False) if keys else None


def _held_calls(parser, reader: JsonCallsReader, text: str) -> tuple[str | None, list[dict] | None]:
    """(content, calls) of a whole reply held to `parser`'s JSON calls: each complete call with its arguments as
    generated (what its stream sent); (text, None) when it makes none."""
    start = parser.calls_start(text)
    found = [(name, arguments) for name, arguments, done in reader.feed(text[start:]) if done] \
        if start is not None else []
    if not found:
        return text, None
    return text[:start].strip() or None, [tool_call_entry(name, arguments) for name, arguments in found]


def _calls_reason(call: Call, reason: str | None) -> str | None:
    """The finish reason of a reply read into calls by the call's parser: `tool_calls`, except for a named function
    (OpenAI ends it with stop) and a reply cut by max_tokens (its complete calls are kept, and it says length)."""
    return reason if call.tool_mode not in ("auto", "required") or reason == "length" else "tool_calls"


def _tool_chunk(call: Call, index: int, text: str, reason: str | None, sent: int = 0) -> dict:
    """The last chunk of a streamed tool-calling choice, sent when it ends: its calls, or the rest of its
    text after the `sent` characters streamed already."""
    message, reason = _message(call, text, reason)
    if "tool_calls" in message:
        delta = {"tool_calls": [{"index": j} | c for j, c in enumerate(message["tool_calls"])]}
    else:
        delta = {"content": text[sent:]}
    return call.envelope(stream=True) | {"choices": [{"index": index, "delta": delta, "logprobs": None,
                                                      "finish_reason": reason}], "tessera": tessera_field(call)}


def _named_call_chunks(call: Call, index: int, text: str, output, call_id: str | None) -> list[dict]:
    """A streamed named-function choice: its call's id and name first (when `call_id` is given, with its first
    content), then its arguments (`text`, this increment's content) as they are generated, as OpenAI streams
    them."""
    deltas = []
    if call_id is not None:
        deltas.append({"index": 0, "id": call_id, "type": "function",
                       "function": {"name": call.tool_mode, "arguments": ""}})
    if text or output.finished:
        deltas.append({"index": 0, "function": {"arguments": text}})
    chunks = [call.envelope(stream=True) | {"choices": [{"index": index, "delta": {"tool_calls": [d]},
                                                         "logprobs": None, "finish_reason": None}]} for d in deltas]
    if output.finished:
        chunks[-1]["choices"][0]["finish_reason"] = output.finish_reason
        chunks[-1]["tessera"] = tessera_field(call)
    return chunks


def _echoes(call: Call, index: int, echoed: set[int]) -> bool:
    """Whether this increment of choice `index` is its first of a completion with `echo` (marks it seen)."""
    if call.echo_texts is None or index in echoed:
        return False
    echoed.add(index)
    return True


def _chunk(call: Call, runner: Runner, index: int, output, text_offset: int, echo: bool = False) -> dict:
    """A streamed completion's increment."""
    prompt = call.prompts[index] if echo else None
    choice = {"index": index, "text": (call.echo_texts[index] if echo else "") + output.text,
              "logprobs": runner.text_logprobs(output, text_offset, prompt, call.tokens_as_ids)
              if output.logprobs is not None else None, "finish_reason": output.finish_reason}
    chunk = call.envelope(stream=True) | {"choices": [choice]}
    if output.finished:
        choice["stop_reason"] = output.stop_reason
        chunk["tessera"] = tessera_field(call)
    return chunk


class _ChatChoice:
    """One streamed chat choice: its reply so far, split into reasoning and content, and what was sent."""

    def __init__(self, call: Call, runner: Runner, index: int):
        self.call, self.runner, self.index = call, runner, index
        self.content = ""
        """With tool calls: its content so far, as far as released (all of it without a reasoning parser)."""
        self.sent = 0
        """tool_choice auto: characters of the content streamed before the calls."""
        self.opened = False
        """A named call: its id and name were sent."""
        self.calls_sent = 0
        """A forced choice in the parser's format: the calls streamed."""
        self.arguments_sent: list[int] = []
        """tool_choice required: per call announced, the characters of its arguments streamed."""
        self.reader = _held_reader(call) or JsonCallsReader()
        """tool_choice required as JSON, or a reply held to a format of JSON calls: the calls read so far."""
        self.calls_at: int | None = None
        """A reply held to a format of JSON calls: where in its content the calls begin, once known."""
        self.echo = call.echo_texts[index] if call.echo_texts is not None else ""
        self.token_ids: list[int] = []
        self.split = ReasoningStream(call.reasoning, call.reasoning_start) if call.reasoning is not None else None
        """With a reasoning parser: the reply split into reasoning and content as it grows."""

    def chunks(self, output) -> list[dict]:
        """The chunks one increment of the choice's output makes."""
        call = self.call
        thought, new = "", output.text  # (nothing of the reply is kept where nothing needs it: a string grown per
        if self.split is not None:      # token would be copied whole at every token)
            self.token_ids += output.token_ids
            thought, new = self.split.feed(output.text, output.finished)
        if call.tool_mode is None:
            return self._text_chunks(output, thought, new)
        self.content += new  # (tool calls read the whole content)
        content = self.content
        chunks = [self._delta(_reasoning(thought))] if thought else []
        if not self.reader.array:  # held to JSON calls: content until the calls begin, then each call as it comes
            chunks += self._held_chunks(content, output)
        elif call.tool_mode == "auto":  # content streams until a call may begin; calls come at the end
            ready = call.tool_parser.streamable(content)
            if len(ready) > self.sent and not output.finished:
                chunks.append(self._delta({"content": ready[self.sent:]}))
                self.sent = len(ready)
            if output.finished:
                chunks.append(_tool_chunk(call, self.index, content, output.finish_reason, self.sent))
        elif call.tool_parser is not None:  # a forced choice in the parser's format: each call once it is complete
            chunks += self._native_chunks(new, content, output)
        elif call.tool_mode == "required":  # each call's id and name once known, then its arguments as they come
            chunks += self._required_chunks(new, content, output)
        elif new or output.finished:  # a named call: its arguments stream as they come
            chunks += _named_call_chunks(call, self.index, new, output, None if self.opened else new_call_id())
            self.opened = True
        return chunks

    def _native_chunks(self, new: str, content: str, output) -> list[dict]:
        """Its tag allows nothing but calls, so a call that parses is final: each one is sent whole (id, name and
        arguments) as soon as it does."""
        call, chunks = self.call, []
        calls = auto_calls(call.tool_parser, content, call.tool_schemas)[1] if new or output.finished else None
        for j in range(self.calls_sent, len(calls or ())):
            chunks.append(self._delta({"tool_calls": [{"index": j} | calls[j]]}))
        self.calls_sent = max(self.calls_sent, len(calls or ()))
        if not output.finished:
            return chunks
        if not self.calls_sent:  # cut before a call was complete: sent whole, as text
            return chunks + [_tool_chunk(call, self.index, content, output.finish_reason)]
        return chunks + [self._last(_calls_reason(call, output.finish_reason))]

    def _call_deltas(self, new: str) -> list[dict]:
        """Feed `new` text to the reader: each call's id and name once its name is complete, then its arguments
        as they come."""
        chunks = []
        for j, (name, arguments, _) in enumerate(self.reader.feed(new)):
            if name is None:
                break
            if j == len(self.arguments_sent):
                self.arguments_sent.append(0)
                chunks.append(self._delta({"tool_calls": [{"index": j, "id": new_call_id(), "type": "function",
                                                           "function": {"name": name, "arguments": ""}}]}))
            if len(arguments) > self.arguments_sent[j]:
                piece = arguments[self.arguments_sent[j]:]
                chunks.append(self._delta({"tool_calls": [{"index": j, "function": {"arguments": piece}}]}))
                self.arguments_sent[j] = len(arguments)
        return chunks

    def _held_chunks(self, content: str, output) -> list[dict]:
        call, parser, chunks = self.call, self.call.tool_parser, []
        if self.calls_at is None:
            self.calls_at = parser.calls_start(content)
            ready = parser.streamable(content) if self.calls_at is None else content[: self.calls_at]
            if len(ready) > self.sent and (self.calls_at is not None or not output.finished):
                chunks.append(self._delta({"content": ready[self.sent:]}))
                self.sent = len(ready)
        if self.calls_at is not None:
            chunks += self._call_deltas(content[self.calls_at + len(self.reader.text):])
        if not output.finished:
            return chunks
        if not self.arguments_sent:  # no call began: the rest is text
            return chunks + [_tool_chunk(call, self.index, content, output.finish_reason, self.sent)]
        return chunks + [self._last(_calls_reason(call, output.finish_reason))]

    def _required_chunks(self, new: str, content: str, output) -> list[dict]:
        chunks = self._call_deltas(new)
        if not output.finished:
            return chunks
        if not self.arguments_sent:  # nothing announced (a reply cut before any name): sent whole, as text
            return chunks + [_tool_chunk(self.call, self.index, content, output.finish_reason)]
        parsed = tool_calls("required", content, output.finish_reason == "stop") is not None
        return chunks + [self._last("tool_calls" if parsed else output.finish_reason)]

    def _last(self, reason: str | None) -> dict:
        """The empty chunk that ends a choice whose calls were streamed: its finish reason and Tessera's field."""
        last = self._delta({})
        last["choices"][0]["finish_reason"] = reason
        last["tessera"] = tessera_field(self.call)
        return last

    def _delta(self, fields: dict) -> dict:
        return self.call.envelope(stream=True) | {"choices": [{"index": self.index, "delta": fields,
                                                               "logprobs": None, "finish_reason": None}]}

    def _text_chunks(self, output, thought: str, new: str) -> list[dict]:
        new, self.echo = self.echo + new, ""
        delta = (_reasoning(thought) if thought else {}) | ({"content": new} if new else {})
        if not (delta or output.finished or output.logprobs):
            return []
        logprobs = ({"content": self.runner.chat_logprobs(output, self.call.tokens_as_ids)}
                    if output.logprobs is not None else None)
        choice = {"index": self.index, "delta": delta, "logprobs": logprobs, "finish_reason": output.finish_reason}
        chunk = self.call.envelope(stream=True) | {"choices": [choice]}
        if output.finished:
            choice["stop_reason"] = output.stop_reason
            chunk["tessera"] = tessera_field(self.call)
        return [chunk]


def _so_far(call: Call, chunk: dict, completion_tokens: list[int]) -> dict:
    """A chunk with the usage so far, under vLLM's `continuous_usage_stats` (the chunk itself otherwise)."""
    if call.continuous_usage:
        chunk["usage"] = {"prompt_tokens": call.num_prompt_tokens, "completion_tokens": sum(completion_tokens),
                          "total_tokens": call.num_prompt_tokens + sum(completion_tokens)}
    return chunk


async def stream(runner: Runner, call: Call) -> AsyncIterator[str]:
    """SSE chunks: a role chunk per choice (chat), content increments, usage if asked, [DONE] (not after an
    error, whose body is the last event)."""
    async for chunk in chunks(runner, call):
        yield sse(chunk)
        if "error" in chunk:
            return
    yield sse("[DONE]")


async def chunks(runner: Runner, call: Call) -> AsyncIterator[dict]:
    """The chunks of a streamed call, as dicts; an error's body ends them."""
    n = len(call.prompts)
    choices = [_ChatChoice(call, runner, i) for i in range(n)] if call.kind == "chat" else None
    for i in range(n if choices else 0):
        first = {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        yield _so_far(call, call.envelope(stream=True) | {"choices": [first], "tessera": tessera_field(call)}, [0])
    completion_tokens, cached_tokens, text_offsets, echoed = [0] * n, [0] * n, [0] * n, set()
    drafts = [(0, 0)] * n
    try:
        async for index, output in runner.outputs(call):
            completion_tokens[index] = output.num_output_tokens
            cached_tokens[index] = output.num_cached_tokens
            drafts[index] = output.speculation or (0, 0)
            if choices is not None:
                for chunk in choices[index].chunks(output):
                    yield _so_far(call, chunk, completion_tokens)
                continue
            echo = _echoes(call, index, echoed)
            if output.text or output.finished or output.logprobs or echo:
                yield _so_far(call, _chunk(call, runner, index, output, text_offsets[index], echo), completion_tokens)
            text_offsets[index] += len(output.text) + (len(call.echo_texts[index]) if echo else 0)
    except APIError as error:
        yield error.body()
        return
    if call.include_usage:
        thought = total_reasoning_tokens(call, [reasoning_tokens(call, choice.token_ids,
                                                                 choice.split is not None and choice.split.reasoned)
                                                for choice in choices or ()])
        total = usage(call.num_prompt_tokens, sum(completion_tokens), call.num_cached_tokens(cached_tokens), thought,
                      predicted(call, drafts))
        yield call.envelope(stream=True) | {"choices": [], "usage": total, "tessera": tessera_field(call)}
