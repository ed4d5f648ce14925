"""Each loss term on a case small enough to check by hand."""

from __future__ import annotations

import math

import pytest
import torch

from training.data import IGNORE
from training.losses import alignment_loss, decoupling_loss, prior_loss, sparsity_loss, task_loss


def test_task_loss_is_cross_entropy_on_labelled_next_tokens_only():
    logits = torch.zeros(1, 3, 2)  # [batch, seq, vocab]
    logits[0, 0] = torch.tensor([0.0, math.log(3.0)])  # predicts position 1: p(1) = 3/4
    logits[0, 1] = torch.tensor([100.0, 0.0])  # predicts position 2, which is not labelled
    labels = torch.tensor([[IGNORE, 1, IGNORE]])
    assert task_loss(logits, labels).item() == pytest.approx(-math.log(0.75))
    with pytest.raises(ValueError, match="no assistant token"):
        task_loss(logits, torch.full((1, 3), IGNORE))


def _explicit_cosines(u, b, col_module, num_modules):
    outputs = []
    for j in range(num_modules):
        cols = (col_module == j).nonzero().flatten()
        outputs.append((u[:, cols] @ b[:, cols].t()).flatten())  # module j's output on every token
    return [[float(torch.dot(o, p) / (o.norm() * p.norm())) for p in outputs] for o in outputs]


def test_decoupling_is_zero_for_orthogonal_and_one_for_parallel_outputs():
    u = torch.tensor([[1.0, 2.0], [3.0, -1.0]])  # [tokens, R]: one rank column per module
    col_module = torch.tensor([0, 1])
    orthogonal = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # [out, R]: the modules write disjoint features
    assert decoupling_loss(u, orthogonal, col_module, 2).item() == pytest.approx(0.0, abs=1e-6)
    parallel_u = torch.tensor([[1.0, -2.0], [3.0, -6.0]])  # module 1's u = -2 x module 0's
    same_b = torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    assert decoupling_loss(parallel_u, same_b, col_module, 2).item() == pytest.approx(1.0, abs=1e-6)


def test_decoupling_equals_squared_cosines_of_explicit_outputs():
    gen = torch.Generator().manual_seed(0)
    u, b = torch.randn(7, 5, generator=gen), torch.randn(6, 5, generator=gen)  # ranks 2, 1, 2 stacked
    col_module = torch.tensor([0, 0, 1, 2, 2])
    cos = _explicit_cosines(u, b, col_module, 3)
    expected = cos[0][1] ** 2 + cos[0][2] ** 2 + cos[1][2] ** 2
    assert decoupling_loss(u, b, col_module, 3).item() == pytest.approx(expected, rel=1e-5)


def test_decoupling_of_untrained_modules_is_zero_with_finite_gradient():
    b = torch.zeros(4, 2, requires_grad=True)
    loss = decoupling_loss(torch.ones(3, 2), b, torch.tensor([0, 1]), 2)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(b.grad).all()


def test_alignment_is_kl_from_target_to_module():
    target = torch.log(torch.tensor([[0.5, 0.5]]))
    module = torch.log(torch.tensor([[0.25, 0.75]]))
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert alignment_loss(target, module).item() == pytest.approx(expected, rel=1e-6)
    assert alignment_loss(module, module).item() == pytest.approx(0.0, abs=1e-7)


def test_sparsity_is_the_mean_insertion_gate():
    assert sparsity_loss(torch.tensor([0.2, 0.4])).item() == pytest.approx(0.3)


def test_prior_weights_squared_gate_distances_by_relation():
    gates = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])  # tasks 0 and 2 use the same module
    relation = torch.tensor([[0.0, 2.0, 5.0], [2.0, 0.0, 0.0], [5.0, 0.0, 0.0]])
    # (t, u) = (0, 1) and (1, 0): 2 * ||(1, -1)||^2 = 4 each; (0, 2) and (2, 0): distance 0
    assert prior_loss(gates, relation).item() == pytest.approx(8.0)
