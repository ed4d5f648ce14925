"""The task-aware controller: task tag -> gates over modules.

This controller is a learned gate-logit row per task (`task-gates`). Gates are
sigmoid(logit / temperature); the top_k largest are kept, those under the threshold dropped, and the
rest renormalised to sum to one when the settings say so. Richer controllers (text routing of untagged
prompts, trained by `training/`) are further values of the `type` field.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from router.composition import Composition
from router.errors import LibraryError, UnknownTaskError

CONTROLLER_TYPES = ("task-gates",)


@dataclass(frozen=True)
class ControllerSettings:
    """How gates become a composition."""

    top_k: int = 2
    """Modules kept per request, the largest gates first."""
    threshold: float = 0.0
    """Gates below this are dropped (after top-k)."""
    temperature: float = 1.0
    """Divides the logits before the sigmoid; lower is sharper."""
    renormalize: bool = True
    """Rescale the kept gates to sum to one."""

    def check(self) -> None:
        if self.top_k < 1 or not 0 <= self.threshold < 1 or not self.temperature > 0:
            raise LibraryError(f"controller settings out of range: {self}")


class Controller:
    def __init__(self, tasks: list[str], modules: list[str], logits: torch.Tensor, settings: ControllerSettings):
        self.tasks = list(tasks)
        self.modules = list(modules)
        self.logits = logits.float()  # [num_tasks, num_modules]
        self.settings = settings
        settings.check()

    def check(self, tasks: list[str], modules: list[str]) -> None:
        """The controller must cover exactly these tasks and modules, in this order."""
        if self.tasks != tasks or self.modules != modules:
            raise LibraryError("controller tasks/modules do not match library.json")
        if tuple(self.logits.shape) != (len(tasks), len(modules)):
            raise LibraryError(
                f"controller task_gate_logits has shape {list(self.logits.shape)}, expected [{len(tasks)}, {len(modules)}]"
            )
        if not torch.isfinite(self.logits).all():
            raise LibraryError("controller task_gate_logits contains NaN or Inf")

    @classmethod
    def from_files(cls, meta: dict, tensors: dict[str, torch.Tensor], tasks: list[str], modules: list[str]) -> "Controller":
        kind = meta.get("type", "task-gates")
        if kind not in CONTROLLER_TYPES:
            raise LibraryError(f"controller type {kind!r} is not supported; supported: {CONTROLLER_TYPES}")
        if set(tensors) != {"task_gate_logits"}:
            raise LibraryError(f"controller.safetensors must hold exactly task_gate_logits, has {sorted(tensors)}")
        fields = {k: meta[k] for k in ("top_k", "threshold", "temperature", "renormalize") if k in meta}
        try:
            settings = ControllerSettings(**fields)
        except TypeError as error:
            raise LibraryError(f"library.json: bad controller settings ({error})") from error
        controller = cls(tasks, modules, tensors["task_gate_logits"], settings)
        controller.check(tasks, modules)
        return controller

    def settings_json(self) -> dict:
        return {"type": "task-gates", **asdict(self.settings)}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"task_gate_logits": self.logits.contiguous()}

    def with_module_column(self, logit: float) -> "Controller":
        column = torch.full((len(self.tasks), 1), logit)
        return Controller(self.tasks, self.modules, torch.cat([self.logits, column], dim=1), self.settings)

    def gates_for_task(self, task: str) -> Composition:
        """The composition the controller gives `task`."""
        if task not in self.tasks:
            raise UnknownTaskError(task, self.tasks)
        s = self.settings
        gates = torch.sigmoid(self.logits[self.tasks.index(task)] / s.temperature)  # [num_modules]
        order = torch.argsort(gates, descending=True, stable=True)[: s.top_k].tolist()
        chosen = [(self.modules[i], float(gates[i])) for i in order if float(gates[i]) >= s.threshold]
        if s.renormalize and chosen:
            total = sum(g for _, g in chosen)
            chosen = [(m, g / total) for m, g in chosen]
        chosen = [(m, g) for m, g in chosen if math.isfinite(g)]
        return Composition(tuple(m for m, _ in chosen), tuple(g for _, g in chosen), "tag", task)
