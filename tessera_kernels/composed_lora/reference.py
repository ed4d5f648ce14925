"""Plain-torch composed_lora: the oracle for the Triton kernel and the CPU path.

Small steps (decode) gather every token's modules and apply them in a few batched products; larger ones walk the
distinct slots of the step (one segment per module, like the kernels), so memory stays at O(tokens x width)
however many modules a batch mixes. Both compute the contract's sum in fp32.
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
    gathered = slots.numel() * stack.max_rank * max(x.shape[1], *stack.slice_widths)
    by_token = _by_token if gathered <= _GATHER_ELEMENTS else _by_slot
    y[:num_tokens] += by_token(xf, slots, live, gates, stack).to(y.dtype)


_GATHER_ELEMENTS = 1 << 22
"""Largest A or B gathered per token (elements) for which a step applies its modules token by token in batched
products rather than slot by slot: decode steps of small and mid-sized models, where the slot walk's dozen ops per
module would cost more than the arithmetic."""


def _by_token(xf, slots, live, gates, stack: LoraStack) -> torch.Tensor:
    index = slots.clamp(min=0)
    weight = torch.where(live, gates * stack.scale[index], 0.0)  # [T, k]; NO_MODULE entries weigh nothing
    deltas = []
    for a_all, b_all in zip(stack.lora_a, stack.lora_b):
        shrunk = torch.einsum("ti,tkri->tkr", xf, a_all[index].float()) * weight[..., None]  # [T, k, max_rank]
        deltas.append(torch.einsum("tkr,tknr->tn", shrunk, b_all[index].float()))  # [T, n_s]
    return torch.cat(deltas, dim=1)


def _by_slot(xf, slots, live, gates, stack: LoraStack) -> torch.Tensor:
    delta = torch.zeros(xf.shape[0], sum(stack.slice_widths), dtype=torch.float32, device=xf.device)
    for slot in torch.unique(slots[live]).tolist():
        hit = slots == slot  # [T, k]
        rows = hit.any(dim=1).nonzero().squeeze(1)  # [R]
        weight = (gates[rows] * hit[rows]).sum(dim=1) * stack.scale[slot]  # [R]
        x_rows = xf[rows]
        offset = 0
        for a_all, b_all in zip(stack.lora_a, stack.lora_b):
            shrunk = (x_rows @ a_all[slot].float().T) * weight[:, None]  # [R, max_rank]
            width = b_all.shape[1]
            delta[rows, offset : offset + width] += shrunk @ b_all[slot].float().T  # [R, n_s]
            offset += width
    return delta
