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

A parser only reads: `parse` returns the calls as (name, arguments) pairs, and `server.api.tools` checks them
against the request's tools. A reply that does not parse in full is text, never a partial call.
"""

from __future__ import annotations

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

    def parse(self, text: str) -> Parsed | None:
        """The content and calls of a whole reply; None when it makes no call or does not parse."""
        raise NotImplementedError

    def streamable(self, text: str) -> str:
        """The part of a reply so far that is content whatever comes next (streamed before the reply ends)."""
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
    OPEN = "<tool_call>"
    _BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)

    def parse(self, text: str) -> Parsed | None:
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


class Llama3Json(ToolParser):
    name = "llama3_json"
    PYTHON_TAG = "<|python_tag|>"

    def parse(self, text: str) -> Parsed | None:
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


class Mistral(ToolParser):
    name = "mistral"
    keeps_special_tokens = True
    CALLS, ARGS = "[TOOL_CALLS]", "[ARGS]"

    def parse(self, text: str) -> Parsed | None:
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


PARSERS: dict[str, ToolParser] = {parser.name: parser for parser in (Hermes(), Llama3Json(), Mistral())}
