"""The task-aware controller: task tag -> gates over modules.

This controller (`type: "task-gates"`) is a learned gate-logit row per task, stored in
controller.safetensors as `task_gate_logits` [num_tasks, num_modules]. Gates are
sigmoid(logit / temperature); the top_k largest are kept, those under the threshold dropped, and the
rest rescaled to sum to one when `renormalize` is set.

Untagged prompts: the controller may carry a `TextRouter` (router/text.py; library.json's
`controller.text_router`, tensors `text_router.*`). `route_text` predicts the prompt's task and returns
that task's gates with source `inferred`; a prompt under `min_confidence` is refused, never guessed.

Seam for richer controllers: library.json names the controller `type`, and `controller_from_files`
dispatches on it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from router.composition import Composition
from router.errors import CompositionError, LibraryError, LowConfidenceError, NoTextRouterError, UnknownTaskError
from router.text import PREFIX, TextRouter, text_router_from_files

logger = logging.getLogger(__name__)

CONTROLLER_TYPES = ("task-gates",)
LOGITS_KEY = "task_gate_logits"
TASK_JOIN = "+"  # joins the task tags of a composite request: `reverse+uppercase`


@dataclass(frozen=True)
class ControllerSettings:
    """How gates become a composition."""

    top_k: int = 2
    """Modules kept per request, the largest gates first."""
    threshold: float = 0.0
    """Gates below this (before renormalising) are dropped after top-k."""
    temperature: float = 1.0
    """Divides the logits before the sigmoid; lower is sharper."""
    renormalize: bool = True
    """Rescale the kept gates to sum to one."""

    def check(self) -> None:
        """Raise LibraryError unless every field has its type and a usable value."""
        ok = (
            isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and self.top_k >= 1
            and isinstance(self.threshold, (int, float)) and 0 <= self.threshold < 1
            and isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
            and self.temperature > 0 and isinstance(self.renormalize, bool)
        )
        if not ok:
            raise LibraryError(
                f"controller settings out of range: {self} (need top_k >= 1, 0 <= threshold < 1, "
                "finite temperature > 0, renormalize a bool)"
            )


class Controller:
    """Task tag -> `Composition`, from a gate-logit matrix over the library's modules."""

    def __init__(
        self, tasks: list[str], modules: list[str], logits: torch.Tensor, settings: ControllerSettings,
        text_router: TextRouter | None = None,
    ):
        settings.check()
        self.tasks = list(tasks)
        self.modules = list(modules)
        self.logits = logits.detach().float().cpu()  # [num_tasks, num_modules]
        self.settings = settings
        self.text_router = text_router  # prompt -> task for requests tagged `auto`; None without one

    def check(self, tasks: list[str], modules: list[str]) -> None:
        """Raise LibraryError unless the controller covers exactly these tasks and modules, in order."""
        if tuple(self.logits.shape) != (len(tasks), len(modules)):
            raise LibraryError(
                f"controller {LOGITS_KEY} has shape {list(self.logits.shape)}, "
                f"expected [num_tasks, num_modules] = [{len(tasks)}, {len(modules)}]"
            )
        if self.tasks != list(tasks) or self.modules != list(modules):
            raise LibraryError(
                f"controller covers tasks {self.tasks} and modules {self.modules}, "
                f"library has tasks {list(tasks)} and modules {list(modules)}"
            )
        if not torch.isfinite(self.logits).all():
            raise LibraryError(f"controller {LOGITS_KEY} contains NaN or Inf")
        if self.text_router is not None and self.text_router.head.num_tasks != len(tasks):
            raise LibraryError(
                f"controller text router predicts {self.text_router.head.num_tasks} tasks, the library has {len(tasks)}"
            )

    def settings_json(self) -> dict:
        """The `controller` object of library.json."""
        meta = {"type": "task-gates", **asdict(self.settings)}
        if self.text_router is not None:
            meta["text_router"] = self.text_router.settings_json()
        return meta

    def tensors(self) -> dict[str, torch.Tensor]:
        """What controller.safetensors holds."""
        router = self.text_router.tensors() if self.text_router is not None else {}
        return {LOGITS_KEY: self.logits.contiguous(), **router}

    def with_text_router(self, text_router: TextRouter | None) -> "Controller":
        """This controller with `text_router` attached (None: detached)."""
        return Controller(self.tasks, self.modules, self.logits, self.settings, text_router)

    def with_module_column(self, module: str, logit: float) -> "Controller":
        """A controller with one more module, `module`, whose logit is `logit` for every task."""
        column = torch.full((len(self.tasks), 1), float(logit))  # [num_tasks, 1]
        logits = torch.cat([self.logits, column], dim=1)  # [num_tasks, num_modules + 1]
        return Controller(self.tasks, [*self.modules, module], logits, self.settings, self.text_router)

    def without_module_column(self, module: str) -> "Controller":
        """A controller without `module`'s column (the other modules keep their logits)."""
        keep = [i for i, name in enumerate(self.modules) if name != module]
        return Controller(self.tasks, [self.modules[i] for i in keep], self.logits[:, keep], self.settings,
                          self.text_router)

    def gates_for_task(self, task: str) -> Composition:
        """The composition the controller gives `task`, modules ordered by gate, largest first."""
        if task not in self.tasks:
            raise UnknownTaskError(task, self.tasks)
        s = self.settings
        gates = torch.sigmoid(self.logits[self.tasks.index(task)] / s.temperature)  # [num_modules]
        order = torch.argsort(gates, descending=True, stable=True)[: s.top_k].tolist()
        values = gates.tolist()
        # a gate of exactly 0 (a logit far below zero) adds nothing: it never takes a slot, whatever the threshold
        chosen = [(self.modules[i], values[i]) for i in order if values[i] >= s.threshold and values[i] > 0]
        if not chosen:
            logger.info("task %r: every gate is under the threshold %s; backbone only", task, s.threshold)
        if s.renormalize and chosen:
            total = sum(g for _, g in chosen)
            chosen = [(m, g / total) for m, g in chosen]
        return Composition(tuple(m for m, _ in chosen), tuple(g for _, g in chosen), "tag", task)

    def gates_for_tasks(self, tasks: Sequence[str], max_k: int, weights: Sequence[float] | None = None) -> Composition:
        """The composition of several task tags at once (a composite request such as `reverse+uppercase`).

        Each task's own composition (`gates_for_task`) is applied at full strength, or scaled by its entry of
        `weights` (task arithmetic: 0.5 is half the task, -1 subtracts it), so the module deltas add as in
        LoRA arithmetic: a module chosen by two tasks gets the sum of its scaled gates, and one whose sum is
        exactly 0 is left out. Modules are ordered by the size of that sum, largest first, and at most `max_k`
        are kept (CompositionError when the union is larger, never a silent cut). One task at full strength
        is exactly `gates_for_task`.
        """
        if not tasks or len(set(tasks)) != len(tasks):
            raise CompositionError(f"a composite tag names each task once, got {list(tasks)}")
        if weights is not None and len(weights) != len(tasks):
            raise CompositionError(f"{len(tasks)} tasks but {len(weights)} weights")
        if len(tasks) == 1 and weights is None:
            return self.gates_for_task(tasks[0])
        summed: dict[str, float] = {}
        for part, weight in zip((self.gates_for_task(task) for task in tasks), weights or [1.0] * len(tasks)):
            for module, gate in zip(part.module_ids, part.gates):
                summed[module] = summed.get(module, 0.0) + weight * gate
        summed = {module: gate for module, gate in summed.items() if gate != 0.0}
        if len(summed) > max_k:
            raise CompositionError(
                f"tasks {list(tasks)} together use {len(summed)} modules, more than the {max_k} a request may use"
            )
        chosen = sorted(summed.items(), key=lambda item: -abs(item[1]))
        return Composition(tuple(m for m, _ in chosen), tuple(g for _, g in chosen), "tag", TASK_JOIN.join(tasks))

    def route_text(self, text: str) -> Composition:
        """The composition of an untagged prompt: its predicted task's gates, with source `inferred`.

        Raises NoTextRouterError without a text router, LowConfidenceError when the top task's
        probability is under the router's `min_confidence`, CompositionError for a blank prompt.
        Blocking (runs the sentence encoder): call it off the event loop.
        """
        if self.text_router is None:
            raise NoTextRouterError("the module library has no text router, so 'auto' cannot route prompts; tag a task")
        if not isinstance(text, str) or not text.strip():
            raise CompositionError("text routing needs a non-empty prompt")
        index, confidence = self.text_router.classify([text])[0]
        task = self.tasks[index]
        floor = self.text_router.settings.min_confidence
        if confidence < floor:
            raise LowConfidenceError(task, confidence, floor)
        logger.debug("routed a %d-character prompt to task %r (p=%.3f)", len(text), task, confidence)
        return dataclasses.replace(self.gates_for_task(task), source="inferred")


def controller_from_files(
    meta: dict, tensors: dict[str, torch.Tensor], tasks: list[str], modules: list[str]
) -> Controller:
    """Build and check the controller that library.json's `controller` object and its tensors describe."""
    if not isinstance(meta, dict):
        raise LibraryError(f"library.json: controller must be an object, got {meta!r}")
    kind = meta.get("type")
    if kind not in CONTROLLER_TYPES:
        raise LibraryError(f"library.json: controller type {kind!r} is not supported; supported: {CONTROLLER_TYPES}")
    router_tensors = {k: v for k, v in tensors.items() if k.startswith(PREFIX)}
    if set(tensors) - set(router_tensors) != {LOGITS_KEY}:
        raise LibraryError(f"controller.safetensors must hold exactly {LOGITS_KEY}, has {sorted(tensors)}")
    logits = tensors[LOGITS_KEY]
    if not logits.is_floating_point():
        raise LibraryError(f"controller {LOGITS_KEY} has dtype {logits.dtype}, expected a floating dtype")
    unknown = set(meta) - {"type", "top_k", "threshold", "temperature", "renormalize", "text_router"}
    if unknown:
        raise LibraryError(f"library.json: unknown controller settings {sorted(unknown)}")
    text_router = None
    if "text_router" in meta:
        text_router = text_router_from_files(meta["text_router"], router_tensors, len(tasks))
    elif router_tensors:
        raise LibraryError(
            f"controller.safetensors holds text router tensors {sorted(router_tensors)}, "
            "but library.json's controller has no text_router"
        )
    settings = ControllerSettings(**{k: v for k, v in meta.items() if k not in ("type", "text_router")})
    controller = Controller(tasks, modules, logits, settings, text_router)
    controller.check(tasks, modules)
    return controller
