"""Metadata of modules and tasks, and the name rule both follow."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from router.errors import LibraryError
from router.fingerprint import TARGETS

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
"""Module and task names: no ':' (a model name is `backbone:task`) and no '/' (names appear in paths)."""

ModuleWeights = dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
"""(layer index, target) -> (A [rank, in_features], B [out_features, rank])."""


def check_name(kind: str, name: object) -> str:
    """Return `name` if it is a valid module or task name, else raise LibraryError."""
    if not isinstance(name, str) or not NAME.match(name):
        raise LibraryError(
            f"{kind} name {name!r} is invalid: start with a letter or digit, then letters, digits, '.', '_', '-' "
            "(at most 64 characters)"
        )
    return name


@dataclass(frozen=True)
class ModuleInfo:
    """One module's metadata; it adapts every target in `targets` in every layer of `layers`."""

    name: str
    """Module id, unique in its library."""
    rank: int
    """Rank r: A is [r, in_features], B is [out_features, r]."""
    alpha: float
    """LoRA alpha; the update is (alpha / r) * B @ A."""
    description: str = ""
    """Free text shown to operators."""
    targets: tuple[str, ...] = TARGETS
    """Targets it adapts, a subset of TARGETS."""
    layers: tuple[int, ...] = ()
    """Decoder layer indices it adapts."""
    points: tuple[tuple[int, str], ...] | None = None
    """The (layer, target) points it adapts when they are not the whole `layers` x `targets` grid (a pruned
    or searched placement); every layer and target above appears in some point. None: the whole grid."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "layers", tuple(self.layers))
        if self.points is not None:
            object.__setattr__(self, "points", tuple((layer, target) for layer, target in self.points))
        check_name("module", self.name)
        where = f"module {self.name}"
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise LibraryError(f"{where}: rank must be an integer >= 1, got {self.rank!r}")
        alpha_ok = isinstance(self.alpha, (int, float)) and not isinstance(self.alpha, bool)
        if not alpha_ok or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise LibraryError(f"{where}: alpha must be a finite number > 0, got {self.alpha!r}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown:
            raise LibraryError(f"{where}: unknown target {unknown[0]!r}; targets are {TARGETS}")
        if not self.targets or len(set(self.targets)) != len(self.targets):
            raise LibraryError(f"{where}: targets must be non-empty and distinct, got {list(self.targets)}")
        if not self.layers or len(set(self.layers)) != len(self.layers):
            raise LibraryError(f"{where}: layers must be non-empty and distinct, got {list(self.layers)}")
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in self.layers):
            raise LibraryError(f"{where}: layer indices must be integers >= 0, got {list(self.layers)}")
        if self.points is not None:
            self._check_points(where)

    def _check_points(self, where: str) -> None:
        points = set(self.points)
        if len(points) != len(self.points):
            raise LibraryError(f"{where}: points repeat a (layer, target)")
        outside = [p for p in self.points if p[0] not in self.layers or p[1] not in self.targets]
        if outside:
            raise LibraryError(f"{where}: point {list(outside[0])} is outside its layers x targets")
        unused = [t for t in self.targets if all(t != target for _, target in points)]
        unused += [i for i in self.layers if all(i != layer for layer, _ in points)]
        if unused:
            raise LibraryError(f"{where}: {unused[0]!r} is declared but used by no point")

    @property
    def all_points(self) -> list[tuple[int, str]]:
        """Every (layer, target) it adapts, in (layer, TARGETS) order."""
        grid = [(layer, target) for layer in sorted(self.layers) for target in TARGETS if target in self.targets]
        return grid if self.points is None else [p for p in grid if p in set(self.points)]

    @property
    def scale(self) -> float:
        """alpha / rank, the factor on B @ A."""
        return self.alpha / self.rank

    def to_json(self) -> dict:
        """The module's entry in library.json."""
        return {
            "name": self.name, "rank": self.rank, "alpha": self.alpha, "description": self.description,
            "targets": list(self.targets), "layers": list(self.layers),
        } | ({} if self.points is None else {"points": [[layer, target] for layer, target in self.all_points]})


@dataclass(frozen=True)
class TaskInfo:
    """A task the controller knows; requests name it as a tag."""

    name: str
    """Task tag, unique in its library."""
    description: str = ""
    """Free text shown to operators and in the model list."""

    def __post_init__(self) -> None:
        check_name("task", self.name)

    def to_json(self) -> dict:
        """The task's entry in library.json."""
        return {"name": self.name, "description": self.description}
