"""An engine started from objects already in memory (`backbone_from_state_dict` + `assemble_parts`) equals
one started from disk, with the same checks; the engine's objects report their own device memory."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from router.composition import Composition
from router.errors import LibraryError
from router.library import fingerprint_from_hf_config, random_library
from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.request import Request, SamplingParams
from server.engine.setup import assemble_parts
from server.model.loader import BackboneConfig, backbone_from_state_dict, load_backbone

COMPOSITIONS = [Composition(("m1",), (1.0,), "explicit"), Composition(), Composition(("m0", "m1"), (0.7, 0.3), "explicit")]
PROMPTS = [[5, 6, 7, 8, 9, 10], [20, 21, 22], [30, 31, 32, 33, 34, 35, 36, 37, 38]]


@pytest.fixture(scope="module")
def hf_model(tiny_llama):
    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)


@pytest.fixture(scope="module")
def library(tiny_llama):
    fingerprint = fingerprint_from_hf_config(AutoConfig.from_pretrained(tiny_llama))
    return random_library(fingerprint, num_modules=2, ranks=(4, 8), std=0.2)


def _config(model: str, library: str | None = None) -> EngineConfig:
    return EngineConfig(model=model, library=library, device="cpu", dtype="float32", block_size=4,
                        max_num_batched_tokens=16, num_kv_blocks=32, max_loaded_modules=2)


def _greedy(engine: Engine) -> list[list[int]]:
    sampling = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    requests = [Request(f"r{i}", p, sampling, c) for i, (p, c) in enumerate(zip(PROMPTS, COMPOSITIONS))]
    outputs = engine.generate_batch(requests)
    return [[t for o in outputs[r.request_id] for t in o.token_ids] for r in requests]


def test_state_dict_backbone_equals_the_loaded_one(tiny_llama, hf_model):
    built = backbone_from_state_dict(hf_model.config, hf_model.state_dict(), BackboneConfig(dtype="float32"))
    loaded = load_backbone(tiny_llama, BackboneConfig(dtype="float32"))
    for (name, ours), (_, theirs) in zip(built.named_parameters(), loaded.named_parameters(), strict=True):
        assert torch.equal(ours, theirs), name
    source = hf_model.state_dict()["model.layers.0.mlp.up_proj.weight"]
    assert built.layers[0].mlp.gate_up_proj.weight.data_ptr() != source.data_ptr()


def test_state_dict_errors_name_the_tensor(hf_model):
    state = dict(hf_model.state_dict())
    missing = {k: v for k, v in state.items() if k != "model.layers.1.self_attn.v_proj.weight"}
    with pytest.raises(ValueError, match=r"state dict is missing tensors for: \['layers.1.self_attn.qkv_proj.weight\[96:\]'\]"):
        backbone_from_state_dict(hf_model.config, missing)
    with pytest.raises(ValueError, match=r"state dict has tensors this architecture does not use: \['extra.weight'\]"):
        backbone_from_state_dict(hf_model.config, {**state, "extra.weight": torch.zeros(2)})
    wrong = {**state, "model.norm.weight": torch.ones(3)}
    with pytest.raises(ValueError, match=r"model.norm.weight has shape \[3\], expected \[64\]"):
        backbone_from_state_dict(hf_model.config, wrong)


def test_engine_from_memory_generates_what_the_engine_from_disk_does(tiny_llama, hf_model, library, tmp_path):
    library.write(tmp_path / "lib")
    from_disk = _greedy(Engine(_config(tiny_llama, str(tmp_path / "lib"))))
    backbone = backbone_from_state_dict(hf_model.config, hf_model.state_dict(), BackboneConfig("float32", "cpu", 2, 8))
    config = _config("in-memory")
    parts = assemble_parts(config, backbone, AutoTokenizer.from_pretrained(tiny_llama), library, eos_ids=set())
    engine = Engine(config, parts=parts)
    assert engine.model_name == "in-memory" and engine.library is library
    assert _greedy(engine) == from_disk


def test_memory_reports_count_weights_pool_and_kv_cache(hf_model, library):
    backbone = backbone_from_state_dict(hf_model.config, hf_model.state_dict(), BackboneConfig("float32", "cpu", 2, 8))
    memory = backbone.memory_bytes()
    spec = backbone.spec
    rotary = 2 * spec.max_position_embeddings * spec.head_dim * 4  # cos and sin, fp32
    assert memory["weights"] == sum(p.numel() for p in hf_model.parameters()) * 4 + rotary
    fingerprint = fingerprint_from_hf_config(hf_model.config)
    per_layer = sum(i + o for _, i, o in fingerprint.targets) * 2 * 8 * 4  # A and B of 2 slots, rank 8, fp32
    assert memory["module_pool"] == spec.num_layers * (per_layer + 4 * 2 * (4 + 4))  # + scale, ranks per linear
    engine = Engine(_config("in-memory"), parts=assemble_parts(_config("in-memory"), backbone, None, library, set()))
    assert engine.runner.kv_cache_bytes() == 32 * backbone.kv_cache_bytes_per_block(4)
    bare = backbone_from_state_dict(hf_model.config, hf_model.state_dict(), BackboneConfig("float32"))
    assert bare.memory_bytes() == {"weights": memory["weights"], "module_pool": 0}


def test_assemble_parts_rejects_a_library_the_backbone_cannot_serve(hf_model, library, tiny_checkpoints):
    config = _config("in-memory")
    small = backbone_from_state_dict(hf_model.config, hf_model.state_dict(), BackboneConfig("float32", "cpu", 2, 4))
    with pytest.raises(ValueError, match=r"modules \['m1'\] have ranks above the module pool's max_rank 4"):
        assemble_parts(config, small, None, library, set())
    bare = backbone_from_state_dict(hf_model.config, hf_model.state_dict(), BackboneConfig("float32"))
    with pytest.raises(ValueError, match="the library has 2 modules but the backbone has no module pool slots"):
        assemble_parts(config, bare, None, library, set())
    other = load_backbone(tiny_checkpoints("llama", num_hidden_layers=3), BackboneConfig("float32", "cpu", 2, 8))
    with pytest.raises(LibraryError, match="num_layers=2.*num_layers=3"):
        assemble_parts(config, other, None, library, set())
