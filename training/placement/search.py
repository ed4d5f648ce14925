"""`search_placement`: the five steps of the placement search, end to end."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from training.placement.blocks import Block, enumerate_blocks, point_costs
from training.placement.config import Placement, PlacementConfig, Point
from training.placement.gain import (
    GainFit, block_features, fit_gain, point_features, point_sums, probe_choice, probe_drops,
)
from training.placement.select import select_points
from training.placement.sketch import GradientSketch, sketch_gradients
from training.placement.spectral import knn_graph, spectral_clusters, task_profiles

logger = logging.getLogger(__name__)


def dominant_clusters(
    blocks: Sequence[Block], labels: torch.Tensor, energy: torch.Tensor, points: Sequence[Point], num_clusters: int
) -> list[int]:
    """Per point, the cluster holding most of its blocks' gradient energy [num_blocks] (by block count if none)."""
    one_hot = nn.functional.one_hot(labels, num_clusters).double()  # [num_blocks, num_clusters]
    mass = point_sums(one_hot * energy.double()[:, None], blocks, points)  # [num_points, num_clusters]
    count = point_sums(one_hot, blocks, points)  # [num_points, num_clusters]
    has_mass = mass.sum(dim=1) > 0  # [num_points]
    return torch.where(has_mass, mass.argmax(dim=1), count.argmax(dim=1)).tolist()


def _score_points(
    model: nn.Module, task_batches: Mapping[str, Sequence[Mapping]], sketch: GradientSketch,
    blocks: Sequence[Block], labels: torch.Tensor, config: PlacementConfig,
) -> tuple[list[float], dict[Point, float], GainFit]:
    """Predicted gain of every point (from a fit to probes), the probes' measured drops, and the fit."""
    points = list(dict.fromkeys(b.point for b in blocks))
    num_tasks = len(sketch.tasks)
    per_block = block_features(sketch, blocks, labels, config.num_clusters, model.config.num_hidden_layers)
    features = point_features(per_block, blocks, points, num_tasks)  # [num_points, num_features]
    energy = point_sums(per_block[:, :num_tasks].sum(dim=1), blocks, points)  # [num_points]
    probed = probe_choice(energy, points, config.probe_points)
    drops = probe_drops(model, task_batches, sketch, probed, config)
    fit = fit_gain(features[[points.index(p) for p in probed]], torch.tensor([drops[p] for p in probed]), config.ridge)
    return (features @ fit.weights).clamp_min(0.0).tolist(), drops, fit


def search_placement(
    model: nn.Module, task_batches: Mapping[str, Sequence[Mapping[str, torch.Tensor]]],
    config: PlacementConfig = PlacementConfig(),
) -> Placement:
    """Choose (layer, target) points for modules under the parameter budget from the frozen model's gradients.

    `model` is a Hugging Face Llama-family causal LM (left frozen and unchanged); `task_batches` maps each
    task to its batches, each a dict of `input_ids`, `attention_mask` and `labels` [batch, seq] tensors.
    """
    blocks = enumerate_blocks(model.config, config.block_width)
    costs = point_costs(model.config, config.rank, config.num_modules)
    points = list(costs)
    if config.num_clusters > len(blocks):
        raise ValueError(f"num_clusters={config.num_clusters} exceeds the {len(blocks)} blocks of this model")
    if len(task_batches) == 1:
        logger.warning("one task: every block has the same task profile, so the clusters carry no information")
    sketch = sketch_gradients(model, task_batches, blocks, config)
    labels = spectral_clusters(
        knn_graph(task_profiles(sketch.sketches), config.knn), config.num_clusters, config.seed, config.kmeans_restarts
    )
    scores, drops, fit = _score_points(model, task_batches, sketch, blocks, labels, config)
    clusters = dominant_clusters(blocks, labels, sketch.energy.sum(dim=1), points, config.num_clusters)
    budget = config.budget(sum(costs.values()))
    selection = select_points(scores, [costs[p] for p in points], clusters, budget)
    logger.info("placement: %d of %d points, cost %d of budget %d, probe fit R^2 %.3f (leave-one-out %.3f)",
                len(selection.chosen), len(points), selection.cost, budget, fit.r2, fit.loo_r2)
    return Placement(
        points=[points[i] for i in selection.chosen], total_cost=selection.cost, budget=budget,
        predicted_gain=selection.gain, scores=dict(zip(points, scores)), costs=costs,
        block_clusters=labels.tolist(), blocks=[(b.layer, b.target, b.index) for b in blocks],
        point_clusters=dict(zip(points, clusters)), probes=drops, fit_r2=fit.r2, fit_loo_r2=fit.loo_r2,
    )
