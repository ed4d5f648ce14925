"""The composition a request is served with: which modules, with which gates.

A `Composition` is what crosses from `router/` to the engine. It is frozen and hashable, so the engine
can group requests that share one and the module pool can key residency on its module ids.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

CompositionSource = Literal["tag", "explicit", "inferred", "none"]


@dataclass(frozen=True)
class Composition:
    """A weighted set of modules for one request.

    `module_ids[j]` is applied with gate `gates[j]`; the layer adds
    `gates[j] * (alpha_j / r_j) * B_j (A_j x)` for every j. An empty composition means backbone only.
    """

    module_ids: tuple[str, ...] = ()
    """Module names, in the order of `gates`; no duplicates."""
    gates: tuple[float, ...] = ()
    """One finite gate per module."""
    source: CompositionSource = "none"
    """How it was chosen: a task tag, explicit weights, inferred from the prompt, or none."""
    task: str | None = None
    """The task tag that produced it (source `tag` or `inferred`), for metrics and the response echo."""

    def __post_init__(self) -> None:
        if len(self.module_ids) != len(self.gates):
            raise ValueError(
                f"composition has {len(self.module_ids)} module ids but {len(self.gates)} gates"
            )
        if len(set(self.module_ids)) != len(self.module_ids):
            raise ValueError(f"composition repeats a module: {list(self.module_ids)}")
        for name, gate in zip(self.module_ids, self.gates):
            if not math.isfinite(gate):
                raise ValueError(f"gate of module {name!r} is not finite: {gate}")

    @property
    def k(self) -> int:
        """Number of modules in the composition."""
        return len(self.module_ids)

    def as_dict(self) -> dict:
        """JSON-ready form, echoed to clients as `tessera.composition`."""
        return {
            "modules": {m: g for m, g in zip(self.module_ids, self.gates)},
            "source": self.source,
            "task": self.task,
        }


NO_COMPOSITION = Composition()
