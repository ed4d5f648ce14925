"""composed_lora: every token of a mixed batch applies its own weighted composition of modules.

Semantics:
    For every token t < meta.num_tokens and every output slice s:

        y[t, off_s : off_s + n_s] += sum_{j < k, slot[t, j] != NO_MODULE}
            gate[t, j] * scale[slot[t, j]] * B_s[slot[t, j]] @ (A_s[slot[t, j]] @ x[t])

    with slot = meta.token_slots, gate = meta.token_gates and off_s = n_0 + ... + n_{s-1}. This is the
    exact function of the stacked LoRA of rank sum(r_j) (PEFT's "cat" merge), not a merge of A and B.
    Modules of smaller rank are zero-padded to max_rank in the pool; padding contributes nothing.
    Rows t >= meta.num_tokens of y are left untouched.

Shape:
    x:          [num_tokens, in_features]                  fp16 / bf16 (fp32 on CPU)
    y:          [num_tokens, sum_s n_s]                    same dtype as x, updated in place
    stack.lora_a[s]: [max_slots, max_rank, in_features]    same dtype as x
    stack.lora_b[s]: [max_slots, n_s, max_rank]            same dtype as x
    stack.scale:     [max_slots] fp32                      alpha / rank of the module in each slot
    stack.ranks:     [max_slots] int32                     true rank of the module in each slot
    meta:       ModuleBatchMeta with token_slots / token_gates [>= num_tokens, k], k <= 4
    Accumulation is fp32; the sum is cast once to y's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tessera_kernels import use_triton

from tessera_kernels.composed_lora.meta import ModuleBatchMeta

__all__ = ["LoraStack", "ModuleBatchMeta", "composed_lora"]


@dataclass
class LoraStack:
    """The module pool's weights for one adapted linear: one A and one B per output slice."""

    lora_a: tuple[torch.Tensor, ...]
    """Per slice, [max_slots, max_rank, in_features]."""
    lora_b: tuple[torch.Tensor, ...]
    """Per slice, [max_slots, n_s, max_rank]."""
    scale: torch.Tensor
    """fp32 [max_slots]: alpha / rank of the module in each slot (0 for an empty slot)."""
    ranks: torch.Tensor
    """int32 [max_slots]: true rank of the module in each slot (0 for an empty slot)."""

    @classmethod
    def allocate(
        cls,
        in_features: int,
        slice_widths: tuple[int, ...],
        max_slots: int,
        max_rank: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> "LoraStack":
        """Zeroed buffers for `max_slots` modules of rank at most `max_rank`."""
        lora_a = tuple(
            torch.zeros(max_slots, max_rank, in_features, dtype=dtype, device=device)
            for _ in slice_widths
        )
        lora_b = tuple(
            torch.zeros(max_slots, width, max_rank, dtype=dtype, device=device) for width in slice_widths
        )
        return cls(
            lora_a=lora_a,
            lora_b=lora_b,
            scale=torch.zeros(max_slots, dtype=torch.float32, device=device),
            ranks=torch.zeros(max_slots, dtype=torch.int32, device=device),
        )

    @property
    def slice_widths(self) -> tuple[int, ...]:
        return tuple(b.shape[1] for b in self.lora_b)

    @property
    def max_rank(self) -> int:
        return self.lora_a[0].shape[1]

    def clear_slot(self, slot: int) -> None:
        """Empty one slot (zero weights, scale and rank)."""
        for a, b in zip(self.lora_a, self.lora_b):
            a[slot].zero_()
            b[slot].zero_()
        self.scale[slot] = 0.0
        self.ranks[slot] = 0

    def write_slot(
        self,
        slot: int,
        per_slice: tuple[tuple[torch.Tensor, torch.Tensor] | None, ...],
        scale: float,
    ) -> None:
        """Put one module into `slot`: per slice its A [r, in] and B [n_s, r], or None (zeros), on any device and in
        any dtype. Every write is queued on the current stream, after the steps that may still read the slot; from
        pinned host memory in the pool's dtype no copy makes the host wait."""
        self.clear_slot(slot)
        rank = 0
        for s, pair in enumerate(per_slice):
            if pair is None:
                continue
            a, b = pair
            r = a.shape[0]
            if r > self.max_rank:
                raise ValueError(f"module rank {r} exceeds the pool's max_rank {self.max_rank}")
            self.lora_a[s][slot, :r].copy_(a, non_blocking=True)
            self.lora_b[s][slot, :, :r].copy_(b, non_blocking=True)
            rank = max(rank, r)
        self.scale[slot] = scale
        self.ranks[slot] = rank


def composed_lora(y: torch.Tensor, x: torch.Tensor, stack: LoraStack, meta: ModuleBatchMeta) -> None:
    """Add every token's module composition to `y` in place (see the module docstring)."""
    if use_triton(x):
        from tessera_kernels.composed_lora import triton as backend
    else:
        from tessera_kernels.composed_lora import reference as backend
    backend.composed_lora(y, x, stack, meta)
