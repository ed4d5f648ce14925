"""Adapted linears: a batch mixing compositions equals, row by row, transformers with merged weights."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from tessera_kernels import NO_MODULE
from tessera_kernels.composed_lora import ModuleBatchMeta
from server.model.forward_context import forward_context
from server.model.loader import BackboneConfig, load_backbone
from tests.server.helpers import PagedSequences

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _random_module(backbone, rank: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    shapes = backbone.lora_targets()
    weights = {}
    for layer in range(backbone.num_layers):
        for target in TARGETS[seed % 3 :]:
            in_features, out_features = shapes[target]
            weights[(layer, target)] = (
                torch.randn(rank, in_features, generator=gen) * 0.3,
                torch.randn(out_features, rank, generator=gen) * 0.3,
            )
    return weights


def _merged_hf(model_dir: str, modules, composition):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    state = model.state_dict()
    for slot, gate in composition:
        weights, scale = modules[slot]
        for (layer, target), (a, b) in weights.items():
            part = "mlp" if target in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            state[f"model.layers.{layer}.{part}.{target}.weight"] += gate * scale * (b @ a)
    model.load_state_dict(state)
    return model


def test_mixed_compositions_match_merged_weights(tiny_checkpoints):
    model_dir = tiny_checkpoints("qwen2")
    backbone = load_backbone(model_dir, BackboneConfig(dtype="float32", max_slots=4, max_rank=8))
    modules = {slot: (_random_module(backbone, rank, seed=slot), 2.0 / rank) for slot, rank in enumerate((4, 8, 8, 4))}
    for slot, (weights, scale) in modules.items():
        backbone.write_module(slot, weights, scale)
    rows = [[(0, 1.0)], [(2, 0.6), (1, 0.4)], [], [(3, 0.9), (0, 0.5), (2, 0.2)]]
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16], [30, 31, 32, 33, 34, 35]]
    token_rows = [row for row, prompt in zip(rows, prompts) for _ in prompt]
    slots = torch.full((len(token_rows), 3), NO_MODULE, dtype=torch.int32)
    gates = torch.zeros(len(token_rows), 3)
    for t, row in enumerate(token_rows):
        for j, (slot, gate) in enumerate(row):
            slots[t, j], gates[t, j] = slot, gate
    meta_modules = ModuleBatchMeta.allocate(64, 4, 4, "cpu")
    meta_modules.fill(slots, gates)
    paged = PagedSequences(backbone)
    meta = paged.metadata(list(enumerate(prompts)), meta_modules)
    with forward_context(meta):
        logits = backbone.compute_logits(backbone(meta.input_ids[: meta.num_tokens], meta.positions[: meta.num_tokens]))
    offset = 0
    for row, prompt in zip(rows, prompts):
        with torch.no_grad():
            expected = _merged_hf(model_dir, modules, row)(torch.tensor([prompt])).logits[0]
        torch.testing.assert_close(logits[offset : offset + len(prompt)], expected, atol=1e-4, rtol=1e-4)
        offset += len(prompt)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        unadapted = base(torch.tensor([prompts[1]])).logits[0]
    assert (logits[5:8] - unadapted).abs().max() > 1e-2
