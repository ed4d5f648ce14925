"""benchmarks/kernels/bench_fused_moe.py without a GPU: its arguments, its refusal without CUDA, and that both
transformers peers it times compute the contract's function on the same weights."""

import pytest
import torch

from benchmarks.kernels import bench_fused_moe
from tessera_kernels.fused_moe import reference, route


def test_arguments_default_to_both_models_and_decode_to_prefill_tokens():
    args = bench_fused_moe._parse_args(["--out", "moe.json"])
    assert args.models == ["qwen3-30b-a3b", "mixtral-8x7b"] and args.tokens == [1, 16, 64, 256, 2048]
    assert args.dtype == "bfloat16" and args.out == "moe.json"
    with pytest.raises(SystemExit):
        bench_fused_moe._parse_args(["--tokens", "0"])
    with pytest.raises(SystemExit):
        bench_fused_moe._parse_args(["--models", "deepseek-v3"])


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm"])
def test_the_transformers_peers_compute_the_same_function(implementation):
    shape = bench_fused_moe.Shape(experts=8, top_k=3, hidden=24, inter=20, renormalize=False)
    gen = torch.Generator().manual_seed(0)
    w13 = torch.randn(8, 40, 24, generator=gen) * 0.2
    w2 = torch.randn(8, 24, 20, generator=gen) * 0.2
    x = torch.randn(9, 24, generator=gen)
    weights, ids = route(torch.randn(9, 8, generator=gen), 3, False)
    experts = bench_fused_moe._hf_experts(shape, w13, w2, implementation)
    torch.testing.assert_close(experts(x, ids, weights), reference.fused_moe(x, w13, w2, weights, ids),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_without_cuda_it_exits_with_a_clear_message(tmp_path):
    out = tmp_path / "moe.json"
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        bench_fused_moe.main(["--out", str(out)])
    assert not out.exists()
