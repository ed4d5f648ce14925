"""Plain-torch silu_mul: the oracle for the Triton kernel and the CPU path (the MLP's own eager ops)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in the input dtype."""
    gate, up = gate_up.chunk(2, dim=-1)  # each [num_tokens, intermediate]
    return F.silu(gate) * up
