"""Tool calling in chat completions: the tools go into the prompt through the model's chat template, and
the calls come out exactly, as a structured output.

`tool_choice` decides what the model may say:

- a named function (`{"type": "function", "function": {"name": ...}}`): the reply is that function's
  arguments, constrained to its `parameters` schema; one call, finish_reason `stop` (as OpenAI);
- `required`: the reply is a JSON array of `{"name", "parameters"}` objects whose names are the tools' and
  whose parameters follow each tool's schema (one item unless `parallel_tool_calls`); finish_reason
  `tool_calls`;
- `none`: free text (the tools are still in the prompt, as OpenAI and vLLM render them).

With a parser whose format xgrammar knows (below), required and named calls are written in the model's own
format instead, under a structural tag that allows nothing but those calls (`call_tool_grammar`), and read
back by the parser as auto's are.

`auto` (OpenAI's default when tools are given) lets the model choose between text and a call, in its own
format. It needs the parser of that format, named at start-up (`--tool-call-parser`, as vLLM's; see
`server.api.tool_parsers`: hermes, llama3_json, mistral, qwen3_coder, pythonic). Without one, auto is a 400
rather than a guess; vLLM without `--enable-auto-tool-choice` refuses it too. The text before the calls is
the message's content; a reply whose calls do not parse, or name no tool of the request, stays text. For
formats xgrammar knows (hermes, llama3_json, qwen3_coder) and Mistral's (v3 and v11, built here: its markers are
special tokens) the reply is generated under a structural tag (`call_tool_grammar`, unless
`--no-tool-call-structural-tags`): the text is free until the model starts a call, and from there the call is held
to the format, a tool's name and that tool's schema, so it parses; with `none`, a reply in those formats with
markers (hermes, qwen3_coder, mistral) cannot open a call (`no_call_grammar`).
"""

from __future__ import annotations

import json
import uuid

from server.api.errors import APIError
from server.api.protocol import ChatCompletionRequest, NamedToolChoice
from server.api.tool_parsers import PARSERS, ToolParser
from server.engine.structured import GrammarSpec, tool_call_tag

ANY_OBJECT = {"type": "object"}


def parser_named(name: str | None) -> ToolParser | None:
    """The parser `--tool-call-parser` names (None for none); a ValueError naming the choices otherwise."""
    if name is not None and name not in PARSERS:
        raise ValueError(f"tool_call_parser must be one of {', '.join(PARSERS)}, got {name!r}")
    return PARSERS.get(name) if name is not None else None


def tool_mode(body: ChatCompletionRequest, parser: str | None = None) -> str | None:
    """`required`, the name of the function to call, `auto` (free text read by `parser`), or None (free
    text); 400 for what cannot be served."""
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none"):
            raise APIError(400, "tool_choice needs tools", "tool_choice")
        return None
    if choice is None or choice == "auto":
        if parser is not None:
            return "auto"
        raise APIError(400, "tool_choice auto (the default when tools are given) needs a parser of the model's own "
                            "call format, which Tessera does not guess: start the server with --tool-call-parser "
                            "hermes (Qwen, Hermes), llama3_json or pythonic (Llama), mistral or qwen3_coder; or use "
                            "tool_choice required or a named function, whose calls are generated under the tools' "
                            "schemas",
                       "tool_choice")
    if choice == "none":
        return None
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in {tool.function.name for tool in body.tools}:
            raise APIError(400, f"tool_choice names {choice.function.name!r}, which is not among the tools",
                           "tool_choice")
        return choice.function.name
    return "required"


def tool_grammar(body: ChatCompletionRequest, mode: str) -> GrammarSpec:
    """The JSON schema the reply follows in `mode`."""
    schemas = {tool.function.name: tool.function.parameters or ANY_OBJECT for tool in body.tools}
    if mode != "required":
        return GrammarSpec("json_schema", json.dumps(schemas[mode]), strict=False)
    calls = [{"type": "object", "properties": {"name": {"const": name}, "parameters": schema},
              "required": ["name", "parameters"], "additionalProperties": False} for name, schema in schemas.items()]
    array = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if not body.parallel_tool_calls:
        array["maxItems"] = 1
    return GrammarSpec("json_schema", json.dumps(array), strict=False)


def call_tool_grammar(body: ChatCompletionRequest, parser: ToolParser, mode: str, tokenizer=None) -> GrammarSpec | None:
    """The structural tag of `parser`'s call format for tool mode `mode` (`structured.tool_call_tag`): with auto,
    free text in which each call the model starts is held to the format and its tool's schema; with required or
    a named function, nothing but calls in that format. None where the parser has no tag for the model (auto then
    reads calls from free text; required and named are `tool_grammar`'s JSON). `tokenizer`, the model's, picks the
    format where a family has several (`ToolParser.tag_format`)."""
    model_format = parser.tag_format(tokenizer)
    if model_format is None:
        return None
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools]
    return GrammarSpec("structural_tag", tool_call_tag(model_format, tools, mode, body.parallel_tool_calls,
                                                       parser.call_separator), strict=False)


def no_call_grammar(parser: ToolParser, tokenizer=None) -> GrammarSpec | None:
    """For tool_choice none: free text that never opens a call in `parser`'s format (OpenAI's none: the model
    answers in text), or None where the format has no marker to keep out, or no tag for `tokenizer`'s model."""
    if parser.call_opening is None or parser.tag_format(tokenizer) is None:
        return None
    if parser.keeps_special_tokens:  # the marker is a special token: kept out as a token (xgrammar matches it so)
        free = {"type": "any_tokens", "exclude_tokens": [parser.call_opening]}
    else:
        free = {"type": "any_text", "excludes": [parser.call_opening]}
    return GrammarSpec("structural_tag", json.dumps({"type": "structural_tag", "format": free}))


def template_messages(body: ChatCompletionRequest) -> list[dict]:
    """Messages as chat templates read them: an assistant turn's calls with their arguments as objects (the
    form transformers documents for templates) and its reasoning, a tool turn with the id of the call it answers."""
    messages = []
    for message in body.messages:
        entry = {"role": message.role, "content": message.text()}
        if message.tool_calls:
            entry["tool_calls"] = [{"id": call.id, "type": "function",
                                    "function": {"name": call.function.name,
                                                 "arguments": _arguments(call.function.arguments)}}
                                   for call in message.tool_calls]
        if message.tool_call_id is not None:
            entry["tool_call_id"] = message.tool_call_id
        reasoning = message.reasoning if message.reasoning is not None else message.reasoning_content
        if reasoning is not None:  # Qwen3's and DeepSeek's templates read reasoning_content
            entry["reasoning_content"] = entry["reasoning"] = reasoning
        messages.append(entry)
    return messages


def template_tools(body) -> list[dict] | None:
    """The tools as chat templates read them (a /tokenize body has none)."""
    given = getattr(body, "tools", None)
    return [tool.model_dump(exclude_none=True) for tool in given] if given else None


def _arguments(text: str):
    try:
        return json.loads(text)
    except ValueError:
        raise APIError(400, f"tool call arguments are not JSON: {text[:80]!r}", "messages") from None


def auto_calls(parser: ToolParser, text: str, tools: dict[str, dict]) -> tuple[str | None, list[dict] | None]:
    """(content, calls) of an `auto` reply read by `parser`; (text, None) when it makes no call, or when a call
    does not name one of the request's `tools` (name -> parameters schema) with an object of arguments."""
    parsed = parser.parse(text, tools)
    if parsed is None:
        return text, None
    content, found = parsed
    if any(name not in tools or not isinstance(arguments, dict) for name, arguments in found):
        return text, None
    return content, [tool_call_entry(name, json.dumps(arguments)) for name, arguments in found]


def tool_calls(mode: str, text: str, finished: bool) -> list[dict] | None:
    """The calls a reply in `mode` makes: one for a named function (its arguments as generated, even when
    max_tokens cut them), the array's items for `required` (each one's arguments as generated, the text
    its stream sent); None when a `required` reply is cut short and does not parse (the text is then
    returned as content)."""
    if mode != "required":
        return [tool_call_entry(mode, text)]
    try:
        items = json.loads(text) if finished else None
    except ValueError:
        items = None
    if not isinstance(items, list):
        return None
    return [tool_call_entry(name, arguments) for name, arguments, _ in required_calls_so_far(text)]


_SPACE = " \t\n\r"


class JsonCallsReader:
    """Reads calls written as JSON objects `{"name": ..., KEY: {...}}` as their text grows, each character once (a
    stream rescanning the whole reply at every increment would cost quadratic time in a long call's arguments).

    `array`: the text is `tool_grammar`'s array of `{"name": ..., "parameters": {...}}` objects (tool_choice
    required as JSON); else it is a sequence of such objects with anything but `{` between them (a call format's
    markers and separators: hermes' `<tool_call>` blocks, llama3_json's `;`), read from where the calls begin.
    The text follows a grammar that holds it to that shape, so only its end can be cut. A call's arguments are
    the text of its value under one of `keys`, as generated."""

    def __init__(self, keys: tuple[str, ...] = ("parameters",), array: bool = True) -> None:
        self.keys = keys
        self.array = array
        self.text = ""
        self._at = 0
        self._state = "start" if array else "items"
        self._calls: list[list] = []
        """[name or None, index of the arguments' start or None, index of their end or None, complete]."""
        self._key = ""
        self._key_start = self._value_start = 0
        self._depth = 0
        self._in_string = self._escaped = False

    def feed(self, more: str) -> list[tuple[str | None, str, bool]]:
        """Read `more` text; (name or None while unknown, arguments text so far, complete) of each call begun."""
        self.text += more
        while self._at < len(self.text):
            if self._step(self.text[self._at]):
                self._at += 1
        return [(name, self.text[start:end] if start is not None else "", done)
                for name, start, end, done in self._calls]

    def _step(self, char: str) -> bool:
        """Advance the state machine by `char`; False to read the same character again in the new state."""
        state = self._state
        if state in ("start", "items", "members", "colon", "value") and char in _SPACE:
            return True
        if state == "start":
            self._state = "items" if char == "[" else "stop"
        elif state == "items":
            if char == "{":
                self._calls.append([None, None, None, False])
                self._state = "members"
            elif char != "," and self.array:
                self._state = "stop"
        elif state == "members":
            if char == "}":
                self._calls[-1][3] = True
                self._state = "items"
            elif char == '"':
                self._key_start, self._state, self._escaped = self._at, "key", False
            elif char != ",":
                self._state = "stop"
        elif state == "key":
            if not self._string_char(char):
                self._key = json.loads(self.text[self._key_start : self._at + 1])
                self._state = "colon"
        elif state == "colon":
            self._state = "value" if char == ":" else "stop"
        elif state == "value":
            self._value_start, self._in_string, self._escaped = self._at, char == '"', False
            self._depth = 1 if char in "{[" else 0
            if self._key in self.keys:
                self._calls[-1][1] = self._at
            self._state = "string" if char == '"' else "compound" if self._depth else "literal"
            return char != "" and self._state != "literal"
        elif state == "string":
            if not self._string_char(char):
                self._end_value(self._at + 1)
        elif state == "compound":
            if self._in_string:
                self._in_string = self._string_char(char)
            elif char == '"':
                self._in_string = True
            elif char in "{[":
                self._depth += 1
            elif char in "}]":
                self._depth -= 1
                if self._depth == 0:
                    self._end_value(self._at + 1)
        elif state == "literal":
            if char in ",}]" + _SPACE:
                self._end_value(self._at)
                return False
        return True

    def _string_char(self, char: str) -> bool:
        """Whether the string that `char` is in goes on after it (False: `char` closed it)."""
        if self._escaped:
            self._escaped = False
            return True
        if char == "\\":
            self._escaped = True
            return True
        return char != '"'

    def _end_value(self, end: int) -> None:
        call = self._calls[-1]
        if self._key in self.keys:
            call[2] = end
        elif self._key == "name":
            call[0] = json.loads(self.text[self._value_start : end])
        self._state = "members"


def required_calls_so_far(text: str) -> list[tuple[str | None, str, bool]]:
    """(name or None while unknown, arguments text so far, whether the call is complete) of each call a
    `required` reply has begun (`JsonCallsReader` on the whole text)."""
    return JsonCallsReader().feed(text)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def tool_call_entry(name: str, arguments: str) -> dict:
    return {"id": new_call_id(), "type": "function",
            "function": {"name": name, "arguments": arguments}}
