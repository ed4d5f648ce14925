"""Composition rules: a task tag (or `auto` and the prompt), explicit weights, or nothing -> a `Composition`."""

from __future__ import annotations

import math
from collections.abc import Mapping

from router.composition import NO_COMPOSITION, Composition
from router.controller import TASK_JOIN
from router.errors import CompositionError, NoTextRouterError, UnknownModuleError, UnknownTaskError
from router.text import AUTO

NO_LIBRARY = "no module library is loaded"


def compose(
    library, task: str | None = None, modules: Mapping[str, float] | None = None, max_k: int = 4,
    text: str | None = None, tasks: Mapping[str, float] | None = None,
) -> Composition:
    """The composition of one request: at most one of `task`, `modules` and `tasks`.

    A task goes through the library's controller (an unknown task is an error, never a silent fallback
    to the backbone); several tasks joined by `+` (`reverse+uppercase`) compose each task's modules at full
    strength (Controller.gates_for_tasks); the task `auto` routes `text` (the prompt) through the controller's text router,
    which blocks on the sentence encoder; explicit `modules` weights are the gates as given; `tasks` weights
    scale each task's composition before they add (Controller.gates_for_tasks); none is the backbone alone.
    """
    if task is not None and modules is not None:
        raise CompositionError("give either a task or explicit module weights, not both")
    if tasks is not None:
        if task is not None or modules is not None:
            raise CompositionError("give task weights alone, without a task or module weights")
        return weighted_tasks(library, tasks, max_k)
    if task == AUTO:
        if library is None:
            raise NoTextRouterError(f"{NO_LIBRARY}, so {AUTO!r} cannot route prompts")
        return library.controller.route_text(text)
    if task is not None:
        if library is None:
            raise UnknownTaskError(task, [], NO_LIBRARY)
        return library.controller.gates_for_tasks(split_tags(task), max_k)
    if modules is not None:
        return explicit(library, modules, max_k)
    return NO_COMPOSITION


def split_tags(task: str) -> list[str]:
    """The task tags of `task`: one name, or several joined by `+` (`reverse+uppercase`) for a composite.

    Task names never contain `+` (router.info.NAME), so the split is unambiguous.
    """
    parts = task.split(TASK_JOIN)
    if len(parts) > 1 and not all(parts):
        raise CompositionError(f"composite task tag {task!r} has an empty part; join task names with {TASK_JOIN!r}")
    return parts


def weighted_tasks(library, tasks: Mapping[str, float], max_k: int) -> Composition:
    """Task weights (`{"reverse": 1.0, "uppercase": -0.5}`): each task's composition scaled, then summed."""
    if not isinstance(tasks, Mapping) or not tasks:
        raise CompositionError("tasks must be a non-empty object of {task name: weight}")
    if library is None:
        raise UnknownTaskError(next(iter(tasks)), [], NO_LIBRARY)
    for name, weight in tasks.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise CompositionError(f"weight of task {name!r} must be a finite number, got {weight!r}")
    given = {name: float(weight) for name, weight in tasks.items() if weight != 0}
    if not given:
        return NO_COMPOSITION
    return library.controller.gates_for_tasks(list(given), max_k, list(given.values()))


def explicit(library, modules: Mapping[str, float], max_k: int) -> Composition:
    """Explicit weights used as gates as given, in the given order; zero weights dropped. A negative weight
    subtracts its module's delta (task arithmetic's negation: `{"toxic": -1.0}` steers away from what that
    module learned), exactly as a positive one adds it."""
    if not isinstance(modules, Mapping) or not modules:
        raise CompositionError("modules must be a non-empty object of {module name: weight}")
    if max_k < 1:
        raise CompositionError(f"max_k must be >= 1, got {max_k}")
    known = list(library.modules) if library is not None else []
    chosen = []
    for name, weight in modules.items():
        if name not in known:
            raise UnknownModuleError(str(name), known, NO_LIBRARY if library is None else "")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise CompositionError(f"weight of module {name!r} must be a finite number, got {weight!r}")
        if weight != 0:
            chosen.append((name, float(weight)))
    if len(chosen) > max_k:
        raise CompositionError(f"at most {max_k} modules per request, got {len(chosen)}")
    return Composition(tuple(n for n, _ in chosen), tuple(w for _, w in chosen), "explicit")
