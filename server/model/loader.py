"""Load a Hugging Face checkpoint directory (or the same tensors from memory) into a `Backbone`.

The config comes from transformers (`AutoConfig`); the weights are read straight from the safetensors
files (single or sharded with an index), mapped onto the fused layers, and checked: every parameter
must be filled exactly once with the right shape, and no checkpoint tensor may be left over.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open

from server.model.backbone import Backbone
from server.model.llama import ArchSpec, LayerBuild

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", "q_proj"),
    "self_attn.k_proj": ("self_attn.qkv_proj", "k_proj"),
    "self_attn.v_proj": ("self_attn.qkv_proj", "v_proj"),
    "mlp.gate_proj": ("mlp.gate_up_proj", "gate_proj"),
    "mlp.up_proj": ("mlp.gate_up_proj", "up_proj"),
    "mlp.shared_expert.gate_proj": ("mlp.shared_expert.gate_up_proj", "gate_proj"),
    "mlp.shared_expert.up_proj": ("mlp.shared_expert.gate_up_proj", "up_proj"),
}
_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$")
_EXPERT_PARTS = {"gate_proj": ("gate_up_proj", 0), "w1": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
                 "w3": ("gate_up_proj", 1), "down_proj": ("down_proj", 0), "w2": ("down_proj", 0)}
"""A checkpoint's per-expert tensor (Qwen3-MoE's names, Mixtral's w1/w3/w2) -> (stacked parameter, which half of
its rows: gate 0, up 1). transformers' in-memory names (experts.gate_up_proj, experts.down_proj) are the
parameters' own."""
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.masked_bias|\.attn\.bias)$")
_HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.tiktoken", "*.txt"]
"""What serving needs from a Hub repository: configs, safetensors weights, tokenizer, chat template."""


def resolve_model_dir(model: str) -> Path:
    """The local directory of `model`: a Hugging Face model directory as given, or a Hub id.

    A Hub id (`org/name`) is fetched with huggingface_hub into its usual cache, only the files serving
    needs (no pickled weights); offline (HF_HUB_OFFLINE=1) it resolves from that cache alone.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{model} is not a Hugging Face model directory (no config.json)")
        return path
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise FileNotFoundError(f"{model} is neither a model directory nor a Hugging Face Hub id (org/name)")
    from huggingface_hub import snapshot_download

    try:
        local = Path(snapshot_download(repo_id=model, allow_patterns=_HUB_FILES))
    except Exception as error:  # noqa: BLE001 - network, auth, validation: all mean "cannot get it"
        raise FileNotFoundError(f"{model}: no such local directory, and the Hugging Face Hub gave no snapshot "
                                f"({type(error).__name__}: {error})") from error
    if not (local / "config.json").is_file():
        raise FileNotFoundError(f"Hub repository {model} has no config.json")
    return local


@dataclass(frozen=True)
class BackboneConfig:
    """How to place the backbone."""

    dtype: str = "auto"
    """auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16 or float16."""
    device: str = "cpu"
    """Torch device of the weights, the KV cache and the module pool."""
    max_slots: int = 0
    """Module pool slots in every adapted linear; 0 serves the backbone alone."""
    max_rank: int = 64
    """Largest module rank the pool holds."""

    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if torch.device(self.device).type == "cuda" else torch.float32
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be auto or one of {sorted(_DTYPES)}, got {self.dtype!r}")
        return _DTYPES[self.dtype]


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / name for name in shards]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(
        f"{model_dir} has no model.safetensors or model.safetensors.index.json (only safetensors checkpoints load)"
    )


class _Slot(NamedTuple):
    """Where one checkpoint tensor goes: rows [start, start + rows) of `param` (of `param[expert]` for one
    expert of a stacked expert parameter)."""

    param: torch.Tensor
    expert: int | None
    start: int
    rows: int


def _target(backbone: Backbone, name: str) -> _Slot | None:
    """Where checkpoint tensor `name` goes, or None if unknown."""
    if name == "model.embed_tokens.weight":
        return _Slot(backbone.embed_tokens.weight, None, 0, backbone.vocab_size)
    if name == "model.norm.weight":
        return _Slot(backbone.norm.weight, None, 0, backbone.hidden_size)
    if name == "lm_head.weight":
        return _Slot(backbone.lm_head_weight, None, 0, backbone.vocab_size)
    match = _LAYER.match(name)
    if match is None or int(match.group(1)) >= backbone.num_layers:
        return None
    layer = backbone.layers[int(match.group(1))]
    local = match.group(2)
    if local.startswith("block_sparse_moe."):  # Mixtral's checkpoints; transformers calls it mlp in memory
        local = "mlp." + local.removeprefix("block_sparse_moe.")
    expert = _EXPERT.match(local)
    if expert is not None and backbone.spec.num_experts:
        index, (stacked, half) = int(expert.group(1)), _EXPERT_PARTS[expert.group(2)]
        if index >= backbone.spec.num_experts:
            return None
        param = layer.mlp.experts.get_parameter(stacked)
        rows = param.shape[1] // 2 if stacked == "gate_up_proj" else param.shape[1]
        return _Slot(param, index, half * rows, rows)
    path, _, kind = local.rpartition(".")
    if path in _FUSED and not (backbone.spec.num_experts and path in ("mlp.gate_proj", "mlp.up_proj")):
        fused_path, target = _FUSED[path]
        linear = layer.get_submodule(fused_path)
        start, width = linear.slice_offset(target)
        param = linear.weight if kind == "weight" else linear.bias
        return _Slot(param, None, start, width) if param is not None else None
    try:
        param = layer.get_parameter(local)
    except AttributeError:
        return None
    return _Slot(param, None, 0, param.shape[0])


_Tensors = Iterable[tuple[str, str, Callable[[], torch.Tensor]]]
"""(where it comes from, checkpoint name, read it) for every tensor of a checkpoint."""


def _fill(backbone: Backbone, tensors: _Tensors, kind: str) -> None:
    """Copy every checkpoint tensor into its parameter; unknown, missing or misshapen ones fail."""
    filled: set[tuple[int, int]] = set()
    unexpected = []
    for where, name, read in tensors:
        target = _target(backbone, name)
        if target is None:
            if not _IGNORED.search(name):
                unexpected.append(name)
            continue
        if name == "lm_head.weight" and backbone.spec.tie_word_embeddings:
            continue
        param, expert, start, rows = target
        destination = param.data if expert is None else param.data[expert]
        tensor = read()
        expected = (rows, *destination.shape[1:])
        if tuple(tensor.shape) != expected:
            raise ValueError(f"{where}: {name} has shape {list(tensor.shape)}, expected {list(expected)}")
        destination[start : start + rows].copy_(tensor)
        filled.add((id(param), expert, start))
    if unexpected:
        raise ValueError(f"{kind} has tensors this architecture does not use: {unexpected[:8]}")
    _check_filled(backbone, filled, kind)


def _file_tensors(files: list[Path]) -> _Tensors:
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                yield file.name, name, functools.partial(handle.get_tensor, name)


def _check_filled(backbone: Backbone, filled: set[tuple[int, int | None, int]], kind: str) -> None:
    missing = []
    for name, param in backbone.named_parameters():
        linear_name, _, leaf = name.rpartition(".")
        owner = backbone.get_submodule(linear_name) if "." in name else backbone
        if linear_name.endswith("mlp.experts") and (id(param), None, 0) not in filled:  # filled expert by expert
            halves = (0, param.shape[1] // 2) if leaf == "gate_up_proj" else (0,)
            missing += [f"{name}[{e}][{o}:]" for e in range(param.shape[0]) for o in halves
                        if (id(param), e, o) not in filled]
            continue
        offsets = [0]
        if hasattr(owner, "slice_widths"):
            offsets = [owner.slice_offset(t)[0] for t in owner.targets]
        missing += [f"{name}[{o}:]" for o in offsets if (id(param), None, o) not in filled]
    if missing:
        raise ValueError(f"{kind} is missing tensors for: {missing[:8]}")


def _empty_backbone(hf_config, config: BackboneConfig) -> Backbone:
    spec = ArchSpec.from_hf_config(hf_config)
    build = LayerBuild(config.torch_dtype(), torch.device(config.device), config.max_slots, config.max_rank)
    return Backbone(hf_config, spec, build)


def load_backbone(model_dir: str, config: BackboneConfig = BackboneConfig()) -> Backbone:
    """Build the backbone from `model_dir` (config.json + safetensors) on `config.device`."""
    from transformers import AutoConfig

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
    backbone = _empty_backbone(AutoConfig.from_pretrained(str(path)), config)
    _fill(backbone, _file_tensors(_weight_files(path)), "checkpoint")
    backbone.eval()
    logger.info(
        "loaded %s (%d layers, hidden %d) from %s as %s on %s",
        backbone.spec.architecture, backbone.num_layers, backbone.hidden_size, model_dir, backbone.dtype,
        backbone.device,
    )
    return backbone


def backbone_from_state_dict(
    hf_config, state: Mapping[str, torch.Tensor], config: BackboneConfig = BackboneConfig()
) -> Backbone:
    """Build the backbone from tensors already in memory, named as in a checkpoint (a transformers model's
    `state_dict()`), with the same checks as `load_backbone`. The tensors are copied, never shared."""
    backbone = _empty_backbone(hf_config, config)
    tensors = (("state dict", name, functools.partial(state.__getitem__, name)) for name in state)
    _fill(backbone, tensors, "state dict")
    backbone.eval()
    logger.info(
        "built %s (%d layers, hidden %d) from a state dict as %s on %s",
        backbone.spec.architecture, backbone.num_layers, backbone.hidden_size, backbone.dtype, backbone.device,
    )
    return backbone
