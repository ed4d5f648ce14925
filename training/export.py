"""From a trained bank and controller to a `ModuleLibrary`: pruning, folding, building.

Pruning is per insertion point: a point whose learned insertion gate ends under `prune_threshold` is
removed from every module, and the library records each module's exact kept points (ModuleInfo.points,
or the short layers x targets form when they happen to be a full grid). Serving then holds no weights
there: in the engine's pool that (layer, target) has rank 0 for the module, so the kernels load nothing
for it. The bank is pruned the same way, so after export the training model computes what the library
serves.

Folding: the served update is g_j (alpha / r) B_j' A_j with B_j' = ig_p B_j, equal to the bank's
ig_p g_j (alpha / r) B_j A_j. With insertion gates off (controller-only training) B is copied as is.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from router.controller import ControllerSettings
from router.fingerprint import TARGETS, BackboneFingerprint
from router.info import ModuleInfo, ModuleWeights, TaskInfo
from router.library import ModuleLibrary
from training.controller import TaskController
from training.modules import ModuleBank, Point

logger = logging.getLogger(__name__)


def _surviving(bank: ModuleBank, threshold: float) -> set[Point]:
    """The insertion points pruning at `threshold` keeps: those whose insertion gate is at least the threshold."""
    return {p for p, gate in zip(bank.points, bank.insertion_gates().detach().cpu().tolist()) if gate >= threshold}


def prune(bank: ModuleBank, threshold: float) -> dict[int, list[Point]]:
    """Kept points per module (module docstring); marks pruned columns in the bank so it computes the same."""
    gates = dict(zip(bank.points, bank.insertion_gates().detach().cpu().tolist()))
    surviving = _surviving(bank, threshold)
    kept: dict[int, list[Point]] = {}
    for module, spec in enumerate(bank.specs):
        kept[module] = [p for p in spec.points if p in surviving]
        if not kept[module]:
            raise ValueError(
                f"prune_threshold {threshold} removes every insertion point of module {spec.name} (its largest "
                f"insertion gate is {max(gates[p] for p in spec.points):.4f}); lower the threshold"
            )
    with torch.no_grad():
        for adapter in bank.adapters:
            for module, (start, end) in adapter.offsets.items():
                adapter.col_keep[start:end] = float(adapter.point in kept[module])
    removed = sorted({p for spec in bank.specs for p in spec.points} - {p for ps in kept.values() for p in ps})
    logger.info("pruning at %s kept %d of %d insertion points; removed %s", threshold,
                len(bank.points) - len(removed), len(bank.points), removed)
    return kept


@contextlib.contextmanager
def pruned_preview(bank: ModuleBank, threshold: float):
    """Inside, the bank computes as if pruned at `threshold` (prune's rule: a point under it is dropped for every
    module), so a forward pass scores what the library would serve if exported now; the bank is restored after."""
    saved = [adapter.col_keep.clone() for adapter in bank.adapters]
    surviving = _surviving(bank, threshold)
    with torch.no_grad():
        for adapter in bank.adapters:
            adapter.col_keep.mul_(float(adapter.point in surviving))
    try:
        yield
    finally:
        with torch.no_grad():
            for adapter, keep in zip(bank.adapters, saved):
                adapter.col_keep.copy_(keep)


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
        grid = len(set(points)) == len(layers) * len(targets)
        info = ModuleInfo(spec.name, spec.rank, spec.alpha, descriptions[index], targets, layers,
                          None if grid else tuple(points))
        modules[spec.name] = (info, module_weights(bank, index, points))
    settings: ControllerSettings = controller.settings
    return ModuleLibrary.build(backbone, modules, tasks, controller.logits.detach().float().cpu(), settings)
