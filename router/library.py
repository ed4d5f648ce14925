"""The module library: read, validate and write the on-disk format of DESIGN.md.

    library/
      library.json          format, version, backbone fingerprint, targets, modules, tasks, controller
      modules.safetensors   "{module}.layers.{i}.{target}.lora_A" [rank, in] and ".lora_B" [out, rank]
      controller.safetensors

Loading validates everything before returning: shapes against the fingerprint, ranks, targets, layer
indices, NaN/Inf, missing or extra tensors, and that every file resolves inside the library root.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from router.controller import Controller, ControllerSettings
from router.errors import LibraryError
from router.fingerprint import TARGETS, BackboneFingerprint, fingerprint_from_hf_config

__all__ = [
    "TARGETS", "BackboneFingerprint", "ControllerSettings", "ModuleInfo", "ModuleLibrary", "TaskInfo",
    "fingerprint_from_hf_config", "random_library",
]

FORMAT, VERSION = "tessera-library", 1
FILES = ("library.json", "modules.safetensors", "controller.safetensors")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ModuleWeights = dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]


def check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not NAME.match(name):
        raise LibraryError(f"{kind} name {name!r} is invalid: use letters, digits, '.', '_', '-' (at most 64)")
    return name


@dataclass(frozen=True)
class ModuleInfo:
    """One module's metadata."""

    name: str
    rank: int
    alpha: float
    description: str = ""
    targets: tuple[str, ...] = TARGETS
    """Targets it adapts (in every layer of `layers`)."""
    layers: tuple[int, ...] = ()
    """Decoder layers it adapts."""

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_json(self) -> dict:
        return {"name": self.name, "rank": self.rank, "alpha": self.alpha, "description": self.description,
                "targets": list(self.targets), "layers": list(self.layers)}


@dataclass(frozen=True)
class TaskInfo:
    name: str
    description: str = ""


def _module_from_json(entry: dict, backbone: BackboneFingerprint) -> ModuleInfo:
    try:
        info = ModuleInfo(
            name=check_name("module", entry["name"]), rank=int(entry["rank"]), alpha=float(entry["alpha"]),
            description=str(entry.get("description", "")), targets=tuple(entry["targets"]),
            layers=tuple(int(i) for i in entry["layers"]),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise LibraryError(f"library.json: malformed module entry {entry!r} ({error!r})") from error
    if info.rank < 1 or not math.isfinite(info.alpha) or info.alpha <= 0:
        raise LibraryError(f"module {info.name}: rank must be >= 1 and alpha > 0, got {info.rank}, {info.alpha}")
    for target in info.targets:
        if target not in backbone.target_names:
            raise LibraryError(f"module {info.name}: unknown target {target!r}; adaptable: {backbone.target_names}")
    bad = [i for i in info.layers if not 0 <= i < backbone.num_layers]
    if bad:
        raise LibraryError(f"module {info.name}: layer {bad[0]} out of range (backbone has {backbone.num_layers})")
    return info


def _inside(root: Path, name: str) -> Path:
    path = root / name
    resolved = path.resolve()
    if not resolved.is_relative_to(root) or not resolved.is_file():
        raise LibraryError(f"{path} is missing or resolves outside the library root {root}")
    return resolved


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # noqa: BLE001 - any unreadable file is an invalid library
        raise LibraryError(f"{path.name}: not a readable safetensors file ({error})") from error


def _check_module_tensors(info: ModuleInfo, backbone: BackboneFingerprint, tensors: dict) -> ModuleWeights:
    weights: ModuleWeights = {}
    for layer in info.layers:
        for target in info.targets:
            in_features, out_features = backbone.shape(target)
            pair = []
            for part, expected in (("lora_A", (info.rank, in_features)), ("lora_B", (out_features, info.rank))):
                key = f"{info.name}.layers.{layer}.{target}.{part}"
                tensor = tensors.pop(key, None)
                where = f"module {info.name}, layer {layer}, target {target}, {part}"
                if tensor is None:
                    raise LibraryError(f"{where}: tensor {key} is missing")
                if tuple(tensor.shape) != expected:
                    raise LibraryError(f"{where}: shape {list(tensor.shape)}, expected {list(expected)}")
                if not torch.isfinite(tensor).all():
                    raise LibraryError(f"{where}: contains NaN or Inf")
                pair.append(tensor.float())
            weights[(layer, target)] = (pair[0], pair[1])
    return weights


@dataclass
class ModuleLibrary:
    """Modules, tasks and controller, validated against one backbone fingerprint."""

    backbone: BackboneFingerprint
    modules: dict[str, ModuleInfo]
    tasks: dict[str, TaskInfo]
    controller: Controller
    weights: dict[str, ModuleWeights] = field(repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        for name in self.modules:
            check_name("module", name)
        for name in self.tasks:
            check_name("task", name)
        self.controller.check(list(self.tasks), list(self.modules))

    def module_weights(self, name: str) -> ModuleWeights:
        """(layer, target) -> (A [rank, in], B [out, rank]), fp32 on the CPU."""
        return self.weights[name]

    @classmethod
    def load(cls, path: str | Path, expect: BackboneFingerprint | None = None) -> "ModuleLibrary":
        """Read and validate a library directory; nothing is returned unless all of it is valid."""
        root = Path(path).resolve()
        if not root.is_dir():
            raise LibraryError(f"{path} is not a directory")
        meta_path, modules_path, controller_path = (_inside(root, name) for name in FILES)
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise LibraryError(f"library.json is not valid JSON ({error})") from error
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise LibraryError(f"library.json: expected format {FORMAT!r} version {VERSION}")
        backbone = BackboneFingerprint.from_json(meta.get("backbone", {}))
        if expect is not None:
            backbone.check_compatible(expect)
        modules = [_module_from_json(entry, backbone) for entry in meta.get("modules", [])]
        tasks = [TaskInfo(check_name("task", t["name"]), str(t.get("description", ""))) for t in meta.get("tasks", [])]
        tensors = _read_tensors(modules_path)
        weights = {info.name: _check_module_tensors(info, backbone, tensors) for info in modules}
        if tensors:
            raise LibraryError(f"modules.safetensors has tensors no module declares: {sorted(tensors)[:5]}")
        controller = Controller.from_files(
            meta.get("controller", {}), _read_tensors(controller_path), [t.name for t in tasks], [m.name for m in modules]
        )
        return cls(backbone, {m.name: m for m in modules}, {t.name: t for t in tasks}, controller, weights)

    def write(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the library atomically (see router.atomic)."""
        from router.atomic import write_directory

        def fill(tmp: Path) -> None:
            from safetensors.torch import save_file

            (tmp / "library.json").write_text(json.dumps(self.to_json(), indent=2))
            flat = {
                f"{name}.layers.{layer}.{target}.{part}": tensor.contiguous()
                for name, weights in self.weights.items()
                for (layer, target), pair in weights.items()
                for part, tensor in zip(("lora_A", "lora_B"), pair)
            }
            save_file(flat, str(tmp / "modules.safetensors"))
            save_file(self.controller.tensors(), str(tmp / "controller.safetensors"))

        return write_directory(Path(path), fill, overwrite)

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "backbone": self.backbone.to_json(),
            "targets": sorted({t for m in self.modules.values() for t in m.targets}, key=TARGETS.index),
            "modules": [m.to_json() for m in self.modules.values()],
            "tasks": [{"name": t.name, "description": t.description} for t in self.tasks.values()],
            "controller": self.controller.settings_json(),
        }

    def with_module(self, info: ModuleInfo, weights: ModuleWeights, task_logit: float = -10.0) -> "ModuleLibrary":
        """A new library with one more module (its controller column set to `task_logit`)."""
        if info.name in self.modules:
            raise LibraryError(f"module {info.name!r} already exists in the library")
        _check_module_tensors(info, self.backbone, _flatten(info, weights))
        return ModuleLibrary(
            self.backbone, {**self.modules, info.name: info}, dict(self.tasks),
            self.controller.with_module_column(task_logit), {**self.weights, info.name: weights},
        )


def _flatten(info: ModuleInfo, weights: ModuleWeights) -> dict[str, torch.Tensor]:
    return {
        f"{info.name}.layers.{layer}.{target}.{part}": tensor
        for (layer, target), pair in weights.items()
        for part, tensor in zip(("lora_A", "lora_B"), pair)
    }


def random_library(
    backbone: BackboneFingerprint,
    num_modules: int = 4,
    tasks: tuple[str, ...] = ("reverse", "uppercase", "summarize"),
    ranks: tuple[int, ...] | int = 8,
    alpha: float = 16.0,
    seed: int = 0,
    std: float = 0.05,
    settings: ControllerSettings = ControllerSettings(),
) -> ModuleLibrary:
    """Untrained modules with non-zero A and B and a random task controller (demo and tests)."""
    gen = torch.Generator().manual_seed(seed)
    ranks = ranks if isinstance(ranks, tuple) else (ranks,) * num_modules
    modules, weights = {}, {}
    for index in range(num_modules):
        info = ModuleInfo(f"m{index}", ranks[index], alpha, "random, untrained", backbone.target_names,
                          tuple(range(backbone.num_layers)))
        modules[info.name] = info
        weights[info.name] = {
            (layer, target): (
                torch.randn(info.rank, backbone.shape(target)[0], generator=gen) * std,  # [rank, in]
                torch.randn(backbone.shape(target)[1], info.rank, generator=gen) * std,  # [out, rank]
            )
            for layer in info.layers
            for target in info.targets
        }
    logits = torch.randn(len(tasks), num_modules, generator=gen) * 3  # [num_tasks, num_modules]
    task_infos = {name: TaskInfo(name, f"{name} (random demo task)") for name in tasks}
    return ModuleLibrary(backbone, modules, task_infos, Controller(list(tasks), list(modules), logits, settings), weights)
