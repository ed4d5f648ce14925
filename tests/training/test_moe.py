"""Training on a mixture-of-experts backbone (Qwen3-MoE, Mixtral, Qwen2-MoE): modules on the attention projections, the experts
frozen; the library serves, through the engine, what the trained model computes."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoConfig

from router.fingerprint import ATTENTION_TARGETS
from router.library import ModuleLibrary, fingerprint_from_hf_config
from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.request import Request, SamplingParams
from training.placement.blocks import enumerate_blocks, point_costs
from training.trainer import train_library
from tests.training.helpers import PROMPTS, composition_deltas, merged


@pytest.mark.parametrize("architecture", ["qwen3_moe", "mixtral", "qwen2_moe"])
def test_a_library_trained_on_the_attention_serves_what_training_computed(tiny_checkpoints, examples, small_config,
                                                                          tmp_path, architecture):
    model_dir = tiny_checkpoints(architecture)
    fingerprint = fingerprint_from_hf_config(AutoConfig.from_pretrained(model_dir))
    report = train_library(model_dir, examples, tmp_path / "lib", small_config, progress=False)
    assert report.finished and all(torch.isfinite(torch.tensor(v)) for v in report.losses.values())
    library = ModuleLibrary.load(tmp_path / "lib", expect=fingerprint)
    assert {target for info in library.modules.values() for _, target in info.all_points} <= set(ATTENTION_TARGETS)
    engine = Engine(EngineConfig(model=model_dir, library=str(tmp_path / "lib"), device="cpu", dtype="float32",
                                 block_size=4, max_num_batched_tokens=32, num_kv_blocks=32, max_loaded_modules=4))
    sampling = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    for task in library.tasks:
        composition = library.controller.gates_for_task(task)
        assert composition.k >= 1
        prompt = PROMPTS[0].tolist()
        out = engine.generate_batch([Request(task, prompt, sampling, composition)])
        tokens = [t for o in out[task] for t in o.token_ids]
        model = merged(model_dir, composition_deltas(library, composition))
        expected = model.generate(PROMPTS[:1], max_new_tokens=4, min_new_tokens=4, do_sample=False)
        assert tokens == expected[0, len(prompt):].tolist(), task


def test_the_default_targets_keep_the_attention_and_named_mlp_targets_are_refused(tiny_checkpoints, examples,
                                                                                  small_config, tmp_path):
    model_dir = tiny_checkpoints("qwen3_moe")
    config = AutoConfig.from_pretrained(model_dir)
    assert {block.target for block in enumerate_blocks(config, 16)} == set(ATTENTION_TARGETS)
    assert {target for _, target in point_costs(config, 4, 2)} == set(ATTENTION_TARGETS)
    named = dataclasses.replace(small_config, targets=("q_proj", "down_proj"), steps=1)
    with pytest.raises(ValueError, match=r"targets \['down_proj'\] are not adaptable on this backbone "
                                         r"\(Qwen3MoeForCausalLM\); adaptable: \['q_proj', 'k_proj', 'v_proj', 'o_proj'\]"):
        train_library(model_dir, examples, tmp_path / "bad", named, progress=False)
    searched = dataclasses.replace(small_config, placement="search", steps=2)
    train_library(model_dir, examples, tmp_path / "searched", searched, progress=False)
    library = ModuleLibrary.load(tmp_path / "searched")
    assert {target for info in library.modules.values() for _, target in info.all_points} <= set(ATTENTION_TARGETS)
