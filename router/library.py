"""The module library: read, validate and write the on-disk format of DESIGN.md.

    library/
      library.json          format, version, backbone fingerprint, targets, modules, tasks, controller
      modules.safetensors   "{module}.layers.{i}.{target}.lora_A" [rank, in] and ".lora_B" [out, rank]
      controller.safetensors  "task_gate_logits" [num_tasks, num_modules], optional "text_router.*"

Loading validates everything before returning: shapes against the fingerprint, ranks, targets, layer
indices, NaN/Inf, missing or extra tensors, and that every file resolves inside the library root.
Constructing a library in memory runs the same checks, so no path yields an unchecked library.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from router.atomic import write_directory
from router.controller import Controller, ControllerSettings, controller_from_files
from router.errors import LibraryError, UnknownModuleError
from router.fingerprint import TARGETS, BackboneFingerprint, fingerprint_from_hf_config
from router.info import ModuleInfo, ModuleWeights, TaskInfo, check_name
from router.text import AUTO, TextRouter, TextRouterHead, TextRouterSettings
from router.validate import (
    FILES, FORMAT, VERSION, check_module_weights, parse_modules, parse_tasks, read_json, read_tensors,
    resolve_inside, take_module_tensors, tensor_key,
)

__all__ = [
    "TARGETS", "BackboneFingerprint", "ControllerSettings", "LibraryView", "ModuleInfo", "ModuleLibrary",
    "ModuleWeights", "TaskInfo", "fingerprint_from_hf_config", "random_library",
]

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class ModuleLibrary:
    """Modules, tasks and controller, validated against one backbone fingerprint."""

    backbone: BackboneFingerprint
    """The backbone every module fits."""
    modules: dict[str, ModuleInfo]
    """Module name -> metadata, in library order (the controller's column order)."""
    tasks: dict[str, TaskInfo]
    """Task name -> metadata, in library order (the controller's row order)."""
    controller: Controller
    """Task tag -> composition."""
    weights: dict[str, ModuleWeights] = field(repr=False, default_factory=dict)
    """Module name -> (layer, target) -> (A [rank, in], B [out, rank]), fp32 on the CPU."""

    def __post_init__(self) -> None:
        self.backbone.check()
        for name, info in self.modules.items():
            if name != info.name:
                raise LibraryError(f"module registered as {name!r} is named {info.name!r}")
        for name, task in self.tasks.items():
            if name != task.name:
                raise LibraryError(f"task registered as {name!r} is named {task.name!r}")
        if AUTO in self.tasks or AUTO in self.modules:
            kind = "task" if AUTO in self.tasks else "module"
            raise LibraryError(f"{kind} name {AUTO!r} is reserved: requests use it to ask for text routing")
        if set(self.weights) != set(self.modules):
            raise LibraryError(
                f"weights are given for modules {sorted(self.weights)}, the library declares {sorted(self.modules)}"
            )
        self.weights = {
            name: check_module_weights(info, self.backbone, self.weights[name]) for name, info in self.modules.items()
        }
        self.controller.check(list(self.tasks), list(self.modules))

    @classmethod
    def build(
        cls,
        backbone: BackboneFingerprint,
        modules: Mapping[str, tuple[ModuleInfo, ModuleWeights]],
        tasks: Sequence[TaskInfo],
        controller: Controller | torch.Tensor,
        settings: ControllerSettings = ControllerSettings(),
    ) -> "ModuleLibrary":
        """A checked library from tensors; `controller` may be gate logits [num_tasks, num_modules]."""
        infos = {name: info for name, (info, _) in modules.items()}
        if isinstance(controller, torch.Tensor):
            controller = Controller([t.name for t in tasks], list(infos), controller, settings)
        return cls(
            backbone, infos, {t.name: t for t in tasks}, controller, {n: w for n, (_, w) in modules.items()}
        )

    def module_weights(self, name: str) -> ModuleWeights:
        """(layer, target) -> (A [rank, in], B [out, rank]), fp32 on the CPU."""
        if name not in self.weights:
            raise UnknownModuleError(name, list(self.modules))
        return self.weights[name]

    def view(self) -> "LibraryView":
        """This library without its module weights (`LibraryView`)."""
        return LibraryView(self.backbone, dict(self.modules), dict(self.tasks), self.controller)

    @classmethod
    def load(cls, path: str | Path, expect: BackboneFingerprint | None = None) -> "ModuleLibrary":
        """Read and validate a library directory; nothing is returned unless all of it is valid."""
        root = Path(path).resolve()
        if not root.is_dir():
            raise LibraryError(f"module library {path} is not a directory")
        meta_path, modules_path, controller_path = (resolve_inside(root, name) for name in FILES)
        meta = read_json(meta_path)
        backbone = BackboneFingerprint.from_json(meta.get("backbone"))
        if expect is not None:
            backbone.check_compatible(expect)
        modules = parse_modules(meta, backbone)
        tasks = parse_tasks(meta)
        tensors = read_tensors(modules_path)
        weights = {info.name: take_module_tensors(info, tensors) for info in modules}
        if tensors:
            raise LibraryError(f"modules.safetensors has tensors no module declares: {sorted(tensors)[:5]}")
        controller = controller_from_files(
            meta.get("controller"), read_tensors(controller_path), [t.name for t in tasks], [m.name for m in modules]
        )
        library = cls(backbone, {m.name: m for m in modules}, {t.name: t for t in tasks}, controller, weights)
        logger.info("loaded module library %s: %d modules, %d tasks", root, len(modules), len(tasks))
        return library

    def write(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the library directory atomically (see router.atomic); returns its absolute path."""

        def fill(tmp: Path) -> None:
            (tmp / "library.json").write_text(json.dumps(self.to_json(), indent=2), encoding="utf-8")
            save_file(self.flat_tensors(), str(tmp / "modules.safetensors"))
            save_file(self.controller.tensors(), str(tmp / "controller.safetensors"))

        return write_directory(Path(path), fill, overwrite)

    def flat_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors of modules.safetensors, keyed "{module}.layers.{i}.{target}.lora_A|lora_B"."""
        return {
            tensor_key(name, layer, target, part): tensor
            for name, weights in self.weights.items()
            for (layer, target), pair in weights.items()
            for part, tensor in zip(("lora_A", "lora_B"), pair)
        }

    def to_json(self) -> dict:
        """library.json."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "backbone": self.backbone.to_json(),
            "targets": [t for t in TARGETS if any(t in m.targets for m in self.modules.values())],
            "modules": [m.to_json() for m in self.modules.values()],
            "tasks": [t.to_json() for t in self.tasks.values()],
            "controller": self.controller.settings_json(),
        }

    def with_text_router(
        self, head: TextRouterHead, settings: TextRouterSettings = TextRouterSettings()
    ) -> "ModuleLibrary":
        """A new library whose controller routes untagged prompts with `head` (one output per task, in order).

        The head is checked (shapes against the tasks and the encoder, finite values) and copied.
        """
        router = TextRouter(head, settings, len(self.tasks))
        return ModuleLibrary(
            self.backbone, dict(self.modules), dict(self.tasks), self.controller.with_text_router(router),
            dict(self.weights),
        )

    def with_module(self, info: ModuleInfo, weights: ModuleWeights, task_logit: float = -10.0) -> "ModuleLibrary":
        """A new library with one more module; its controller logit is `task_logit` for every task.

        The default logit (-10, a gate of 5e-5) keeps the new module out of every task's top-k until a
        controller is trained; explicit weights can use it at once.
        """
        if info.name in self.modules:
            raise LibraryError(f"module {info.name!r} already exists in the library")
        return ModuleLibrary(
            self.backbone, {**self.modules, info.name: info}, dict(self.tasks),
            self.controller.with_module_column(info.name, task_logit), {**self.weights, info.name: weights},
        )

    def without_module(self, name: str) -> "ModuleLibrary":
        """A new library without module `name`; LibraryError if a task's composition uses it."""
        if name not in self.modules:
            raise UnknownModuleError(name, list(self.modules))
        users = [task for task in self.tasks if name in self.controller.gates_for_task(task).module_ids]
        if users:
            raise LibraryError(f"module {name!r} is in the compositions of tasks {users}; it cannot be removed")
        return ModuleLibrary(
            self.backbone, {k: v for k, v in self.modules.items() if k != name}, dict(self.tasks),
            self.controller.without_module_column(name), {k: v for k, v in self.weights.items() if k != name},
        )


@dataclass(frozen=True, eq=False)
class LibraryView:
    """What a checked `ModuleLibrary` says, without its module weights: names, ranks, tasks and the controller,
    all that routing a request needs. The API process of an engine in a process of its own (`server.engine.process`)
    routes with one while the weights, gigabytes for a large library, stay with the engine."""

    backbone: BackboneFingerprint
    modules: dict[str, ModuleInfo]
    tasks: dict[str, TaskInfo]
    controller: Controller


NO_TASK_LOGIT = -1e4
"""Controller logit of a standalone module for every task: its sigmoid is exactly 0, so no task's composition
picks it (Controller.gates_for_task drops zero gates); requests name it directly."""


def with_standalone_module(
    library: "ModuleLibrary | None", backbone: BackboneFingerprint, info: ModuleInfo, weights: ModuleWeights
) -> "ModuleLibrary":
    """`library` (a new, task-less one on `backbone` when None) plus a module that no task uses: requests
    address it by name (`"model": name` or explicit weights), as vLLM addresses a LoRA. For PEFT adapters
    given at start-up (`--lora-modules`) and loaded while serving."""
    if library is None:
        return ModuleLibrary.build(backbone, {info.name: (info, weights)}, [], torch.zeros(0, 1), ControllerSettings())
    return library.with_module(info, weights, task_logit=NO_TASK_LOGIT)


def _random_weights(info: ModuleInfo, backbone: BackboneFingerprint, gen: torch.Generator, std: float) -> ModuleWeights:
    weights: ModuleWeights = {}
    for layer in info.layers:
        for target in info.targets:
            in_features, out_features = backbone.shape(target)
            a = torch.randn(info.rank, in_features, generator=gen) * std  # [rank, in]
            b = torch.randn(out_features, info.rank, generator=gen) * std  # [out, rank]
            weights[(layer, target)] = (a, b)
    return weights


def random_library(
    backbone: BackboneFingerprint,
    num_modules: int = 4,
    tasks: Sequence[str] = ("reverse", "uppercase", "summarize"),
    rank: int | Sequence[int] = 8,
    alpha: float = 16.0,
    seed: int = 0,
    targets: Sequence[str] | None = None,
    std: float = 0.05,
    settings: ControllerSettings = ControllerSettings(),
    ranks: Sequence[int] | None = None,
) -> ModuleLibrary:
    """Untrained modules m0, m1, ... with non-zero A and B on every layer, and a random task controller.

    `rank` is one rank for all modules or one per module; `ranks` is the same, kept for older callers.
    `targets` defaults to every target the backbone can adapt. Used by the offline demo and tests.
    """
    targets = backbone.target_names if targets is None else targets
    per_module = ranks if ranks is not None else rank
    per_module = (per_module,) * num_modules if isinstance(per_module, int) else tuple(per_module)
    if len(per_module) != num_modules:
        raise ValueError(f"{len(per_module)} ranks given for {num_modules} modules")
    gen = torch.Generator().manual_seed(seed)
    layers = tuple(range(backbone.num_layers))
    modules = {}
    for index, module_rank in enumerate(per_module):
        info = ModuleInfo(f"m{index}", module_rank, alpha, "random, untrained", tuple(targets), layers)
        modules[info.name] = (info, _random_weights(info, backbone, gen, std))
    logits = torch.randn(len(tasks), num_modules, generator=gen) * 3  # [num_tasks, num_modules]
    task_infos = [TaskInfo(check_name("task", name), f"{name} (random demo task)") for name in tasks]
    return ModuleLibrary.build(backbone, modules, task_infos, logits, settings)
