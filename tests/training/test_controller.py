"""The task controller's training gates: the exported composition forward, every gate's gradient backward."""

from __future__ import annotations

import pytest
import torch

from router.controller import Controller, ControllerSettings
from training.controller import TaskController

SETTINGS = ControllerSettings(top_k=2, threshold=0.3, temperature=0.5)


def _controller(straight_through=True) -> TaskController:
    controller = TaskController(3, 4, SETTINGS, straight_through)
    with torch.no_grad():
        controller.logits.copy_(torch.tensor([[2.0, -1.0, 0.5, 0.0], [-3.0, -2.0, -0.4, -5.0], [0.1, 0.2, 0.3, 0.4]]))
    return controller


def test_export_gates_are_the_routers_compositions():
    controller = _controller()
    router = Controller(["a", "b", "c"], ["m0", "m1", "m2", "m3"], controller.logits.detach(), SETTINGS)
    exported = controller.export_gates()
    for row, task in enumerate("abc"):
        composition = router.gates_for_task(task)
        expected = torch.zeros(4)
        for name, gate in zip(composition.module_ids, composition.gates):
            expected[int(name[1:])] = gate
        torch.testing.assert_close(exported[row], expected)
    assert exported[1].tolist()[:2] == [0.0, 0.0] and exported[1, 2] == 1.0  # one gate over the threshold


def test_straight_through_forwards_hard_gates_and_reaches_every_logit():
    controller = _controller()
    gates = controller(torch.tensor([0, 2]))
    torch.testing.assert_close(gates.detach(), controller.export_gates()[[0, 2]])
    (gates * torch.arange(1.0, 5.0)).sum().backward()
    assert (controller.logits.grad[[0, 2]] != 0).all() and (controller.logits.grad[1] == 0).all()


def test_soft_mode_is_the_plain_sigmoid():
    controller = _controller(straight_through=False)
    gates = controller(torch.tensor([1]))
    assert gates.detach()[0].tolist() == pytest.approx(torch.sigmoid(controller.logits[1] / 0.5).tolist())
