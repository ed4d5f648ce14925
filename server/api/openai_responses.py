"""OpenAI's Responses API (POST /v1/responses), served through the chat path.

The request becomes a chat completion (`chat_request`): `instructions` a system message, `input` the
messages, `function_call` items an assistant turn's tool calls, `function_call_output` items tool turns, and
`reasoning` items the reasoning of the assistant turn after them. So every tagging route, the tool choices,
structured outputs (`text.format`), reasoning parsers and the LoRA resolver work as they do for chat. The
reply becomes output items: a `reasoning` item (with a reasoning parser), a `message` with `output_text`, and
one `function_call` per call. Streamed, the chat chunks become the Responses events (`response.created`,
`response.output_item.added`, `response.output_text.delta`, ..., `response.completed`).

Finished responses are kept in memory unless `store` is false (`response_store`), so `previous_response_id`
continues a conversation from its stored turns and GET/DELETE /v1/responses/{id} read and drop one.
"""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import AsyncIterator, Callable

from pydantic import ValidationError

from server.api.errors import APIError
from server.api.protocol import RESPONSES_EXTRAS, ChatCompletionRequest, ResponseInputItem, ResponsesRequest
from server.api.response_store import MissingTurnError, ResponseStore
from server.api.responses import chunks
from server.api.serving import Call, Runner

Keep = Callable[[dict], None]
"""Takes a finished response to store."""

_PARAMS = {"messages": "input", "max_tokens": "max_output_tokens", "response_format": "text"}
"""Chat fields -> the Responses fields they came from, for error messages."""


def chat_request(body: ResponsesRequest) -> ChatCompletionRequest:
    """The chat completion that serves `body`; a 400 naming the Responses field where it does not validate."""
    data = {"model": body.model, "messages": _messages(body), "max_tokens": body.max_output_tokens,
            "stream": body.stream,
            "parallel_tool_calls": body.parallel_tool_calls, "user": body.user}
    if body.tools:
        data["tools"] = [{"type": "function", "function": tool.model_dump(exclude={"type"}, exclude_none=True)}
                         for tool in body.tools]
    if isinstance(body.tool_choice, str):
        data["tool_choice"] = body.tool_choice
    elif body.tool_choice is not None:
        data["tool_choice"] = {"type": "function", "function": {"name": body.tool_choice.name}}
    fmt = body.text.format if body.text is not None else None
    if fmt is not None and fmt.type == "json_object":
        data["response_format"] = {"type": "json_object"}
    elif fmt is not None and fmt.type == "json_schema":
        data["response_format"] = {"type": "json_schema", "json_schema": {
            "name": fmt.name or "response", "schema": fmt.schema_, "strict": fmt.strict}}
    if wants_logprobs(body):
        data |= {"logprobs": True, "top_logprobs": body.top_logprobs or 0}
    data |= {name: getattr(body, name) for name in RESPONSES_EXTRAS if getattr(body, name) is not None}
    data |= {name: getattr(body, name) for name in ("temperature", "top_p") if name in body.model_fields_set}
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        param = _PARAMS.get(str(first["loc"][0]), str(first["loc"][0])) if first["loc"] else None
        raise APIError(400, f"{param}: {first['msg']}", param) from None


LOGPROBS = "message.output_text.logprobs"


def wants_logprobs(body: ResponsesRequest) -> bool:
    """Whether the output text carries its tokens' logprobs (every generated token's, as in chat)."""
    return LOGPROBS in (body.include or ())


def _messages(body: ResponsesRequest) -> list[dict]:
    messages = [{"role": "system", "content": body.instructions}] if body.instructions else []
    items = [ResponseInputItem(role="user", content=body.input)] if isinstance(body.input, str) else body.input
    reasoning = None
    for item in items:
        if item.type == "reasoning":
            reasoning = item.text() or "".join(part.text for part in item.summary or ())
        elif item.type == "message":
            messages.append({"role": item.role, "content": item.text()})
            if item.role == "assistant" and reasoning is not None:
                messages[-1]["reasoning"], reasoning = reasoning, None
        elif item.type == "function_call":
            call = {"id": item.call_id, "type": "function", "function": {"name": item.name,
                                                                          "arguments": item.arguments}}
            if messages and messages[-1]["role"] == "assistant":  # the turn that made the call
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
                if reasoning is not None:
                    messages[-1]["reasoning"], reasoning = reasoning, None
        else:
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
    return messages


def turn_items(body: ResponsesRequest) -> list[dict]:
    """The input items of this turn as the store keeps (and lists) them: a message's text as its parts."""
    given = [ResponseInputItem(role="user", content=body.input)] if isinstance(body.input, str) else body.input
    items = []
    for item in given:
        item = item.model_dump(exclude_none=True)
        if item["type"] == "message" and isinstance(item["content"], str):
            kind = "output_text" if item["role"] == "assistant" else "input_text"
            item["content"] = [{"type": kind, "text": item["content"]}]
        items.append(item)
    return items


def with_history(body: ResponsesRequest, store: ResponseStore) -> tuple[ResponsesRequest, list[dict]]:
    """`body` with the stored conversation of its `previous_response_id` before its input (itself without
    one), and this turn's items (`turn_items`); a 404 when that response, or an earlier turn of it, is not
    stored."""
    items = turn_items(body)
    if body.previous_response_id is None:
        return body, items
    if not store.enabled:
        raise APIError(400, "this server keeps no responses (--responses-store-size 0): send the whole "
                            "conversation in input", "previous_response_id")
    try:
        history = store.conversation(body.previous_response_id)
    except MissingTurnError as error:
        raise APIError(404, str(error), "previous_response_id", "previous_response_not_found") from None
    whole = [ResponseInputItem.model_validate(item) for item in history + items]
    return body.model_copy(update={"input": whole}), items


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def _response(body: ResponsesRequest, call: Call, output: list[dict], status: str, usage: dict | None) -> dict:
    fmt = body.text.format if body.text is not None and body.text.format is not None else None
    return {
        "id": "resp_" + call.public_id, "object": "response", "created_at": call.created, "status": status,
        "model": body.model, "output": output, "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
        "metadata": body.metadata or {}, "parallel_tool_calls": body.parallel_tool_calls,
        "temperature": call.params[0].temperature, "top_p": call.params[0].top_p,  # as used, defaults included
        "tool_choice": body.tool_choice.model_dump() if hasattr(body.tool_choice, "model_dump")
        else body.tool_choice or "auto",
        "tools": [tool.model_dump(exclude_none=True) for tool in body.tools or ()],
        "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt is not None else {"type": "text"}},
        "store": False, "truncation": "disabled", "usage": usage,
        "previous_response_id": body.previous_response_id,
        "tessera": {"composition": call.composition.as_dict()},
    }


def _usage(chat_usage: dict | None) -> dict | None:
    """Responses usage from chat usage (reasoning tokens as the engine counted them; 0 where uncounted)."""
    if chat_usage is None:
        return None
    reasoning = (chat_usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0
    return {"input_tokens": chat_usage["prompt_tokens"], "output_tokens": chat_usage["completion_tokens"],
            "total_tokens": chat_usage["total_tokens"],
            "input_tokens_details": {"cached_tokens": chat_usage["prompt_tokens_details"]["cached_tokens"]},
            "output_tokens_details": {"reasoning_tokens": reasoning}}


def _message_item(item_id: str, text: str, status: str, logprobs: list | None = None) -> dict:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}]}


def _reasoning_item(item_id: str, text: str, status: str) -> dict:
    return {"type": "reasoning", "id": item_id, "status": status, "summary": [],
            "content": [{"type": "reasoning_text", "text": text}]}


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}


def response_body(chat_body: dict, body: ResponsesRequest, call: Call, keep: Keep | None = None) -> dict:
    """The Responses body of a collected chat completion, handed to `keep` (to be stored) when given."""
    choice = chat_body["choices"][0]
    message, status = choice["message"], "incomplete" if choice["finish_reason"] == "length" else "completed"
    output = []
    reasoning = message.get("reasoning") or ""
    if reasoning:
        output.append(_reasoning_item(_id("rs"), reasoning, "completed"))
    if message.get("content"):
        logprobs = (choice.get("logprobs") or {}).get("content")
        output.append(_message_item(_id("msg"), message["content"], status, logprobs))
    for tool_call in message.get("tool_calls") or ():
        function = tool_call["function"]
        output.append(_call_item(_id("fc"), tool_call["id"], function["name"], function["arguments"], "completed"))
    return _kept(_response(body, call, output, status, _usage(chat_body["usage"])), keep)


def _kept(response: dict, keep: Keep | None) -> dict:
    if keep is not None:
        response["store"] = True
        keep(response)
    return response


class _Events:
    """The Responses events of one streamed reply, fed its chat chunks' deltas."""

    def __init__(self, body: ResponsesRequest, call: Call, keep: Keep | None = None):
        self.body, self.call, self.keep = body, call, keep
        self._numbers = itertools.count()
        self.output: list[tuple[int, dict]] = []
        """Items finished so far, with their output index."""
        self.text: dict | None = None
        """The reasoning or message item streaming now: {"kind", "id", "index", "pieces"} (its text, joined when it
        closes: a string grown per token would be copied whole at every token)."""
        self.calls: dict[int, dict] = {}
        """Function calls by their chat index: {"id", "index", "call_id", "name", "arguments"}."""
        self.logprobs: list[dict] = []
        """Logprobs of the tokens streamed so far, not yet sent with a text delta."""
        self.sent_logprobs: list[dict] = []

    def event(self, kind: str, **fields) -> str:
        payload = {"type": kind, "sequence_number": next(self._numbers), **fields}
        return f"event: {kind}\ndata: {json.dumps(payload)}\n\n"

    def start(self) -> list[str]:
        response = _response(self.body, self.call, [], "in_progress", None)
        return [self.event("response.created", response=response), self.event("response.in_progress",
                                                                              response=response)]

    def delta(self, delta: dict, logprobs: dict | None = None) -> list[str]:
        self.logprobs += (logprobs or {}).get("content") or []
        events = []
        for kind, key in (("reasoning", "reasoning"), ("message", "content")):
            if delta.get(key):
                events += self._text_delta(kind, delta[key])
        for tool_call in delta.get("tool_calls") or ():
            events += self._call_delta(tool_call)
        return events

    def _text_delta(self, kind: str, piece: str) -> list[str]:
        events = []
        if self.text is not None and self.text["kind"] != kind:
            events += self._close_text("completed")
        if self.text is None:
            self.text = {"kind": kind, "id": _id("rs" if kind == "reasoning" else "msg"), "index": self._next_index(),
                         "pieces": []}
            item_id, index = self.text["id"], self.text["index"]
            if kind == "reasoning":
                events.append(self.event("response.output_item.added", output_index=index,
                                         item=_reasoning_item(item_id, "", "in_progress") | {"content": []}))
            else:
                events.append(self.event("response.output_item.added", output_index=index,
                                         item=_message_item(item_id, "", "in_progress") | {"content": []}))
                events.append(self.event("response.content_part.added", item_id=item_id, output_index=index,
                                         content_index=0, part={"type": "output_text", "text": "", "annotations": []}))
        self.text["pieces"].append(piece)
        if kind == "reasoning":
            return events + [self.event("response.reasoning_text.delta", item_id=self.text["id"],
                                        output_index=self.text["index"], content_index=0, delta=piece)]
        logprobs, self.logprobs = self.logprobs, []
        self.sent_logprobs += logprobs
        return events + [self.event("response.output_text.delta", item_id=self.text["id"],
                                    output_index=self.text["index"], content_index=0, delta=piece,
                                    logprobs=logprobs)]

    def _close_text(self, status: str) -> list[str]:
        text, self.text = self.text, None
        item_id, index = text["id"], text["index"]
        text["text"] = "".join(text.pop("pieces"))
        if text["kind"] == "reasoning":
            item = _reasoning_item(item_id, text["text"], "completed")
            events = [self.event("response.reasoning_text.done", item_id=item_id, output_index=index, content_index=0,
                                 text=text["text"])]
        else:
            self.sent_logprobs, self.logprobs = self.sent_logprobs + self.logprobs, []
            item = _message_item(item_id, text["text"], status, self.sent_logprobs)
            part = item["content"][0]
            events = [self.event("response.output_text.done", item_id=item_id, output_index=index, content_index=0,
                                 text=text["text"], logprobs=self.sent_logprobs),
                      self.event("response.content_part.done", item_id=item_id, output_index=index, content_index=0,
                                 part=part)]
        self.output.append((index, item))
        return events + [self.event("response.output_item.done", output_index=index, item=item)]

    def _call_delta(self, tool_call: dict) -> list[str]:
        events = self._close_text("completed") if self.text is not None else []
        state = self.calls.get(tool_call["index"])
        function = tool_call.get("function") or {}
        if state is None:
            state = {"id": _id("fc"), "index": self._next_index(), "call_id": tool_call["id"],
                     "name": function.get("name"), "arguments": ""}
            self.calls[tool_call["index"]] = state
            events.append(self.event("response.output_item.added", output_index=state["index"], item=_call_item(
                state["id"], state["call_id"], state["name"], "", "in_progress")))
        piece = function.get("arguments") or ""
        if piece:
            state["arguments"] += piece
            events.append(self.event("response.function_call_arguments.delta", item_id=state["id"],
                                     output_index=state["index"], delta=piece))
        return events

    def _next_index(self) -> int:
        return len(self.output) + (self.text is not None) + len(self.calls)

    def finish(self, finish_reason: str | None, chat_usage: dict | None) -> list[str]:
        status = "incomplete" if finish_reason == "length" else "completed"
        events = self._close_text(status) if self.text is not None else []
        for state in self.calls.values():
            item = _call_item(state["id"], state["call_id"], state["name"], state["arguments"], "completed")
            events.append(self.event("response.function_call_arguments.done", item_id=state["id"],
                                     output_index=state["index"], arguments=state["arguments"], name=state["name"]))
            events.append(self.event("response.output_item.done", output_index=state["index"], item=item))
            self.output.append((state["index"], item))
        output = [item for _, item in sorted(self.output, key=lambda pair: pair[0])]
        response = _kept(_response(self.body, self.call, output, status, _usage(chat_usage)), self.keep)
        return events + [self.event("response.completed" if status == "completed" else "response.incomplete",
                                    response=response)]


async def events(runner: Runner, call: Call, body: ResponsesRequest, keep: Keep | None = None) -> AsyncIterator[str]:
    """The SSE events of a streamed response (no `[DONE]`: the stream ends after `response.completed`); the
    finished response goes to `keep` when given (a failed one does not)."""
    call.include_usage = True  # the last chunk's usage goes into the final response
    writer, finish_reason, chat_usage = _Events(body, call, keep), None, None
    for event in writer.start():
        yield event
    async for chunk in chunks(runner, call):
        if "error" in chunk:
            error = chunk["error"]
            yield writer.event("error", message=error["message"], code=error["code"], param=error["param"])
            return
        if chunk.get("usage"):
            chat_usage = chunk["usage"]
        for choice in chunk["choices"]:
            for event in writer.delta(choice["delta"], choice.get("logprobs")):
                yield event
            finish_reason = choice["finish_reason"] or finish_reason
    for event in writer.finish(finish_reason, chat_usage):
        yield event
