"""Penalties and biases on a request's logits: OpenAI's presence and frequency penalties and logit_bias,
vLLM's repetition_penalty and min_tokens.

In the order they apply, for a row whose request generated the tokens counted in c (c[v]: how often token v
was generated so far) from a prompt with tokens P:

    repetition  (vLLM, HF)  for v in P or c[v] > 0:  logit /= rp if logit > 0 else logit *= rp
    frequency and presence  logit -= frequency * c[v] + presence * (c[v] > 0)
    logit_bias              logit += bias[v]
    min_tokens              EOS and the request's stop tokens at -inf while fewer than min_tokens were generated

The counts live on the device (`TokenCounts`, a row per request that needs them), written when the runner
takes a request (from its real token ids) and advanced after each step from the sampled ids on the device,
so no step waits for the host: asynchronous scheduling and preemption keep working. Logprobs stay those of
the unprocessed distribution, as vLLM reports by default.
"""

from __future__ import annotations

import torch

from server.engine.request import SamplingParams
from server.engine.transfer import to_device


def needs_processing(params: SamplingParams) -> bool:
    """Whether any of this module's adjustments applies to a request."""
    return bool(needs_counts(params) or params.logit_bias or params.min_tokens)


def needs_counts(params: SamplingParams) -> bool:
    return params.presence_penalty != 0.0 or params.frequency_penalty != 0.0 or params.repetition_penalty != 1.0


class TokenCounts:
    """Per request that needs them: output token counts (int32) and a prompt-token mask (bool), each
    [rows, vocab] on the device; rows are reused, and the tensors double when they run out."""

    def __init__(self, vocab_size: int, device: torch.device, rows: int = 4):
        self.vocab_size = vocab_size
        self.counts = torch.zeros(rows, vocab_size, dtype=torch.int32, device=device)  # [rows, vocab]
        self.in_prompt = torch.zeros(rows, vocab_size, dtype=torch.bool, device=device)  # [rows, vocab]
        self.row_of: dict[str, int] = {}
        self._free = list(range(rows - 1, -1, -1))

    def hold(self, request_id: str, prompt_ids: list[int], output_ids: list[int]) -> None:
        """A row for a request the runner takes (again, after a preemption), from its real token ids."""
        self.forget(request_id)
        if not self._free:
            self._grow()
        row = self._free.pop()
        self.row_of[request_id] = row
        device = self.counts.device
        self.counts[row].zero_()
        self.in_prompt[row].zero_()
        if prompt_ids:
            self.in_prompt[row, to_device(torch.tensor(prompt_ids, dtype=torch.int64), device)] = True
        if output_ids:
            ids = to_device(torch.tensor(output_ids, dtype=torch.int64), device)  # [num_outputs]
            self.counts[row].index_put_((ids,), torch.ones_like(ids, dtype=torch.int32), accumulate=True)

    def forget(self, request_id: str) -> None:
        row = self.row_of.pop(request_id, None)
        if row is not None:
            self._free.append(row)

    def record(self, request_ids: list[str], sampled: torch.Tensor) -> None:
        """Count each request's sampled token (`sampled[i]` is request_ids[i]'s, on the device)."""
        rows = to_device(torch.tensor([self.row_of[r] for r in request_ids], dtype=torch.int64), sampled.device)
        self.counts.index_put_((rows, sampled), torch.ones_like(sampled, dtype=torch.int32), accumulate=True)

    def _grow(self) -> None:
        old = self.counts.shape[0]
        self.counts = torch.cat([self.counts, torch.zeros_like(self.counts)])
        self.in_prompt = torch.cat([self.in_prompt, torch.zeros_like(self.in_prompt)])
        self._free = list(range(2 * old - 1, old - 1, -1))


def process(logits: torch.Tensor, rows: list[int], params: list[SamplingParams], count_rows: list[int | None],
            num_outputs: list[int], counts: TokenCounts | None, eos_ids: set[int]) -> torch.Tensor:
    """A copy of `logits` [S, vocab] (fp32) with each of `rows` adjusted by its `params`; `count_rows[i]` is
    the request's `TokenCounts` row (None when it needs none), `num_outputs[i]` the tokens it generated."""
    device = logits.device
    rows_t = to_device(torch.tensor(rows, dtype=torch.int64), device)  # [R]
    sub = logits[rows_t]  # [R, vocab], a copy
    counted = [i for i, row in enumerate(count_rows) if row is not None]
    if counted:
        index = to_device(torch.tensor(counted, dtype=torch.int64), device)  # [C]
        state = to_device(torch.tensor([count_rows[i] for i in counted], dtype=torch.int64), device)  # [C]
        c = counts.counts[state].to(logits.dtype)  # [C, vocab]
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
    out = logits.clone()
    out[rows_t] = sub
    return out


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    return to_device(torch.tensor(values, dtype=torch.float32), device)[:, None]
