"""A batch mixing compositions generates, under greedy decoding, exactly what transformers generates
for each request alone with its composition merged into the weights (W + sum_j g_j s_j B_j A_j)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig

from router.composition import Composition
from router.library import ModuleInfo, fingerprint_from_hf_config, random_library
from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.request import Request, SamplingParams
from tests.router.helpers import merged_model

ROWS = [
    Composition(("m0",), (1.0,), "explicit"),
    Composition(("m2", "m1"), (0.7, 0.3), "explicit"),
    Composition(),
    Composition(("m3", "m0", "m2"), (0.5, 0.9, 0.2), "explicit"),
    Composition(("m1",), (0.35,), "explicit"),
    Composition(("m1", "m3"), (0.5, 0.5), "explicit"),
    Composition(("sparse", "m2"), (0.8, 0.4), "explicit"),
]
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], [13, 14, 15, 16, 17, 18, 19, 40, 41], [30, 31], [50] * 12, [60, 61, 62, 63],
           [70, 71, 72, 73, 74]]
SPARSE_POINTS = ((0, "k_proj"), (0, "gate_proj"), (1, "o_proj"))


def _with_sparse_module(library):
    """`library` plus a module on three (layer, target) points only (a pruned placement)."""
    gen = torch.Generator().manual_seed(5)
    weights = {}
    for layer, target in SPARSE_POINTS:
        in_features, out_features = library.backbone.shape(target)
        weights[(layer, target)] = (torch.randn(4, in_features, generator=gen) * 0.3,  # [rank, in]
                                    torch.randn(out_features, 4, generator=gen) * 0.3)  # [out, rank]
    info = ModuleInfo("sparse", 4, 8.0, "", ("k_proj", "o_proj", "gate_proj"), (0, 1), SPARSE_POINTS)
    return library.with_module(info, weights)


def _merged_generate(model_dir, library, composition, prompt, num_tokens):
    model = merged_model(model_dir, library, composition)
    out = model.generate(torch.tensor([prompt]), max_new_tokens=num_tokens, do_sample=False, min_new_tokens=num_tokens)
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_mixed_batch_equals_merged_weights_alone(tiny_checkpoints, tmp_path, device):
    """On CUDA the same check runs the Triton composed_lora and paged-attention kernels (fp32)."""
    model_dir = tiny_checkpoints("llama")
    library = _with_sparse_module(random_library(
        fingerprint_from_hf_config(AutoConfig.from_pretrained(model_dir)), num_modules=4, ranks=(4, 8, 8, 4), std=0.2
    ))
    library.write(tmp_path / "lib")
    config = EngineConfig(
        model=model_dir, library=str(tmp_path / "lib"), device=device, dtype="float32",
        block_size=4 if device == "cpu" else 16,
        max_num_batched_tokens=16, num_kv_blocks=64, max_loaded_modules=5,
    )
    engine = Engine(config)
    sampling = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    requests = [Request(f"r{i}", p, sampling, c) for i, (p, c) in enumerate(zip(PROMPTS, ROWS))]
    outputs = engine.generate_batch(requests)
    generated = {rid: [t for o in outs for t in o.token_ids] for rid, outs in outputs.items()}
    for i, (prompt, composition) in enumerate(zip(PROMPTS, ROWS)):
        expected = _merged_generate(model_dir, library, composition, prompt, 10)
        assert generated[f"r{i}"] == expected, f"request {i} with {composition}"
    assert generated["r1"] != generated["r4"] or PROMPTS[1] == PROMPTS[4]
    assert engine.scheduler.blocks.num_used == 0
