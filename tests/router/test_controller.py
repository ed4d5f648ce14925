"""Controller semantics on chosen logits: sigmoid, temperature, top-k, threshold, renormalisation."""

from __future__ import annotations

import math

import pytest
import torch

from router.controller import Controller, ControllerSettings
from router.errors import LibraryError, UnknownTaskError

MODULES = ["a", "b", "c", "d"]
LOGITS = torch.tensor([[2.0, 0.0, -1.0, 1.0], [-3.0, -2.0, 0.5, -4.0]])  # [num_tasks, num_modules]


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def gates(task="t0", **settings):
    composition = Controller(["t0", "t1"], MODULES, LOGITS, ControllerSettings(**settings)).gates_for_task(task)
    assert composition.source == "tag" and composition.task == task
    return composition.module_ids, composition.gates


def test_top_k_orders_by_gate_and_renormalizes():
    ids, values = gates()
    assert ids == ("a", "d")
    total = sig(2) + sig(1)
    assert values == pytest.approx((sig(2) / total, sig(1) / total), abs=1e-7)
    assert sum(values) == pytest.approx(1.0)


def test_without_renormalize_gates_are_sigmoids():
    ids, values = gates(top_k=3, renormalize=False)
    assert ids == ("a", "d", "b")
    assert values == pytest.approx((sig(2), sig(1), sig(0)), abs=1e-7)


def test_threshold_drops_small_gates_before_renormalizing():
    ids, values = gates(top_k=4, threshold=0.6)
    assert ids == ("a", "d")
    assert values[0] / values[1] == pytest.approx(sig(2) / sig(1), rel=1e-6)
    ids, values = gates("t1", top_k=4, threshold=0.4, renormalize=False)
    assert ids == ("c",) and values == pytest.approx((sig(0.5),), abs=1e-7)


def test_threshold_above_every_gate_gives_the_backbone_for_a_known_task():
    ids, values = gates("t1", threshold=0.9)
    assert ids == () and values == ()


def test_temperature_sharpens():
    _, warm = gates(renormalize=False, temperature=2.0)
    _, cold = gates(renormalize=False, temperature=0.5)
    assert warm == pytest.approx((sig(1.0), sig(0.5)), abs=1e-7)
    assert cold == pytest.approx((sig(4.0), sig(2.0)), abs=1e-7)
    _, cold_norm = gates(temperature=0.5)
    assert cold_norm[0] == pytest.approx(sig(4) / (sig(4) + sig(2)), abs=1e-7)


def test_unknown_task_lists_the_known_ones():
    controller = Controller(["t0", "t1"], MODULES, LOGITS, ControllerSettings())
    with pytest.raises(UnknownTaskError) as info:
        controller.gates_for_task("t9")
    assert str(info.value) == "unknown task 't9'; known: t0, t1"
    assert info.value.name == "t9" and info.value.known == ("t0", "t1")


@pytest.mark.parametrize(
    "settings",
    [{"top_k": 0}, {"top_k": 1.5}, {"threshold": 1.0}, {"threshold": -0.1}, {"temperature": 0.0},
     {"temperature": float("inf")}, {"renormalize": "yes"}],
)
def test_settings_out_of_range(settings):
    with pytest.raises(LibraryError, match="controller settings out of range"):
        Controller(["t0", "t1"], MODULES, LOGITS, ControllerSettings(**settings))


def test_with_module_column_keeps_old_gates():
    controller = Controller(["t0", "t1"], MODULES, LOGITS, ControllerSettings())
    bigger = controller.with_module_column("e", 5.0)
    assert bigger.modules == [*MODULES, "e"] and bigger.logits.shape == (2, 5)
    assert bigger.gates_for_task("t1").module_ids[0] == "e"
    assert controller.gates_for_task("t1").module_ids == ("c", "b")


def test_a_zero_gate_never_takes_a_slot_and_a_column_comes_out_again():
    controller = Controller(["t0", "t1"], MODULES[:1], LOGITS[:, :1], ControllerSettings(top_k=3, threshold=0.0))
    added = controller.with_module_column("runtime", -1e4)  # sigmoid is exactly 0 in fp32
    assert added.gates_for_task("t0").module_ids == ("a",) and added.gates_for_task("t0").gates == (1.0,)
    removed = added.without_module_column("runtime")
    assert removed.modules == ["a"] and torch.equal(removed.logits, controller.logits)
