"""The frozen backbone the engine runs: embeddings, decoder layers, norm and LM head."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from server.model.layers import AdaptedLinear, RotaryEmbedding
from server.model.llama import ArchSpec, DecoderLayer, LayerBuild, RMSNorm

ModuleWeights = Mapping[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
"""(layer index, target) -> (A [rank, in], B [out, rank]), PEFT's convention."""


class Backbone(nn.Module):
    """A Llama-family causal LM over a paged KV cache, with module pool slots in every adapted linear.

    `forward` reads the step's metadata from the forward context; the engine binds the KV cache once
    (`bind_kv_cache`) and writes modules into pool slots (`write_module`).
    """

    def __init__(self, hf_config, spec: ArchSpec, build: LayerBuild):
        super().__init__()
        self.hf_config = hf_config
        self.spec = spec
        self.dtype = build.dtype
        self.device = build.device
        self.max_slots = build.max_slots
        self.max_rank = build.max_rank
        self.embed_tokens = nn.Embedding(
            spec.vocab_size, spec.hidden_size, dtype=build.dtype, device=build.device
        ).requires_grad_(False)
        rotary = RotaryEmbedding(hf_config, spec.head_dim, spec.max_position_embeddings, build.device)
        self.layers = nn.ModuleList(DecoderLayer(spec, build, rotary) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, build.dtype, build.device)
        if spec.tie_word_embeddings:
            self.lm_head_weight = self.embed_tokens.weight
        else:
            self.lm_head_weight = nn.Parameter(
                torch.empty(spec.vocab_size, spec.hidden_size, dtype=build.dtype, device=build.device),
                requires_grad=False,
            )

    num_layers = property(lambda self: self.spec.num_layers)
    num_heads = property(lambda self: self.spec.num_heads)
    num_kv_heads = property(lambda self: self.spec.num_kv_heads)
    head_dim = property(lambda self: self.spec.head_dim)
    hidden_size = property(lambda self: self.spec.hidden_size)
    vocab_size = property(lambda self: self.spec.vocab_size)
    sliding_window = property(lambda self: self.spec.sliding_window)
    max_position_embeddings = property(lambda self: self.spec.max_position_embeddings)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Hidden states [num_tokens, hidden] of one step's tokens."""
        x = self.embed_tokens(input_ids)  # [num_tokens, hidden]
        residual = None
        for layer in self.layers:
            x, residual = layer(x, positions, residual)
        return self.norm(x) if residual is None else self.norm(x, residual)[0]

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits [n, vocab] of the rows that sample."""
        return (hidden @ self.lm_head_weight.T).float()

    def kv_cache_bytes_per_block(self, block_size: int, dtype: torch.dtype | None = None) -> int:
        """Bytes one KV block takes across all layers, keys and values, in `dtype` (default: the model's)."""
        element = torch.empty((), dtype=dtype or self.dtype).element_size()
        return 2 * self.num_layers * block_size * self.num_kv_heads * self.head_dim * element

    def memory_bytes(self) -> dict[str, int]:
        """Bytes on the device: `weights` (parameters and buffers, each tensor once, so a tied embedding
        counts once) and `module_pool` (every adapted linear's LoraStack: A, B, scales, ranks)."""
        weights = sum(t.numel() * t.element_size() for t in (*self.parameters(), *self.buffers()))
        pool = 0
        for _, linear in self.adapted_linears():
            stack = linear.stack
            if stack is not None:
                tensors = (*stack.lora_a, *stack.lora_b, stack.scale, stack.ranks)
                pool += sum(t.numel() * t.element_size() for t in tensors)
        return {"weights": weights, "module_pool": pool}

    def bind_kv_cache(self, caches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Give every layer its (k_cache, v_cache), each [num_blocks, block_size, kv_heads, head_dim]."""
        if len(caches) != self.num_layers:
            raise ValueError(f"got {len(caches)} KV caches for {self.num_layers} layers")
        for layer, cache in zip(self.layers, caches):
            layer.self_attn.kv_cache = cache

    def adapted_linears(self) -> list[tuple[int, AdaptedLinear]]:
        """(layer index, layer) for every adapted linear."""
        found = []
        for index, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            found += [(index, attn.qkv_proj), (index, attn.o_proj)]
            if not self.spec.num_experts:  # a mixture of experts' weights stay frozen
                found += [(index, mlp.gate_up_proj), (index, mlp.down_proj)]
        return found

    def lora_targets(self) -> dict[str, tuple[int, int]]:
        """target -> (in_features, out_features), as the module library's fingerprint records it."""
        shapes = {}
        for _, linear in (entry for entry in self.adapted_linears() if entry[0] == 0):
            for target, width in zip(linear.targets, linear.slice_widths):
                shapes[target] = (linear.in_features, width)
        return shapes

    def write_module(self, slot: int, weights: ModuleWeights, scale: float) -> None:
        """Put a module into pool slot `slot` of every adapted linear; absent targets stay zero."""
        if not 0 <= slot < self.max_slots:
            raise ValueError(f"slot {slot} outside the module pool of {self.max_slots} slots")
        unknown = {key for key in weights if key[1] not in self.lora_targets() or not 0 <= key[0] < self.num_layers}
        if unknown:
            raise ValueError(f"module has weights for unknown (layer, target) points: {sorted(unknown)[:5]}")
        for index, linear in self.adapted_linears():
            linear.stack.write_slot(slot, tuple(weights.get((index, target)) for target in linear.targets), scale)

    def clear_module(self, slot: int) -> None:
        """Empty pool slot `slot` in every adapted linear."""
        for _, linear in self.adapted_linears():
            linear.stack.clear_slot(slot)
