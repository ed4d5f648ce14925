"""Reasoning parsers (`--reasoning-parser`, as vLLM's): a reasoning model's `<think>...</think>` block is
returned apart from its answer, in the message's `reasoning` (vLLM's current name; `reasoning_content`,
DeepSeek's and the older one, carries the same text), and the answer alone is the `content`.

Where the reply starts depends on the prompt, so each request's start is read from its rendered prompt
(`ReasoningParser.start`):

- the prompt leaves a `<think>` block open (DeepSeek-R1, Qwen3 thinking models, a continued turn): the reply
  starts inside the reasoning;
- the prompt ends just after a closed block (Qwen3 with `enable_thinking: false`): the reply is all answer;
- otherwise the parser's default: `qwen3` looks at the reply (a reply that opens `<think>` reasons first, any
  other is all answer); `deepseek_r1` starts inside the reasoning.

A reply cut before `</think>` is all reasoning. Tool calls and structured outputs apply to the answer: the
tool parser reads the content only, and a grammar begins after the `</think>` token (`Request.grammar_after`).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from server.api.tool_parsers import before_marker

Start = Literal["reasoning", "answer", "detect"]


class ReasoningParser:
    """A `<think>...</think>` reasoning format."""

    name: ClassVar[str]
    OPEN: ClassVar[str] = "<think>"
    CLOSE: ClassVar[str] = "</think>"
    default: ClassVar[Start]
    """Where a reply starts when its prompt says nothing."""

    def start(self, prompt_text: str) -> Start:
        """Where the reply to a prompt whose text is `prompt_text` starts."""
        opened, closed = prompt_text.rfind(self.OPEN), prompt_text.rfind(self.CLOSE)
        if opened > closed:
            return "reasoning"
        if closed >= 0 and not prompt_text[closed + len(self.CLOSE):].strip():
            return "answer"
        return self.default

    def split(self, text: str, start: Start, finished: bool) -> tuple[str, str]:
        """(reasoning, content) of a reply's text so far. Before the reply ends, both are only what no later
        text can change (a possible start of a tag is held back), so each grows by appending as the reply
        grows; at the end they are the whole reply's."""
        if start == "answer":
            return "", text
        if start == "detect":
            body = text.lstrip()
            if body.startswith(self.OPEN):
                text = body[len(self.OPEN):]
            elif not finished and self.OPEN.startswith(body):
                return "", ""  # the reply may still open a block
            else:
                return "", text
        at = text.find(self.CLOSE)
        if at >= 0:
            return text[:at].strip("\n"), text[at + len(self.CLOSE):].lstrip("\n")
        reasoning = text if finished else before_marker(text, self.CLOSE)
        return reasoning.strip("\n"), ""


class ReasoningStream:
    """`ReasoningParser.split` of a growing reply, paid per new character: each `feed` gives what the reasoning and
    the content gained, exactly the difference of two splits of the whole reply, while only the text not yet given
    out is kept (so a reply of 30,000 tokens is not scanned and copied whole at every token)."""

    def __init__(self, parser: ReasoningParser, start: Start):
        self.parser = parser
        self.phase = {"answer": "answer", "reasoning": "reasoning", "detect": "detect"}[start]
        """detect (the reply may still open a block), reasoning, content (after the block: its leading newlines
        dropped) or answer (all of it content, as it is)."""
        self.pending = ""
        """Text not given out yet: the reply so far (detect), the reasoning after what was given (reasoning:
        newlines that may end it, a tail that may start `</think>`), leading newlines (content)."""
        self.reasoned = False
        """Whether any reasoning was given (its leading newlines are behind it then)."""

    def feed(self, more: str, finished: bool) -> tuple[str, str]:
        """(reasoning gained, content gained) once the reply has grown by `more`."""
        parser, self.pending = self.parser, self.pending + more
        thought = ""
        if self.phase == "detect":
            body = self.pending.lstrip()
            if body.startswith(parser.OPEN):
                self.phase, self.pending = "reasoning", body[len(parser.OPEN):]
            elif not finished and parser.OPEN.startswith(body):
                return "", ""
            else:
                self.phase = "answer"
        if self.phase == "reasoning":
            at = self.pending.find(parser.CLOSE)
            if at < 0:
                return self._reason(self.pending if finished else before_marker(self.pending, parser.CLOSE)), ""
            thought = self._reason(self.pending[:at], rest=self.pending[at + len(parser.CLOSE):])
            self.phase = "content"
        if self.phase == "content":
            content = self.pending.lstrip("\n")
            if not content:
                return thought, ""
            self.phase = "answer"  # (the newlines before the answer are behind it)
            self.pending = content
        content, self.pending = self.pending, ""
        return thought, content

    def _reason(self, body: str, rest: str | None = None) -> str:
        """Give out `body` (the front of `pending` that is reasoning for sure) but the newlines at its end, and at
        the reasoning's start; with `rest` (the text after `</think>`), `pending` becomes it."""
        lead = 0 if self.reasoned else len(body) - len(body.lstrip("\n"))
        end = len(body.rstrip("\n"))
        thought = body[lead:end] if end > lead else ""
        self.reasoned = self.reasoned or bool(thought)
        self.pending = rest if rest is not None else self.pending[end if thought else 0 :]
        return thought


class Qwen3(ReasoningParser):
    name = "qwen3"
    default = "detect"


class DeepSeekR1(ReasoningParser):
    name = "deepseek_r1"
    default = "reasoning"


REASONING_PARSERS: dict[str, ReasoningParser] = {p.name: p for p in (Qwen3(), DeepSeekR1())}


def reasoning_parser_named(name: str | None) -> ReasoningParser | None:
    """The parser `--reasoning-parser` names (None for none); a ValueError naming the choices otherwise."""
    if name is not None and name not in REASONING_PARSERS:
        raise ValueError(f"reasoning_parser must be one of {', '.join(REASONING_PARSERS)}, got {name!r}")
    return REASONING_PARSERS.get(name) if name is not None else None
