"""Speculative decoding without a draft model: n-gram prompt lookup (vLLM's `method: ngram`) and OpenAI's
Predicted Outputs (a request's `prediction`).

A request that speculates runs, in one step, its last token plus up to k *draft* tokens guessed from text it
already has, and samples a token at every one of those positions. Each position is drawn exactly as a plain
decode step would draw it: with the request's own seed for that position (`sampling.draw_seed`). So the
draws at positions whose earlier drafts all matched are the very tokens plain decoding would produce, and
the step keeps them up to and including the first draw that differs from its draft:

    drafts  = [d1, d2, d3]              the step runs [t, d1, d2, d3] at positions p .. p+3
    sampled = [d1, d2, x, y]            x != d3
    kept    = [d1, d2, x]               3 tokens for one step; y is discarded

The output is the token sequence plain decoding gives, greedy or sampled, seeded or not (up to the
floating-point difference between a multi-token pass and a one-token pass); only the number of steps
changes. A deterministic draft is accepted with the probability the model gives it, which is the
acceptance rate of speculative sampling's rejection rule for such a draft, so nothing is lost against it.

Drafts come from the request's prediction (the next occurrence of its last output tokens after where the
previous match ended, and what follows it there; the prediction's start before any output), else from its
structured output's grammar (the tokens the grammar forces next), else from its own tokens (the most recent
earlier occurrence of its last n tokens, longest n first, and what followed it). Under a grammar, forced
tokens are drafts like any other: drawn and kept as plain decoding would draw them, so unlike jump-forward
decoding they never change the output's tokenization.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields

import numpy as np

_TOKEN_BYTES = 4
"""Token ids are searched as little-endian int32 bytes (`bytes.find` runs at C speed)."""


@dataclass(frozen=True)
class SpeculativeConfig:
    """Draft tokens per step and where they come from (`EngineConfig.speculative_config` holds it as JSON)."""

    num_speculative_tokens: int = 0
    """Draft tokens per step from n-gram lookup in the request's own prompt and output; 0: no lookup."""
    prompt_lookup_max: int = 4
    """Longest n-gram (the request's last n tokens) looked for."""
    prompt_lookup_min: int = 1
    """Shortest n-gram looked for; a shorter match proposes nothing."""
    prediction_tokens: int = 16
    """Draft tokens per step from a request's OpenAI `prediction` (Predicted Outputs); 0 ignores predictions.
    NOTE: 4 / 8 / 16 took 0.27 / 0.19 / 0.12 of the plain time for an exact prediction at batch 1 and 0.33 / 0.28
    / 0.21 with an edit every 32 tokens (bench_spec.py, CPU, "small" model; batch 8 alike). A prediction is drafted
    where the output meets it (and from its start): a wrong one cost 3% at batch 1 and 5% at batch 8 at 16."""
    grammar_tokens: int = 16
    """Draft tokens per step from a structured output's forced continuation (the text its grammar allows alone
    next: a JSON schema's keys and punctuation, say; xgrammar's jump-forward tokens); 0: none."""
    disable_by_batch_size: int = 0
    """No drafts while more than this many requests run (vLLM's speculative_disable_by_batch_size): a large batch's
    steps cost more per token, so drafts save less, and plain steps keep asynchronous overlap (and, past the verify
    graphs' largest batch, CUDA graphs); 0: drafts at any batch size."""

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"speculative_config: {item.name} must be an integer >= 0, got {value!r}")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError(f"speculative_config: need 1 <= prompt_lookup_min <= prompt_lookup_max, got "
                             f"{self.prompt_lookup_min} and {self.prompt_lookup_max}")

    @property
    def max_drafts(self) -> int:
        """Drafts one request runs per step at most, from any source (`Drafter.max_drafts` <= this)."""
        return max(self.num_speculative_tokens, self.prediction_tokens, self.grammar_tokens)

    @classmethod
    def from_json(cls, text: str | None) -> SpeculativeConfig:
        """vLLM's --speculative-config: `{"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4}`
        (n-gram sizes default as vLLM's: one given sets the other, neither is 5), plus Tessera's fields
        (`prediction_tokens`, `grammar_tokens`, `disable_by_batch_size`). None: no n-gram lookup, the rest at
        their defaults."""
        if text is None:
            return cls()
        try:
            given = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"speculative_config is not JSON ({error.msg}): {text!r}") from None
        if not isinstance(given, dict):
            raise ValueError(f"speculative_config must be a JSON object, got {text!r}")
        given = dict(given)
        method = given.pop("method", "ngram" if "num_speculative_tokens" in given else None)
        if method is not None and method != "ngram":
            raise ValueError(f"speculative_config: method {method!r} is not supported; Tessera speculates with "
                             "ngram (prompt lookup) and with requests' predictions, no draft model")
        known = {item.name for item in fields(cls)}
        unknown = sorted(set(given) - known)
        if unknown:
            raise ValueError(f"speculative_config: unknown keys {unknown}; known: method, {', '.join(sorted(known))}")
        if method == "ngram":
            if "num_speculative_tokens" not in given:
                raise ValueError("speculative_config: method ngram needs num_speculative_tokens")
            low, high = given.get("prompt_lookup_min"), given.get("prompt_lookup_max")
            given["prompt_lookup_min"] = low if low is not None else (high if high is not None else 5)
            given["prompt_lookup_max"] = high if high is not None else given["prompt_lookup_min"]
        return cls(**given)


def accepted(drafts: list[int], sampled: list[int]) -> list[int]:
    """The tokens a step keeps: `sampled` (one per position, len(drafts) + 1) up to and including the first one
    that differs from its draft (all of them when every draft matched)."""
    for index, draft in enumerate(drafts):
        if sampled[index] != draft:
            return sampled[: index + 1]
    return sampled[: len(drafts) + 1]


class Drafter:
    """One request's proposer: its tokens as searchable bytes, kept up to date as they grow, and its prediction."""

    def __init__(self, config: SpeculativeConfig, prediction: tuple[int, ...] = (), matcher=None):
        self.config = config
        self.matcher = matcher if config.grammar_tokens else None
        """The request's structured-output matcher (`structured`), whose forced continuation is drafted."""
        self.history = bytearray()
        """Token ids known so far, as int32 bytes."""
        self.prediction = _as_bytes(prediction) if config.prediction_tokens else b""
        self.num_prediction = len(prediction) if config.prediction_tokens else 0
        self.cursor = 0
        """Where in the prediction the last match ended: the next search starts there."""
        self.num_drafted = 0
        """Draft tokens proposed (and run) so far."""
        self.num_accepted = 0
        """Of those, tokens the model drew as drafted."""
        self.hot = True
        """Whether drafts follow the tokens known when the scheduler last looked (`peek`, after each step it reads):
        a step planned while the request's next token is in flight waits for that token only then. True until
        first looked at."""

    @property
    def max_drafts(self) -> int:
        """Drafts it proposes per step at most."""
        return max(self.config.num_speculative_tokens, self.config.prediction_tokens if self.num_prediction else 0,
                   self.config.grammar_tokens if self.matcher is not None else 0)

    def propose(self, token_ids: list[int], num_known: int, num_prompt: int, limit: int) -> list[int]:
        """Up to `limit` draft tokens to follow the first `num_known` of `token_ids` (the first `num_prompt` are the
        prompt; anything after `num_known` is not looked at)."""
        self._sync(token_ids, num_known)
        limit = min(limit, self.max_drafts)
        if limit <= 0:
            return []
        drafts = self._from_prediction(num_known - num_prompt, min(limit, self.config.prediction_tokens))
        if not drafts and self.matcher is not None:  # it has seen every known token (`Scheduler.update`)
            drafts = self.matcher.find_jump_forward_tokens()[: min(limit, self.config.grammar_tokens)]
        if not drafts:
            drafts = self._from_history(min(limit, self.config.num_speculative_tokens))
        return drafts

    def peek(self, token_ids: list[int], num_known: int, num_prompt: int) -> bool:
        """Whether `propose` would find a draft after the first `num_known` of `token_ids` (limits aside); it moves
        nothing `propose` depends on (the prediction's cursor stays), so looking never changes a proposal."""
        self._sync(token_ids, num_known)
        return bool(self._from_prediction(num_known - num_prompt, min(1, self.config.prediction_tokens), move=False)
                    or (self.matcher is not None and self.matcher.find_jump_forward_tokens())
                    or self._from_history(min(1, self.config.num_speculative_tokens)))

    def record(self, num_drafted: int, num_accepted: int) -> None:
        self.num_drafted += num_drafted
        self.num_accepted += num_accepted

    def _sync(self, token_ids: list[int], num_known: int) -> None:
        have = len(self.history) // _TOKEN_BYTES
        if have < num_known:
            self.history += _as_bytes(token_ids[have:num_known])

    def _from_history(self, limit: int) -> list[int]:
        """What followed the most recent earlier occurrence of the longest suffix (n-gram) that occurred before."""
        if limit <= 0:
            return []
        history, size = self.history, len(self.history) // _TOKEN_BYTES
        for n in range(min(self.config.prompt_lookup_max, size - 1), self.config.prompt_lookup_min - 1, -1):
            suffix = history[-n * _TOKEN_BYTES :]
            end = len(history) - _TOKEN_BYTES  # a match ends a token before the suffix does: never the suffix itself
            start = _rfind(history, suffix, end)
            if start >= 0:
                return _tokens(history, start + n, min(start + n + limit, size))
        return []

    def _from_prediction(self, num_output: int, limit: int, move: bool = True) -> list[int]:
        """The prediction's start before any output; later, what follows the next occurrence (from the cursor, else
        from the start) of the longest output suffix found in the prediction (the cursor then moves past it, if
        `move`)."""
        if limit <= 0 or not self.num_prediction:
            return []
        if num_output == 0:
            return _tokens(self.prediction, 0, min(limit, self.num_prediction))
        for n in range(min(self.config.prompt_lookup_max, num_output), self.config.prompt_lookup_min - 1, -1):
            suffix = self.history[-n * _TOKEN_BYTES :]
            start = _find(self.prediction, suffix, self.cursor)
            if start < 0:
                start = _find(self.prediction, suffix, 0)
            if start >= 0:
                if move:
                    self.cursor = start + n
                return _tokens(self.prediction, start + n, min(start + n + limit, self.num_prediction))
        return []


def _as_bytes(token_ids) -> bytes:
    return np.asarray(token_ids, dtype="<i4").tobytes()


def _tokens(data: bytes | bytearray, start: int, end: int) -> list[int]:
    """Token ids start..end-1 of `data`."""
    return np.frombuffer(data, dtype="<i4", count=max(end - start, 0), offset=start * _TOKEN_BYTES).tolist()


def _rfind(data: bytes | bytearray, needle: bytes | bytearray, end: int) -> int:
    """The token index of the last occurrence of `needle` that lies within data[:end] on a token boundary; -1."""
    while True:
        at = data.rfind(needle, 0, end)
        if at < 0 or at % _TOKEN_BYTES == 0:
            return at // _TOKEN_BYTES if at >= 0 else -1
        end = at + len(needle) - 1


def _find(data: bytes | bytearray, needle: bytes | bytearray, start_token: int) -> int:
    """The token index of the first occurrence of `needle` on a token boundary from token `start_token` on; -1."""
    at = start_token * _TOKEN_BYTES
    while True:
        at = data.find(needle, at)
        if at < 0 or at % _TOKEN_BYTES == 0:
            return at // _TOKEN_BYTES if at >= 0 else -1
        at += 1
