"""Plain-torch composed_lora: the oracle for the Triton kernel and the CPU path.

It walks the distinct slots of the step (one segment per module, like the kernels), so memory stays at
O(tokens x width) however many modules a batch mixes.
"""

from __future__ import annotations

import torch

from tessera_kernels.composed_lora import LoraStack
from tessera_kernels.composed_lora.meta import ModuleBatchMeta


def composed_lora(y: torch.Tensor, x: torch.Tensor, stack: LoraStack, meta: ModuleBatchMeta) -> None:
    """Apply every token's modules with fp32 accumulation, cast once into `y` (see the contract)."""
    num_tokens = meta.num_tokens
    slots = meta.token_slots[:num_tokens].long()  # [T, k]
    live = slots >= 0
    if num_tokens == 0 or not bool(live.any()):
        return
    gates = meta.token_gates[:num_tokens]  # [T, k] fp32
    xf = x[:num_tokens].float()  # [T, in]
    delta = torch.zeros(num_tokens, sum(stack.slice_widths), dtype=torch.float32, device=y.device)
    for slot in torch.unique(slots[live]).tolist():
        hit = slots == slot  # [T, k]
        rows = hit.any(dim=1).nonzero().squeeze(1)  # [R]
        weight = (gates[rows] * hit[rows]).sum(dim=1) * stack.scale[slot]  # [R]
        offset = 0
        for a_all, b_all in zip(stack.lora_a, stack.lora_b):
            shrunk = (xf[rows] @ a_all[slot].float().T) * weight[:, None]  # [R, max_rank]
            width = b_all.shape[1]
            delta[rows, offset : offset + width] += shrunk @ b_all[slot].float().T  # [R, n_s]
            offset += width
    y[:num_tokens] += delta.to(y.dtype)
