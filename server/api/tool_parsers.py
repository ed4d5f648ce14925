"""Readers of the tool-call formats models write on their own, for tool_choice auto (`--tool-call-parser`).

With auto the model chooses between text and calls, so its reply is free text in the format its chat
template taught it. A parser finds the calls in that text and says how much of a reply still being
generated can be streamed as content without showing part of a call:

- `hermes`: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks after optional text (Qwen2.5,
  Qwen3, Hermes);
- `llama3_json`: a reply that is one or more `{"name": ..., "parameters": {...}}` objects separated by `;`,
  optionally after `<|python_tag|>` (Llama 3.1, 3.2, 3.3); a reply that starts otherwise is text;
- `mistral`: text, then `[TOOL_CALLS]` followed by a JSON array of `{"name", "arguments"}` objects (tokenizer
  v3 and earlier), or by `name[ARGS]{...}`, once per call (v11 and later). `[TOOL_CALLS]` is a special token,
  so requests read by this parser keep special tokens in their text (as vLLM's mistral parser does).
- `qwen3_coder`: `<tool_call><function=NAME><parameter=KEY>value</parameter></function></tool_call>` blocks
  after optional text (Qwen3-Coder), values typed by the tool's schema.
- `pythonic`: a reply that is a Python list of calls, `[f(a=1), g(b="x")]` (Llama 3.2, Llama 4), read with
  `ast`, never executed.

A parser only reads: `parse` returns the calls as (name, arguments) pairs, and `server.api.tools` checks them
against the request's tools. A reply that does not parse in full is text, never a partial call.
"""

from __future__ import annotations

import ast
import json
import re
from typing import ClassVar

Parsed = tuple[str | None, list[tuple[object, object]]]
"""(content before the calls or None, [(name, arguments)]) as found in the text, not yet checked."""


class ToolParser:
    """One model family's tool-call format."""

    name: ClassVar[str]
    keeps_special_tokens: ClassVar[bool] = False
    """Its markers are special tokens: the text it reads must be decoded with them."""
    structural_format: ClassVar[str | None] = None
    """xgrammar's name of this format (`structured.tool_call_tag`): with tool_choice auto, replies are generated
    under it, each call held to the format and its tool's schema; None: calls are read from free text only."""
    call_separator: ClassVar[str] = "\n"
    """What goes between two calls of a reply the structural tag makes all calls (tool_choice required)."""
    call_keys: ClassVar[tuple[str, ...] | None] = None
    """Where each call is a JSON object `{"name": ..., KEY: {...}}` (after the format's markers): the keys its
    arguments may sit under, so a call held to the format by its structural tag streams its arguments as they
    are generated (`tools.JsonCallsReader`, `calls_start`); None where calls are read whole."""
    call_opening: ClassVar[str | None] = None
    """The text that opens a call and nothing else (a marker): with tool_choice none it is kept out of the reply
    (`tools.no_call_grammar`); None where a call opens with text a plain reply may hold too."""

    def tag_format(self, tokenizer) -> str | None:
        """The structural format (`structural_format`) of the calls of the model `tokenizer` belongs to."""
        return self.structural_format

    def held_call_keys(self, tokenizer) -> tuple[str, ...] | None:
        """`call_keys` for the format of the model `tokenizer` belongs to (`tag_format`)."""
        return self.call_keys

    def parse(self, text: str, tools: dict[str, dict]) -> Parsed | None:
        """The content and calls of a whole reply; None when it makes no call or does not parse. `tools` (name
        -> parameters schema) is for formats whose arguments are untyped text."""
        raise NotImplementedError

    def streamable(self, text: str) -> str:
        """The part of a reply so far that is content whatever comes next (streamed before the reply ends)."""
        raise NotImplementedError

    def calls_start(self, text: str) -> int | None:
        """With `call_keys`: where a reply's calls begin once that is certain (everything before is content), or
        None while it is not (or never is: the reply is text)."""
        raise NotImplementedError


def before_marker(text: str, marker: str) -> str:
    """`text` up to `marker`, without a tail that could be the marker's start."""
    start = text.find(marker)
    if start >= 0:
        return text[:start]
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:size]):
            return text[:-size]
    return text


class Hermes(ToolParser):
    name = "hermes"
    structural_format = "qwen_3"  # `<tool_call>\n{"name": ..., "arguments": ...}\n</tool_call>`
    OPEN = call_opening = "<tool_call>"
    call_keys = ("arguments",)
    _BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)

    def parse(self, text: str, tools: dict[str, dict]) -> Parsed | None:
        calls = []
        for block in self._BLOCK.findall(text):
            try:
                item = json.loads(block)
            except ValueError:
                return None
            if not isinstance(item, dict):
                return None
            calls.append((item.get("name"), item.get("arguments")))
        if not calls:
            return None
        return text[: text.index(self.OPEN)].strip() or None, calls

    def streamable(self, text: str) -> str:
        return before_marker(text, self.OPEN)

    def calls_start(self, text: str) -> int | None:
        start = text.find(self.OPEN)
        return start if start >= 0 else None


class Llama3Json(ToolParser):
    name = "llama3_json"
    structural_format = "llama"  # (it allows text before a call; such a reply stays text here, as in vLLM)
    call_separator = "; "
    call_keys = ("parameters", "arguments")
    PYTHON_TAG = "<|python_tag|>"

    def parse(self, text: str, tools: dict[str, dict]) -> Parsed | None:
        body = text.strip()
        if body.startswith(self.PYTHON_TAG):
            body = body[len(self.PYTHON_TAG):].lstrip()
        if not body.startswith("{"):
            return None
        decoder, calls, at = json.JSONDecoder(), [], 0
        while True:
            try:
                item, at = decoder.raw_decode(body, at)
            except ValueError:
                return None
            if not isinstance(item, dict):
                return None
            calls.append((item.get("name"), item.get("parameters", item.get("arguments"))))
            rest = body[at:].lstrip()
            if not rest:
                return None, calls
            if not rest.startswith(";"):
                return None
            at = len(body) - len(rest[1:].lstrip())

    def streamable(self, text: str) -> str:
        body = text.lstrip()
        if not body or body.startswith("{") or self.PYTHON_TAG.startswith(body[: len(self.PYTHON_TAG)]):
            return ""  # a call may be coming: the whole reply is decided at its end
        return text

    def calls_start(self, text: str) -> int | None:
        body = text.lstrip()
        return len(text) - len(body) if body.startswith(("{", self.PYTHON_TAG)) else None


class Mistral(ToolParser):
    """Mistral's calls after the special token `[TOOL_CALLS]`: a JSON array of `{"name": ..., "arguments": ...}` (v3
    tokenizers), or `NAME[ARGS]{...}` per call (v11 and later); it reads both. Its structural tag writes the one the
    chat template writes (`tag_format`); held to v3's, the calls' arguments stream as they are generated."""

    name = "mistral"
    keeps_special_tokens = True
    structural_format = "mistral_v3"
    call_separator = ""
    call_opening = "[TOOL_CALLS]"
    CALLS, ARGS = "[TOOL_CALLS]", "[ARGS]"

    def tag_format(self, tokenizer) -> str | None:
        """v11's NAME[ARGS]{...} where the chat template writes calls that way, else v3's array; None for a tokenizer
        without the token `[TOOL_CALLS]` (no tag can hold calls to it there: they are read from free text)."""
        if tokenizer is None or len(tokenizer.encode(self.CALLS, add_special_tokens=False)) != 1:
            return None
        return "mistral_v11" if self.ARGS in (getattr(tokenizer, "chat_template", None) or "") else "mistral_v3"

    def held_call_keys(self, tokenizer) -> tuple[str, ...] | None:
        """v3's calls are JSON objects (in one array): their arguments stream as generated; v11's come whole."""
        return ("arguments",) if self.tag_format(tokenizer) == "mistral_v3" else None

    def calls_start(self, text: str) -> int | None:
        start = text.find(self.CALLS)
        return start if start >= 0 else None

    def parse(self, text: str, tools: dict[str, dict]) -> Parsed | None:
        start = text.find(self.CALLS)
        if start < 0:
            return None
        calls = []
        try:
            for part in text[start:].split(self.CALLS)[1:]:
                part = part.strip()
                if self.ARGS in part:  # v11: name[ARGS]{...}
                    name, _, arguments = part.partition(self.ARGS)
                    calls.append((name.strip(), json.loads(arguments)))
                    continue
                items = json.loads(part)  # v3: [{"name": ..., "arguments": {...}}, ...]
                for item in items if isinstance(items, list) else [items]:
                    calls.append((item.get("name"), item.get("arguments")))
        except (ValueError, AttributeError):
            return None
        if not calls:
            return None
        return text[:start].strip() or None, calls

    def streamable(self, text: str) -> str:
        return before_marker(text, self.CALLS)


class Qwen3Coder(ToolParser):
    """Qwen3-Coder's XML calls: `<tool_call><function=NAME><parameter=KEY>value</parameter>...</function>
    </tool_call>`. Values are text; each is read as the type its tool's schema gives the parameter (integer,
    number, boolean, null, object, array), and stays a string where the schema says string or nothing."""

    name = "qwen3_coder"
    structural_format = "qwen_3_coder"
    OPEN, FUNCTION = "<tool_call>", "<function="
    call_opening = OPEN
    _CALL = re.compile(r"<function=([^>\n]+)>(.*?)</function>", re.S)
    _PARAMETER = re.compile(r"<parameter=([^>\n]+)>(.*?)</parameter>", re.S)

    def parse(self, text: str, tools: dict[str, dict]) -> Parsed | None:
        calls = []
        for name, body in self._CALL.findall(text):
            name = name.strip()
            properties = (tools.get(name) or {}).get("properties") or {}
            arguments = {}
            for key, value in self._PARAMETER.findall(body):
                key = key.strip()
                arguments[key] = _typed(value.removeprefix("\n").removesuffix("\n"), properties.get(key))
            calls.append((name, arguments))
        if not calls:
            return None
        starts = [at for at in (text.find(self.OPEN), text.find(self.FUNCTION)) if at >= 0]
        return text[: min(starts)].strip() or None, calls

    def streamable(self, text: str) -> str:
        return min(before_marker(text, self.OPEN), before_marker(text, self.FUNCTION), key=len)


def _typed(value: str, schema: dict | None):
    """`value` as the JSON type `schema` names (the first non-null one of a list), or as it is."""
    kind = (schema or {}).get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), None) if value.strip() != "null" else "null"
    if kind in (None, "string"):
        return value
    text = value.strip()
    if kind == "boolean" and text.lower() in ("true", "false"):
        return text.lower() == "true"
    if kind == "null" and text == "null":
        return None
    try:
        parsed = json.loads(text)
    except ValueError:
        return value
    valid = {"integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
             "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
             "object": lambda v: isinstance(v, dict), "array": lambda v: isinstance(v, list)}
    return parsed if valid.get(kind, lambda v: False)(parsed) else value


class Pythonic(ToolParser):
    """A reply that is a Python list of calls with literal keyword arguments, `[get_weather(city="paris"),
    get_time(utc=True)]` (Llama 3.2 and Llama 4 templates), optionally between `<|python_start|>` and
    `<|python_end|>`. It is read with `ast` and `ast.literal_eval`, never executed; a reply that starts
    otherwise is text."""

    name = "pythonic"
    START, END = "<|python_start|>", "<|python_end|>"

    def parse(self, text: str, tools: dict[str, dict]) -> Parsed | None:
        body = text.strip().removeprefix(self.START).removesuffix(self.END).strip()
        if not (body.startswith("[") and body.endswith("]")):
            return None
        try:
            tree = ast.parse(body, mode="eval").body
            if not isinstance(tree, ast.List) or not tree.elts:
                return None
            calls = []
            for node in tree.elts:
                if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
                    return None
                calls.append((node.func.id, {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords
                                             if kw.arg is not None}))
        except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
            return None
        return None, calls

    def streamable(self, text: str) -> str:
        body = text.lstrip()
        if not body or body.startswith("[") or self.START.startswith(body[: len(self.START)]):
            return ""  # a call may be coming: the whole reply is decided at its end
        return text


PARSERS: dict[str, ToolParser] = {parser.name: parser for parser in (
    Hermes(), Llama3Json(), Mistral(), Qwen3Coder(), Pythonic())}
