"""Placement search: blocks, sketches, clustering, selection, and the whole search on a tiny Llama."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from router.fingerprint import TARGETS
from training.placement import (
    PlacementConfig, count_sketch, enumerate_blocks, greedy_select, kmeans, knn_graph, point_costs,
    random_select, search_placement, select_points, sketch_gradients, spectral_clusters, target_linear, two_opt,
)
from training.placement import sketch as sketch_module
from training.placement.gain import fit_gain, probe_choice
from training.placement.sketch import PRIME, point_hash

VOCAB = 48


def tiny_config(**overrides) -> LlamaConfig:
    sizes = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    return LlamaConfig(**{**sizes, **overrides})


def tiny_model(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(**overrides), dtype=torch.float32)


def task_batches(pattern: int, count: int = 2, seed: int = 0) -> list[dict]:
    """Batches of a deterministic token pattern: `pattern` picks the stride of an arithmetic sequence."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        starts = torch.randint(VOCAB, (2, 1), generator=generator)  # [batch, 1]
        ids = (starts + torch.arange(12) * pattern) % VOCAB  # [batch, seq]
        labels = ids.clone()
        labels[:, :3] = -100
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return batches


def test_blocks_are_heads_kv_heads_and_neuron_groups():
    config = tiny_config(num_hidden_layers=3)
    blocks = enumerate_blocks(config, block_width=16)
    per_point = {p: [b for b in blocks if b.point == p] for p in point_costs(config, 1, 1)}
    expected = {"q_proj": 4, "k_proj": 2, "v_proj": 2, "o_proj": 4, "gate_proj": 3, "up_proj": 3, "down_proj": 3}
    assert len(blocks) == 3 * sum(expected.values())
    model = tiny_model(num_hidden_layers=3)
    for (layer, target), point_blocks in per_point.items():
        assert len(point_blocks) == expected[target]
        weight = target_linear(model, layer, target).weight
        axis = 1 if target in ("o_proj", "down_proj") else 0
        assert all(b.axis == axis for b in point_blocks)
        ranges = [(b.start, b.stop) for b in point_blocks]
        assert ranges[0][0] == 0 and ranges[-1][1] == weight.shape[axis]
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert [b.stop - b.start for b in per_point[(0, "gate_proj")]] == [16, 16, 8]
    assert [b.stop - b.start for b in per_point[(2, "k_proj")]] == [8, 8]


def test_target_linear_names_and_errors():
    model = tiny_model()
    assert target_linear(model, 1, "k_proj") is model.model.layers[1].self_attn.k_proj
    assert target_linear(model, 0, "down_proj") is model.model.layers[0].mlp.down_proj
    with pytest.raises(ValueError, match="unknown target 'lm_head'"):
        target_linear(model, 0, "lm_head")
    with pytest.raises(ValueError, match="layer 2 out of range"):
        target_linear(model, 2, "q_proj")


def test_point_costs_are_rank_times_in_plus_out_times_modules():
    costs = point_costs(tiny_config(), rank=4, num_modules=3)
    assert len(costs) == 2 * len(TARGETS)
    assert costs[(0, "k_proj")] == 4 * (32 + 16) * 3
    assert costs[(1, "down_proj")] == 4 * (40 + 32) * 3


def test_count_sketch_matches_elementwise_definition(monkeypatch):
    monkeypatch.setattr(sketch_module, "CHUNK_ELEMENTS", 7)  # several chunks, some rows split across none
    generator = torch.Generator().manual_seed(1)
    matrix = torch.randn(5, 6, generator=generator)  # [rows, cols]
    owner = torch.tensor([0, 0, 1, 2, 2])  # [rows]
    coeffs = point_hash(3, (0, "q_proj"))
    sketch, energy = count_sketch(matrix, owner, 3, 4, coeffs)
    a, b, c, d = coeffs
    expected = torch.zeros(3, 4)  # [blocks, s]
    for i, j in itertools.product(range(5), range(6)):
        n = i * 6 + j
        sign = 1 if (c * n + d) % PRIME % 2 else -1
        expected[owner[i], (a * n + b) % PRIME % 4] += sign * matrix[i, j]
    assert torch.allclose(sketch, expected, atol=1e-6)
    assert torch.allclose(energy, torch.stack([matrix[:2].square().sum(), matrix[2].square().sum(),
                                               matrix[3:].square().sum()]))


def test_sketches_deterministic_per_seed_differ_across_tasks_and_energy_is_exact():
    model = tiny_model()
    batches = {"stride1": task_batches(1), "stride5": task_batches(5, seed=1)}
    blocks = enumerate_blocks(model.config, 16)
    config = PlacementConfig(sketch_dim=8, block_width=16)
    first = sketch_gradients(model, batches, blocks, config)
    again = sketch_gradients(model, batches, blocks, config)
    other_seed = sketch_gradients(model, batches, blocks, PlacementConfig(sketch_dim=8, block_width=16, seed=1))
    assert first.sketches.shape == (len(blocks), 2, 8) and first.energy.shape == (len(blocks), 2)
    assert torch.equal(first.sketches, again.sketches)
    assert not torch.allclose(first.sketches, other_seed.sketches)
    assert torch.allclose(first.energy, other_seed.energy)
    assert not torch.allclose(first.sketches[:, 0], first.sketches[:, 1])
    # energy of o_proj head 3 in layer 1 equals the squared norm of autograd's gradient, column slice
    weight = model.model.layers[1].self_attn.o_proj.weight
    expected = 0.0
    for batch in batches["stride5"]:
        loss = model(**batch).loss
        (grad,) = torch.autograd.grad(loss, weight)
        expected += grad[:, 24:32].square().sum().item() / 2
    index = next(i for i, b in enumerate(blocks) if (b.layer, b.target, b.index) == (1, "o_proj", 3))
    assert first.energy[index, 1].item() == pytest.approx(expected, rel=1e-4)
    assert all(p.grad is None for p in model.parameters())


def test_bad_batches_are_rejected_with_the_task_named():
    model = tiny_model()
    blocks = enumerate_blocks(model.config, 16)
    config = PlacementConfig(block_width=16)
    masked = task_batches(1)
    masked[1]["labels"][:] = -100
    with pytest.raises(ValueError, match=r"task 'copy' batch 1: no label"):
        sketch_gradients(model, {"copy": masked}, blocks, config)
    with pytest.raises(ValueError, match="task 'copy' has 1 batches; batches_per_task=2"):
        sketch_gradients(model, {"copy": task_batches(1, count=1)}, blocks, config)
    missing = [{"input_ids": b["input_ids"], "labels": b["labels"]} for b in task_batches(1)]
    with pytest.raises(ValueError, match=r"batch lacks \['attention_mask'\]"):
        sketch_gradients(model, {"copy": missing}, blocks, config)


def test_kmeans_recovers_separated_clusters():
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    truth = torch.arange(3).repeat_interleave(torch.tensor([20, 7, 13]))  # [40]
    points = centres[truth] + 0.5 * torch.randn(40, 2, generator=generator)  # [40, 2]
    labels = kmeans(points, 3, seed=0)
    assert len(set(zip(truth.tolist(), labels.tolist()))) == 3
    assert torch.equal(labels, kmeans(points, 3, seed=0))
    with pytest.raises(ValueError, match="k=41 for 40 points"):
        kmeans(points, 41, seed=0)


def test_spectral_clustering_separates_two_disconnected_cliques():
    sizes = (5, 7)
    truth = torch.arange(2).repeat_interleave(torch.tensor(sizes))  # [12]
    weights = (truth[:, None] == truth[None, :]).double() * 0.8  # [12, 12]
    weights.fill_diagonal_(0.0)
    labels = spectral_clusters(weights, 2, seed=0)
    assert len(set(labels[:5].tolist())) == 1 and len(set(labels[5:].tolist())) == 1
    assert labels[0] != labels[5]
    with pytest.raises(ValueError, match="symmetric and non-negative"):
        spectral_clusters(-weights, 2, seed=0)


def test_knn_graph_is_symmetric_sparse_and_nonnegative():
    generator = torch.Generator().manual_seed(0)
    features = torch.nn.functional.normalize(torch.randn(30, 5, generator=generator), dim=1)  # [30, 5]
    weights = knn_graph(features, knn=3)
    assert torch.equal(weights, weights.T) and (weights >= 0).all()
    assert (weights.diagonal() == 0).all()
    assert ((weights > 0).sum(dim=1) >= 1).all() and (weights > 0).sum() <= 2 * 3 * 30


def test_two_opt_beats_greedy_where_greedy_is_suboptimal():
    gains, costs, clusters = [7.0, 5.0, 5.0], [6, 5, 5], [0, 0, 0]
    greedy = greedy_select(gains, costs, clusters, budget=10)
    assert greedy.chosen == (0,) and greedy.gain == 7.0
    improved = two_opt(greedy, gains, costs, clusters, budget=10)
    assert improved.chosen == (1, 2) and improved.gain == 10.0 and improved.cost == 10


def test_two_opt_keeps_a_sole_cluster_representative():
    gains, costs, clusters = [7.0, 5.0, 5.0, 1.0], [6, 5, 5, 4], [0, 0, 0, 1]
    greedy = greedy_select(gains, costs, clusters, budget=14)
    assert greedy.chosen == (0, 3) and greedy.gain == 8.0
    # swapping item 3 for item 1 would gain 12 but leave cluster 1 empty; 0 -> {1, 2} keeps it (gain 11)
    assert two_opt(greedy, gains, costs, clusters, budget=14).chosen == (1, 2, 3)


def test_coverage_skips_a_cluster_whose_gains_are_all_zero():
    selection = select_points([0.0, 0.0, 3.0, 1.0], [1, 1, 4, 4], [0, 0, 1, 1], budget=5)
    assert selection.chosen == (2,)


def _best_subset(gains, costs, clusters, budget) -> float:
    """Highest gain of any in-budget subset covering every cluster (brute force)."""
    best = float("-inf")
    for mask in itertools.product((0, 1), repeat=len(gains)):
        chosen = [i for i in range(len(gains)) if mask[i]]
        if sum(costs[i] for i in chosen) <= budget and {clusters[i] for i in chosen} == set(clusters):
            best = max(best, sum(gains[i] for i in chosen))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_selection_respects_budget_covers_clusters_and_two_opt_never_loses(seed):
    generator = torch.Generator().manual_seed(seed)
    gains = (torch.rand(10, generator=generator) * 10).tolist()
    costs = torch.randint(1, 20, (10,), generator=generator).tolist()
    clusters = torch.randint(3, (10,), generator=generator).tolist()
    budget = sum(max(c for c, k in zip(costs, clusters) if k == cluster) for cluster in set(clusters)) + 10
    greedy = greedy_select(gains, costs, clusters, budget)
    final = select_points(gains, costs, clusters, budget)
    for selection in (greedy, final):
        assert selection.cost == sum(costs[i] for i in selection.chosen) <= budget
        assert {clusters[i] for i in selection.chosen} == set(clusters)
    assert final.gain >= greedy.gain - 1e-9
    assert final.gain <= _best_subset(gains, costs, clusters, budget) + 1e-9
    assert final == select_points(gains, costs, clusters, budget)


def test_selection_input_errors():
    with pytest.raises(ValueError, match="differ in length"):
        greedy_select([1.0], [1, 2], [0], 3)
    with pytest.raises(ValueError, match="integer >= 1"):
        greedy_select([1.0], [0], [0], 3)
    with pytest.raises(ValueError, match="over the budget"):
        two_opt(greedy_select([1.0], [3], [0], 3), [1.0], [3], [0], 2)


def test_random_selection_fills_the_budget_in_a_seeded_order():
    costs = [5, 3, 8, 2, 7, 4, 6, 1, 9, 3]
    budget = 20
    selections = {seed: random_select(costs, budget, seed) for seed in range(8)}
    for seed, selection in selections.items():
        assert selection.cost == sum(costs[i] for i in selection.chosen) <= budget
        assert list(selection.chosen) == sorted(selection.chosen)
        # greedy fill: no unchosen item still fits
        assert all(costs[i] > budget - selection.cost for i in range(len(costs)) if i not in selection.chosen)
        assert selection == random_select(costs, budget, seed)
    assert len({s.chosen for s in selections.values()}) > 1  # the seed matters
    assert random_select(costs, 0, 0).chosen == ()
    with pytest.raises(ValueError, match="integer >= 1"):
        random_select([0, 2], 3, 0)


def test_gain_fit_recovers_a_linear_law_and_loo_exposes_noise():
    generator = torch.Generator().manual_seed(0)
    features = torch.rand(24, 4, generator=generator, dtype=torch.float64)  # [P, F]
    law = torch.tensor([2.0, -1.0, 0.5, 3.0], dtype=torch.float64)  # [F]
    fit = fit_gain(features, features @ law, ridge=1e-8)
    assert torch.allclose(fit.weights, law, atol=1e-4)
    assert fit.r2 > 0.999 and fit.loo_r2 > 0.999
    noise = fit_gain(features, torch.randn(24, generator=generator, dtype=torch.float64), ridge=1e-3)
    assert noise.loo_r2 < noise.r2 and noise.loo_r2 < 0.3


def test_probe_choice_spreads_over_the_energy_ranking():
    points = [(0, t) for t in TARGETS]
    energy = torch.tensor([5.0, 1.0, 7.0, 3.0, 2.0, 6.0, 4.0])  # [num_points]
    assert probe_choice(energy, points, 3) == [(0, "k_proj"), (0, "v_proj"), (0, "down_proj")]
    assert probe_choice(energy, points, 20) == points


def test_config_validation():
    with pytest.raises(ValueError, match="exactly one of"):
        PlacementConfig(budget_params=100, budget_fraction=0.5)
    with pytest.raises(ValueError, match="budget_fraction must be in"):
        PlacementConfig(budget_fraction=1.5)
    with pytest.raises(ValueError, match="knn must be an integer >= 1"):
        PlacementConfig(knn=0)
    assert PlacementConfig(budget_params=123, budget_fraction=None).budget(10_000) == 123
    assert PlacementConfig(budget_fraction=0.5).budget(1001) == 500


SEARCH = PlacementConfig(sketch_dim=16, knn=4, num_clusters=3, block_width=16, budget_fraction=0.3, rank=2,
                         num_modules=2, probe_points=4, probe_steps=2, probe_lr=5e-2)


@pytest.fixture(scope="module")
def searched():
    model = tiny_model().train()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    batches = {"stride1": task_batches(1), "stride7": task_batches(7, seed=1)}
    placement = search_placement(model, batches, SEARCH)
    return model, before, batches, placement


def test_search_returns_valid_points_within_budget(searched):
    model, _, _, placement = searched
    costs = point_costs(model.config, SEARCH.rank, SEARCH.num_modules)
    assert placement.budget == int(0.3 * sum(costs.values()))
    assert placement.points and placement.points == sorted(set(placement.points), key=list(costs).index)
    assert all(0 <= layer < 2 and target in TARGETS for layer, target in placement.points)
    assert placement.total_cost == sum(costs[p] for p in placement.points) <= placement.budget
    assert placement.predicted_gain == pytest.approx(sum(placement.scores[p] for p in placement.points))
    assert len(placement.block_clusters) == len(placement.blocks) == len(enumerate_blocks(model.config, 16))
    assert set(placement.probes) <= set(costs) and len(placement.probes) == SEARCH.probe_points
    assert all(score >= 0 for score in placement.scores.values())
    assert all(drop > 0 for drop in placement.probes.values())
    report = json.loads(json.dumps(placement.to_json()))
    assert report["points"] == [list(p) for p in placement.points] and report["budget"] == placement.budget


def test_search_leaves_the_model_unchanged(searched):
    model, before, _, _ = searched
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) and p.requires_grad and p.grad is None
    assert model.training


def test_search_is_deterministic(searched):
    model, _, batches, placement = searched
    again = search_placement(model, batches, SEARCH)
    assert again.points == placement.points and again.scores == placement.scores
    assert again.block_clusters == placement.block_clusters


def test_points_an_adapter_cannot_affect_score_zero_and_are_not_chosen():
    """Layer 0's o_proj and down_proj are zero, so whatever an adapter adds to its q/k/v/gate/up is multiplied
    by zero before it reaches the residual stream: those points cannot change the loss at all."""
    model = tiny_model(seed=3)
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight.zero_()
        model.model.layers[0].mlp.down_proj.weight.zero_()
    batches = {"stride1": task_batches(1), "stride7": task_batches(7, seed=1)}
    placement = search_placement(model, batches, replace(SEARCH, budget_fraction=0.6))
    dead = [(0, t) for t in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")]
    assert all(placement.scores[p] == 0.0 for p in dead)
    assert not set(dead) & set(placement.points)
    assert all(abs(drop) < 1e-6 for p, drop in placement.probes.items() if p in dead)
    assert any(p in dead for p in placement.probes)  # the lowest-energy probe lands on a dead point
    assert len(placement.points) >= 4 and placement.total_cost <= placement.budget
