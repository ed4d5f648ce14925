"""The model runner: turns a `StepPlan` into one forward pass and a `StepResult`.

It owns the static device buffers (`BatchMetadata`, `ModuleBatchMeta`, the KV caches), allocated once,
and its own copy of every running request's token ids and block table, updated from the plan's deltas.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kernels import NO_MODULE
from kernels.composed_lora import ModuleBatchMeta
from server.engine.graphs import DecodeGraphs
from server.engine.plan import NewRequestData, StepPlan, StepResult
from server.engine.sampling import logprobs_of, sample
from server.model.backbone import Backbone, ModuleWeights
from server.model.forward_context import BatchMetadata, forward_context


@dataclass
class _Held:
    """The runner's state of one request."""

    data: NewRequestData
    token_ids: list[int]
    block_ids: list[int]
    num_computed_tokens: int
    generator: torch.Generator


@dataclass(frozen=True)
class RunnerConfig:
    """Sizes of the runner's static buffers."""

    max_num_batched_tokens: int
    """Rows of the token buffers."""
    max_num_seqs: int
    """Rows of the per-sequence buffers."""
    max_blocks_per_seq: int
    """Columns of the block table."""
    max_k: int
    """Modules per token at most."""
    num_kv_blocks: int
    """Blocks in each layer's KV cache."""
    block_size: int
    """Tokens per block."""
    max_model_len: int = 0
    """Longest context of a request; decode graphs are captured for it."""
    graph_mode: str = "off"
    """Decode steps: `capture` (CUDA graphs), `padded` (the graphs' bucketed shapes, run eagerly) or `off`."""
    graph_max_batch: int = 0
    """Largest decode batch a graph serves."""


class ModelRunner:
    def __init__(self, model: Backbone, config: RunnerConfig, load_module: Callable[[str], tuple[ModuleWeights, float]]):
        self.model = model
        self.config = config
        self.load_module = load_module
        device = model.device
        modules = (
            ModuleBatchMeta.allocate(config.max_num_batched_tokens, config.max_k, model.max_slots, device)
            if model.max_slots > 0
            else None
        )
        self.meta = BatchMetadata.allocate(
            config.max_num_batched_tokens, config.max_num_seqs, config.max_blocks_per_seq, modules, device
        )
        shape = (config.num_kv_blocks, config.block_size, model.num_kv_heads, model.head_dim)
        self.kv_caches = [
            (torch.zeros(shape, dtype=model.dtype, device=device), torch.zeros(shape, dtype=model.dtype, device=device))
            for _ in range(model.num_layers)
        ]
        model.bind_kv_cache(self.kv_caches)
        self.held: dict[str, _Held] = {}
        self.graphs = None
        if config.graph_mode != "off":
            max_batch = min(config.graph_max_batch, config.max_num_seqs, config.max_num_batched_tokens)
            self.graphs = DecodeGraphs(model, self.meta, max_batch, config.max_model_len,
                                       capture=config.graph_mode == "capture")

    def kv_cache_bytes(self) -> int:
        """Bytes of every layer's key and value caches."""
        return sum(t.numel() * t.element_size() for cache in self.kv_caches for t in cache)

    def run(self, plan: StepPlan) -> StepResult:
        """Apply the plan's deltas, run one forward pass, sample the requests that sample."""
        self._apply(plan)
        if plan.is_empty:
            return StepResult()
        order = list(plan.num_scheduled_tokens)
        sampling_rows = self._fill(plan, order)
        if self.graphs is not None and self.graphs.is_decode(self.meta, len(sampling_rows)):
            logits = self.graphs.logits(self.meta.num_seqs, self.meta.has_modules)
            return self._sample(plan, order, sampling_rows, logits)
        with forward_context(self.meta):
            hidden = self.model(self.meta.input_ids[: self.meta.num_tokens], self.meta.positions[: self.meta.num_tokens])
            logits = self.model.compute_logits(hidden[self.meta.logits_indices[: len(sampling_rows)]])
        return self._sample(plan, order, sampling_rows, logits)

    def _apply(self, plan: StepPlan) -> None:
        for request_id in plan.dropped:
            self.held.pop(request_id, None)
        for slot, module_id in plan.module_loads:
            weights, scale = self.load_module(module_id)
            self.model.write_module(slot, weights, scale)
        for data in plan.new:
            generator = torch.Generator(device=self.model.device).manual_seed(data.seed)
            self.held[data.request_id] = _Held(data, list(data.token_ids), list(data.block_ids), data.num_computed_tokens, generator)
        for delta in plan.running:
            self.held[delta.request_id].block_ids += delta.new_block_ids

    def _fill(self, plan: StepPlan, order: list[str]) -> list[int]:
        """Write the step into the static buffers; the batch positions of the sampling requests."""
        ids, positions, slots, cu, lens, logit_rows, sampling_rows = [], [], [], [0], [], [], []
        token_slots, token_gates = [], []
        block_size = self.config.block_size
        tables = torch.zeros(len(order), self.config.max_blocks_per_seq, dtype=torch.int32)
        for i, request_id in enumerate(order):
            held = self.held[request_id]
            start, count = held.num_computed_tokens, plan.num_scheduled_tokens[request_id]
            ids += held.token_ids[start : start + count]
            span = range(start, start + count)
            positions += span
            slots += [held.block_ids[p // block_size] * block_size + p % block_size for p in span]
            cu.append(cu[-1] + count)
            lens.append(start + count)
            tables[i, : len(held.block_ids)] = torch.tensor(held.block_ids, dtype=torch.int32)
            token_slots += [self._padded(held.data.module_slots, NO_MODULE)] * count
            token_gates += [self._padded(held.data.gates, 0.0)] * count
            if request_id in plan.samples:
                logit_rows.append(cu[-1] - 1)
                sampling_rows.append(i)
        self._copy_in(ids, positions, slots, cu, lens, logit_rows, tables)
        self._fill_modules(token_slots, token_gates)
        return sampling_rows

    def _padded(self, values: tuple, pad) -> list:
        return list(values) + [pad] * (self.config.max_k - len(values))

    def _copy_in(self, ids, positions, slots, cu, lens, logit_rows, tables) -> None:
        meta, n, s = self.meta, len(ids), len(lens)
        meta.input_ids[:n].copy_(torch.tensor(ids), non_blocking=True)
        meta.positions[:n].copy_(torch.tensor(positions), non_blocking=True)
        meta.slot_mapping[:n].copy_(torch.tensor(slots), non_blocking=True)
        meta.cu_query_lens[: s + 1].copy_(torch.tensor(cu, dtype=torch.int32), non_blocking=True)
        meta.seq_lens[:s].copy_(torch.tensor(lens, dtype=torch.int32), non_blocking=True)
        meta.block_tables[:s].copy_(tables, non_blocking=True)
        if logit_rows:
            meta.logits_indices[: len(logit_rows)].copy_(torch.tensor(logit_rows), non_blocking=True)
        meta.num_tokens, meta.num_seqs = n, s
        meta.max_query_len = max(b - a for a, b in zip(cu, cu[1:]))
        meta.max_seq_len = max(lens)

    def _fill_modules(self, token_slots: list[list[int]], token_gates: list[list[float]]) -> None:
        meta = self.meta
        meta.has_modules = meta.modules is not None and any(s != NO_MODULE for row in token_slots for s in row)
        if meta.has_modules:
            meta.modules.fill(torch.tensor(token_slots, dtype=torch.int32), torch.tensor(token_gates, dtype=torch.float32))

    def _sample(self, plan: StepPlan, order: list[str], sampling_rows: list[int], logits: torch.Tensor) -> StepResult:
        for request_id in order:
            self.held[request_id].num_computed_tokens += plan.num_scheduled_tokens[request_id]
        request_ids = [order[i] for i in sampling_rows]
        params = [self.held[r].data.sampling for r in request_ids]
        generators = [self.held[r].generator for r in request_ids]
        token_ids = sample(logits, params, generators)
        logprobs = logprobs_of(logits, token_ids, params)
        for request_id, token_id in zip(request_ids, token_ids):
            self.held[request_id].token_ids.append(token_id)
        return StepResult(request_ids, token_ids, logprobs)
