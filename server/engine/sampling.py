"""Choosing the next token of every sampling row: greedy, temperature, top-k, top-p, seeds, logprobs.

Masks are built for the whole batch at once; the draw itself runs per row with that request's own
generator (an exponential race, argmax of p / E with E ~ Exp(1)), so a seeded request draws the same
tokens whatever else shares its batch.
"""

from __future__ import annotations

import torch

from server.engine.request import SamplingParams, TokenLogprob


def _filter(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature-scaled logits [S, vocab] with top-k and top-p applied (-inf outside)."""
    device = logits.device
    temperature = torch.tensor([max(p.temperature, 1e-5) for p in params], device=device)
    scaled = logits / temperature[:, None]
    vocab = logits.shape[1]
    top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=device)
    top_p = torch.tensor([p.top_p for p in params], device=device)
    sorted_logits, order = scaled.sort(dim=-1, descending=True)  # [S, vocab]
    ranks = torch.arange(vocab, device=device)[None, :]
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop = (ranks >= top_k[:, None]) | (mass_before >= top_p[:, None])
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(scaled).scatter_(1, order, sorted_logits)


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int]:
    """One token id per row of `logits` [S, vocab] (fp32)."""
    greedy = [p.temperature == 0.0 for p in params]
    chosen = logits.argmax(dim=-1)  # [S]
    if all(greedy):
        return chosen.tolist()
    probs = _filter(logits, params).softmax(dim=-1)  # [S, vocab]
    for row, generator in enumerate(generators):
        if greedy[row]:
            continue
        race = torch.empty_like(probs[row]).exponential_(generator=generator)
        chosen[row] = (probs[row] / race).argmax()
    return chosen.tolist()


def logprobs_of(logits: torch.Tensor, token_ids: list[int], params: list[SamplingParams]) -> list[TokenLogprob | None]:
    """The sampled token's logprob under the unmodified distribution, plus top alternatives, per row."""
    wanted = [p.logprobs is not None for p in params]
    if not any(wanted):
        return [None] * len(params)
    logp = torch.log_softmax(logits, dim=-1)  # [S, vocab]
    most = max(p.logprobs or 0 for p in params)
    top_values, top_ids = logp.topk(most, dim=-1) if most else (logp[:, :0], logp[:, :0].long())
    out: list[TokenLogprob | None] = []
    for row, token_id in enumerate(token_ids):
        if not wanted[row]:
            out.append(None)
            continue
        n = params[row].logprobs
        top = tuple(zip(top_ids[row, :n].tolist(), top_values[row, :n].tolist()))
        out.append(TokenLogprob(token_id, float(logp[row, token_id]), top))
    return out
