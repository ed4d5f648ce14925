"""Building blocks of the Llama family: RMSNorm, rotary embedding, and the adapted linear layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tessera_kernels.composed_lora import LoraStack, composed_lora
from tessera_kernels.rms_norm import rms_norm
from tessera_kernels.rotary import rotary
from server.model.forward_context import get_forward_context


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 and cast back (as Hugging Face's Llama does).

    With `residual`, the residual add is fused in (vLLM's `hidden, residual = norm(x, residual)`): the
    call returns (norm(x + residual), x + residual). `tessera_kernels.rms_norm` keeps HF's rounding points.
    """

    def __init__(self, width: int, eps: float, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width, dtype=dtype, device=device), requires_grad=False)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return rms_norm(x, self.weight, self.eps, residual)


def rope_inv_freq(hf_config, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scaling for the config's RoPE type, via transformers."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = getattr(hf_config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        theta = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        return inv_freq, 1.0
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"unsupported rope_type {rope_type!r}; supported: default, {sorted(ROPE_INIT_FUNCTIONS)}")
    if rope_type == "dynamic":
        raise ValueError("dynamic NTK RoPE depends on the sequence length and is not supported")
    return ROPE_INIT_FUNCTIONS[rope_type](hf_config, "cpu")


class RotaryEmbedding(nn.Module):
    """fp32 cos/sin tables for every position, built once; applied in place with the rotate-half convention
    by `tessera_kernels.rotary` (cos/sin cast to the activations' dtype, then x * cos + rotate_half(x) * sin)."""

    def __init__(self, hf_config, head_dim: int, max_positions: int, device: torch.device | str):
        super().__init__()
        inv_freq, attention_scaling = rope_inv_freq(hf_config, head_dim)
        positions = torch.arange(max_positions, dtype=torch.float)
        freqs = torch.outer(positions, inv_freq)  # [max_positions, head_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [max_positions, head_dim]
        self.register_buffer("cos", (emb.cos() * attention_scaling).to(device), persistent=False)
        self.register_buffer("sin", (emb.sin() * attention_scaling).to(device), persistent=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> None:
        """Rotate q [num_tokens, heads, head_dim] and k [num_tokens, kv_heads, head_dim] in place."""
        rotary(q, k, positions, self.cos, self.sin)


class AdaptedLinear(nn.Module):
    """A frozen linear layer whose output slices also receive each token's module composition.

    `targets` names the output slices in order (for example q_proj, k_proj, v_proj of a fused qkv),
    `slice_widths` their widths. With `max_slots > 0` the layer owns a `LoraStack` that the module pool
    writes into; the forward pass adds the step's compositions through `tessera_kernels.composed_lora`.
    """

    def __init__(
        self,
        in_features: int,
        targets: tuple[str, ...],
        slice_widths: tuple[int, ...],
        bias: bool,
        max_slots: int,
        max_rank: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        super().__init__()
        self.in_features = in_features
        self.targets = targets
        self.slice_widths = slice_widths
        out_features = sum(slice_widths)
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=dtype, device=device), requires_grad=False
        )
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
            if bias
            else None
        )
        self.stack = (
            LoraStack.allocate(in_features, slice_widths, max_slots, max_rank, dtype, device)
            if max_slots > 0
            else None
        )

    def slice_offset(self, target: str) -> tuple[int, int]:
        """(start, width) of a target's rows in the fused weight."""
        index = self.targets.index(target)
        return sum(self.slice_widths[:index]), self.slice_widths[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)  # [num_tokens, out_features]
        if self.stack is not None:
            ctx = get_forward_context()
            if ctx.has_modules and ctx.modules is not None:
                composed_lora(y, x, self.stack, ctx.modules)
        return y
