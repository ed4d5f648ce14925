"""Checks that stand between files on disk and a `ModuleLibrary`: paths, library.json, tensors.

Every failure is a LibraryError whose message names the module, layer, target and expected shape where
they apply.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from router.errors import LibraryError
from router.fingerprint import TARGETS, BackboneFingerprint
from router.info import ModuleInfo, ModuleWeights, TaskInfo

FORMAT, VERSION = "tessera-library", 1
FILES = ("library.json", "modules.safetensors", "controller.safetensors")
MAX_JSON_BYTES = 16 << 20


def tensor_key(module: str, layer: int, target: str, part: str) -> str:
    """Key of one tensor in modules.safetensors; `part` is lora_A or lora_B."""
    return f"{module}.layers.{layer}.{target}.{part}"


def resolve_inside(root: Path, name: str) -> Path:
    """`root / name` resolved, if it is a plain file inside `root` (symlinks may not escape)."""
    if not name or "/" in name or "\\" in name or name in (".", "..") or "\0" in name:
        raise LibraryError(f"file name {name!r} must be a plain name inside the library, without separators")
    path = root / name
    resolved = path.resolve()
    if not resolved.is_relative_to(root):
        raise LibraryError(f"{path} resolves to {resolved}, outside the library root {root}")
    if not resolved.is_file():
        raise LibraryError(f"{path} is missing or not a regular file")
    return resolved


def read_json(path: Path) -> dict:
    """library.json as a dict, with its format and version checked."""
    if path.stat().st_size > MAX_JSON_BYTES:
        raise LibraryError(f"{path.name} is larger than {MAX_JSON_BYTES} bytes")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LibraryError(f"{path.name} is not valid JSON ({error})") from error
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else meta
        raise LibraryError(f"{path.name}: expected format {FORMAT!r}, got {found!r}")
    if meta.get("version") != VERSION:
        raise LibraryError(f"{path.name}: unsupported version {meta.get('version')!r}; this reader supports {VERSION}")
    return meta


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, on the CPU."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # noqa: BLE001 - any unreadable file is an invalid library
        raise LibraryError(f"{path.name}: not a readable safetensors file ({error})") from error


def _list(meta: dict, key: str) -> list:
    value = meta.get(key, [])
    if not isinstance(value, list):
        raise LibraryError(f"library.json: {key!r} must be a list, got {type(value).__name__}")
    return value


def parse_modules(meta: dict, backbone: BackboneFingerprint) -> list[ModuleInfo]:
    """The module entries of library.json, each checked against the backbone."""
    declared = _list(meta, "targets")
    if any(t not in TARGETS for t in declared):
        raise LibraryError(f"library.json: targets {declared} include one outside {TARGETS}")
    modules = []
    for entry in _list(meta, "modules"):
        try:
            info = ModuleInfo(
                name=entry["name"], rank=entry["rank"], alpha=entry["alpha"],
                description=str(entry.get("description", "")), targets=tuple(entry["targets"]),
                layers=tuple(entry["layers"]), points=_points(entry),
            )
        except (KeyError, TypeError, AttributeError, ValueError) as error:
            if isinstance(error, LibraryError):
                raise
            raise LibraryError(f"library.json: malformed module entry {entry!r} ({error!r})") from error
        missing = [t for t in info.targets if t not in declared]
        if missing:
            raise LibraryError(f"module {info.name}: target {missing[0]} is not in library.json's targets {declared}")
        check_module_info(info, backbone)
        modules.append(info)
    _check_unique("module", [m.name for m in modules])
    return modules


def _points(entry: dict) -> tuple[tuple[int, str], ...] | None:
    """The optional `points` of a module entry: a list of [layer, target] pairs."""
    if "points" not in entry:
        return None
    points = entry["points"]
    ok = isinstance(points, list) and all(
        isinstance(p, list) and len(p) == 2 and isinstance(p[0], int) and not isinstance(p[0], bool)
        and isinstance(p[1], str) for p in points
    )
    if not ok or not points:
        raise LibraryError(f"module {entry.get('name')!r}: points must be a non-empty list of [layer, target]")
    return tuple((layer, target) for layer, target in points)


def parse_tasks(meta: dict) -> list[TaskInfo]:
    """The task entries of library.json."""
    try:
        tasks = [TaskInfo(entry["name"], str(entry.get("description", ""))) for entry in _list(meta, "tasks")]
    except (KeyError, TypeError, AttributeError) as error:
        raise LibraryError(f"library.json: malformed task entry ({error!r})") from error
    _check_unique("task", [t.name for t in tasks])
    return tasks


def _check_unique(kind: str, names: list[str]) -> None:
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise LibraryError(f"library.json: {kind} {repeated[0]!r} is declared more than once")


def check_module_info(info: ModuleInfo, backbone: BackboneFingerprint) -> None:
    """Targets and layers of `info` must exist on the backbone."""
    for target in info.targets:
        if target not in backbone.target_names:
            raise LibraryError(
                f"module {info.name}: unknown target {target!r}; the backbone adapts {backbone.target_names}"
            )
    bad = [i for i in info.layers if not 0 <= i < backbone.num_layers]
    if bad:
        raise LibraryError(
            f"module {info.name}: layer {bad[0]} out of range; the backbone has {backbone.num_layers} layers"
        )


def take_module_tensors(info: ModuleInfo, tensors: dict[str, torch.Tensor]) -> ModuleWeights:
    """Remove `info`'s tensors from the flat dict of modules.safetensors; missing ones are an error."""
    weights: ModuleWeights = {}
    for layer, target in info.all_points:
        pair = []
        for part in ("lora_A", "lora_B"):
            key = tensor_key(info.name, layer, target, part)
            if key not in tensors:
                raise LibraryError(f"module {info.name}, layer {layer}, target {target}: tensor {key} is missing")
            pair.append(tensors.pop(key))
        weights[(layer, target)] = (pair[0], pair[1])
    return weights


def _checked_tensor(where: str, tensor: object, shape: tuple[int, int], meaning: str) -> torch.Tensor:
    """`tensor` as a contiguous fp32 CPU copy, if it is floating point, of `shape` and finite."""
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        found = getattr(tensor, "dtype", type(tensor))
        raise LibraryError(f"{where}: expected a floating-point tensor, got {found}")
    if tuple(tensor.shape) != shape:
        raise LibraryError(f"{where}: shape {list(tensor.shape)}, expected {list(shape)} {meaning}")
    if not torch.isfinite(tensor).all():
        raise LibraryError(f"{where}: contains NaN or Inf")
    copy = tensor.detach().to("cpu", torch.float32).contiguous()
    return copy.clone() if copy.data_ptr() == tensor.data_ptr() else copy  # never alias the caller's tensor


def check_module_weights(info: ModuleInfo, backbone: BackboneFingerprint, weights: ModuleWeights) -> ModuleWeights:
    """Shapes, dtypes and values of one module's weights; returns them as contiguous fp32 CPU tensors."""
    check_module_info(info, backbone)
    expected = info.all_points
    extra = sorted(set(weights) - set(expected))
    if extra:
        raise LibraryError(f"module {info.name}: weights for (layer, target) {extra[0]} it does not declare")
    checked: ModuleWeights = {}
    for layer, target in expected:
        where = f"module {info.name}, layer {layer}, target {target}"
        if (layer, target) not in weights:
            raise LibraryError(f"{where}: weights are missing")
        in_features, out_features = backbone.shape(target)
        a, b = weights[(layer, target)]
        checked[(layer, target)] = (
            _checked_tensor(f"{where}, lora_A", a, (info.rank, in_features), f"[rank, in_features] (rank {info.rank})"),
            _checked_tensor(f"{where}, lora_B", b, (out_features, info.rank), f"[out_features, rank] (rank {info.rank})"),
        )
    return checked
