"""Trainable-parameter counts and the equal-parameter rank of the LoRA baselines.

A LoRA of rank r on a set of insertion points costs r * sum over points of (in + out) weights
(A is [r, in], B is [out, r]). Tessera trains, besides its N modules of rank R on every point, one
insertion-gate logit per point and one controller logit per (task, module):

    tessera_trained = N * R * cost(points) + len(points) + num_tasks * N
    lora_total(r)   = num_adapters * r * cost(points)

`equal_param_rank` picks the one rank r shared by all adapters whose total is closest to a target
(ties go to the larger rank, so the baseline is never the smaller one by a tie).
"""

from __future__ import annotations

from collections.abc import Sequence

from router.fingerprint import BackboneFingerprint
from router.library import ModuleLibrary

Point = tuple[int, str]


def all_points(backbone: BackboneFingerprint, targets: Sequence[str]) -> list[Point]:
    """Every (layer, target) of the backbone for the given targets: Tessera's placement `all`."""
    return [(layer, target) for layer in range(backbone.num_layers) for target in targets]


def rank_cost(backbone: BackboneFingerprint, points: Sequence[Point]) -> int:
    """Weights one unit of rank costs over `points`: sum of (in + out)."""
    if not points:
        raise ValueError("rank_cost needs at least one insertion point")
    return sum(sum(backbone.shape(target)) for _, target in points)


def tessera_trained_params(backbone: BackboneFingerprint, points: Sequence[Point], num_modules: int, rank: int,
                           num_tasks: int) -> dict[str, int]:
    """What `train_library` trains when every module sits on `points` (placement `all`: every layer x targets;
    `search`: the search's choice): module weights, insertion gates, controller logits."""
    counts = {
        "modules": num_modules * rank * rank_cost(backbone, points),
        "insertion_gates": len(points),
        "controller": num_tasks * num_modules,
    }
    return counts | {"total": sum(counts.values())}


def equal_param_rank(target: int, num_adapters: int, cost: int) -> int:
    """The rank r >= 1 that makes num_adapters * r * cost closest to `target` (ties: the larger r)."""
    if target < 1 or num_adapters < 1 or cost < 1:
        raise ValueError(f"equal_param_rank needs positive sizes, got target={target}, "
                         f"num_adapters={num_adapters}, cost={cost}")
    unit = num_adapters * cost
    low = max(target // unit, 1)
    candidates = (low, low + 1)
    return min(candidates, key=lambda r: (abs(r * unit - target), -r))


def library_params(library: ModuleLibrary) -> int:
    """Module weights a library holds on disk: every A and B element of every module."""
    return sum(a.numel() + b.numel() for weights in library.weights.values() for a, b in weights.values())


def module_params(library: ModuleLibrary, names: Sequence[str]) -> int:
    """A and B elements of the named modules of `library`."""
    return sum(a.numel() + b.numel() for name in names for a, b in library.module_weights(name).values())
