"""Penalties and biases on a request's logits: OpenAI's presence and frequency penalties and logit_bias,
vLLM's repetition_penalty, min_tokens, allowed_token_ids and bad_words.

In the order they apply, for a row whose request generated the tokens counted in c (c[v]: how often token v
was generated so far) from a prompt with tokens P:

    repetition  (vLLM, HF)  for v in P or c[v] > 0:  logit /= rp if logit > 0 else logit *= rp
    frequency and presence  logit -= frequency * c[v] + presence * (c[v] > 0)
    logit_bias              logit += bias[v]
    min_tokens              EOS and the request's stop tokens at -inf while fewer than min_tokens were generated
    allowed_token_ids       every other token at -inf
    bad_words               for each banned sequence (w_1 .. w_m): w_m at -inf where the output ends in w_1 .. w_m-1

The counts and the last output tokens live on the device (`TokenCounts`, a row per request that needs them),
written when the runner takes a request (from its real token ids) and advanced after each step from the
sampled ids on the device, so no step waits for the host: asynchronous scheduling and preemption keep
working. Logprobs stay those of the unprocessed distribution, as vLLM reports by default.

Speculative decoding: a draft's row counts the drafts before it as generated (`process`'s `before`), and a
request that ran drafts advances its row by the tokens its step kept, once they are read (`record_tokens`).
"""

from __future__ import annotations

import torch

from server.engine.request import SamplingParams
from server.engine.transfer import to_device


def needs_processing(params: SamplingParams) -> bool:
    """Whether any of this module's adjustments applies to a request."""
    return bool(needs_history(params) or params.logit_bias or params.min_tokens or params.allowed_token_ids
                or params.bad_words)


def needs_counts(params: SamplingParams) -> bool:
    """Whether a request's penalties read its token counts."""
    return params.presence_penalty != 0.0 or params.frequency_penalty != 0.0 or params.repetition_penalty != 1.0


def history_window(params: SamplingParams) -> int:
    """How many of its last output tokens a request's bad words look back at."""
    return max((len(word) - 1 for word in params.bad_words), default=0)


def needs_history(params: SamplingParams) -> bool:
    """Whether a request holds a `TokenCounts` row (its counts, or its last output tokens)."""
    return needs_counts(params) or history_window(params) > 0


class TokenCounts:
    """Per request that needs them: output token counts (int32) and a prompt-token mask (bool), each
    [rows, vocab], and the last `window` output tokens (int64, [rows, window], oldest first, -1 before the
    first), on the device; rows are reused, the tensors double when they run out of rows, and the window
    widens to the longest a request asks for."""

    def __init__(self, vocab_size: int, device: torch.device, rows: int = 4):
        self.vocab_size = vocab_size
        self.counts = torch.zeros(rows, vocab_size, dtype=torch.int32, device=device)  # [rows, vocab]
        self.in_prompt = torch.zeros(rows, vocab_size, dtype=torch.bool, device=device)  # [rows, vocab]
        self.recent = torch.full((rows, 0), -1, dtype=torch.int64, device=device)  # [rows, window]
        self.row_of: dict[str, int] = {}
        self._free = list(range(rows - 1, -1, -1))

    def hold(self, request_id: str, prompt_ids: list[int], output_ids: list[int], window: int = 0) -> None:
        """A row for a request the runner takes (again, after a preemption), from its real token ids; `window`:
        how many last output tokens it reads."""
        self.forget(request_id)
        if not self._free:
            self._grow()
        if window > self.recent.shape[1]:
            pad = torch.full((self.recent.shape[0], window - self.recent.shape[1]), -1, dtype=torch.int64,
                             device=self.recent.device)
            self.recent = torch.cat([pad, self.recent], dim=1)
        row = self._free.pop()
        self.row_of[request_id] = row
        device = self.counts.device
        self.counts[row].zero_()
        self.in_prompt[row].zero_()
        self.recent[row].fill_(-1)
        if prompt_ids:
            self.in_prompt[row, to_device(torch.tensor(prompt_ids, dtype=torch.int64), device)] = True
        if output_ids:
            ids = to_device(torch.tensor(output_ids, dtype=torch.int64), device)  # [num_outputs]
            self.counts[row].index_put_((ids,), torch.ones_like(ids, dtype=torch.int32), accumulate=True)
            last = ids[-self.recent.shape[1]:] if self.recent.shape[1] else ids[:0]
            if len(last):
                self.recent[row, self.recent.shape[1] - len(last):] = last

    def forget(self, request_id: str) -> None:
        row = self.row_of.pop(request_id, None)
        if row is not None:
            self._free.append(row)

    def record(self, request_ids: list[str], sampled: torch.Tensor) -> None:
        """Count each request's sampled token (`sampled[i]` is request_ids[i]'s, on the device)."""
        rows = to_device(torch.tensor([self.row_of[r] for r in request_ids], dtype=torch.int64), sampled.device)
        self.counts.index_put_((rows, sampled), torch.ones_like(sampled, dtype=torch.int32), accumulate=True)
        if self.recent.shape[1]:
            self.recent[rows] = torch.cat([self.recent[rows, 1:], sampled[:, None].to(torch.int64)], dim=1)

    def record_tokens(self, request_id: str, token_ids: list[int]) -> None:
        """Count tokens of one request known on the host (a step's kept drafts and the token drawn after them)."""
        row = self.row_of[request_id]
        ids = to_device(torch.tensor(token_ids, dtype=torch.int64), self.counts.device)  # [num_tokens]
        self.counts[row].index_put_((ids,), torch.ones_like(ids, dtype=torch.int32), accumulate=True)
        window = self.recent.shape[1]
        if window:
            self.recent[row] = torch.cat([self.recent[row], ids])[-window:]

    def _grow(self) -> None:
        old = self.counts.shape[0]
        self.counts = torch.cat([self.counts, torch.zeros_like(self.counts)])
        self.in_prompt = torch.cat([self.in_prompt, torch.zeros_like(self.in_prompt)])
        self.recent = torch.cat([self.recent, torch.full_like(self.recent, -1)])
        self._free = list(range(2 * old - 1, old - 1, -1))


def allowed_mask(params: SamplingParams, vocab_size: int, device: torch.device) -> torch.Tensor:
    """[vocab] bool on the device: the tokens a request with `allowed_token_ids` may draw (built once per
    request, since the lists can be long)."""
    mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    mask[to_device(torch.tensor(params.allowed_token_ids, dtype=torch.int64), device)] = True
    return mask


def process(logits: torch.Tensor, rows: list[int], params: list[SamplingParams], count_rows: list[int | None],
            num_outputs: list[int], counts: TokenCounts | None, eos_ids: set[int],
            allowed: list[torch.Tensor | None] | None = None, before: list[list[int]] | None = None) -> torch.Tensor:
    """A copy of `logits` [S, vocab] (fp32) with each of `rows` adjusted by its `params`; `count_rows[i]` is
    the request's `TokenCounts` row (None when it needs none), `num_outputs[i]` the tokens it generated,
    `allowed[i]` its `allowed_mask` (None: built here from its params). A draft's row (speculative decoding)
    counts the drafts before it, `before[i]`, as generated too."""
    device = logits.device
    rows_t = to_device(torch.tensor(rows, dtype=torch.int64), device)  # [R]
    sub = logits[rows_t]  # [R, vocab], a copy
    counted = [i for i, row in enumerate(count_rows) if row is not None and needs_counts(params[i])]
    if counted:
        index = to_device(torch.tensor(counted, dtype=torch.int64), device)  # [C]
        state = to_device(torch.tensor([count_rows[i] for i in counted], dtype=torch.int64), device)  # [C]
        c = counts.counts[state].to(logits.dtype)  # [C, vocab]
        drafted = [(k, token) for k, i in enumerate(counted) for token in (before[i] if before else ())]
        if drafted:
            where = to_device(torch.tensor(drafted, dtype=torch.int64), device)  # [D, 2]
            c.index_put_((where[:, 0], where[:, 1]), torch.ones(len(drafted), dtype=c.dtype, device=device),
                         accumulate=True)
        part = sub[index]  # [C, vocab]
        rp = _column([params[i].repetition_penalty for i in counted], device)  # [C, 1]
        seen = counts.in_prompt[state] | (c > 0)  # [C, vocab]
        part = torch.where(seen, torch.where(part > 0, part / rp, part * rp), part)
        frequency = _column([params[i].frequency_penalty for i in counted], device)  # [C, 1]
        presence = _column([params[i].presence_penalty for i in counted], device)  # [C, 1]
        part = part - frequency * c - presence * (c > 0).to(logits.dtype)
        sub[index] = part
    biased = [(i, token, bias) for i, p in enumerate(params) for token, bias in p.logit_bias]
    if biased:
        where = to_device(torch.tensor([(i, t) for i, t, _ in biased], dtype=torch.int64), device)  # [B, 2]
        values = to_device(torch.tensor([b for _, _, b in biased], dtype=logits.dtype), device)  # [B]
        sub.index_put_((where[:, 0], where[:, 1]), values, accumulate=True)
    early = [(i, t) for i, p in enumerate(params) if num_outputs[i] < p.min_tokens
             for t in sorted(set(p.stop_token_ids) | (set() if p.ignore_eos else eos_ids))]
    if early:
        where = to_device(torch.tensor(early, dtype=torch.int64), device)  # [E, 2]
        sub[where[:, 0], where[:, 1]] = float("-inf")
    limited = [i for i, p in enumerate(params) if p.allowed_token_ids]
    if limited:
        masks = [allowed[i] if allowed is not None and allowed[i] is not None
                 else allowed_mask(params[i], sub.shape[1], device) for i in limited]
        index = to_device(torch.tensor(limited, dtype=torch.int64), device)  # [len(limited)]
        sub[index] = sub[index].masked_fill(~torch.stack(masks), float("-inf"))
    if any(p.bad_words for p in params):
        sub = _ban_words(sub, params, count_rows, counts, before)
    out = logits.clone()
    out[rows_t] = sub
    return out


def _ban_words(sub: torch.Tensor, params: list[SamplingParams], count_rows: list[int | None],
               counts: TokenCounts | None, before: list[list[int]] | None) -> torch.Tensor:
    """`sub` [R, vocab] (a copy, changed in place) with each row's bad words' last tokens at -inf where its last
    output tokens (on the device, `TokenCounts.recent`, then the drafts `before` the row) are the words' other
    tokens. One scatter over the banned entries: no [R, vocab] temporary, no host sync."""
    device, vocab = sub.device, sub.shape[1]
    longer = [(i, word) for i, p in enumerate(params) for word in p.bad_words if len(word) > 1]
    single = [(i, word) for i, p in enumerate(params) for word in p.bad_words if len(word) == 1]
    banned = torch.ones(len(single), dtype=torch.bool, device=device)  # a one-token word is always banned
    if longer:
        window = counts.recent.shape[1]
        prefixes = torch.full((len(longer), window), -1, dtype=torch.int64)  # [L, window], right-aligned
        checked = torch.zeros(len(longer), window, dtype=torch.bool)  # [L, window]
        for e, (_, word) in enumerate(longer):
            prefixes[e, window - len(word) + 1:] = torch.tensor(word[:-1])
            checked[e, window - len(word) + 1:] = True
        state = to_device(torch.tensor([count_rows[i] for i, _ in longer], dtype=torch.int64), device)  # [L]
        seen = counts.recent[state]  # [L, window]
        if before is not None and any(before[i] for i, _ in longer):
            seen = _followed_by(seen, [before[i] for i, _ in longer])
        prefixes, checked = to_device(prefixes, device), to_device(checked, device)
        banned = torch.cat([((seen == prefixes) | ~checked).all(dim=1), banned])  # [L + S1]
    entries = longer + single
    flat = to_device(torch.tensor([i * vocab + word[-1] for i, word in entries], dtype=torch.int64), device)
    values = torch.where(banned, float("-inf"), float("inf")).to(sub.dtype)  # +inf leaves a logit as it is
    sub.view(-1).scatter_reduce_(0, flat, values, reduce="amin")  # repeated entries: -inf if any is banned
    return sub


def _followed_by(recent: torch.Tensor, tokens: list[list[int]]) -> torch.Tensor:
    """`recent` [L, window] (each row's last tokens, oldest first) with `tokens[e]` appended to row e: the last
    `window` of them, [L, window]."""
    window, width = recent.shape[1], max(len(t) for t in tokens)
    extra = torch.full((len(tokens), width), -1, dtype=torch.int64)  # [L, width], left-aligned
    for e, row in enumerate(tokens):
        extra[e, : len(row)] = torch.tensor(row, dtype=torch.int64)
    full = torch.cat([recent, to_device(extra, recent.device)], dim=1)  # [L, window + width]
    shift = to_device(torch.tensor([len(t) for t in tokens], dtype=torch.int64), recent.device)  # [L]
    return full.gather(1, torch.arange(window, device=recent.device)[None, :] + shift[:, None])


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    return to_device(torch.tensor(values, dtype=torch.float32), device)[:, None]
