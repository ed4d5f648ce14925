"""Sampling on random logits: greedy, temperature, top-k, top-p, per-request seeds, logprobs."""

from __future__ import annotations

import torch

from server.engine.request import SamplingParams
from server.engine.sampling import draw_seed, logprobs_of, sample

VOCAB = 50


def _logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 2  # [rows, vocab]


def _draws(logits_row: torch.Tensor, params: SamplingParams, n: int, seed: int = 0) -> torch.Tensor:
    """n independent draws from one row: the draws at positions 0..n-1 of a request seeded with `seed`."""
    batch = logits_row.expand(n, VOCAB).contiguous()  # [n, vocab]
    return torch.tensor(sample(batch, [params] * n, [draw_seed(seed, i) for i in range(n)]))


def test_greedy_and_degenerate_filters_pick_the_argmax():
    logits = _logits(6)
    argmax = logits.argmax(dim=-1).tolist()
    assert sample(logits, [SamplingParams(temperature=0.0)] * 6, [0] * 6) == argmax
    seeds = [draw_seed(i, 0) for i in range(6)]
    assert sample(logits, [SamplingParams(temperature=1.0, top_k=1)] * 6, seeds) == argmax
    assert sample(logits, [SamplingParams(temperature=1.0, top_p=1e-6)] * 6, seeds) == argmax


def test_draws_follow_the_filtered_distribution():
    row = _logits(1, seed=3)[0]
    n = 4000
    for params in (SamplingParams(temperature=0.7), SamplingParams(temperature=1.3, top_k=5),
                   SamplingParams(temperature=1.0, top_p=0.6)):
        probs = torch.softmax(row / params.temperature, dim=-1)
        order = probs.argsort(descending=True)
        keep = torch.zeros(VOCAB, dtype=torch.bool)
        if params.top_k > 0:
            keep[order[: params.top_k]] = True
        else:
            before = probs[order].cumsum(0) - probs[order]
            keep[order[before < params.top_p]] = True
        expected = torch.where(keep, probs, 0.0)
        expected /= expected.sum()
        counts = torch.bincount(_draws(row, params, n), minlength=VOCAB).float() / n
        assert counts[~keep].sum() == 0, f"{params}: drew a token outside the kept set"
        assert (counts - expected).abs().max() < 0.03, f"{params}: frequencies off by {(counts - expected).abs().max()}"


def test_a_seeded_row_draws_the_same_tokens_whatever_its_neighbours():
    logits = _logits(4, seed=1)
    params = SamplingParams(temperature=1.0, seed=7)
    alone = sample(logits[2:3], [params], [draw_seed(7, 5)])[0]
    neighbours = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.5, top_k=3), params,
                  SamplingParams(temperature=0.9)]
    together = sample(logits, neighbours, [0, draw_seed(1, 5), draw_seed(7, 5), draw_seed(3, 2)])
    assert together[2] == alone
    assert together[0] == int(logits[0].argmax())
    first = _draws(logits[0], params, 30, seed=11)
    assert torch.equal(first, _draws(logits[0], params, 30, seed=11))
    assert not torch.equal(first, _draws(logits[0], params, 30, seed=12))


def test_logprobs_are_of_the_unmodified_distribution_with_sorted_alternatives():
    logits = _logits(3, seed=2)
    params = [SamplingParams(temperature=0.5, top_k=2, logprobs=3), SamplingParams(), SamplingParams(logprobs=0)]
    tokens = [7, 4, 9]
    out = logprobs_of(logits, tokens, params)
    logp = torch.log_softmax(logits, dim=-1)
    assert out[1] is None
    assert out[0].token_id == 7 and abs(out[0].logprob - float(logp[0, 7])) < 1e-6
    assert [t for t, _ in out[0].top] == logp[0].topk(3).indices.tolist()
    values = [v for _, v in out[0].top]
    assert values == sorted(values, reverse=True)
    assert out[2].top == () and abs(out[2].logprob - float(logp[2, 9])) < 1e-6


def test_greedy_rows_in_a_sampled_batch_take_the_first_argmax_of_their_logits():
    logits = _logits(3, seed=4)
    logits[0, [9, 31]] = logits[0].max() + 1.0  # an exact tie: torch.argmax's first index
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_k=4),
              SamplingParams(temperature=0.0)]
    for seeds in ([0, draw_seed(5, 0), 0], [draw_seed(1, 1), draw_seed(6, 0), draw_seed(2, 9)]):
        tokens = sample(logits, params, seeds)
        assert tokens[0] == 9 and tokens[2] == int(logits[2].argmax())
        assert tokens[1] in logits[1].topk(4).indices.tolist()


def _kept_by_vllm_order(row: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The tokens one row may draw, filtered one rule at a time in vLLM's order: temperature, min-p, then
    top-k and top-p over what is left (renormalised)."""
    probs = torch.softmax(row / params.temperature, dim=-1)
    keep = probs >= params.min_p * probs.max()
    if params.top_k > 0:
        keep &= probs >= probs.sort(descending=True).values[params.top_k - 1]
    left = torch.where(keep, probs, 0.0) / torch.where(keep, probs, 0.0).sum()
    order = left.argsort(descending=True)
    before = left[order].cumsum(0) - left[order]
    nucleus = torch.zeros_like(keep)
    nucleus[order[before < params.top_p]] = True
    return keep & nucleus


def test_min_p_then_top_k_and_top_p_keep_the_tokens_vllm_keeps():
    n = 3000
    row = _logits(1, seed=12)[0] / 2  # flat enough that min-p keeps many tokens
    for params in (SamplingParams(temperature=1.0, min_p=0.1), SamplingParams(temperature=0.8, min_p=0.05, top_p=0.7),
                   SamplingParams(temperature=1.0, min_p=0.3, top_p=0.8),  # top-p of the full mass would keep 7, not 5
                   SamplingParams(temperature=1.5, min_p=0.2, top_k=4, top_p=0.9)):
        keep = _kept_by_vllm_order(row, params)
        assert 1 < keep.sum() < VOCAB, f"{params}: the case must drop some tokens and keep several"
        probs = torch.where(keep, torch.softmax(row / params.temperature, dim=-1), 0.0)
        expected = probs / probs.sum()
        counts = torch.bincount(_draws(row, params, n), minlength=VOCAB).float() / n
        assert counts[~keep].sum() == 0, f"{params}: drew a token outside the kept set"
        off = (counts - expected).abs().max()
        assert off < 0.035, f"{params}: frequencies off by {off}"
    logits = _logits(5, seed=4)
    seeds = [draw_seed(i, 0) for i in range(5)]
    assert sample(logits, [SamplingParams(temperature=1.0, min_p=1.0)] * 5, seeds) == logits.argmax(-1).tolist()
    mixed = [SamplingParams(temperature=1.0, seed=3), SamplingParams(temperature=1.0, min_p=0.3, seed=3)]
    alone = sample(logits[:1], mixed[:1], [draw_seed(3, 0)])
    assert sample(logits[:2], mixed, [draw_seed(3, 0)] * 2)[0] == alone[0]  # a min-p neighbour changes nothing
