"""Evaluating one trained system on held-out items, in every mode that applies to it.

    backbone  `prompted`  no composition, base and composite prompts
    lora      `explicit`  each base task of the item contributes its own module at weight 1 (a composite:
                          both tasks' modules, the LoRA-arithmetic baseline; the shared LoRA: its one module)
    reference `explicit`  composites only, each served by the LoRA trained on it (systems.train_composite_lora)
    tessera   `tagged`    the controller given the item's tag ("a+b" for a composite: both tags)
              `untagged`  `auto`: the text router picks the task from the prompt (base tasks only)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from router.library import ModuleLibrary
from training.suite.data import Item

from benchmarks.quality.evaluate import (
    Policy, ServeConfig, backbone_policy, explicit_policy, serve, tagged_policy, untagged_policy,
)
from benchmarks.quality.metrics import mean_accuracy, task_accuracy, utilisation
from benchmarks.quality.systems import Data, System, eval_items

logger = logging.getLogger(__name__)


def policies(system: System, library: ModuleLibrary | None, untagged: bool) -> dict[str, tuple[Policy, bool]]:
    """Mode -> (policy, whether composites are evaluated in this mode) for `system`."""
    if system.kind == "backbone":
        return {"prompted": (backbone_policy(), True)}
    if system.kind in ("lora", "reference"):
        return {"explicit": (explicit_policy(library, system.task_modules), True)}
    modes = {"tagged": (tagged_policy(library), True)}
    if untagged and library.controller.text_router is not None:
        modes["untagged"] = (untagged_policy(library), False)
    return modes


def score(outcomes, tasks: Sequence[str], composites: Sequence[str]) -> dict:
    """Per-task table and the mean over base tasks (and over composites when they were served)."""
    table = task_accuracy(outcomes)
    record = {"per_task": table, "mean_base": mean_accuracy(table, tasks) if set(tasks) & set(table) else None}
    served = [c for c in composites if c in table]
    record["mean_composite"] = mean_accuracy(table, served) if served else None
    return record


def routing_accuracy(outcomes) -> float:
    """Share of untagged items whose routed task is their true task (a refusal counts as wrong)."""
    outcomes = list(outcomes)
    return sum(o.routed_task == o.task for o in outcomes) / len(outcomes)


def evaluate_system(system: System, model_dir, data: Data, items: Sequence[Item], serve_config: ServeConfig,
                    max_tokens: int, untagged: bool = True, keep_outcomes: bool = True) -> dict:
    """Every mode of `system` (module docstring) on `items`; composites only where the mode serves them."""
    library = ModuleLibrary.load(system.library) if system.library is not None else None
    evaluations = {}
    for mode, (policy, with_composites) in policies(system, library, untagged).items():
        chosen = [item for item in items if with_composites or item.task in data.tasks]
        if system.kind == "reference":  # a reference serves only the tasks it was trained on
            chosen = [item for item in chosen if item.task in system.task_modules]
        outcomes, seconds = serve(model_dir, system.library, eval_items(chosen), policy, serve_config, max_tokens)
        record = score(outcomes, data.tasks, data.composites) | {"seconds": seconds, "num_items": len(outcomes)}
        if mode == "untagged":
            record["routing_accuracy"] = routing_accuracy(outcomes)
        if keep_outcomes:
            record["outcomes"] = [o.to_json() for o in outcomes]
        evaluations[mode] = record
        logger.info("%s %s: mean exact match%s%s (%.1f s)", system.name, mode,
                    "" if record["mean_base"] is None else f" {record['mean_base']:.3f} on base tasks",
                    "" if record["mean_composite"] is None else f" {record['mean_composite']:.3f} on composites",
                    seconds)
    result = {"evaluations": evaluations}
    if system.kind == "tessera":
        result["utilisation"] = utilisation(library, data.tasks)
    return result
