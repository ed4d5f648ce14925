"""Host arrays the runner fills a step's buffers from, built per sequence rather than per token.

`HostRows` keeps, for every request the runner holds, its block-table row and its composition's padded
module slots and gates in one row of three numpy arrays, written when the request arrives or gains
blocks; a step gathers its sequences' rows with one fancy index per array. `StepRows` is one step's
arrays: a decode row (one token) costs a few list lookups, and the token rows of prefill chunks are
expanded by numpy. Running example, block_size 4: sequence 0 decodes position 6 (blocks [3, 8]),
sequence 1 prefills positions 2..4 (blocks [5, 1]):

    counts = [1, 3]        cu = [0, 1, 4]        seq_lens = [7, 5]
    seq_of_token = [0, 1, 1, 1]                  positions = [6, 2, 3, 4]
    slots = tables[seq_of_token, positions // 4] * 4 + positions % 4 = [34, 22, 23, 4]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from tessera_kernels import NO_MODULE
from server.engine.plan import PLACEHOLDER


class HeldRequest(Protocol):
    """What `StepRows` reads of the runner's state of a request."""

    request_id: str
    token_ids: list[int]
    block_ids: list[int]
    num_computed_tokens: int
    row: int
    pending: dict


class HostRows:
    """One row per held request: block table, module slots and gates, all padded to fixed widths."""

    def __init__(self, capacity: int, max_blocks_per_seq: int, max_k: int):
        self.tables = np.zeros((capacity, max_blocks_per_seq), dtype=np.int32)  # [capacity, max_blocks_per_seq]
        self.module_slots = np.full((capacity, max_k), NO_MODULE, dtype=np.int32)  # [capacity, max_k]
        self.module_gates = np.zeros((capacity, max_k), dtype=np.float32)  # [capacity, max_k]
        self.num_blocks = np.zeros(capacity, dtype=np.int64)  # [capacity]
        self._free = list(range(capacity - 1, -1, -1))

    @property
    def max_k(self) -> int:
        return self.module_slots.shape[1]

    def take(self, request_id: str, module_slots: Sequence[int], gates: Sequence[float]) -> int:
        """A fresh row for a request with this composition (no blocks yet)."""
        if len(module_slots) > self.max_k or len(gates) != len(module_slots):
            raise ValueError(
                f"request {request_id!r} composes {len(module_slots)} modules with {len(gates)} gates; "
                f"max_k is {self.max_k}"
            )
        if not self._free:
            self._grow()
        row = self._free.pop()
        self.tables[row] = 0
        self.num_blocks[row] = 0
        self.module_slots[row] = NO_MODULE
        self.module_gates[row] = 0.0
        self.module_slots[row, : len(module_slots)] = module_slots
        self.module_gates[row, : len(gates)] = gates
        return row

    def release(self, row: int) -> None:
        self._free.append(row)

    def add_blocks(self, request_id: str, row: int, block_ids: list[int]) -> None:
        """Append blocks to a row's block table."""
        start = int(self.num_blocks[row])
        end = start + len(block_ids)
        if end > self.tables.shape[1]:
            raise RuntimeError(
                f"request {request_id!r} would hold {end} KV blocks; the block table has {self.tables.shape[1]}"
            )
        self.tables[row, start:end] = block_ids
        self.num_blocks[row] = end

    def _grow(self) -> None:
        capacity = len(self.tables)
        self.tables = np.concatenate([self.tables, np.zeros_like(self.tables)])
        self.module_slots = np.concatenate([self.module_slots, np.full_like(self.module_slots, NO_MODULE)])
        self.module_gates = np.concatenate([self.module_gates, np.zeros_like(self.module_gates)])
        self.num_blocks = np.concatenate([self.num_blocks, np.zeros_like(self.num_blocks)])
        self._free += range(2 * capacity - 1, capacity - 1, -1)


@dataclass
class StepRows:
    """One step's host arrays: sequences in batch order, their tokens back to back."""

    index: np.ndarray
    """int64 [num_seqs]: each sequence's row in `HostRows`."""
    counts: np.ndarray
    """int64 [num_seqs]: tokens each sequence runs."""
    cu: np.ndarray
    """int64 [num_seqs + 1]: cumulative `counts`."""
    seq_lens: np.ndarray
    """int64 [num_seqs]: context length of each sequence after the step."""
    tables: np.ndarray
    """int32 [num_seqs, max_blocks_per_seq]: block table rows."""
    token_ids: np.ndarray
    """int64 [num_tokens]: token ids (PLACEHOLDER where a token is still on the device)."""
    positions: np.ndarray
    """int64 [num_tokens]: position of each token in its sequence."""
    slots: np.ndarray
    """int64 [num_tokens]: KV-cache slot each token writes."""
    seq_of_token: np.ndarray
    """int64 [num_tokens]: batch row of each token's sequence."""
    all_decode: bool
    """Every sequence runs exactly one token."""

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_seqs(self) -> int:
        return len(self.counts)

    @classmethod
    def build(cls, held: list[HeldRequest], counts: list[int], host: HostRows, block_size: int) -> StepRows:
        """The arrays of a step running `counts[i]` tokens of `held[i]` from its first uncomputed one."""
        starts = np.array([h.num_computed_tokens for h in held], dtype=np.int64)  # [num_seqs]
        count_arr = np.array(counts, dtype=np.int64)  # [num_seqs]
        cu = np.zeros(len(held) + 1, dtype=np.int64)  # [num_seqs + 1]
        np.cumsum(count_arr, out=cu[1:])
        all_decode = min(counts) == 1 and int(cu[-1]) == len(held)
        if all_decode:
            ids = [h.token_ids[h.num_computed_tokens] for h in held]
            seq_of_token, positions = np.arange(len(held)), starts  # [num_tokens] each
        else:
            ids = []
            for h, count in zip(held, counts):
                ids += h.token_ids[h.num_computed_tokens : h.num_computed_tokens + count]
            seq_of_token = np.repeat(np.arange(len(held)), count_arr)  # [num_tokens]
            positions = np.arange(cu[-1]) - cu[seq_of_token] + starts[seq_of_token]  # [num_tokens]
        if len(ids) != cu[-1]:
            raise RuntimeError(f"step schedules {int(cu[-1])} tokens but the runner holds {len(ids)} of them")
        index = np.array([h.row for h in held], dtype=np.int64)  # [num_seqs]
        block_index = positions // block_size  # [num_tokens]
        _check_blocks(held, host.num_blocks[index][seq_of_token], seq_of_token, block_index)
        tables = host.tables[index]  # [num_seqs, max_blocks_per_seq]
        slots = tables[seq_of_token, block_index].astype(np.int64) * block_size + positions % block_size
        token_ids = np.array(ids, dtype=np.int64)  # [num_tokens]
        return cls(index, count_arr, cu, starts + count_arr, tables, token_ids, positions, slots, seq_of_token,
                   all_decode)

    def late_tokens(self, held: list[HeldRequest]) -> tuple[np.ndarray, list[tuple]]:
        """Rows whose token is still on the device (int64 [num_late], ascending) and, per row, the pending
        step that samples it and its row there."""
        rows = np.flatnonzero(self.token_ids == PLACEHOLDER)  # [num_late]
        seqs, positions = self.seq_of_token[rows].tolist(), self.positions[rows].tolist()
        return rows, [held[s].pending[p] for s, p in zip(seqs, positions)]

    def modules(self, host: HostRows) -> tuple[np.ndarray, np.ndarray] | None:
        """Per-token module slots and gates, [num_tokens, max_k] each; None when no token applies a module."""
        slots = host.module_slots[self.index]  # [num_seqs, max_k]
        if not (slots[self.counts > 0] != NO_MODULE).any():
            return None
        gates = host.module_gates[self.index]  # [num_seqs, max_k]
        if not self.all_decode:
            slots = np.repeat(slots, self.counts, axis=0)  # [num_tokens, max_k]
            gates = np.repeat(gates, self.counts, axis=0)  # [num_tokens, max_k]
        return slots, gates


def _check_blocks(held: list[HeldRequest], num_blocks: np.ndarray, seq_of_token: np.ndarray,
                  block_index: np.ndarray) -> None:
    """Every token's position must fall in a block its sequence holds (`num_blocks`: [num_tokens])."""
    outside = np.flatnonzero(block_index >= num_blocks)
    if len(outside):
        h = held[seq_of_token[outside[0]]]
        raise RuntimeError(
            f"request {h.request_id!r} runs a token in block {int(block_index[outside[0]])} "
            f"but holds {len(h.block_ids)} blocks"
        )
