"""Scoring: exact match per item, accuracy per task, module utilisation of a controller.

Exact match: the generated text (the engine's detokenized output; special tokens such as the end-of-turn
token are not part of it) equals the reference answer character for character, and generation ended by
itself (finish reason `stop`), not by running into max_tokens. Nothing is stripped or normalised.

Utilisation: for every task t the controller's composition gives gates g_tj over its chosen modules;
module j carries the share g_tj / sum_i g_ti of task t's gate mass. A module is *used* when it carries at
least `MIN_SHARE` (5%) of some task's gate mass; utilisation = used modules / modules in the library.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from router.library import ModuleLibrary

MIN_SHARE = 0.05
"""A module is used by a task when it carries at least this share of the task's gate mass."""


@dataclass(frozen=True)
class Outcome:
    """One held-out item served by one system."""

    task: str
    """The item's task name ("a+b" for a composite)."""
    input: str
    """The task input the prompt was built from."""
    answer: str
    """The reference answer."""
    output: str
    """The generated text."""
    finish_reason: str
    """How generation ended: `stop` (end of turn) or `length` (max_tokens)."""
    modules: tuple[str, ...]
    """Modules of the composition it was served with (empty: backbone alone)."""
    gates: tuple[float, ...]
    """Their gates."""
    routed_task: str | None = None
    """For untagged requests: the task the text router chose (None when it refused the prompt)."""
    correct: bool = False
    """Exact match of output and answer (module docstring)."""

    def to_json(self) -> dict:
        return asdict(self) | {"modules": list(self.modules), "gates": list(self.gates)}


def exact_match(output: str, answer: str, finish_reason: str) -> bool:
    """True when `output` is exactly `answer` and generation stopped by itself."""
    return finish_reason == "stop" and output == answer


def task_accuracy(outcomes: Iterable[Outcome]) -> dict[str, dict]:
    """Task -> {"correct", "total", "accuracy"}, tasks in order of first appearance."""
    table: dict[str, dict] = {}
    for outcome in outcomes:
        row = table.setdefault(outcome.task, {"correct": 0, "total": 0})
        row["correct"] += int(outcome.correct)
        row["total"] += 1
    for row in table.values():
        row["accuracy"] = row["correct"] / row["total"]
    return table


def mean_accuracy(table: dict[str, dict], tasks: Sequence[str]) -> float:
    """Unweighted mean of the accuracies of `tasks` in a task_accuracy table."""
    missing = [t for t in tasks if t not in table]
    if missing or not tasks:
        raise ValueError(f"mean_accuracy: tasks {missing or list(tasks)} have no outcomes")
    return sum(table[t]["accuracy"] for t in tasks) / len(tasks)


def gate_shares(library: ModuleLibrary, tasks: Sequence[str]) -> dict[str, dict[str, float]]:
    """Task -> {module: share of the task's gate mass} from the controller's composition for that task."""
    shares = {}
    for task in tasks:
        composition = library.controller.gates_for_task(task)
        total = sum(composition.gates)
        shares[task] = {m: g / total for m, g in zip(composition.module_ids, composition.gates)} if total > 0 else {}
    return shares


def utilisation(library: ModuleLibrary, tasks: Sequence[str], min_share: float = MIN_SHARE) -> dict:
    """Used modules (module docstring), their share of the library, and each task's gate shares."""
    shares = gate_shares(library, tasks)
    used = [m for m in library.modules if any(s.get(m, 0.0) >= min_share for s in shares.values())]
    return {
        "definition": f"share of the library's modules that carry >= {min_share:.0%} of some task's gate mass "
                      "in the controller's composition for that task",
        "min_share": min_share,
        "used_modules": used,
        "num_modules": len(library.modules),
        "utilisation": len(used) / len(library.modules),
        "gate_shares": shares,
    }
