"""Composition rules: a request's task tag, explicit weights, or nothing -> a `Composition`."""

from __future__ import annotations

import math
from collections.abc import Mapping

from router.composition import NO_COMPOSITION, Composition
from router.errors import CompositionError, UnknownModuleError, UnknownTaskError


def compose(library, task: str | None = None, modules: Mapping[str, float] | None = None, max_k: int = 4) -> Composition:
    """Exactly one of `task` and `modules`, or neither (the backbone alone). Never a silent fallback."""
    if task is not None and modules is not None:
        raise CompositionError("give either a task or explicit module weights, not both")
    if task is not None:
        if library is None:
            raise UnknownTaskError(task, [], "no module library is loaded")
        return library.controller.gates_for_task(task)
    if modules is not None:
        return explicit(library, modules, max_k)
    return NO_COMPOSITION


def explicit(library, modules: Mapping[str, float], max_k: int) -> Composition:
    """Explicit weights used as gates as given; zero weights dropped."""
    if not isinstance(modules, Mapping) or not modules:
        raise CompositionError("modules must be a non-empty object of {module name: weight}")
    known = list(library.modules) if library is not None else []
    chosen = []
    for name, weight in modules.items():
        if name not in known:
            detail = "no module library is loaded" if library is None else ""
            raise UnknownModuleError(name, known, detail)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise CompositionError(f"weight of module {name!r} must be a finite number >= 0, got {weight!r}")
        if weight > 0:
            chosen.append((name, float(weight)))
    if len(chosen) > max_k:
        raise CompositionError(f"at most {max_k} modules per request, got {len(chosen)}")
    return Composition(tuple(n for n, _ in chosen), tuple(w for _, w in chosen), "explicit")
