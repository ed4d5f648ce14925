"""silu_mul: SwiGLU's activation, silu(gate) * up, from the fused gate_up projection's output.

Semantics:
    For every token t, with gate = gate_up[t, :I] and up = gate_up[t, I:]:

        out[t] = silu(gate) * up        silu(g) = g / (1 + exp(-g))

    evaluated as `F.silu(gate) * up` is in eager torch: silu in fp32, rounded to the input dtype, then
    the product rounded to the input dtype.

Shape:
    gate_up: [num_tokens, 2 * I]   fp16 / bf16 / fp32; last dim contiguous, row stride free
    out:     [num_tokens, I]       new contiguous tensor, gate_up's dtype (static shape: CUDA-graph safe)
"""

from __future__ import annotations

import torch

from tessera_kernels import use_triton

__all__ = ["silu_mul"]


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up (see the module docstring)."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"silu_mul takes gate_up [num_tokens, 2 * intermediate], got {list(gate_up.shape)}")
    if use_triton(gate_up):
        from tessera_kernels.silu_mul import triton as backend
    else:
        from tessera_kernels.silu_mul import reference as backend
    return backend.silu_mul(gate_up)
