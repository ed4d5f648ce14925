"""Mixture-of-experts backbones (Mixtral, Qwen2-MoE with its shared expert, Qwen3-MoE): loading from a checkpoint's
per-expert tensors and from a transformers state dict's stacked ones, the errors that name what is wrong, the attention-only fingerprint, and a
mixed batch of compositions that generates exactly what transformers generates with each composition merged."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from router.composition import Composition
from router.errors import LibraryError
from router.fingerprint import ATTENTION_TARGETS
from router.library import fingerprint_from_hf_config, random_library
from router.peft_io import import_peft
from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.request import Request, SamplingParams
from server.model.llama import ArchSpec
from server.model.loader import BackboneConfig, backbone_from_state_dict, load_backbone
from tests.router.helpers import merged_model, random_peft_adapter
from tests.server.helpers import assert_edited_checkpoints_fail
from tests.server.test_exactness import PROMPTS as DENSE_PROMPTS, ROWS as DENSE_ROWS

ARCHITECTURES = ["qwen3_moe", "mixtral", "qwen2_moe"]
ROWS, PROMPTS = DENSE_ROWS[:5], DENSE_PROMPTS[:5]  # the dense exactness test's batch, without its sparse module


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_checkpoint_and_state_dict_load_the_same_experts(tiny_checkpoints, architecture):
    model_dir = tiny_checkpoints(architecture)
    hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    loaded = load_backbone(model_dir, BackboneConfig(dtype="float32"))
    built = backbone_from_state_dict(hf_model.config, hf_model.state_dict(), BackboneConfig(dtype="float32"))
    for (name, ours), (_, theirs) in zip(built.named_parameters(), loaded.named_parameters(), strict=True):
        assert torch.equal(ours, theirs), name
    experts = hf_model.model.layers[1].mlp.experts
    assert torch.equal(loaded.layers[1].mlp.experts.gate_up_proj, experts.gate_up_proj)
    assert torch.equal(loaded.layers[1].mlp.experts.down_proj, experts.down_proj)
    spec = loaded.spec
    assert (spec.num_experts, spec.experts_per_token, spec.expert_intermediate_size) == (4, 2, 64)
    assert spec.renormalize_routing
    assert spec.shared_expert_intermediate_size == (128 if architecture == "qwen2_moe" else 0)
    if architecture == "qwen2_moe":
        shared = hf_model.model.layers[0].mlp.shared_expert
        fused = torch.cat([shared.gate_proj.weight, shared.up_proj.weight])
        assert torch.equal(loaded.layers[0].mlp.shared_expert.gate_up_proj.weight, fused)


def test_missing_and_unknown_expert_tensors_are_named(tmp_path, tiny_checkpoints):
    assert_edited_checkpoints_fail(tiny_checkpoints("mixtral"), tmp_path, [
        ("missing", lambda t: t.pop("model.layers.1.block_sparse_moe.experts.2.w3.weight"),
         r"missing tensors for: \['layers\.1\.mlp\.experts\.gate_up_proj\[2\]\[64:\]'\]"),
        ("extra", lambda t: t.update({"model.layers.0.block_sparse_moe.experts.4.w1.weight": torch.ones(64, 64)}),
         r"does not use: \['model\.layers\.0\.block_sparse_moe\.experts\.4\.w1\.weight'\]"),
        ("shape", lambda t: t.update({"model.layers.0.block_sparse_moe.experts.0.w2.weight": torch.ones(64, 3)}),
         r"experts\.0\.w2\.weight has shape \[64, 3\], expected \[64, 64\]"),
    ])


def test_configs_outside_the_served_layouts_are_refused(tiny_checkpoints):
    config = AutoConfig.from_pretrained(tiny_checkpoints("qwen3_moe"))
    config.mlp_only_layers = [0]
    with pytest.raises(ValueError, match=r"qwen3_moe configs with dense layers \(mlp_only_layers \[0\].*not supported"):
        ArchSpec.from_hf_config(config)
    config.mlp_only_layers, config.decoder_sparse_step = [], 2
    with pytest.raises(ValueError, match="decoder_sparse_step 2"):
        ArchSpec.from_hf_config(config)
    config = AutoConfig.from_pretrained(tiny_checkpoints("qwen2_moe"))
    config.mlp_only_layers = [1]
    with pytest.raises(ValueError, match=r"qwen2_moe configs with dense layers \(mlp_only_layers \[1\]"):
        ArchSpec.from_hf_config(config)
    from transformers import OlmoeConfig

    with pytest.raises(ValueError, match=r"unsupported architecture \['OlmoeForCausalLM'\].*Qwen3MoeForCausalLM"):
        ArchSpec.from_hf_config(OlmoeConfig(architectures=["OlmoeForCausalLM"]))


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_the_fingerprint_adapts_attention_only(tiny_checkpoints, architecture):
    model_dir = tiny_checkpoints(architecture)
    fingerprint = fingerprint_from_hf_config(AutoConfig.from_pretrained(model_dir))
    assert fingerprint.target_names == ATTENTION_TARGETS
    backbone = load_backbone(model_dir, BackboneConfig("float32", "cpu", 2, 8))
    assert tuple(backbone.lora_targets()) == ATTENTION_TARGETS
    assert {fingerprint.shape(t) for t in ("q_proj", "o_proj")} == {(64, 64)}
    assert len(backbone.adapted_linears()) == 2 * backbone.num_layers  # qkv and o per layer
    with pytest.raises(ValueError, match="unknown .layer, target. points"):
        backbone.write_module(0, {(0, "gate_proj"): (torch.ones(2, 64), torch.ones(64, 2))}, 1.0)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_mixed_batch_equals_merged_weights_alone(tiny_checkpoints, tmp_path, architecture, device):
    """On CUDA the experts run in fused_moe's Triton kernels (fp32: exact products), decode steps in CUDA graphs."""
    model_dir = tiny_checkpoints(architecture)
    library = random_library(fingerprint_from_hf_config(AutoConfig.from_pretrained(model_dir)), num_modules=4,
                             ranks=(4, 8, 8, 4), std=0.2)
    library.write(tmp_path / "lib")
    engine = Engine(EngineConfig(model=model_dir, library=str(tmp_path / "lib"), device=device, dtype="float32",
                                 block_size=4 if device == "cpu" else 16, max_num_batched_tokens=16, num_kv_blocks=64,
                                 max_loaded_modules=4))
    sampling = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    outputs = engine.generate_batch([Request(f"r{i}", p, sampling, c) for i, (p, c) in enumerate(zip(PROMPTS, ROWS))])
    generated = {rid: [t for o in outs for t in o.token_ids] for rid, outs in outputs.items()}
    for i, (prompt, composition) in enumerate(zip(PROMPTS, ROWS)):
        model = merged_model(model_dir, library, composition)
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False)
        assert generated[f"r{i}"] == expected[0, len(prompt):].tolist(), f"request {i} with {composition}"
    assert len({tuple(tokens) for tokens in generated.values()}) > 1
    assert engine.scheduler.blocks.num_used == 0


def test_a_peft_adapter_on_the_attention_imports_and_one_on_the_experts_is_refused(tiny_checkpoints, tmp_path):
    model_dir = tiny_checkpoints("qwen3_moe")
    fingerprint = fingerprint_from_hf_config(AutoConfig.from_pretrained(model_dir))
    adapter = random_peft_adapter(model_dir, tmp_path / "attn", seed=1, targets=["q_proj", "v_proj"])
    info, weights = import_peft(adapter, fingerprint, "attn")
    assert info.targets == ("q_proj", "v_proj") and len(weights) == 2 * 2  # two targets in two layers
    config = json.loads((tmp_path / "attn" / "adapter_config.json").read_text())
    config["target_modules"] = ["q_proj", "gate_proj"]
    (tmp_path / "attn" / "adapter_config.json").write_text(json.dumps(config))
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / "attn" / "adapter_model.safetensors"))
    key = next(k for k in tensors if "layers.0.self_attn.v_proj.lora_A" in k)
    tensors[key.replace("self_attn.v_proj", "mlp.gate_proj")] = tensors.pop(key)
    tensors[key.replace("self_attn.v_proj", "mlp.gate_proj").replace("lora_A", "lora_B")] = tensors.pop(
        key.replace("lora_A", "lora_B"))
    save_file(tensors, str(tmp_path / "attn" / "adapter_model.safetensors"))
    with pytest.raises(LibraryError, match="gate_proj"):
        import_peft(adapter, fingerprint, "experts")
    expert_key = key.replace("self_attn.v_proj", "mlp.experts.3.gate_proj")  # transformers 4's per-expert modules
    save_file({**tensors, expert_key: tensors[key.replace("self_attn.v_proj", "mlp.gate_proj")].clone()},
              str(tmp_path / "attn" / "adapter_model.safetensors"))
    with pytest.raises(LibraryError, match=r"experts\.3\.gate_proj.* adapts a mixture of experts' expert"):
        import_peft(adapter, fingerprint, "experts")


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_an_exported_composition_loads_in_peft_on_the_moe_model(tiny_checkpoints, tmp_path, architecture):
    """What `tessera library export-peft` (and so export-vllm's adapters) writes for an MoE backbone is a PEFT LoRA on
    the attention projections that transformers + PEFT apply to the same logits as the merged composition."""
    from peft import PeftModel

    from router.peft_io import export_peft

    model_dir = tiny_checkpoints(architecture)
    library = random_library(fingerprint_from_hf_config(AutoConfig.from_pretrained(model_dir)), num_modules=3, std=0.2)
    composition = Composition(("m2", "m0"), (0.6, 1.1), "explicit")
    out = export_peft(library, composition, tmp_path / "export", base_model=model_dir)
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == list(ATTENTION_TARGETS)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt = torch.tensor([PROMPTS[2]])
    with torch.no_grad():
        got = PeftModel.from_pretrained(base, str(out)).eval()(prompt).logits
        expected = merged_model(model_dir, library, composition)(prompt).logits
        plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()(prompt).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (expected - plain).abs().max() > 1e-2
