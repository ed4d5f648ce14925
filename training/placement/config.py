"""The placement search's config and its result."""

from __future__ import annotations

from dataclasses import dataclass

Point = tuple[int, str]
"""An insertion point: (layer index, target name from `router.fingerprint.TARGETS`)."""


@dataclass(frozen=True)
class PlacementConfig:
    """Settings of `search_placement`; exactly one of `budget_params` and `budget_fraction` is set."""

    sketch_dim: int = 64
    """Count-sketch width per block and task (buckets a block's gradient is hashed into)."""
    batches_per_task: int = 2
    """Batches of each task sent through the frozen backbone; a task needs at least this many."""
    knn: int = 8
    """Neighbours kept per block in the similarity graph before symmetrising."""
    num_clusters: int = 4
    """Clusters of blocks found by spectral clustering."""
    block_width: int = 64
    """Width of the intermediate-neuron blocks of gate_proj, up_proj and down_proj (last one may be narrower)."""
    budget_params: int | None = None
    """Budget as a count of module parameters, summed over all chosen points and modules."""
    budget_fraction: float | None = 0.25
    """Budget as a fraction in (0, 1] of the cost of placing modules at every point."""
    rank: int = 8
    """Rank r of every module at every point."""
    num_modules: int = 1
    """Modules that will be placed at each chosen point (the cost scales with it)."""
    seed: int = 0
    """Seed of the sketch hashes, the probe adapters and k-means; the search is deterministic given it."""
    probe_points: int = 8
    """Points where a short adapter training measures the loss drop the gain predictor is fitted to."""
    probe_steps: int = 4
    """Adam steps of each probe adapter (full batch over the task's batches)."""
    probe_lr: float = 1e-2
    """Learning rate of the probe adapters."""
    ridge: float = 0.1
    """Ridge strength of the gain fit, relative to the mean squared feature value."""
    kmeans_restarts: int = 4
    """k-means runs from different k-means++ seeds; the one with the lowest inertia wins."""

    def __post_init__(self) -> None:
        positive = ("sketch_dim", "batches_per_task", "knn", "num_clusters", "block_width", "rank",
                    "num_modules", "probe_steps", "kmeans_restarts")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"PlacementConfig.{name} must be an integer >= 1, got {value!r}")
        if self.probe_points < 2:
            raise ValueError(f"PlacementConfig.probe_points must be >= 2 to fit the gain, got {self.probe_points}")
        if not self.probe_lr > 0 or not self.ridge > 0:
            raise ValueError(f"probe_lr and ridge must be > 0, got {self.probe_lr} and {self.ridge}")
        if (self.budget_params is None) == (self.budget_fraction is None):
            raise ValueError("set exactly one of PlacementConfig.budget_params and budget_fraction")
        if self.budget_params is not None and self.budget_params < 1:
            raise ValueError(f"PlacementConfig.budget_params must be >= 1, got {self.budget_params}")
        if self.budget_fraction is not None and not 0 < self.budget_fraction <= 1:
            raise ValueError(f"PlacementConfig.budget_fraction must be in (0, 1], got {self.budget_fraction}")

    def budget(self, all_points_cost: int) -> int:
        """The budget in parameters, given the cost of placing modules at every point."""
        if self.budget_params is not None:
            return self.budget_params
        return int(self.budget_fraction * all_points_cost)


@dataclass(frozen=True)
class Placement:
    """Where modules go: the chosen points and the evidence for them."""

    points: list[Point]
    """Chosen insertion points, sorted by (layer, target order)."""
    total_cost: int
    """Module parameters of the chosen points: sum of rank * (in + out) * num_modules."""
    budget: int
    """The budget in parameters the selection respected."""
    predicted_gain: float
    """Sum of the chosen points' predicted gains (predicted loss drop, summed over tasks)."""
    scores: dict[Point, float]
    """Predicted gain of every point, chosen or not."""
    costs: dict[Point, int]
    """Parameter cost of every point."""
    block_clusters: list[int]
    """Cluster of every block, in `blocks` order."""
    blocks: list[tuple[int, str, int]]
    """(layer, target, index within the point) of every block, in enumeration order."""
    point_clusters: dict[Point, int]
    """Dominant cluster of every point (the cluster holding most of its blocks' gradient energy)."""
    probes: dict[Point, float]
    """Measured loss drop (summed over tasks) at the probed points."""
    fit_r2: float
    """Coefficient of determination of the gain predictor on the probes it was fitted to."""
    fit_loo_r2: float
    """Leave-one-out R^2 of the gain predictor on the probes (its honest accuracy; can be negative)."""

    def to_json(self) -> dict:
        """A JSON-ready report (points as "layer:target" strings in the maps)."""

        def key(point: Point) -> str:
            return f"{point[0]}:{point[1]}"

        return {
            "points": [[layer, target] for layer, target in self.points],
            "total_cost": self.total_cost,
            "budget": self.budget,
            "predicted_gain": self.predicted_gain,
            "scores": {key(p): s for p, s in self.scores.items()},
            "costs": {key(p): c for p, c in self.costs.items()},
            "point_clusters": {key(p): c for p, c in self.point_clusters.items()},
            "probes": {key(p): d for p, d in self.probes.items()},
            "fit_r2": self.fit_r2,
            "fit_loo_r2": self.fit_loo_r2,
            "block_clusters": list(self.block_clusters),
            "blocks": [list(block) for block in self.blocks],
        }
