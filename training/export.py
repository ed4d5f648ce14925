"""From a trained bank and controller to a `ModuleLibrary`: grid checks, pruning, folding, building.

The library format (router.info.ModuleInfo) gives every module ONE layers tuple and ONE targets tuple,
and it must hold weights at every (layer, target) of that grid. So a module's insertion points must form
a grid, and pruning works at grid granularity, per module:

    keep layer l  iff  some point (l, t) of the module has insertion gate >= prune_threshold
    keep target t iff  some point (l, t) of the module has insertion gate >= prune_threshold
    kept points = kept layers x kept targets

A point under the threshold whose layer and target both survive stays, with its small trained gate
folded into B: the served function is then exactly the trained one restricted to the kept points (no
zero padding, which would cost compute for nothing). The bank is pruned the same way, so after export
the training model computes what the library serves.

Folding: the served update is g_j (alpha / r) B_j' A_j with B_j' = ig_p B_j, equal to the bank's
ig_p g_j (alpha / r) B_j A_j. With insertion gates off (controller-only training) B is copied as is.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch

from router.controller import ControllerSettings
from router.fingerprint import TARGETS, BackboneFingerprint
from router.info import ModuleInfo, ModuleWeights, TaskInfo
from router.library import ModuleLibrary
from training.controller import TaskController
from training.modules import ModuleBank, Point

logger = logging.getLogger(__name__)


def grid_closure(points: Iterable[Point]) -> list[Point]:
    """The smallest layers x targets grid holding `points`, in (layer, TARGETS) order."""
    points = list(points)
    layers = sorted({layer for layer, _ in points})
    targets = [t for t in TARGETS if any(t == target for _, target in points)]
    return [(layer, target) for layer in layers for target in targets]


def check_grid(points: Iterable[Point], where: str) -> None:
    """Raise ValueError unless `points` is a full layers x targets grid (what ModuleInfo can express)."""
    points = set(points)
    missing = [p for p in grid_closure(points) if p not in points]
    if missing:
        raise ValueError(
            f"{where}: insertion points must form a layers x targets grid, because a library module has one "
            f"layers tuple and one targets tuple; missing {missing[:6]}{' ...' if len(missing) > 6 else ''} "
            f"({len(missing)} points). Pass training.export.grid_closure(points) to train the full grid"
        )


def prune(bank: ModuleBank, threshold: float) -> dict[int, list[Point]]:
    """Kept points per module (module docstring); marks pruned columns in the bank so it computes the same."""
    gates = dict(zip(bank.points, bank.insertion_gates().detach().cpu().tolist()))
    kept: dict[int, list[Point]] = {}
    for module, spec in enumerate(bank.specs):
        alive = [p for p in spec.points if gates[p] >= threshold]
        if not alive:
            raise ValueError(
                f"prune_threshold {threshold} removes every insertion point of module {spec.name} (its largest "
                f"insertion gate is {max(gates[p] for p in spec.points):.4f}); lower the threshold"
            )
        layers = {layer for layer, _ in alive}
        targets = {target for _, target in alive}
        kept[module] = [p for p in spec.points if p[0] in layers and p[1] in targets]
    with torch.no_grad():
        for adapter in bank.adapters:
            for module, (start, end) in adapter.offsets.items():
                adapter.col_keep[start:end] = float(adapter.point in kept[module])
    removed = sorted({p for spec in bank.specs for p in spec.points} - {p for ps in kept.values() for p in ps})
    logger.info("pruning at %s kept %d of %d insertion points; removed %s", threshold,
                len(bank.points) - len(removed), len(bank.points), removed)
    return kept


def module_weights(bank: ModuleBank, module: int, points: list[Point]) -> ModuleWeights:
    """(layer, target) -> (A, B) of one module at `points`, insertion gates folded into B, fp32 CPU copies."""
    weights: ModuleWeights = {}
    for point in points:
        adapter = bank.adapters[bank.points.index(point)]
        a, b = bank.pair(module, point)
        fold = adapter.insertion_gate().detach() if adapter.use_gate else None
        b_out = b.detach() * fold if fold is not None else b.detach()
        weights[point] = (a.detach().float().cpu().clone(), b_out.float().cpu().clone())
    return weights


def build_library(
    bank: ModuleBank, controller: TaskController, backbone: BackboneFingerprint, tasks: list[TaskInfo],
    kept: dict[int, list[Point]], descriptions: list[str],
) -> ModuleLibrary:
    """The checked library of the bank's modules (at their kept points) and the controller's logits."""
    modules = {}
    for index, spec in enumerate(bank.specs):
        points = kept[index]
        layers = tuple(sorted({layer for layer, _ in points}))
        targets = tuple(t for t in TARGETS if any(t == target for _, target in points))
        info = ModuleInfo(spec.name, spec.rank, spec.alpha, descriptions[index], targets, layers)
        modules[spec.name] = (info, module_weights(bank, index, points))
    settings: ControllerSettings = controller.settings
    return ModuleLibrary.build(backbone, modules, tasks, controller.logits.detach().float().cpu(), settings)
