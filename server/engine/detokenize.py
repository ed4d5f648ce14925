"""Incremental detokenization with stop strings.

Each update releases only the new part of the output text. A trailing replacement character (a UTF-8
sequence cut between tokens) and any tail that could still grow into a stop string are held back until
they resolve; a finished request releases everything.

The text comes one of two ways, with the same result:

- Streamed (a Hugging Face fast tokenizer whose decode is the `tokenizers` backend's, without clean-up):
  each new token goes through a `tokenizers.decoders.DecodeStream`, which decodes a window from the
  previous release point and yields the new text once it no longer ends in a cut UTF-8 sequence: O(new
  tokens) per update instead of a decode of the whole output. While the stream holds tokens back, their
  text is decoded the stream's way (`_pending_text`) so hold-backs and stop strings see exactly what a
  whole decode shows.
- Re-decoded: the whole output each update (any other tokenizer, or after the stream raised).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

_REPLACEMENT = "\ufffd"
_TRIM = 4096
"""Characters dropped from the front of a long output's text at a time (`Detokenizer._trim`)."""


def streaming_backend(tokenizer: object):
    """The `tokenizers.Tokenizer` to stream with, or None where only a whole decode is exact."""
    try:
        import tokenizers.decoders
        from tokenizers import Tokenizer
        from transformers import PreTrainedTokenizerFast
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
    except ImportError:
        return None
    if not hasattr(tokenizers.decoders, "DecodeStream"):  # tokenizers < 0.21
        return None
    backend = getattr(tokenizer, "_tokenizer", None)
    cls = type(tokenizer)
    plain_decode = (getattr(cls, "decode", None) is PreTrainedTokenizerBase.decode
                    and getattr(cls, "_decode", None) is PreTrainedTokenizerFast._decode)
    if (not getattr(tokenizer, "is_fast", False) or not isinstance(backend, Tokenizer) or not plain_decode
            or getattr(tokenizer, "clean_up_tokenization_spaces", True)):
        return None
    return backend


@dataclass
class Detokenizer:
    """Text state of one request."""

    tokenizer: object
    stop: tuple[str, ...]
    emitted: int = 0
    """Characters of the output text already released."""
    stream: bool = True
    """Stream the text where the tokenizer allows it (`streaming_backend`); False: re-decode every update."""
    include_stop: bool = False
    """A matched stop string stays in the text (which ends after it) instead of being cut."""
    skip_special_tokens: bool = True
    """Leave special tokens out of the text."""
    matched_stop: str | None = field(default=None, init=False)
    """The stop string the text ended at, once one matched."""
    backend: object = field(default=None, init=False, repr=False)
    """The `tokenizers.Tokenizer` streamed with; None: re-decode every update."""
    _stream: object = field(default=None, init=False, repr=False)
    _text: str = field(default="", init=False, repr=False)
    """The stream's text so far, the decode of the output's first `_released` tokens, from character `_base` on:
    what lies further back than any stop string could reach is dropped, so a long output's updates do not copy
    its whole text."""
    _base: int = field(default=0, init=False, repr=False)
    """Characters of the output text dropped from the front of `_text`."""
    _fed: int = field(default=0, init=False, repr=False)
    """Output tokens given to the stream."""
    _released: int = field(default=0, init=False, repr=False)
    """Tokens whose text the stream has yielded (its last release point)."""
    _window: int = field(default=0, init=False, repr=False)
    """The release point before that: where the stream's decode window starts."""

    def __post_init__(self) -> None:
        self.backend = streaming_backend(self.tokenizer) if self.stream else None
        if self.backend is not None:
            from tokenizers.decoders import DecodeStream

            self._stream = DecodeStream(skip_special_tokens=self.skip_special_tokens)

    def update(self, output_ids: list[int], finished: bool, start: int = 0, end: int | None = None
               ) -> tuple[str, bool]:
        """(new text to release, whether a stop string matched) for the output `output_ids[start:end]` (a request's
        token ids and where its output lies in them: nothing is copied)."""
        end = len(output_ids) if end is None else end
        text, base = self._decode(output_ids, start, end)  # the output's text from character `base` on
        matches = [(at + base, i) for i, stop in enumerate(self.stop)
                   if (at := text.find(stop, max(self.emitted - len(stop) + 1 - base, 0))) != -1]
        if matches:  # the earliest match ends the text, whichever stop string it is
            at, index = min(matches)
            self.matched_stop = self.stop[index]
            return self._release(text, base, at + len(self.matched_stop) if self.include_stop else at), True
        releasable = base + (len(text) if finished else self._held_back_end(text))
        released = self._release(text, base, releasable)
        self._trim()
        return released, False

    def _decode(self, ids: list[int], start: int, end: int) -> tuple[str, int]:
        """The decode of the output `ids[start:end]` (skipping special tokens), streamed where possible, from
        character `base` on: (text, base)."""
        if self._stream is not None and end - start >= self._fed:
            try:
                return self._streamed(ids, start, end), self._base
            except Exception as error:  # noqa: BLE001 - the stream gave up on this output: re-decode from now on
                logger.debug("streamed detokenization stopped (%s); decoding whole outputs", error)
        self._stream = None
        return self.tokenizer.decode(ids[start:end], skip_special_tokens=self.skip_special_tokens), 0

    def _streamed(self, ids: list[int], start: int, end: int) -> str:
        for token_id in ids[start + self._fed : end]:
            chunk = self._stream.step(self.backend, token_id)
            self._fed += 1
            if chunk is not None:
                self._text += chunk
                self._window, self._released = self._released, self._fed
        if self._released == end - start:
            return self._text
        pending = self._pending_text(ids[start + self._window : end])
        if pending is None:  # (the whole text, from `_base` on)
            return self.tokenizer.decode(ids[start:end], skip_special_tokens=self.skip_special_tokens)[self._base :]
        return self._text + pending

    def _trim(self) -> None:
        """Drop the front of the stream's text that is released and out of every stop string's reach (in steps of
        a few thousand characters, so each character is copied a bounded number of times)."""
        reach = max((len(stop) for stop in self.stop), default=0)
        drop = min(self.emitted - reach, self._base + len(self._text)) - self._base
        if drop >= _TRIM:
            self._text, self._base = self._text[drop:], self._base + drop

    def _pending_text(self, window: list[int]) -> str | None:
        """Text of the tokens after the release point, decoded over the stream's window (the output's tokens from
        `_window` on); None if inconsistent."""
        skip = self.skip_special_tokens
        known = self.backend.decode(window[: self._released - self._window], skip_special_tokens=skip)
        grown = self.backend.decode(window, skip_special_tokens=skip)
        return grown[len(known) :] if grown.startswith(known) else None

    def _held_back_end(self, text: str) -> int:
        """Where the releasable text ends: before a trailing cut UTF-8 sequence and any stop string's prefix
        (unless a matched stop stays in the text: then what precedes it and its prefix are released alike)."""
        end = len(text)
        while end and text[end - 1] == _REPLACEMENT:
            end -= 1
        for stop in () if self.include_stop else self.stop:
            for n in range(min(len(stop) - 1, end), 0, -1):
                if text.endswith(stop[:n], 0, end):
                    end -= n
                    break
        return end

    def _release(self, text: str, base: int, end: int) -> str:
        """The text from what was emitted up to `end` (both counted from the output's start; `text` starts at
        character `base`)."""
        if end <= self.emitted:
            return ""
        new, self.emitted = text[self.emitted - base : end - base], end
        return new
