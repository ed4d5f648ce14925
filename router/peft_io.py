"""PEFT LoRA directories in and out of a module library.

Import: one PEFT LoRA directory (adapter_config.json + adapter_model.safetensors) becomes one module.
PEFT's scale (lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA) is kept as an equivalent alpha. A
non-uniform rank_pattern / alpha_pattern is represented exactly: ranks are zero-padded to the largest,
each pair's scale is folded into its B, and the module's alpha equals its rank (scale 1). An adapter on
some layers' targets only (layers_to_transform, per-layer patterns) keeps exactly its (layer, target)
points (ModuleInfo.points): nothing is padded with zero pairs.

Export: a composition becomes one PEFT LoRA of rank R = sum_j r_j ("cat" merge), exact by construction:

    A_cat = [A_1; A_2; ...]                      # [R, in]
    B_cat = [g_1 s_1 B_1, g_2 s_2 B_2, ...]      # [out, R]
    lora_alpha = r = R, so PEFT's scale is 1 and B_cat @ A_cat = sum_j g_j s_j B_j A_j

A module that lacks a layer or target contributes zero rows and columns there.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from router.atomic import write_directory
from router.composition import Composition
from router.errors import CompositionError, LibraryError, UnknownModuleError
from router.fingerprint import TARGETS, BackboneFingerprint
from router.info import ModuleInfo, ModuleWeights
from router.validate import check_module_weights, read_tensors, resolve_inside

logger = logging.getLogger(__name__)

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
PEFT_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
UNSUPPORTED = {
    "use_dora": "DoRA adapters (use_dora) have a magnitude vector and are not a low-rank update",
    "lora_bias": "adapters with a trained LoRA bias (lora_bias) are not supported",
    "fan_in_fan_out": "fan_in_fan_out adapters (Conv1D layouts) are not supported",
    "modules_to_save": "adapters with fully trained modules (modules_to_save) are not supported",
    "target_parameters": "adapters on parameters (target_parameters) are not supported",
    "layer_replication": "adapters with layer_replication are not supported",
    "trainable_token_indices": "adapters with trainable tokens are not supported",
    "use_qalora": "QA-LoRA adapters are not supported",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported",
}


def peft_key(layer: int, target: str, part: str) -> str:
    """PEFT's key of one LoRA tensor of a Llama-family decoder layer; `part` is A or B."""
    return f"base_model.model.model.layers.{layer}.{PARENT[target]}.{target}.lora_{part}.weight"


def _check_config(config: dict, where: str) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise LibraryError(f"{where}: peft_type {config.get('peft_type')!r} is not LORA")
    for key, reason in UNSUPPORTED.items():
        if config.get(key):
            raise LibraryError(f"{where}: {reason} ({key}={config[key]!r})")
    if config.get("bias", "none") != "none":
        raise LibraryError(f"{where}: adapters that train biases are not supported (bias={config['bias']!r})")
    targets = config.get("target_modules")
    if isinstance(targets, list):
        outside = [t for t in targets if t.rsplit(".", 1)[-1] not in TARGETS]  # PEFT matches name suffixes
        if outside:
            raise LibraryError(f"{where}: target_modules {outside} are outside the adaptable targets {TARGETS}")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or config[key] <= 0:
            raise LibraryError(f"{where}: {key} must be a positive number, got {config.get(key)!r}")


def _pattern_value(patterns: dict, module_key: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key)."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module_key):
            return value
    return default


def _expected(config: dict, layer: int, target: str) -> tuple[int, float]:
    """(rank, alpha) PEFT gives the LoRA on `target` of decoder layer `layer`.

    With rsLoRA PEFT's scale is alpha / sqrt(r); the equivalent alpha for the scale alpha / r is
    alpha * sqrt(r).
    """
    module_key = f"model.layers.{layer}.{PARENT[target]}.{target}"
    rank = int(_pattern_value(config.get("rank_pattern"), module_key, config["r"]))
    alpha = _pattern_value(config.get("alpha_pattern"), module_key, config["lora_alpha"])
    return rank, alpha * math.sqrt(rank) if config.get("use_rslora") else alpha


def _pairs(tensors: dict[str, torch.Tensor], where: str) -> dict[tuple[int, str], dict[str, torch.Tensor]]:
    """Group PEFT tensors into (layer, target) -> {"A": ..., "B": ...}, rejecting anything else."""
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = PEFT_KEY.match(key)
        if "lora_magnitude_vector" in key:
            raise LibraryError(f"{where}: {key} is a DoRA magnitude vector; DoRA adapters are not supported")
        if ".experts." in key or ".block_sparse_moe." in key:
            raise LibraryError(f"{where}: {key} adapts a mixture of experts' expert; on Mixtral, Qwen2-MoE and Qwen3-MoE the "
                               f"experts stay frozen and modules adapt the attention projections (train the adapter "
                               f"with target_modules q_proj, k_proj, v_proj, o_proj)")
        if match is None or match.group(3) not in TARGETS or PARENT[match.group(3)] != match.group(2):
            raise LibraryError(
                f"{where}: tensor {key} is not a LoRA A/B of a decoder-layer target in {TARGETS} "
                f"(expected keys like {peft_key(0, 'q_proj', 'A')})"
            )
        pairs.setdefault((int(match.group(1)), match.group(3)), {})[match.group(4)] = tensor
    for (layer, target), pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise LibraryError(f"{where}: layer {layer}, target {target} has lora_{list(pair)[0]} but not its pair")
    if not pairs:
        raise LibraryError(f"{where}: {WEIGHTS_FILE} holds no LoRA tensors")
    return pairs


def _check_pair(where: str, layer: int, target: str, a: torch.Tensor, b: torch.Tensor, rank: int,
                backbone: BackboneFingerprint) -> None:
    in_features, out_features = backbone.shape(target)
    for part, tensor, shape, meaning in (("lora_A", a, (rank, in_features), "[r, in_features]"),
                                         ("lora_B", b, (out_features, rank), "[out_features, r]")):
        if tuple(tensor.shape) != shape:
            raise LibraryError(
                f"{where}: layer {layer}, target {target}, {part}: shape {list(tensor.shape)}, "
                f"expected {list(shape)} {meaning} (r={rank})"
            )
    if layer >= backbone.num_layers:
        raise LibraryError(f"{where}: layer {layer} out of range; the backbone has {backbone.num_layers} layers")


def import_peft(
    peft_dir: str | Path, backbone: BackboneFingerprint, name: str, description: str = ""
) -> tuple[ModuleInfo, ModuleWeights]:
    """Read a PEFT LoRA directory as one module; add it with `ModuleLibrary.with_module(info, weights)`."""
    root = Path(peft_dir).resolve()
    where = f"PEFT adapter {peft_dir}"
    if not root.is_dir():
        raise LibraryError(f"{where} is not a directory")
    try:
        config = json.loads(resolve_inside(root, CONFIG_FILE).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LibraryError(f"{where}: {CONFIG_FILE} is not valid JSON ({error})") from error
    if not isinstance(config, dict):
        raise LibraryError(f"{where}: {CONFIG_FILE} must hold an object")
    _check_config(config, where)
    if not (root / WEIGHTS_FILE).exists() and (root / "adapter_model.bin").exists():
        raise LibraryError(f"{where}: only {WEIGHTS_FILE} is read; adapter_model.bin (pickle) is refused")
    pairs = _pairs(read_tensors(resolve_inside(root, WEIGHTS_FILE)), where)
    found: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, int, float]] = {}
    for (layer, target), pair in sorted(pairs.items()):
        rank, alpha = _expected(config, layer, target)
        _check_pair(where, layer, target, pair["A"], pair["B"], rank, backbone)
        found[(layer, target)] = (pair["A"].float(), pair["B"].float(), rank, alpha)
    info, weights = _as_module(found, backbone, name, description)
    logger.info("imported %s as module %s (rank %d, alpha %g)", peft_dir, name, info.rank, info.alpha)
    return info, check_module_weights(info, backbone, weights)


def _as_module(
    found: dict, backbone: BackboneFingerprint, name: str, description: str
) -> tuple[ModuleInfo, ModuleWeights]:
    """One rank and alpha for all pairs; pad and fold scales into B when PEFT's patterns differ."""
    layers = tuple(sorted({layer for layer, _ in found}))
    targets = tuple(t for t in TARGETS if any(t == target for _, target in found))
    ranks = {rank for _, _, rank, _ in found.values()}
    alphas = {alpha for _, _, _, alpha in found.values()}
    uniform = len(ranks) == 1 and len(alphas) == 1
    rank = max(ranks)
    alpha = alphas.pop() if uniform else rank
    weights: ModuleWeights = {}
    for (layer, target), (pair_a, pair_b, pair_rank, pair_alpha) in found.items():
        in_features, out_features = backbone.shape(target)
        a = torch.zeros(rank, in_features)  # [rank, in]
        b = torch.zeros(out_features, rank)  # [out, rank]
        a[:pair_rank] = pair_a
        b[:, :pair_rank] = pair_b if uniform else pair_b * (pair_alpha / pair_rank)
        weights[(layer, target)] = (a, b)
    grid = len(found) == len(layers) * len(targets)
    return ModuleInfo(name, rank, alpha, description, targets, layers, None if grid else tuple(found)), weights


def _stacked(library, composition: Composition, layer: int, target: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_cat [R, in], B_cat [out, R]) of the composition at one layer and target."""
    in_features, out_features = library.backbone.shape(target)
    a_parts, b_parts = [], []
    for name, gate in zip(composition.module_ids, composition.gates):
        info = library.modules[name]
        pair = library.module_weights(name).get((layer, target))
        if pair is None:
            a_parts.append(torch.zeros(info.rank, in_features))  # [r_j, in]
            b_parts.append(torch.zeros(out_features, info.rank))  # [out, r_j]
        else:
            a_parts.append(pair[0])
            b_parts.append(pair[1] * (gate * info.scale))
    return torch.cat(a_parts, dim=0), torch.cat(b_parts, dim=1)


def peft_files(
    library, composition: Composition, base_model: str | None = None
) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json's dict, adapter_model.safetensors' tensors) of `composition` as one PEFT LoRA."""
    if composition.k == 0:
        raise CompositionError("an empty composition is the backbone alone; there is nothing to export")
    for name in composition.module_ids:
        if name not in library.modules:
            raise UnknownModuleError(name, list(library.modules))
    infos = [library.modules[name] for name in composition.module_ids]
    total_rank = sum(info.rank for info in infos)
    targets = [t for t in TARGETS if any(t in info.targets for info in infos)]
    tensors = {}
    for layer in range(library.backbone.num_layers):
        for target in targets:
            a_cat, b_cat = _stacked(library, composition, layer, target)
            tensors[peft_key(layer, target, "A")] = a_cat.contiguous()
            tensors[peft_key(layer, target, "B")] = b_cat.contiguous()
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": total_rank, "lora_alpha": total_rank, "target_modules": targets, "lora_dropout": 0.0,
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "modules_to_save": None, "init_lora_weights": True, "rank_pattern": {}, "alpha_pattern": {},
        "inference_mode": True,
    }
    return config, tensors


def write_peft_files(directory: Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Write one PEFT LoRA's two files into an existing `directory` (not atomic: callers stage it)."""
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2), encoding="utf-8")
    save_file(tensors, str(directory / WEIGHTS_FILE))


def export_peft(library, composition: Composition, out_dir: str | Path, base_model: str | None = None,
                overwrite: bool = False) -> Path:
    """Write `composition` as one PEFT LoRA directory (stacked rank, scale 1), atomically."""
    config, tensors = peft_files(library, composition, base_model)
    path = write_directory(Path(out_dir), lambda tmp: write_peft_files(tmp, config, tensors), overwrite)
    gates = dict(zip(composition.module_ids, composition.gates))
    logger.info("exported %s as a PEFT LoRA of rank %d to %s", gates, config["r"], path)
    return path
