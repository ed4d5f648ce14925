"""Export: per-point pruning, and the library computing exactly what the pruned bank does."""

from __future__ import annotations

import pytest
import torch

from router.controller import ControllerSettings
from router.info import TaskInfo
from training.controller import TaskController
from training.export import build_library, prune
from training.modules import ModuleBank, ModuleSpec
from tests.training.helpers import PROMPTS, backbone, composition_deltas, merged

GRID = ((0, "q_proj"), (0, "v_proj"), (1, "q_proj"), (1, "v_proj"))


def _trained_bank(fingerprint, gates: dict) -> ModuleBank:
    bank = ModuleBank([ModuleSpec(f"m{j}", 2, 4.0, GRID) for j in range(3)], fingerprint, 0.5)
    bank.init_new(seed=0)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for adapter in bank.adapters:
            adapter.b.copy_(torch.randn(adapter.b.shape, generator=gen) * 0.3)
            adapter.gate_logit.fill_(float(torch.logit(torch.tensor(gates[adapter.point]))))
    return bank


@pytest.mark.parametrize("gates, expected", [
    ({(0, "q_proj"): 0.9, (0, "v_proj"): 0.05, (1, "q_proj"): 0.05, (1, "v_proj"): 0.02}, [(0, "q_proj")]),
    # a diagonal: not a grid, kept exactly (the library records the two points, nothing padded)
    ({(0, "q_proj"): 0.9, (0, "v_proj"): 0.05, (1, "q_proj"): 0.05, (1, "v_proj"): 0.6}, [(0, "q_proj"), (1, "v_proj")]),
    ({(0, "q_proj"): 0.9, (0, "v_proj"): 0.5, (1, "q_proj"): 0.3, (1, "v_proj"): 0.6}, list(GRID)),
    ({(0, "q_proj"): 0.05, (0, "v_proj"): 0.3, (1, "q_proj"): 0.01, (1, "v_proj"): 0.2}, [(0, "v_proj"), (1, "v_proj")]),
])
def test_pruned_library_serves_what_the_pruned_bank_computes(tiny_llama, fingerprint, gates, expected):
    bank = _trained_bank(fingerprint, gates)
    controller = TaskController(2, 3, ControllerSettings(top_k=2, threshold=0.05), straight_through=True)
    controller.init_random(std=2.0, seed=0)
    kept = prune(bank, threshold=0.1)
    assert kept == {0: expected, 1: expected, 2: expected}
    tasks = [TaskInfo("reverse", "r"), TaskInfo("upper", "u")]
    library = build_library(bank, controller, fingerprint, tasks, kept, ["d0", "d1", "d2"])
    info = library.modules["m1"]
    assert (info.rank, info.alpha, info.description) == (2, 4.0, "d1")
    is_grid = len(expected) == len({layer for layer, _ in expected}) * len({t for _, t in expected})
    assert info.all_points == expected and (info.points is None) == is_grid
    assert sorted(library.module_weights("m1")) == sorted(expected)
    model = backbone(tiny_llama)
    bank.install(model)
    for row, task in enumerate(("reverse", "upper")):
        composition = library.controller.gates_for_task(task)
        assert composition.k == 2
        with bank.gating(controller.export_gates()[[row, row]]):
            got = model(PROMPTS).logits
        want = merged(tiny_llama, composition_deltas(library, composition))(PROMPTS).logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_a_threshold_above_every_gate_is_refused(fingerprint):
    bank = _trained_bank(fingerprint, dict.fromkeys(GRID, 0.2))
    with pytest.raises(ValueError, match="removes every insertion point of module m0"):
        prune(bank, threshold=0.5)
