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

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "layers", tuple(self.layers))
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

    @property
    def scale(self) -> float:
        """alpha / rank, the factor on B @ A."""
        return self.alpha / self.rank

    def to_json(self) -> dict:
        """The module's entry in library.json."""
        return {
            "name": self.name, "rank": self.rank, "alpha": self.alpha, "description": self.description,
            "targets": list(self.targets), "layers": list(self.layers),
        }


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
