"""The backbone's GPU path, the layers' wiring included, checked on the CPU.

With `tessera_kernels.TRITON_ON_CPU` every op takes its Triton kernels on CPU tensors, which Triton's
interpreter runs (tests/conftest.py sets TRITON_INTERPRET): the q/k/v views of the fused projection, the q/k
norms on 3-D views, rotary in place, the paged cache writes and reads, the fused residual adds, silu_mul, composed_lora on
every adapted linear (compositions of k = 1..3 and none in one batch), fused_moe on the mixture-of-experts
backbones, the graph-shaped padded decode and the seeded sampler. The kernel tests check each op alone; this checks what the layers hand them. Greedy
tokens and logprobs must equal the reference path's.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig

import tessera_kernels
from router.composition import Composition
from router.library import fingerprint_from_hf_config, random_library
from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.request import Request, SamplingParams

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA, Triton compiles for the GPU and "
                                "cannot take CPU tensors; the gpu tests run this path there for real")

ROWS = [
    Composition(("m0",), (1.0,), "explicit"),
    Composition(("m2", "m1"), (0.7, 0.3), "explicit"),
    Composition(),
    Composition(("m3", "m0", "m2"), (0.5, 0.9, 0.2), "explicit"),
]
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], [13, 14, 15, 16, 17, 18, 19, 40, 41, 42, 43, 44, 45, 46, 47,
                                                    48, 49, 50, 51], [30, 31]]


def _generate(model_dir: str, library_dir: str, cuda_graphs: str, sampling: SamplingParams,
              predictions: dict | None = None, observer=None, kv_cache_dtype: str = "auto") -> dict:
    config = EngineConfig(model=model_dir, library=library_dir, device="cpu", dtype="float32", block_size=16,
                          max_num_batched_tokens=16, num_kv_blocks=32, max_loaded_modules=4, max_k=4,
                          cuda_graphs=cuda_graphs, cuda_graph_max_batch=8, kv_cache_dtype=kv_cache_dtype)
    engine = Engine(config, step_observer=observer)
    requests = [Request(f"r{i}", p, sampling, c, prediction=tuple((predictions or {}).get(f"r{i}", ())))
                for i, (p, c) in enumerate(zip(PROMPTS, ROWS))]
    outputs = engine.generate_batch(requests)
    return {rid: ([t for o in outs for t in o.token_ids], [lp for o in outs for lp in (o.logprobs or ())])
            for rid, outs in outputs.items()}


@pytest.mark.parametrize("architecture,cuda_graphs", [("llama", "padded"), ("qwen3", "off"), ("qwen2", "padded"),
                                                      ("qwen3_moe", "padded"), ("mixtral", "off")])
def test_engine_on_the_triton_path_equals_the_reference_path(tiny_checkpoints, tmp_path, monkeypatch,
                                                            architecture, cuda_graphs):
    model_dir = tiny_checkpoints(architecture)
    fingerprint = fingerprint_from_hf_config(AutoConfig.from_pretrained(model_dir))
    library = random_library(fingerprint, num_modules=4, ranks=(4, 8, 8, 4), std=0.2)
    library_dir = str(library.write(tmp_path / "lib"))
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=2)
    expected = _generate(model_dir, library_dir, cuda_graphs, greedy)
    monkeypatch.setattr(tessera_kernels, "TRITON_ON_CPU", True)
    got = _generate(model_dir, library_dir, cuda_graphs, greedy)
    for rid, (tokens, logprobs) in expected.items():
        assert got[rid][0] == tokens, rid
        assert len(got[rid][1]) == len(logprobs) == 6
        for mine, theirs in zip(got[rid][1], logprobs):
            assert mine.token_id == theirs.token_id
            assert mine.logprob == pytest.approx(theirs.logprob, abs=1e-4)
            assert [t for t, _ in mine.top] == [t for t, _ in theirs.top]
    assert len({tuple(tokens) for tokens, _ in got.values()}) > 1  # the compositions made a difference


def test_an_fp8_kv_cache_gives_the_reference_paths_tokens(tiny_checkpoints, tmp_path, monkeypatch):
    """kv_cache_dtype fp8: write_kv rounds keys and values to e4m3 as torch does (bit for bit), attention reads them
    back in the model's dtype; prefill chunks, decode and the padded graph-shaped decode on both paths."""
    model_dir = tiny_checkpoints("qwen3")
    library = random_library(fingerprint_from_hf_config(AutoConfig.from_pretrained(model_dir)), num_modules=4,
                             ranks=(4, 8, 8, 4), std=0.2)
    library_dir = str(library.write(tmp_path / "lib"))
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=1)
    expected = _generate(model_dir, library_dir, "padded", greedy, kv_cache_dtype="fp8")
    monkeypatch.setattr(tessera_kernels, "TRITON_ON_CPU", True)
    got = _generate(model_dir, library_dir, "padded", greedy, kv_cache_dtype="fp8")
    for rid, (tokens, logprobs) in expected.items():
        assert got[rid][0] == tokens, rid
        assert [lp.logprob for lp in got[rid][1]] == pytest.approx([lp.logprob for lp in logprobs], abs=1e-4)


def test_seeded_sampling_runs_on_the_triton_path(tiny_checkpoints, tmp_path, monkeypatch):
    """The one-launch sampler draws from Philox, the reference from splitmix64 (tessera_kernels.sampling): same
    distribution, other streams, so only reproducibility is compared here."""
    model_dir = tiny_checkpoints("llama")
    library = random_library(fingerprint_from_hf_config(AutoConfig.from_pretrained(model_dir)), num_modules=4,
                             ranks=(4, 8, 8, 4), std=0.2)
    library_dir = str(library.write(tmp_path / "lib"))
    monkeypatch.setattr(tessera_kernels, "TRITON_ON_CPU", True)
    seeded = SamplingParams(max_tokens=5, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    first = _generate(model_dir, library_dir, "off", seeded)
    assert first == _generate(model_dir, library_dir, "off", seeded)
    assert all(len(tokens) == 5 for tokens, _ in first.values())


def test_drafts_verified_on_the_triton_path_give_the_reference_tokens(tiny_checkpoints, tmp_path, monkeypatch):
    """Speculative decoding's verify steps (a request's last token and its drafts, each sampled, among plain rows)
    run the paged prefill attention over cached blocks and composed_lora on every draft row: with each request's
    own reference output as its prediction, half of it edited, the tokens and logprobs stay the reference's."""
    model_dir = tiny_checkpoints("llama")
    library = random_library(fingerprint_from_hf_config(AutoConfig.from_pretrained(model_dir)), num_modules=4,
                             ranks=(4, 8, 8, 4), std=0.2)
    library_dir = str(library.write(tmp_path / "lib"))
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=1)
    expected = _generate(model_dir, library_dir, "padded", greedy)
    predictions = {rid: tokens if rid in ("r0", "r2") else tokens[:3] + [1, 2] + tokens[5:]
                   for rid, (tokens, _) in expected.items()}
    monkeypatch.setattr(tessera_kernels, "TRITON_ON_CPU", True)
    steps = []
    got = _generate(model_dir, library_dir, "padded", greedy, predictions, steps.append)
    assert sum(s.num_accepted_tokens for s in steps) >= 8
    for rid, (tokens, logprobs) in expected.items():
        assert got[rid][0] == tokens, rid
        assert [lp.logprob for lp in got[rid][1]] == pytest.approx([lp.logprob for lp in logprobs], abs=1e-4)
