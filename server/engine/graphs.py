"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket.

A decode step (every sequence adds one token) has the same kernels and shapes for every batch of the
same size, so it is captured once per bucket and replayed: no Python, no launch overhead. A step of n
sequences runs the graph of the smallest bucket >= n, with rows n..bucket-1 padded to harmless work:

    input_ids 0, positions 0, slot_mapping -1 (write_kv skips it), seq_lens 1 and cu_query_lens + 1 per
    row (attention over one cached position of a valid block), logits_indices = the row itself,
    module slots NO_MODULE (ModuleBatchMeta.fill resets rows past the live ones)

Everything a graph reads lives in the runner's static `BatchMetadata` buffers, the KV caches and the
module pool's stacks, whose addresses never change; host values the kernels size their grids with are
fixed at capture (`max_seq_len` = the longest context a request may have, so the decode kernel's
context splits cover any replay). Compositions change between replays by refilling `ModuleBatchMeta`,
never by recapture. Steps with and without modules get separate graphs, so a backbone-only batch does
not pay for the composed_lora launches.

With `capture=False` the same padded, fixed-shape forward runs eagerly: the CPU test path, which checks
that padding never changes the live rows' results.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tessera_kernels import NO_MODULE
from server.model.backbone import Backbone
from server.model.forward_context import BatchMetadata, forward_context

logger = logging.getLogger(__name__)


def decode_buckets(max_batch: int) -> tuple[int, ...]:
    """Batch sizes that get a graph: 1, 2, 4, 8, then every multiple of 8 up to `max_batch` (and it)."""
    sizes = [b for b in (1, 2, 4) if b < max_batch] + list(range(8, max_batch, 8)) + [max_batch]
    return tuple(sorted(set(sizes)))


@dataclass
class _Graph:
    """One captured (or, without capture, eagerly run) decode forward of `size` rows."""

    size: int
    run: Callable[[], torch.Tensor]
    """Replays the step; returns the static logits buffer [size, vocab]."""


class DecodeGraphs:
    """The decode graphs of one runner: `is_decode` picks the steps they serve, `logits` runs one."""

    def __init__(self, model: Backbone, meta: BatchMetadata, max_batch: int, max_seq_len: int, capture: bool):
        self.model, self.meta = model, meta
        self.max_seq_len, self.capture = max_seq_len, capture
        self.buckets = decode_buckets(max_batch)
        self.graphs: dict[tuple[int, bool], _Graph] = {}
        self.pool = None
        self.num_replays = 0  # decode steps served by a graph
        variants = (False, True) if meta.modules is not None else (False,)
        for with_modules in variants:
            for size in reversed(self.buckets):  # largest first: smaller graphs reuse its memory pool
                self.graphs[size, with_modules] = self._build(size, with_modules)
        if capture:
            logger.info("captured %d decode CUDA graphs (batch sizes %s)", len(self.graphs), list(self.buckets))

    def is_decode(self, meta: BatchMetadata, num_sampling: int) -> bool:
        """Whether this step is a pure decode step a graph can run: one token per sequence, all sampling."""
        return (meta.max_query_len == 1 and meta.num_tokens == meta.num_seqs == num_sampling
                and meta.num_seqs <= self.buckets[-1])

    def logits(self, num_seqs: int, has_modules: bool) -> torch.Tensor:
        """Logits [num_seqs, vocab] of the decode step filled into the static buffers."""
        size = next(b for b in self.buckets if b >= num_seqs)
        self._pad(num_seqs, size)
        self.num_replays += 1
        return self.graphs[size, has_modules].run()[:num_seqs]

    def _pad(self, start: int, end: int) -> None:
        """Turn rows start..end-1 into padding rows (module docstring)."""
        meta = self.meta
        if end > start:
            rows = torch.arange(start, end, device=meta.input_ids.device)  # [end - start]
            meta.input_ids[start:end].zero_()
            meta.positions[start:end].zero_()
            meta.slot_mapping[start:end].fill_(-1)
            meta.seq_lens[start:end].fill_(1)
            meta.cu_query_lens[start + 1 : end + 1].copy_(rows + 1)
            meta.logits_indices[start:end].copy_(rows)
        meta.num_tokens = meta.num_seqs = end
        meta.max_query_len, meta.max_seq_len = 1, self.max_seq_len

    def _forward(self, size: int, with_modules: bool) -> torch.Tensor:
        meta = self.meta
        meta.has_modules = with_modules
        with forward_context(meta):
            hidden = self.model(meta.input_ids[:size], meta.positions[:size])
            return self.model.compute_logits(hidden[meta.logits_indices[:size]])

    def _build(self, size: int, with_modules: bool) -> _Graph:
        if not self.capture:
            return _Graph(size, lambda: self._forward(size, with_modules))
        self.meta.cu_query_lens[0] = 0
        self._pad(0, size)
        if with_modules:
            k = self.meta.modules.max_k
            self.meta.modules.fill(torch.full((size, k), NO_MODULE, dtype=torch.int32),
                                   torch.zeros(size, k, dtype=torch.float32))
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: Triton compiles and grow-only caches settle outside capture
            for _ in range(2):
                self._forward(size, with_modules)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._forward(size, with_modules)
        self.pool = graph.pool()

        def replay() -> torch.Tensor:
            graph.replay()
            return logits

        return _Graph(size, replay)
