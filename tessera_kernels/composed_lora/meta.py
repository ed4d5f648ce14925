"""Per-step module metadata for `composed_lora`, in preallocated buffers.

Running example: 3 tokens, k = 2, a pool of 4 slots.

    token_slots = [[2, 0], [2, -1], [1, 2]]      # -1 = NO_MODULE
    token_gates = [[.7, .3], [1., 0.], [.5, .5]]

Flattened (t * k + j) the live entries are 0:(t0,s2) 1:(t0,s0) 2:(t1,s2) 4:(t2,s1) 5:(t2,s2). Sorting
them by slot (NO_MODULE last, stable) gives the segments the kernels walk, so each module's A and B are
read once per segment instead of once per token:

    sorted_entries = [1, 4, 0, 2, 5, 3]          # slot 0 | slot 1 | slot 2 x3 | NO_MODULE
    slot_counts    = [1, 1, 3, 0, 1]             # last entry: NO_MODULE
    slot_starts    = [0, 1, 2, 5, 5]

The expand walks tokens in composition order (by slot of column 0, then column 1, ..., NO_MODULE last),
so a tile of consecutive tokens in that order shares few distinct modules and reads each one's B once:

    token_order    = [2, 0, 1]                   # (1, 2) < (2, 0) < (2, NO_MODULE)

Everything is computed on the device with no host sync (`fill`), into tensors whose addresses never
change, so a decode step can be captured in a CUDA graph and replayed with new compositions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tessera_kernels import NO_MODULE


@dataclass
class ModuleBatchMeta:
    """Which modules, with which gates, every token of a step applies."""

    token_slots: torch.Tensor
    """int32 [max_tokens, max_k]: pool slot of the j-th module of token t, NO_MODULE for none."""
    token_gates: torch.Tensor
    """fp32 [max_tokens, max_k]: gate of that module (0 where the slot is NO_MODULE)."""
    sorted_entries: torch.Tensor
    """int32 [max_tokens * max_k]: flat entries t * max_k + j sorted by slot, NO_MODULE last."""
    slot_counts: torch.Tensor
    """int32 [max_slots + 1]: entries per slot in this step; the last element counts NO_MODULE."""
    slot_starts: torch.Tensor
    """int32 [max_slots + 1]: offset of each slot's segment in `sorted_entries`."""
    token_order: torch.Tensor
    """int32 [max_tokens]: token ids sorted by their composition's slots (column 0 first, NO_MODULE last)."""
    num_tokens: int = 0
    """Tokens in this step (rows of the buffers that are live)."""

    @classmethod
    def allocate(
        cls, max_tokens: int, max_k: int, max_slots: int, device: torch.device | str
    ) -> "ModuleBatchMeta":
        """Buffers for at most `max_tokens` tokens, `max_k` modules each, `max_slots` pool slots."""
        if (max_slots + 1) ** max_k >= 2**63:
            raise ValueError(f"max_slots {max_slots} and max_k {max_k}: (max_slots + 1) ** max_k must be < 2**63")
        return cls(
            token_slots=torch.full((max_tokens, max_k), NO_MODULE, dtype=torch.int32, device=device),
            token_gates=torch.zeros((max_tokens, max_k), dtype=torch.float32, device=device),
            sorted_entries=torch.zeros(max_tokens * max_k, dtype=torch.int32, device=device),
            slot_counts=torch.zeros(max_slots + 1, dtype=torch.int32, device=device),
            slot_starts=torch.zeros(max_slots + 1, dtype=torch.int32, device=device),
            token_order=torch.arange(max_tokens, dtype=torch.int32, device=device),
        )

    @property
    def max_k(self) -> int:
        return self.token_slots.shape[1]

    @property
    def max_slots(self) -> int:
        return self.slot_counts.shape[0] - 1

    def fill(self, token_slots: torch.Tensor, token_gates: torch.Tensor) -> None:
        """Copy a step's `[num_tokens, k]` slots and gates in (k <= max_k) and rebuild the segments.

        Rows past `num_tokens` and columns past `k` are reset to NO_MODULE, so stale entries from an
        earlier, larger step never apply.
        """
        num_tokens, k = token_slots.shape
        if k > self.max_k or num_tokens > self.token_slots.shape[0]:
            raise ValueError(
                f"step needs [{num_tokens}, {k}] module entries, buffers hold {list(self.token_slots.shape)}"
            )
        self.token_slots.fill_(NO_MODULE)
        self.token_gates.zero_()
        self.token_slots[:num_tokens, :k].copy_(token_slots, non_blocking=True)
        self.token_gates[:num_tokens, :k].copy_(token_gates, non_blocking=True)
        self.num_tokens = num_tokens
        self._build_segments()

    def _build_segments(self) -> None:
        flat = self.token_slots.reshape(-1).long()  # [max_tokens * max_k]
        key = torch.where(flat < 0, torch.full_like(flat, self.max_slots), flat)
        self.sorted_entries.copy_(torch.argsort(key, stable=True).to(torch.int32))
        counts = torch.zeros(self.max_slots + 1, dtype=torch.int64, device=flat.device)
        counts.scatter_add_(0, key, torch.ones_like(key))
        self.slot_counts.copy_(counts.to(torch.int32))
        self.slot_starts.copy_((torch.cumsum(counts, 0) - counts).to(torch.int32))
        # One int64 key per token: its slots as digits in base max_slots + 1 (`allocate` keeps it < 2**63).
        digits = key.view(-1, self.max_k)  # [max_tokens, max_k], NO_MODULE as max_slots
        powers = (self.max_slots + 1) ** torch.arange(self.max_k - 1, -1, -1, device=flat.device)  # [max_k]
        self.token_order.copy_(torch.argsort((digits * powers).sum(1), stable=True).to(torch.int32))
