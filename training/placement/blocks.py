"""Parameter blocks of the adaptable linears, the Hugging Face names of those linears, and point costs."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from router.fingerprint import TARGETS, fingerprint_from_hf_config
from training.placement.config import Point

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
"""Targets under `self_attn`, blocked by attention head."""
MLP = ("gate_proj", "up_proj", "down_proj")
"""Targets under `mlp`, blocked by groups of intermediate neurons."""
ROW_BLOCKED = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
"""Targets whose blocks are row ranges of the weight [out, in] (output features)."""


@dataclass(frozen=True)
class Block:
    """A contiguous slice of one linear's weight [out_features, in_features]."""

    layer: int
    """Decoder layer index."""
    target: str
    """Target name (one of TARGETS)."""
    index: int
    """Index of the block within its (layer, target) point."""
    axis: int
    """0 when the block is a row range of the weight, 1 when it is a column range."""
    start: int
    """First row (axis 0) or column (axis 1)."""
    stop: int
    """One past the last row or column."""

    @property
    def point(self) -> Point:
        """The (layer, target) insertion point the block belongs to."""
        return self.layer, self.target


def target_linear(model: nn.Module, layer: int, target: str) -> nn.Linear:
    """The linear `model.model.layers[layer].{self_attn|mlp}.{target}` (Llama, Mistral, Qwen2, Qwen3 names)."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; targets are {TARGETS}")
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no model.layers; expected a Llama-family causal LM")
    if not 0 <= layer < len(layers):
        raise ValueError(f"layer {layer} out of range; the model has {len(layers)} layers")
    parent = getattr(layers[layer], "self_attn" if target in ATTENTION else "mlp", None)
    linear = getattr(parent, target, None)
    if not isinstance(linear, nn.Linear):
        raise ValueError(f"layer {layer} has no linear {target}; got {type(linear).__name__}")
    return linear


def _ranges(total: int, width: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of `width` covering `total`; the last may be narrower."""
    return [(start, min(start + width, total)) for start in range(0, total, width)]


def attention_geometry(hf_config) -> tuple[int, int, int]:
    """(query heads, key/value heads, head_dim) of a Llama-family config."""
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    if heads % kv_heads:
        raise ValueError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    return heads, kv_heads, head_dim


def point_ranges(hf_config, target: str, block_width: int) -> list[tuple[int, int]]:
    """Block ranges of one target: heads of q/o, KV heads of k/v, neuron groups of gate/up/down."""
    heads, kv_heads, head_dim = attention_geometry(hf_config)
    if target in ("q_proj", "o_proj"):
        return _ranges(heads * head_dim, head_dim)
    if target in ("k_proj", "v_proj"):
        return _ranges(kv_heads * head_dim, head_dim)
    return _ranges(hf_config.intermediate_size, block_width)


def enumerate_blocks(hf_config, block_width: int) -> list[Block]:
    """Every block of every adaptable linear (the backbone fingerprint's targets), ordered by layer, then TARGETS
    order, then index."""
    if block_width < 1:
        raise ValueError(f"block_width must be >= 1, got {block_width}")
    blocks = []
    targets = fingerprint_from_hf_config(hf_config).target_names  # the attention ones only under a sparse MLP
    for layer in range(hf_config.num_hidden_layers):
        for target in targets:
            axis = 0 if target in ROW_BLOCKED else 1
            for index, (start, stop) in enumerate(point_ranges(hf_config, target, block_width)):
                blocks.append(Block(layer, target, index, axis, start, stop))
    return blocks


def point_costs(hf_config, rank: int, num_modules: int) -> dict[Point, int]:
    """Parameter cost rank * (in + out) * num_modules of every point, ordered by layer then TARGETS."""
    shapes = fingerprint_from_hf_config(hf_config).target_shapes
    return {
        (layer, target): rank * (shapes[target][0] + shapes[target][1]) * num_modules
        for layer in range(hf_config.num_hidden_layers)
        for target in shapes
    }
