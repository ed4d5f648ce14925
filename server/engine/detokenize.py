"""Incremental detokenization with stop strings.

Text is re-decoded from the output ids each time (the only way that is exact for every tokenizer) and
only the new part is released. A trailing replacement character (a UTF-8 sequence cut between tokens)
and any tail that could still grow into a stop string are held back until they resolve.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Detokenizer:
    """Text state of one request."""

    tokenizer: object
    stop: tuple[str, ...]
    emitted: int = 0
    """Characters of the output text already released."""

    def update(self, output_ids: list[int], finished: bool) -> tuple[str, bool]:
        """(new text to release, whether a stop string matched)."""
        text = self.tokenizer.decode(output_ids, skip_special_tokens=True)
        for stop in self.stop:
            at = text.find(stop, max(self.emitted - len(stop) + 1, 0))
            if at != -1:
                return self._release(text[:at]), True
        if not finished:
            text = self._hold_back(text)
        return self._release(text), False

    def _hold_back(self, text: str) -> str:
        if text.endswith("\ufffd"):
            text = text.rstrip("\ufffd")
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:n]):
                    text = text[:-n]
                    break
        return text

    def _release(self, text: str) -> str:
        if len(text) <= self.emitted:
            return ""
        new, self.emitted = text[self.emitted :], len(text)
        return new
