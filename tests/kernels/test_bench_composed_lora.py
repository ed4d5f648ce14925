"""benchmarks/kernels/bench_composed_lora.py: its correctness check runs (interpreter on the CPU) and can fail.

The benchmark times ours against vLLM's kernels only if both compute the same thing, so every row carries
both max errors against the fp32 reference; here that check runs on small shapes.
"""

import pytest
import torch

from benchmarks.kernels import bench_composed_lora as bench

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL_TARGETS = {"qkv": (64, (64, 32, 32)), "down": (96, (64,))}
HALF_ULP_AT_8 = 4e-3  # y ~ N(0, 1) plus the LoRA term, rounded once to fp16


def _peer():
    """vLLM's kernels when `vllm_lora_peer` is on the path (shared/tools/README.md), else skip."""
    peer = pytest.importorskip("vllm_lora_peer")
    if DEVICE == "cpu":  # vLLM pins host staging buffers, which needs CUDA
        import vllm.utils.torch_utils

        vllm.utils.torch_utils.PIN_MEMORY = False
    return peer


@pytest.mark.parametrize("target", list(SMALL_TARGETS))
@pytest.mark.parametrize("tokens,k", [(16, 1), (16, 2), (600, 2)])
def test_ours_matches_the_reference_through_the_benchmark(monkeypatch, target, tokens, k):
    monkeypatch.setattr(bench, "TARGETS", SMALL_TARGETS)
    stack = bench._stack(target, 16, 8, torch.float16, DEVICE)
    errors = bench.check_case(bench.Case(target, 16, 8, tokens, k), (stack, bench._fp32(stack)), None,
                              torch.float16, DEVICE)
    assert errors["peer_max_abs_err"] is None
    assert 0 < errors["max_abs_err"] < HALF_ULP_AT_8


def test_a_wrong_result_shows_in_the_error(monkeypatch):
    monkeypatch.setattr(bench, "TARGETS", SMALL_TARGETS)
    torch.manual_seed(0)
    stack = bench._stack("qkv", 16, 8, torch.float16, DEVICE)
    wrong = bench._fp32(stack)
    wrong.scale = stack.scale * 10  # the reference applies ten times the scale ours does
    errors = bench.check_case(bench.Case("qkv", 16, 8, 16, 1), (stack, wrong), None, torch.float16, DEVICE)
    assert errors["max_abs_err"] > 10 * HALF_ULP_AT_8


@pytest.mark.parametrize("tokens,k", [(16, 1), (16, 2), (600, 2)])
def test_the_peer_call_computes_the_same_compositions(monkeypatch, tokens, k):
    """k = 2 runs on vLLM as one stacked rank-2r LoRA per distinct composition: same result as ours."""
    peer = _peer()
    monkeypatch.setattr(bench, "TARGETS", SMALL_TARGETS)
    stack = bench._stack("qkv", 16, 8, torch.float16, DEVICE)
    errors = bench.check_case(bench.Case("qkv", 16, 8, tokens, k), (stack, bench._fp32(stack)), peer,
                              torch.float16, DEVICE)
    assert errors["peer_max_abs_err"] < HALF_ULP_AT_8 and errors["max_abs_err"] < HALF_ULP_AT_8


def test_arguments_default_to_the_issue_grid():
    args = bench._parse_args([])
    assert args.ranks == [16, 64] and args.pools == [8, 64, 256] and args.k == [1, 2]
    assert args.tokens == [16, 64, 256, 2048, 8192] and set(args.targets) == {"qkv", "gate_up", "down"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_without_cuda_it_exits_with_a_clear_message():
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        bench.main([])
