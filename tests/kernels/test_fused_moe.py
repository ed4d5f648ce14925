"""fused_moe: routing against transformers' routers, the reference against a token-by-token loop, and the Triton
kernels against the reference on random inputs: uniform, skewed and single-expert routing, top_k 1-8, odd widths,
one token to prefill sizes; the device-side sort on its own. On CPU the kernels run in Triton's interpreter
(tests/conftest.py); the `gpu` cases add bf16 and a CUDA-graph replay whose routing changes between replays."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tessera_kernels.fused_moe import fused_moe, reference, route
from tessera_kernels.fused_moe import triton as backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _weights(experts: int, hidden: int, inter: int, dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=gen) * hidden**-0.5
    w2 = torch.randn(experts, hidden, inter, generator=gen) * inter**-0.5
    return w13.to(DEVICE, dtype), w2.to(DEVICE, dtype)


def _routing(tokens: int, experts: int, top_k: int, pattern: str, seed: int):
    """(fp32 weights, int64 ids) [tokens, top_k]: distinct experts per token, drawn by `pattern`."""
    gen = torch.Generator().manual_seed(seed)
    if pattern == "uniform":
        scores = torch.rand(tokens, experts, generator=gen)
    elif pattern == "skewed":  # most tokens share the first few experts (a hot expert), a few elsewhere
        scores = torch.rand(tokens, experts, generator=gen) - torch.arange(experts) * 0.5
    elif pattern == "one_hot_expert":  # every token's first choice is the same expert
        scores = torch.rand(tokens, experts, generator=gen)
        scores[:, experts // 2] = 10.0
    else:
        raise ValueError(pattern)
    ids = scores.topk(top_k, dim=-1).indices
    weights = torch.rand(tokens, top_k, generator=gen) + 0.1
    return weights.to(DEVICE), ids.to(DEVICE)


def _token_loop(x, w13, w2, weights, ids):
    """The contract, written token by token and expert by expert (no sorting, no grouping)."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            gate, up = (w13[e].float() @ x[t].float()).chunk(2)
            act = (F.silu(gate) * up).to(x.dtype)
            out[t] += weights[t, j] * (w2[e].float() @ act.float())
    return out.to(x.dtype)


def _close(out, expected):
    assert out.shape == expected.shape and out.dtype == expected.dtype
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)
    else:  # both round the activation and the sum once to the half type; fp32 noise before that flips the rare ulp
        two_ulps = 2 * torch.finfo(out.dtype).eps * expected.float().abs().max().item()
        torch.testing.assert_close(out.float(), expected.float(), atol=two_ulps, rtol=0)
        assert (out == expected).float().mean() > 0.98


@pytest.mark.parametrize("pattern", ["uniform", "skewed"])
def test_reference_is_the_token_loop(pattern):
    w13, w2 = _weights(6, 24, 20, torch.float32, seed=1)
    weights, ids = _routing(9, 6, 3, pattern, seed=2)
    x = torch.randn(9, 24, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    _close(reference.fused_moe(x, w13, w2, weights, ids), _token_loop(x, w13, w2, weights, ids))


@pytest.mark.parametrize("renormalize", [True, False])
def test_route_matches_transformers_routers(renormalize):
    """Qwen3-MoE's router (norm_topk_prob either way); Mixtral's always renormalises."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    config = Qwen3MoeConfig(hidden_size=16, num_experts=8, num_experts_per_tok=3, norm_topk_prob=renormalize)
    router = Qwen3MoeTopKRouter(config)
    torch.nn.init.normal_(router.weight, generator=torch.Generator().manual_seed(4))
    x = torch.randn(11, 16, generator=torch.Generator().manual_seed(5))
    _, expected_weights, expected_ids = router(x)
    weights, ids = route(x @ router.weight.T, 3, renormalize)
    assert torch.equal(ids, expected_ids)
    torch.testing.assert_close(weights, expected_weights.float())
    if renormalize:
        torch.testing.assert_close(weights.sum(-1), torch.ones(11))


def test_align_sorts_pairs_by_expert_in_padded_runs():
    ids = torch.tensor([[3, 0], [3, 1], [0, 3], [2, 3], [3, 1]], device=DEVICE)  # 10 pairs, expert 3 hot
    sorted_pairs, block_expert = backend.align(ids, num_experts=5, block_m=4)
    num_pairs = ids.numel()
    assert sorted_pairs.numel() == 4 * block_expert.numel() >= num_pairs
    rows = sorted_pairs.view(-1, 4).tolist()
    flat = ids.flatten().tolist()
    seen = []
    for block, expert in zip(rows, block_expert.tolist()):
        real = [p for p in block if p != num_pairs]
        if expert == 5:
            assert not real  # past the last run
            continue
        assert all(flat[p] == expert for p in real) and real == sorted(real)
        seen += real
    assert sorted(seen) == list(range(num_pairs))  # every pair once
    assert block_expert.tolist()[:4] == [0, 1, 2, 3]  # expert 4 has no pairs: no block
    assert block_expert.tolist()[4] == 3  # expert 3's 5 pairs fill two blocks


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tokens,experts,top_k,pattern", [
    (1, 8, 2, "uniform"), (5, 8, 2, "skewed"), (13, 16, 4, "uniform"), (7, 6, 1, "one_hot_expert"),
    (40, 8, 8, "uniform"), (300, 8, 2, "skewed"),
])
def test_triton_matches_reference(dtype, tokens, experts, top_k, pattern):
    hidden, inter = 72, 40  # neither a multiple of the column or reduction blocks
    w13, w2 = _weights(experts, hidden, inter, dtype, seed=tokens)
    weights, ids = _routing(tokens, experts, top_k, pattern, seed=tokens + 1)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(tokens + 2)).to(DEVICE, dtype)
    out = backend.fused_moe(x, w13, w2, weights, ids)
    _close(out, reference.fused_moe(x, w13, w2, weights, ids))
    assert out.abs().sum() > 0


def test_bad_inputs_are_named():
    w13, w2 = _weights(4, 8, 6, torch.float32, seed=0)
    x = torch.ones(3, 8, device=DEVICE)
    weights, ids = _routing(3, 4, 2, "uniform", seed=0)
    with pytest.raises(ValueError, match="shapes disagree"):
        fused_moe(torch.ones(3, 9, device=DEVICE), w13, w2, weights, ids)
    with pytest.raises(ValueError, match="fp32 weights and int64 ids"):
        fused_moe(x, w13, w2, weights.half(), ids)
    with pytest.raises(ValueError, match=r"weights and ids \[num_tokens, top_k\] for 3 tokens"):
        fused_moe(x, w13, w2, weights[:2], ids[:2])
    with pytest.raises(ValueError, match="must have x's dtype"):
        fused_moe(x, w13.half(), w2, weights, ids)
    with pytest.raises(ValueError, match="1 <= top_k <= num_experts"):
        route(torch.ones(3, 4), 5, True)


@pytest.mark.gpu
def test_bf16_and_graph_replay_with_new_routing():
    """bf16 at Qwen3-30B-A3B's expert shape (hidden 2048, inter 768, 128 experts, top 8) on a decode batch, then
    the same launch captured once and replayed with other tokens routed to other experts."""
    experts, hidden, inter, top_k, tokens = 128, 2048, 768, 8, 32
    w13, w2 = _weights(experts, hidden, inter, torch.bfloat16, seed=7)
    x = torch.randn(tokens, hidden, device=DEVICE, dtype=torch.bfloat16)
    weights, ids = _routing(tokens, experts, top_k, "uniform", seed=8)
    _close(fused_moe(x, w13, w2, weights, ids), reference.fused_moe(x, w13, w2, weights, ids))
    static = [x.clone(), weights.clone(), ids.clone()]
    fused_moe(*static[:1], w13, w2, *static[1:])  # warm-up compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe(static[0], w13, w2, static[1], static[2])
    for seed in (9, 10):
        new_weights, new_ids = _routing(tokens, experts, top_k, "skewed", seed=seed)
        new_x = torch.randn(tokens, hidden, device=DEVICE, dtype=torch.bfloat16)
        for buffer, value in zip(static, (new_x, new_weights, new_ids)):
            buffer.copy_(value)
        graph.replay()
        _close(out, reference.fused_moe(new_x, w13, w2, new_weights, new_ids))
