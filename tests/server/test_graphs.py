"""Decode graphs: bucketed, padded decode steps give exactly the tokens of unpadded eager steps.

On the CPU the padded fixed-shape forward runs eagerly (`cuda_graphs="padded"`); on CUDA (gpu marker)
the same steps replay captured graphs while compositions change between replays.
"""

from __future__ import annotations

import pytest

from router.composition import Composition
from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.graphs import decode_buckets, verify_buckets
from server.engine.request import Request, SamplingParams

COMPOSITIONS = [
    Composition(("m0",), (1.0,), "explicit"),
    Composition(),
    Composition(("m1", "m2"), (0.6, 0.4), "explicit"),
    Composition(("m2", "m0", "m1"), (0.2, 0.5, 0.3), "explicit"),
    Composition(("m1",), (0.9,), "explicit"),
]
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [20, 21, 22], [30, 31, 32, 33, 34], [40, 41, 42, 43, 44, 45, 46], [50, 51]]
MAX_TOKENS = [3, 14, 6, 9, 11]  # the decode batch shrinks 5 -> 4 -> 3 -> 2 -> 1 (padded to 8, 4, 4, 2, 1)


def _run(setup, device: str, **overrides) -> tuple[dict[str, list[int]], Engine]:
    model_dir, library = setup
    engine = Engine(EngineConfig(**(dict(model=model_dir, library=library, device=device, block_size=4,
                                         max_num_batched_tokens=64, num_kv_blocks=64, max_loaded_modules=3,
                                         dtype="float32") | overrides)))
    requests = [Request(f"r{i}", prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), composition)
                for i, (prompt, n, composition) in enumerate(zip(PROMPTS, MAX_TOKENS, COMPOSITIONS))]
    outputs = engine.generate_batch(requests)
    return {k: [t for o in v for t in o.token_ids] for k, v in outputs.items()}, engine


def test_buckets():
    assert decode_buckets(1) == (1,)
    assert decode_buckets(6) == (1, 2, 4, 6)
    assert decode_buckets(20) == (1, 2, 4, 8, 16, 20)
    assert decode_buckets(256)[-3:] == (240, 248, 256)
    assert verify_buckets(256, 17, 512) == (1, 2, 4, 8, 16, 24)  # 24 * 17 = 408 rows; 32 * 17 > 512
    assert verify_buckets(256, 4, 64) == (1, 2, 4, 8, 16)
    assert verify_buckets(6, 5, 512) == (1, 2, 4, 6)
    assert verify_buckets(256, 1, 512) == () and verify_buckets(8, 17, 16) == ()


def test_padded_decode_steps_give_the_eager_tokens(setup):
    eager, plain = _run(setup, "cpu", cuda_graphs="off")
    padded, engine = _run(setup, "cpu", cuda_graphs="padded", cuda_graph_max_batch=8)
    assert plain.runner.graphs is None
    assert engine.runner.graphs.num_replays >= max(MAX_TOKENS) - 1
    assert padded == eager
    assert [len(eager[f"r{i}"]) for i in range(len(PROMPTS))] == MAX_TOKENS
    assert engine.scheduler.blocks.num_used == 0


def test_decode_batches_over_the_largest_bucket_run_eagerly(setup):
    eager, _ = _run(setup, "cpu", cuda_graphs="off")
    padded, engine = _run(setup, "cpu", cuda_graphs="padded", cuda_graph_max_batch=2)
    assert engine.runner.graphs.buckets == (1, 2) and padded == eager


def test_bad_graph_mode_fails_before_loading(setup):
    with pytest.raises(ValueError, match="cuda_graphs must be auto, off or padded, got 'sometimes'"):
        _run(setup, "cpu", cuda_graphs="sometimes")


@pytest.mark.gpu
def test_cuda_graph_replays_give_the_eager_tokens(setup):
    eager, _ = _run(setup, "cuda", cuda_graphs="off")
    captured, engine = _run(setup, "cuda", cuda_graphs="auto", cuda_graph_max_batch=8)
    assert engine.runner.graphs.capture and engine.runner.graphs.num_replays >= max(MAX_TOKENS) - 1
    assert captured == eager


def test_block_size_is_checked_for_the_device(setup):
    """The Triton attention tiles one KV block with tl.arange and tl.dot: a power of two >= 16 on CUDA."""
    for size in (8, 24):
        with pytest.raises(ValueError, match=f"power of two >= 16 on CUDA .*got {size}"):
            EngineConfig(model="m", block_size=size).check_block_size("cuda")
        EngineConfig(model="m", block_size=size).check_block_size("cpu")
    EngineConfig(model="m", block_size=32).check_block_size("cuda:0")
    with pytest.raises(ValueError, match="block_size must be an integer >= 1, got 0"):
        _run(setup, "cpu", block_size=0)
