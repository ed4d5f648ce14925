"""Per-step batch metadata, handed to the backbone's layers through `with forward_context(meta):`.

The runner owns one `BatchMetadata` whose tensors are allocated once at start-up at their maximum sizes
and refilled every step, so their addresses never change and a CUDA graph captured over a step can be
replayed with new contents. Layers never receive metadata as arguments: attention reads the KV fields,
adapted linears read `modules`.

Running example: two sequences in one step, block_size 4. Sequence 0 decodes its 7th token (6 cached,
1 new); sequence 1 prefills a 3-token chunk after 2 cached tokens.

    num_tokens = 4, num_seqs = 2
    input_ids     = [t6, u2, u3, u4]          positions = [6, 2, 3, 4]
    cu_query_lens = [0, 1, 4]                 seq_lens  = [7, 5]
    block_tables  = [[3, 8, -], [5, 1, -]]    slot_mapping = [8*4+2, 5*4+2, 5*4+3, 1*4+0]
    logits_indices = [0, 3]                   (the last token of each sequence that samples)
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from tessera_kernels.composed_lora import ModuleBatchMeta
from tessera_kernels.paged_attention import AttentionMeta


@dataclass
class BatchMetadata:
    """Everything a forward pass over one step's tokens needs besides the weights."""

    input_ids: torch.Tensor
    """int64 [max_tokens]: token ids of the step, sequences back to back."""
    positions: torch.Tensor
    """int64 [max_tokens]: position of each token in its sequence."""
    slot_mapping: torch.Tensor
    """int64 [max_tokens]: flat KV-cache slot (block * block_size + offset) each token writes."""
    block_tables: torch.Tensor
    """int32 [max_seqs, max_blocks_per_seq]: KV blocks of each sequence, in order."""
    seq_lens: torch.Tensor
    """int32 [max_seqs]: context length of each sequence after this step."""
    cu_query_lens: torch.Tensor
    """int32 [max_seqs + 1]: cumulative count of this step's tokens per sequence."""
    logits_indices: torch.Tensor
    """int64 [max_tokens]: index of each token whose logits are sampled: the last of each sequence that samples
    (and, for a sequence that runs drafts, each draft too)."""
    modules: ModuleBatchMeta | None
    """Per-token module slots and gates; None when the backbone serves no modules."""
    num_tokens: int = 0
    """Live tokens in the step."""
    num_seqs: int = 0
    """Live sequences in the step."""
    max_query_len: int = 0
    """Largest number of this step's tokens in one sequence (host value)."""
    max_seq_len: int = 0
    """Largest context length in the step (host value)."""
    has_modules: bool = False
    """Whether any token of the step applies a module; adapted linears skip the op when not."""

    @classmethod
    def allocate(
        cls,
        max_tokens: int,
        max_seqs: int,
        max_blocks_per_seq: int,
        modules: ModuleBatchMeta | None,
        device: torch.device | str,
    ) -> "BatchMetadata":
        """Zeroed buffers at their maximum sizes."""
        return cls(
            input_ids=torch.zeros(max_tokens, dtype=torch.int64, device=device),
            positions=torch.zeros(max_tokens, dtype=torch.int64, device=device),
            slot_mapping=torch.full((max_tokens,), -1, dtype=torch.int64, device=device),
            block_tables=torch.zeros(max_seqs, max_blocks_per_seq, dtype=torch.int32, device=device),
            seq_lens=torch.zeros(max_seqs, dtype=torch.int32, device=device),
            cu_query_lens=torch.zeros(max_seqs + 1, dtype=torch.int32, device=device),
            logits_indices=torch.zeros(max_tokens, dtype=torch.int64, device=device),
            modules=modules,
        )

    def attention(self) -> AttentionMeta:
        """The view attention kernels read."""
        return AttentionMeta(
            block_tables=self.block_tables,
            seq_lens=self.seq_lens,
            cu_query_lens=self.cu_query_lens,
            num_seqs=self.num_seqs,
            max_query_len=self.max_query_len,
            max_seq_len=self.max_seq_len,
        )


_current: contextvars.ContextVar[BatchMetadata | None] = contextvars.ContextVar(
    "tessera_forward_context", default=None
)


@contextlib.contextmanager
def forward_context(meta: BatchMetadata) -> Iterator[BatchMetadata]:
    """Install `meta` for the layers of one forward pass; the previous value is restored on exit."""
    token = _current.set(meta)
    try:
        yield meta
    finally:
        _current.reset(token)


def get_forward_context() -> BatchMetadata:
    """The metadata of the forward pass in progress; an error outside `forward_context`."""
    meta = _current.get()
    if meta is None:
        raise RuntimeError("no forward context: run the backbone inside `with forward_context(meta):`")
    return meta
