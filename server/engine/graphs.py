"""Decode and verify steps replayed from CUDA graphs, one graph per batch-size bucket and step kind.

A decode step (every sequence adds one token) has the same kernels and shapes for every batch of the
same size, so it is captured once per bucket and replayed: no Python, no launch overhead. A step of n
sequences runs the graph of the smallest bucket >= n, with rows n..bucket-1 padded to harmless work:

    input_ids 0, positions 0, slot_mapping -1 (write_kv skips it), seq_lens 1 and cu_query_lens + 1 per
    row (attention over one cached position of a valid block), logits_indices = the row itself,
    module slots NO_MODULE (ModuleBatchMeta.fill resets rows past the live ones)

A verify step (speculative decoding: each sequence runs its last token and up to Q - 1 drafts, and every
token samples) gets graphs of its own, for the buckets whose `bucket * Q` tokens fit `max_tokens`. A graph
of bucket S runs S * Q token rows: the live sequences packed as the eager step packs them, then the padding
sequences one token each as above; the token rows left over belong to no sequence (past
cu_query_lens[S]), so attention leaves them alone, write_kv skips them (slot -1), every other op works row by
row, and their logits are not sampled. Live logit rows are the step's first rows (every token samples), so
the graph's logits are sliced, not gathered.

Everything a graph reads lives in the runner's static `BatchMetadata` buffers, the KV caches and the
module pool's stacks, whose addresses never change; host values the kernels size their grids with are
fixed at capture (`max_seq_len` = the longest context a request may have, so the decode kernel's
context splits cover any replay; `max_query_len` = 1 or Q). Compositions change between replays by
refilling `ModuleBatchMeta`, never by recapture. Steps with and without modules get separate graphs, so a
backbone-only batch does not pay for the composed_lora launches.

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


def verify_buckets(max_batch: int, query_len: int, max_tokens: int) -> tuple[int, ...]:
    """Batch sizes that get a verify graph: the decode buckets whose `bucket * query_len` token rows fit
    `max_tokens`; none when `query_len` is 1 (no drafts)."""
    if query_len <= 1:
        return ()
    return tuple(b for b in decode_buckets(max_batch) if b * query_len <= max_tokens)


@dataclass
class _Graph:
    """One captured (or, without capture, eagerly run) forward of `size` sequences, `query_len` tokens each."""

    size: int
    run: Callable[[], torch.Tensor]
    """Replays the step; returns the static logits buffer [size * query_len, vocab]."""


class DecodeGraphs:
    """The decode and verify graphs of one runner: `select` picks the graph a step can run, `logits` runs it."""

    def __init__(self, model: Backbone, meta: BatchMetadata, max_batch: int, max_seq_len: int, capture: bool,
                 query_len: int = 1, max_tokens: int = 0):
        self.model, self.meta = model, meta
        self.max_seq_len, self.capture = max_seq_len, capture
        self.buckets = decode_buckets(max_batch)
        self.query_len = query_len
        """Token rows per sequence of a verify graph: 1 + the most drafts a sequence runs in a step."""
        self.verify_buckets = verify_buckets(max_batch, query_len, max_tokens)
        self.graphs: dict[tuple[int, int, bool], _Graph] = {}
        self.pool = None
        self.num_replays = 0  # decode and verify steps served by a graph
        self.num_verify_replays = 0  # of those, verify steps
        variants = (False, True) if meta.modules is not None else (False,)
        shapes = [(size, 1) for size in self.buckets] + [(size, query_len) for size in self.verify_buckets]
        for with_modules in variants:
            for size, rows in sorted(shapes, key=lambda shape: -shape[0] * shape[1]):  # largest first: smaller
                self.graphs[size, rows, with_modules] = self._build(size, rows, with_modules)  # reuse its pool
        if capture:
            logger.info("captured %d CUDA graphs (decode batch sizes %s; verify batch sizes %s, %d tokens each)",
                        len(self.graphs), list(self.buckets), list(self.verify_buckets), query_len)

    def select(self, meta: BatchMetadata, num_sampling: int) -> tuple[int, int] | None:
        """(bucket, tokens per sequence) of the graph that runs this step, or None (eager): a decode step (one
        token per sequence, all sampling), or a verify step (up to `query_len` tokens per sequence, all
        sampling), of at most the largest bucket's sequences."""
        if meta.num_tokens != num_sampling:  # a prompt chunk's tokens do not all sample
            return None
        if meta.max_query_len == 1:
            buckets, rows = self.buckets, 1
        elif meta.max_query_len <= self.query_len:
            buckets, rows = self.verify_buckets, self.query_len
        else:
            return None
        if not buckets or meta.num_seqs > buckets[-1]:
            return None
        return next(b for b in buckets if b >= meta.num_seqs), rows

    def logits(self, shape: tuple[int, int], has_modules: bool, num_rows: int) -> torch.Tensor:
        """Logits [num_rows, vocab] of the step filled into the static buffers, run by the graph of `shape`
        (from `select`)."""
        size, rows = shape
        self._pad(size, rows)
        self.num_replays += 1
        self.num_verify_replays += rows > 1
        return self.graphs[size, rows, has_modules].run()[:num_rows]

    def _pad(self, size: int, rows: int) -> None:
        """Pad the live step to `size` sequences and `size * rows` token rows (module docstring): sequences past
        the live ones take one token each, and the token rows after them belong to no sequence."""
        meta = self.meta
        live_seqs, live_tokens, total = meta.num_seqs, meta.num_tokens, size * rows
        if total > live_tokens:
            tokens = torch.arange(live_tokens, total, device=meta.input_ids.device)
            meta.input_ids[live_tokens:total].zero_()
            meta.positions[live_tokens:total].zero_()
            meta.slot_mapping[live_tokens:total].fill_(-1)
            meta.logits_indices[live_tokens:total].copy_(tokens)
        if size > live_seqs:
            ends = torch.arange(1, size - live_seqs + 1, device=meta.input_ids.device) + live_tokens
            meta.seq_lens[live_seqs:size].fill_(1)
            meta.cu_query_lens[live_seqs + 1 : size + 1].copy_(ends)
        meta.num_tokens, meta.num_seqs = total, size
        meta.max_query_len, meta.max_seq_len = rows, self.max_seq_len

    def _forward(self, size: int, rows: int, with_modules: bool) -> torch.Tensor:
        meta = self.meta
        meta.has_modules = with_modules
        total = size * rows
        with forward_context(meta):
            hidden = self.model(meta.input_ids[:total], meta.positions[:total])
            return self.model.compute_logits(hidden[meta.logits_indices[:total]])

    def _build(self, size: int, rows: int, with_modules: bool) -> _Graph:
        if not self.capture:
            return _Graph(size, lambda: self._forward(size, rows, with_modules))
        self.meta.cu_query_lens[0] = 0
        self.meta.num_seqs = self.meta.num_tokens = 0
        self._pad(size, rows)
        if with_modules:
            k = self.meta.modules.max_k
            self.meta.modules.fill(torch.full((size * rows, k), NO_MODULE, dtype=torch.int32),
                                   torch.zeros(size * rows, k, dtype=torch.float32))
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: Triton compiles and grow-only caches settle outside capture
            for _ in range(2):
                self._forward(size, rows, with_modules)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._forward(size, rows, with_modules)
        self.pool = graph.pool()

        def replay() -> torch.Tensor:
            graph.replay()
            return logits

        return _Graph(size, replay)
