"""Choosing the next token of every sampling row: greedy, temperature, top-k, top-p, seeds, logprobs.

Masks are built for the whole batch at once, and so is the draw: `tessera_kernels.sampling.race_sample`, an
exponential race (argmax of p / E with E ~ Exp(1)) whose uniforms are a counter-based function of each
row's seed and token index (splitmix64 on CPU, Philox in one Triton launch on CUDA). Every draw's seed is
`draw_seed(request seed, position)`, so a seeded request draws the same tokens whatever else shares its
batch, on the same backend.

Sampling and logprob gathering stay on the logits' device (`sample_on_device`, `gather_logprobs`): no
host sync, so a step can be launched while the previous one is still running. Reading the results back
(`read_logprobs`, `.tolist()`) is the one sync point of a step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tessera_kernels.sampling import race_sample
from tessera_kernels.sampling.reference import splitmix64_int
from server.engine.plan import LOGIT_ROWS
from server.engine.request import SamplingParams, TokenLogprob
from server.engine.transfer import to_device


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list as a device tensor, copied without a host sync (a plain `torch.tensor(...,
    device=cuda)` waits for the stream; `transfer.to_device` stages through pinned memory)."""
    return to_device(torch.tensor(values, dtype=dtype), device)


def _filter(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature-scaled logits [S, vocab] with min-p, then top-k and top-p applied (-inf outside).

    The order is vLLM's: min-p keeps the tokens at least min_p times as likely as the most likely one, and
    top-p then counts mass within what min-p kept (top-k is the same before or after: both keep a prefix of
    the sorted tokens)."""
    device = logits.device
    vocab = logits.shape[1]
    temperature = _to_device([max(p.temperature, 1e-5) for p in params], torch.float32, device)  # [S]
    top_k = _to_device([p.top_k if 0 < p.top_k < vocab else vocab for p in params], torch.int64, device)  # [S]
    top_p = _to_device([p.top_p for p in params], torch.float32, device)[:, None]  # [S, 1]
    scaled = logits / temperature[:, None]
    sorted_logits, order = scaled.sort(dim=-1, descending=True)  # [S, vocab]
    ranks = torch.arange(vocab, device=device)[None, :]
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop = ranks >= top_k[:, None]
    if any(p.min_p > 0.0 for p in params):
        min_p = _to_device([p.min_p for p in params], torch.float32, device)[:, None]  # [S, 1]
        below = probs < min_p * probs[:, :1]  # [S, vocab]: a suffix of each sorted row
        top_p = top_p * probs.masked_fill(below, 0.0).sum(dim=-1, keepdim=True)  # top-p of the kept mass
        drop |= below
    drop |= mass_before >= top_p
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(scaled).scatter_(1, order, sorted_logits)


def sample_on_device(logits: torch.Tensor, params: list[SamplingParams], seeds: list[int]) -> torch.Tensor:
    """One token id per row of `logits` [S, vocab] (fp32), left on its device: int64 [S]. No host sync.

    `seeds[row]` is the seed of that row's draw (`draw_seed(request seed, position)`, below 2**63); greedy
    rows (temperature 0) take the argmax of their raw logits and ignore it."""
    greedy = [p.temperature == 0.0 for p in params]
    if all(greedy):
        return logits.argmax(dim=-1)  # [S]
    device = logits.device
    greedy_rows = _to_device(greedy, torch.bool, device)  # [S]
    probs = _filter(logits, params).softmax(dim=-1)  # [S, vocab]
    scores = torch.where(greedy_rows[:, None], logits, probs)  # [S, vocab]: greedy rows keep their logits
    return race_sample(scores, _to_device(seeds, torch.int64, device), greedy_rows)


def sample(logits: torch.Tensor, params: list[SamplingParams], seeds: list[int]) -> list[int]:
    """One token id per row of `logits` [S, vocab] (fp32); `seeds` as in `sample_on_device`."""
    return sample_on_device(logits, params, seeds).tolist()


def draw_seed(seed: int, position: int) -> int:
    """The seed of the draw at token `position` of a request seeded with `seed` (splitmix64).

    Seeding every draw from (seed, position) makes a seeded request's tokens independent of how its steps
    were batched, preempted and recomputed, or overlapped.
    """
    return splitmix64_int(seed, position) >> 1  # 63 bits: a non-negative int64


@dataclass
class DeviceLogprobs:
    """Logprobs of a step's sampling rows, still on the device until `read_logprobs`."""

    chosen: torch.Tensor
    """Logprob of each row's sampled token: [S]."""
    top_values: torch.Tensor
    """Logprobs of the most likely tokens, best first: [S, most]."""
    top_ids: torch.Tensor
    """Their token ids: [S, most]."""


def gather_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, params: list[SamplingParams]
) -> DeviceLogprobs | None:
    """Logprobs under the unmodified distribution of `token_ids` [S] (on the logits' device); None when no
    row asks for them. No host sync."""
    if all(p.logprobs is None for p in params):
        return None
    logp = torch.log_softmax(logits, dim=-1)  # [S, vocab]
    chosen = logp.gather(1, token_ids[:, None]).squeeze(1)  # [S]
    most = max(p.logprobs or 0 for p in params)
    top_values, top_ids = logp.topk(most, dim=-1) if most else (logp[:, :0], logp[:, :0].long())  # [S, most]
    return DeviceLogprobs(chosen, top_values, top_ids)


def read_logprobs(
    gathered: DeviceLogprobs | None, token_ids: list[int], params: list[SamplingParams]
) -> list[TokenLogprob | None]:
    """The host view of `gather_logprobs`'s result: per row, its TokenLogprob or None if not asked."""
    if gathered is None:
        return [None] * len(params)
    chosen, top_values, top_ids = gathered.chosen.tolist(), gathered.top_values.tolist(), gathered.top_ids.tolist()
    out: list[TokenLogprob | None] = []
    for row, token_id in enumerate(token_ids):
        n = params[row].logprobs
        if n is None:
            out.append(None)
            continue
        out.append(TokenLogprob(token_id, chosen[row], tuple(zip(top_ids[row][:n], top_values[row][:n]))))
    return out


def logprobs_of(logits: torch.Tensor, token_ids: list[int], params: list[SamplingParams]) -> list[TokenLogprob | None]:
    """The sampled token's logprob under the unmodified distribution, plus top alternatives, per row."""
    ids = torch.tensor(token_ids, dtype=torch.int64, device=logits.device)  # [S]
    return read_logprobs(gather_logprobs(logits, ids, params), token_ids, params)


@dataclass
class DevicePromptLogprobs:
    """Logprobs of the prompt tokens a step scored, still on the device until `read_prompt_logprobs`."""

    spans: list[tuple[str, int, int, int]]
    """(request id, position of its first scored token, tokens scored, top alternatives k), in row order."""
    chosen: torch.Tensor
    """Logprob of each scored prompt token: [N]."""
    top_values: torch.Tensor
    """[N, most]."""
    top_ids: torch.Tensor
    """[N, most]."""
    ranks: torch.Tensor
    """1 + the number of tokens more likely than the scored one: [N]."""


def gather_prompt_logprobs(logits_of, rows: torch.Tensor, targets: torch.Tensor,
                           spans: list[tuple[str, int, int, int]]) -> DevicePromptLogprobs:
    """Logprob of `targets[i]` under the logits of token row `rows[i]` (the row before it), and the top
    alternatives; `logits_of(rows) -> fp32 [n, vocab]`. No host sync."""
    most = max(k for *_, k in spans)
    chosen, values, ids, ranks = [], [], [], []
    for start in range(0, len(rows), LOGIT_ROWS):
        logp = torch.log_softmax(logits_of(rows[start : start + LOGIT_ROWS]), dim=-1)  # [n, vocab]
        chosen.append(logp.gather(1, targets[start : start + LOGIT_ROWS, None]).squeeze(1))  # [n]
        ranks.append((logp > chosen[-1][:, None]).sum(dim=-1) + 1)  # [n]
        top = logp.topk(most, dim=-1) if most else (logp[:, :0], logp[:, :0].long())  # [n, most] each
        values.append(top[0])
        ids.append(top[1])
    return DevicePromptLogprobs(spans, torch.cat(chosen), torch.cat(values), torch.cat(ids), torch.cat(ranks))


def read_prompt_logprobs(gathered: DevicePromptLogprobs | None,
                         targets: list[int]) -> dict[str, tuple[int, list[TokenLogprob]]]:
    """The host view of `gather_prompt_logprobs`: per request, (first position, its TokenLogprobs)."""
    if gathered is None:
        return {}
    chosen, values, ids = gathered.chosen.tolist(), gathered.top_values.tolist(), gathered.top_ids.tolist()
    ranks = gathered.ranks.tolist()
    out, row = {}, 0
    for request_id, first, count, k in gathered.spans:
        out[request_id] = (first, [TokenLogprob(targets[i], chosen[i], tuple(zip(ids[i][:k], values[i][:k])), ranks[i])
                                   for i in range(row, row + count)])
        row += count
    return out
