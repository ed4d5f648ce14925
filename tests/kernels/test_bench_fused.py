"""benchmarks/kernels/bench_fused.py loads and parses its arguments without a GPU, and says why it stops."""

import pytest
import torch

from benchmarks.kernels import bench_fused


def test_arguments_default_to_llama_3_8b_token_counts():
    args = bench_fused._parse_args(["--out", "fused.json"])
    assert args.tokens == [32, 256, 2048, 8192] and args.dtype == "bfloat16" and args.out == "fused.json"
    assert set(args.ops) == set(bench_fused.OPS) >= set(bench_fused.LAYER_OPS)
    assert bench_fused._parse_args(["--ops", "rotary", "--tokens", "7"]).ops == ["rotary"]


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit) as exit_info:
        bench_fused._parse_args(["--tokens", "0"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        bench_fused._parse_args(["--ops", "softmax"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_without_cuda_it_exits_with_a_clear_message(tmp_path):
    out = tmp_path / "fused.json"
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        bench_fused.main(["--out", str(out)])
    assert not out.exists()
