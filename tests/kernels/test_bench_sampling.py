"""benchmarks/kernels/bench_sampling.py parses its arguments without a GPU, says why it stops, and its
copy of the old per-row generator draw still samples inside the top-p support."""

import pytest
import torch

from benchmarks.kernels import bench_sampling
from server.engine.sampling import _filter, draw_seed


def test_arguments_default_to_batches_32_and_256():
    assert bench_sampling._parse_args(["--out", "s.json"]).rows == [32, 256]
    assert bench_sampling._parse_args(["--rows", "8"]).rows == [8]
    with pytest.raises(SystemExit) as exit_info:
        bench_sampling._parse_args(["--rows", "0"])
    assert exit_info.value.code == 2


def test_the_old_loop_it_times_draws_reseeded_tokens_in_the_support():
    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(0)) * 3  # [6, 300]
    params = [bench_sampling.PARAMS] * 6
    probs = _filter(logits, params).softmax(dim=-1)
    seeds = [draw_seed(row, 4) for row in range(6)]
    generators = [torch.Generator() for _ in range(6)]
    tokens = bench_sampling._loop_step(logits, params, generators, seeds)
    assert bool((probs.gather(1, tokens[:, None]) > 0).all())
    assert torch.equal(bench_sampling._loop_draw(probs, generators, seeds), tokens)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_without_cuda_it_exits_with_a_clear_message(tmp_path):
    out = tmp_path / "sampling.json"
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        bench_sampling.main(["--out", str(out)])
    assert not out.exists()
