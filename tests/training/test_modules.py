"""The module bank on a real tiny Llama: starts as the backbone, computes the gated formula, uninstalls."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig

from router.library import fingerprint_from_hf_config
from training.modules import ModuleBank, ModuleSpec, target_linear
from tests.training.helpers import PROMPTS, backbone, merged

POINTS = ((0, "q_proj"), (0, "down_proj"), (1, "v_proj"))


def _bank(fingerprint, gate_init=0.7):
    specs = [ModuleSpec("m0", 2, 4.0, POINTS), ModuleSpec("m1", 3, 3.0, POINTS[:2]), ModuleSpec("m2", 1, 2.0, POINTS)]
    bank = ModuleBank(specs, fingerprint, gate_init)
    bank.init_new(seed=0)
    return bank


def test_new_bank_equals_the_backbone_and_uninstalls(tiny_llama, fingerprint):
    model = backbone(tiny_llama)
    before = model(PROMPTS).logits
    bank = _bank(fingerprint)
    assert all(adapter.a.abs().sum() > 0 and adapter.b.abs().sum() == 0 for adapter in bank.adapters)
    bank.install(model)
    with bank.gating(torch.rand(2, 3)):
        assert torch.equal(model(PROMPTS).logits, before)
    with torch.no_grad():
        for adapter in bank.adapters:
            adapter.b.normal_()
    with bank.gating(torch.rand(2, 3)):
        assert not torch.allclose(model(PROMPTS).logits, before)
    bank.uninstall()
    assert torch.equal(model(PROMPTS).logits, before)


def test_each_row_gets_its_own_gated_sum_of_low_rank_updates(tiny_llama, fingerprint):
    model = backbone(tiny_llama)
    bank = _bank(fingerprint)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for adapter in bank.adapters:
            adapter.b.copy_(torch.randn(adapter.b.shape, generator=gen) * 0.3)
            adapter.gate_logit.fill_(float(torch.randn((), generator=gen)))
    gates = torch.tensor([[0.6, 0.0, 0.4], [0.1, 0.9, 0.5]])  # [batch, N]
    bank.install(model)
    with bank.gating(gates):
        got = model(PROMPTS).logits
    for row in range(2):
        deltas = {}
        for point in POINTS:
            gate = float(bank.insertion_gates()[bank.points.index(point)].detach())
            deltas[point] = sum(gates[row, j] * gate * (spec.alpha / spec.rank) * (b @ a).detach()
                                for j, spec in enumerate(bank.specs) if point in spec.points
                                for a, b in [bank.pair(j, point)])
        want = merged(tiny_llama, deltas)(PROMPTS[row: row + 1]).logits
        torch.testing.assert_close(got[row: row + 1], want, rtol=1e-4, atol=1e-4)


def test_forward_without_gates_and_bad_points_are_errors(tiny_llama, fingerprint):
    model = backbone(tiny_llama)
    bank = _bank(fingerprint)
    bank.install(model)
    with pytest.raises(RuntimeError, match="outside `with bank.gating"):
        model(PROMPTS)
    with pytest.raises(ValueError, match=r"gates must be \[batch, 3\]"):
        with bank.gating(torch.ones(2, 2)):
            pass
    with pytest.raises(RuntimeError, match="already installed"):
        bank.install(model)
    with pytest.raises(ValueError, match="layer out of range; the model has 2 layers"):
        target_linear(model, (2, "q_proj"))


@pytest.mark.parametrize("architecture", ["mistral", "qwen2", "qwen3"])
def test_every_supported_architecture_names_its_targets_alike(tiny_checkpoints, architecture):
    path = tiny_checkpoints(architecture)
    model = backbone(path)
    before = model(PROMPTS).logits
    bank = _bank(fingerprint_from_hf_config(AutoConfig.from_pretrained(path)))
    bank.install(model)
    with torch.no_grad():
        bank.adapters[0].b.fill_(0.1)
    with bank.gating(torch.ones(2, 3)):
        assert not torch.allclose(model(PROMPTS).logits, before)
    bank.uninstall()
    assert torch.equal(model(PROMPTS).logits, before)
