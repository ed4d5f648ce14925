"""Gain predictor: block features, probe adapters that measure a real loss drop, and the ridge fit (step 4)."""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from training.placement.blocks import Block, target_linear
from training.placement.config import PlacementConfig, Point
from training.placement.sketch import GradientSketch, batch_loss, frozen_except

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GainFit:
    """A linear gain predictor fitted on probed points."""

    weights: torch.Tensor
    """[num_features] coefficients w: predicted point gain = w . F_p (see `point_features`)."""
    r2: float
    """Coefficient of determination on the probes (0 when the probes all measured the same drop)."""
    loo_r2: float
    """Leave-one-out R^2: each probe predicted by a fit on the others (honest when features >= probes)."""


def block_features(
    sketch: GradientSketch, blocks: Sequence[Block], labels: torch.Tensor, num_clusters: int, num_layers: int
) -> torch.Tensor:
    """[num_blocks, num_tasks + num_clusters + 1] features f_b of every block (float64).

    Columns: the block's share of each task's gradient energy q_bt = e_bt / sum_b' e_b't, then q_b = sum_t q_bt
    times the one-hot of its cluster and times its depth layer / (num_layers - 1). Every column is 0 for a
    block without gradient, so such a block (which no adapter can improve to first order) predicts no gain.
    """
    energy = sketch.energy.double()  # [num_blocks, num_tasks]
    share = energy / energy.sum(dim=0, keepdim=True).clamp_min(1e-300)  # [num_blocks, num_tasks]
    total = share.sum(dim=1, keepdim=True)  # [num_blocks, 1]
    one_hot = nn.functional.one_hot(labels, num_clusters).double()  # [num_blocks, num_clusters]
    depth = torch.tensor([b.layer / max(num_layers - 1, 1) for b in blocks], dtype=torch.float64)  # [num_blocks]
    return torch.cat([share, total * one_hot, total * depth[:, None]], dim=1)


def point_sums(values: torch.Tensor, blocks: Sequence[Block], points: Sequence[Point]) -> torch.Tensor:
    """[num_points, ...] sums of per-block `values` [num_blocks, ...] over each point's blocks."""
    index = {point: i for i, point in enumerate(points)}
    owner = torch.tensor([index[b.point] for b in blocks])  # [num_blocks]
    out = torch.zeros((len(points),) + tuple(values.shape[1:]), dtype=values.dtype)  # [num_points, ...]
    return out.index_add_(0, owner, values)


def point_features(features: torch.Tensor, blocks: Sequence[Block], points: Sequence[Point], num_tasks: int):
    """[num_points, num_features] F_p = sum_{b in p} f_b / sqrt(q_p), q_p the point's total energy share.

    The scaling makes a prediction grow like the square root of the point's gradient energy (0 without
    gradient). Adam, which the probes and the trainer use, lowers the loss in its first steps by about
    lr * ||g||_1, which is degree 1 in g, so degree 1/2 in the energy ||g||^2; on a tiny Llama (all 14
    points probed, ridge 0.1) this fitted the probes with leave-one-out R^2 0.90, the unscaled sum 0.70.
    """
    summed = point_sums(features, blocks, points)  # [num_points, num_features]
    energy = summed[:, :num_tasks].sum(dim=1, keepdim=True)  # [num_points, 1]
    return torch.where(energy > 0, summed / energy.clamp_min(1e-300).sqrt(), torch.zeros_like(summed))


def probe_choice(point_energy: torch.Tensor, points: Sequence[Point], count: int) -> list[Point]:
    """`count` points evenly spaced in the ranking by gradient energy (lowest to highest), in point order."""
    order = torch.argsort(point_energy, stable=True).tolist()
    count = min(count, len(points))
    ranks = sorted({round(i * (len(points) - 1) / max(count - 1, 1)) for i in range(count)})
    return [points[i] for i in sorted(order[r] for r in ranks)]


def _probe_task(model: nn.Module, point: Point, batches: Sequence[Mapping], base: float, config, task: str) -> float:
    """Loss drop of the task's batches after `probe_steps` full-batch Adam steps of a rank-r adapter at `point`."""
    linear = target_linear(model, *point)
    rng = random.Random(f"tessera-probe:{config.seed}:{point[0]}:{point[1]}:{task}")
    generator = torch.Generator().manual_seed(rng.randrange(2**62))
    device, dtype = linear.weight.device, linear.weight.dtype
    down = torch.randn(config.rank, linear.in_features, generator=generator) / linear.in_features**0.5  # [r, in]
    down = down.to(device, dtype).requires_grad_()
    up = torch.zeros(linear.out_features, config.rank, device=device, dtype=dtype, requires_grad=True)  # [out, r]
    handle = linear.register_forward_hook(lambda module, args, out: out + (args[0] @ down.T) @ up.T)
    optimizer = torch.optim.Adam([down, up], lr=config.probe_lr)
    where = f"probe {point} task {task!r}"
    try:
        for _ in range(config.probe_steps):
            optimizer.zero_grad()
            for batch in batches:
                (batch_loss(model, batch, where) / len(batches)).backward()
            optimizer.step()
        with torch.no_grad():
            after = sum(batch_loss(model, batch, where).item() for batch in batches) / len(batches)
    finally:
        handle.remove()
    return base - after


def probe_drops(
    model: nn.Module, task_batches: Mapping[str, Sequence[Mapping]], sketch: GradientSketch,
    points: Sequence[Point], config: PlacementConfig,
) -> dict[Point, float]:
    """Measured loss drop at each probed point, summed over tasks (one fresh adapter per task)."""
    drops = {}
    with frozen_except(model, []):
        for point in points:
            drops[point] = sum(
                _probe_task(model, point, task_batches[task][: config.batches_per_task], float(base), config, task)
                for task, base in zip(sketch.tasks, sketch.losses)
            )
    logger.info("probe loss drops: %s", {f"{l}:{t}": round(d, 6) for (l, t), d in drops.items()})
    return drops


def _ridge(features: torch.Tensor, targets: torch.Tensor, ridge: float) -> torch.Tensor:
    """[F] ridge least-squares weights, columns scaled to unit RMS: (X^T X + ridge * P * I) v = X^T y, w = v / rms."""
    rms = features.square().mean(dim=0).sqrt()  # [F]
    rms = torch.where(rms > 0, rms, torch.ones_like(rms))
    scaled = features / rms  # [P, F]
    gram = scaled.T @ scaled + ridge * features.shape[0] * torch.eye(features.shape[1], dtype=torch.float64)  # [F, F]
    return torch.linalg.solve(gram, scaled.T @ targets) / rms


def _r2(targets: torch.Tensor, predictions: torch.Tensor) -> float:
    """1 - SS_res / SS_tot (0 when the targets are all equal)."""
    total = (targets - targets.mean()).square().sum()
    return float(1 - (targets - predictions).square().sum() / total) if total > 0 else 0.0


def fit_gain(features: torch.Tensor, targets: torch.Tensor, ridge: float) -> GainFit:
    """Ridge fit of probe targets [P] on point features [P, F], with in-sample and leave-one-out R^2."""
    features, targets = features.double(), targets.double()
    weights = _ridge(features, targets, ridge)  # [F]
    rows = torch.arange(features.shape[0])  # [P]
    held_out = torch.stack([
        features[i] @ _ridge(features[rows != i], targets[rows != i], ridge) for i in range(features.shape[0])
    ])  # [P]
    return GainFit(weights, _r2(targets, features @ weights), _r2(targets, held_out))
