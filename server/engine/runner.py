"""The model runner: turns a `StepPlan` into one forward pass and a `StepResult`.

It owns the static device buffers (`BatchMetadata`, `ModuleBatchMeta`, the KV caches), allocated once,
and its own copy of every running request's token ids and block table, updated from the plan's deltas;
the block table and the padded module slots and gates also live in a host row per request (`HostRows`),
so filling a step costs a few lookups per sequence, not work per token.

A step is `launch`ed (deltas applied, buffers filled, forward and sampling queued on the device, no host
sync) and its `PendingStep.result()` read later: the step's one sync. Until then each sampled token is a
`PLACEHOLDER` in the runner's token ids; if the next step is launched before that (asynchronous
scheduling), the rows that feed such a token are filled from the pending step's device tensor of sampled
ids with an index copy into the static `input_ids` buffer, before the forward or graph replay reads it.
`run` = launch + result, the synchronous step. A structured request's grammar mask needs its previous token, so
when that token is still in flight the step's sampling is deferred (`PendingStep.sample`) until the caller has
read the step before back: the forward pass is queued either way.

A request with drafts in the plan (`StepPlan.drafts`, speculative decoding) runs them after its last token and
samples at each of those positions, with each position's own seed; `result()` keeps the draws up to the first
that differs from its draft (`speculative.accepted`), and the kept drafts count as computed from then on.
"""

from __future__ import annotations

import functools
import itertools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from tessera_kernels.composed_lora import ModuleBatchMeta
from server.engine.graphs import DecodeGraphs
from server.engine.host_rows import HostRows, StepRows
from server.engine.penalties import (TokenCounts, allowed_mask, history_window, needs_history, needs_processing,
                                     process)
from server.engine.plan import LOGIT_ROWS, PLACEHOLDER, NewRequestData, StepPlan, StepResult
from server.engine.request import SamplingParams
from server.engine.sampling import (
    DeviceLogprobs, DevicePromptLogprobs, draw_seed, gather_logprobs, gather_prompt_logprobs, read_logprobs,
    read_prompt_logprobs, sample_on_device,
)
from server.engine.speculative import accepted
from server.engine.transfer import copy_into, host_tensor, to_device
from server.model.backbone import Backbone, ModuleWeights
from server.model.forward_context import BatchMetadata, forward_context


@dataclass
class _Held:
    """The runner's state of one request."""

    data: NewRequestData
    token_ids: list[int]
    block_ids: list[int]
    num_computed_tokens: int
    row: int
    """This request's row in the runner's `HostRows` (block table, module slots and gates)."""
    processed: bool = False
    """Whether its logits get penalties, biases or min_tokens (`penalties`)."""
    pending: dict[int, tuple[PendingStep, int]] = field(default_factory=dict)
    """Per placeholder in `token_ids`, by position: the launched step and the row that samples it."""

    @property
    def request_id(self) -> str:
        return self.data.request_id


@dataclass
class PendingStep:
    """A launched step; its sampled tokens stay on the device until `result()`."""

    request_ids: list[str] = field(default_factory=list)
    """The requests that sample, in row order."""
    held: list[_Held] = field(default_factory=list)
    """The runner's state of each, whose placeholder at `positions[i]` the result replaces."""
    positions: list[int] = field(default_factory=list)
    params: list[SamplingParams] = field(default_factory=list)
    """Per sampling row."""
    drafts: list[list[int]] = field(default_factory=list)
    """Per request, the drafts it ran (its rows: one per draft plus one); empty when the step ran none: then
    request i is row i."""
    sampled: torch.Tensor | None = None
    """Sampled token ids on the device: int64 [num_sampling rows]."""
    logprobs: DeviceLogprobs | None = None
    prompt_logprobs: DevicePromptLogprobs | None = None
    prompt_targets: list[int] = field(default_factory=list)
    """The prompt tokens `prompt_logprobs` scores, in its row order."""
    drawable: torch.Tensor | None = None
    """With masked logits (min_tokens, allowed tokens, bad words, grammars): bool [num_sampling], whether a row
    had any finite logit."""
    counts: TokenCounts | None = None
    """With drafts: the token counts to advance by what each request with penalties or bad words keeps."""
    deferred: Callable[[], None] | None = None
    """The step's sampling, not queued yet: a structured row's mask waits until its matcher has seen the token
    the step before this one draws for it (`ModelRunner.launch`)."""
    _result: StepResult | None = None

    def sample(self) -> None:
        """Queue the step's sampling if it was deferred (no host sync); the fields above are then set."""
        if self.deferred is not None:
            deferred, self.deferred = self.deferred, None
            deferred()

    def result(self) -> StepResult:
        """Read the sampled tokens back (the step's host sync) and put them into the runner's token ids."""
        self.sample()
        if self._result is None:
            drawable = None
            if self.drawable is not None:  # one copy for both
                token_ids, drawable = torch.stack([self.sampled, self.drawable.to(torch.int64)]).tolist()
            else:
                token_ids = self.sampled.tolist() if self.sampled is not None else []
            logprobs = read_logprobs(self.logprobs, token_ids, self.params)
            prompt = read_prompt_logprobs(self.prompt_logprobs, self.prompt_targets)
            if self.drafts:
                self._result = self._keep(token_ids, logprobs, drawable, prompt)
                return self._result
            self._result = StepResult(list(self.request_ids), token_ids, logprobs, prompt)
            if drawable is not None:
                self._result.undrawable = {r for r, ok in zip(self.request_ids, drawable) if not ok}
            for held, position, token_id in zip(self.held, self.positions, token_ids):
                held.token_ids[position] = token_id
                held.pending.pop(position, None)
        return self._result

    def _keep(self, row_tokens: list[int], row_logprobs: list, drawable: list[int] | None, prompt) -> StepResult:
        """The result of a step that ran drafts: each request keeps its rows' draws up to the first that differs
        from its draft (the last one kept is its sampled token, the others its accepted drafts), in its token ids
        too, where the kept drafts count as computed."""
        result = StepResult(prompt_logprobs=prompt)
        row = 0
        for request_id, held, position, drafts in zip(self.request_ids, self.held, self.positions, self.drafts):
            kept = accepted(drafts, row_tokens[row : row + len(drafts) + 1])
            if drawable is not None and not all(drawable[row : row + len(kept)]):  # (rows past a refused draft
                # do not count) a row with nothing to draw ends what is kept: the drafts before it stand, and the
                # request fails at that row, as plain decoding would
                kept = kept[: drawable.index(0, row) - row + 1]
                result.undrawable.add(request_id)
            result.request_ids.append(request_id)
            result.sampled_token_ids.append(kept[-1])
            result.logprobs.append(row_logprobs[row + len(kept) - 1])
            if drafts:
                result.accepted[request_id] = (kept[:-1], row_logprobs[row : row + len(kept) - 1])
            held.token_ids[position : position + 1] = kept
            held.num_computed_tokens += len(kept) - 1
            held.pending.pop(position, None)
            if self.counts is not None and request_id in self.counts.row_of:
                self.counts.record_tokens(request_id, kept)
            row += len(drafts) + 1
        return result


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
    graph_query_len: int = 1
    """Token rows per sequence of the verify graphs (speculative decoding): 1 + the most drafts a request runs in
    a step; 1: no verify graphs."""
    kv_cache_dtype: torch.dtype | None = None
    """dtype of the KV cache (EngineConfig.kv_cache_dtype); None: the model's."""


class ModelRunner:
    def __init__(self, model: Backbone, config: RunnerConfig, load_module: Callable[[str], tuple[ModuleWeights, float]],
                 eos_ids: set[int] = frozenset()):
        self.model = model
        self.config = config
        self.load_module = load_module
        self.eos_ids = set(eos_ids)
        self.counts: TokenCounts | None = None
        """Token counts and last tokens of the requests with penalties or bad words, on the device; made when the
        first one comes."""
        self.allowed: dict[str, torch.Tensor] = {}
        """`allowed_mask` of each held request with `allowed_token_ids`."""
        self._extras: Counter[str] = Counter()
        """Held requests per extra a step may owe them (`_extras_of`), so steps without any skip the checks."""
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
        kv_dtype = config.kv_cache_dtype or model.dtype
        self.kv_caches = [
            (torch.zeros(shape, dtype=kv_dtype, device=device), torch.zeros(shape, dtype=kv_dtype, device=device))
            for _ in range(model.num_layers)
        ]
        model.bind_kv_cache(self.kv_caches)
        self.held: dict[str, _Held] = {}
        self._unsampled: PendingStep | None = None
        """The launched step whose sampling is deferred, if any (`launch`)."""
        self.num_deferred_samples = 0
        """Steps whose sampling waited for the step before them to be read (structured rows, `launch`)."""
        self.host_rows = HostRows(config.max_num_seqs, config.max_blocks_per_seq, config.max_k)
        self.graphs = None
        if config.graph_mode != "off":
            max_batch = min(config.graph_max_batch, config.max_num_seqs, config.max_num_batched_tokens)
            self.graphs = DecodeGraphs(model, self.meta, max_batch, config.max_model_len,
                                       capture=config.graph_mode == "capture", query_len=config.graph_query_len,
                                       max_tokens=min(config.max_num_batched_tokens, LOGIT_ROWS))

    def kv_cache_bytes(self) -> int:
        """Bytes of every layer's key and value caches."""
        return sum(t.numel() * t.element_size() for cache in self.kv_caches for t in cache)

    def run(self, plan: StepPlan) -> StepResult:
        """One synchronous step: launch it and wait for its result."""
        return self.launch(plan).result()

    def launch(self, plan: StepPlan) -> PendingStep:
        """Apply the plan's deltas, queue one forward pass and the sampling of the requests that sample.

        The sampling is deferred (`PendingStep.deferred`) when a structured request samples while the token before
        it is still in flight (asynchronous scheduling): its grammar mask needs that token, so the caller reads the
        step before this one back, and its matchers advance, while this one's forward pass runs, and then calls
        `PendingStep.sample()` (vLLM's split of execute and sample). A step launched after it samples it first.
        """
        if self._unsampled is not None:
            self._unsampled.sample()  # (a no-op when the caller did it)
            self._unsampled = None
        self._apply(plan)
        if plan.is_empty:
            return PendingStep()
        order = list(plan.num_scheduled_tokens)
        sampling_rows, num_logit_rows = self._fill(plan, order)
        step = PendingStep()
        shape = self.graphs.select(self.meta, num_logit_rows) if self.graphs is not None else None
        if shape is not None:
            logits = self.graphs.logits(shape, self.meta.has_modules, num_logit_rows)
        else:
            with forward_context(self.meta):
                hidden = self.model(self.meta.input_ids[: self.meta.num_tokens],
                                    self.meta.positions[: self.meta.num_tokens])
                logits = self.model.compute_logits(hidden[self.meta.logits_indices[:num_logit_rows]])
                scored = self._score_prompts(plan, order, hidden)
            if scored is not None:
                step.prompt_logprobs, step.prompt_targets = scored
        sample = functools.partial(self._sample, plan, order, sampling_rows, logits, step)
        if self._masks_wait(order, sampling_rows):
            step.deferred, self._unsampled = sample, step
            self.num_deferred_samples += 1
        else:
            sample()
        return step

    def drop_deferred(self) -> None:
        """Never sample the step whose sampling is deferred (a failure failed its requests, which the next plan
        drops): its masks would wait for tokens that are never read."""
        if self._unsampled is not None:
            self._unsampled.deferred = None
            self._unsampled = None

    def _masks_wait(self, order: list[str], sampling_rows: list[int]) -> bool:
        """Whether a structured request samples in this step while its previous token is still in flight."""
        if not self._extras["structured"]:
            return False
        sampling = (self.held[order[i]] for i in sampling_rows)
        return any(held.data.matcher is not None and held.pending for held in sampling)

    def _score_prompts(self, plan: StepPlan, order: list[str], hidden: torch.Tensor):
        """For the requests that ask for prompt logprobs: the logprob of every prompt token this step's
        rows predict (the row of position p predicts the token at p + 1), as (device logprobs, targets)."""
        if not self._extras["scored"]:
            return None
        spans, rows, targets, offset = [], [], [], 0
        for request_id in order:
            held, count = self.held[request_id], plan.num_scheduled_tokens[request_id]
            k, start = held.data.sampling.prompt_logprobs, held.num_computed_tokens
            last = min(start + count, held.data.num_prompt_tokens - 1)  # the last prompt position it predicts
            if k is not None and last > start:
                spans.append((request_id, start + 1, last - start, k))
                rows += range(offset, offset + last - start)
                targets += held.token_ids[start + 1 : last + 1]
            offset += count
        if not spans:
            return None
        device = hidden.device
        rows_t = to_device(torch.tensor(rows, dtype=torch.int64), device)  # [N]
        targets_t = to_device(torch.tensor(targets, dtype=torch.int64), device)  # [N]
        gathered = gather_prompt_logprobs(lambda r: self.model.compute_logits(hidden[r]), rows_t, targets_t, spans)
        return gathered, targets

    def _apply(self, plan: StepPlan) -> None:
        for request_id in plan.dropped:
            self._forget(request_id)
        for slot, module_id in plan.module_loads:
            weights, scale = self.load_module(module_id)
            self.model.write_module(slot, weights, scale)
        for data in plan.new:
            self._forget(data.request_id)
            self.held[data.request_id] = self._hold(data)
        for delta in plan.running:
            if delta.new_block_ids:  # most decode steps add none
                held = self.held[delta.request_id]
                self.host_rows.add_blocks(delta.request_id, held.row, delta.new_block_ids)
                held.block_ids += delta.new_block_ids

    def _hold(self, data: NewRequestData) -> _Held:
        """The runner's state of a request new to it, with its row of `host_rows` written."""
        row = self.host_rows.take(data.request_id, data.module_slots, data.gates)
        try:
            self.host_rows.add_blocks(data.request_id, row, data.block_ids)
        except RuntimeError:
            self.host_rows.release(row)
            raise
        if needs_history(data.sampling):
            if self.counts is None:
                self.counts = TokenCounts(self.model.hf_config.vocab_size, self.model.device)
            prompt = data.num_prompt_tokens
            self.counts.hold(data.request_id, data.token_ids[:prompt], data.token_ids[prompt:],
                             history_window(data.sampling))
        if data.sampling.allowed_token_ids:
            self.allowed[data.request_id] = allowed_mask(data.sampling, self.model.hf_config.vocab_size,
                                                         self.model.device)
        self._extras.update(self._extras_of(data))
        return _Held(data, list(data.token_ids), list(data.block_ids), data.num_computed_tokens, row,
                     processed=needs_processing(data.sampling))

    @staticmethod
    def _extras_of(data: NewRequestData) -> list[str]:
        """What a request needs beyond the plain draw: processed logits, device token counts, a grammar mask,
        prompt scoring, and the check that its masks (-inf logits) left it a token."""
        sampling = data.sampling
        masks = bool(sampling.min_tokens or sampling.allowed_token_ids or sampling.bad_words) or data.matcher is not None
        wanted = {"processed": needs_processing(sampling), "counted": needs_history(sampling),
                  "structured": data.matcher is not None, "scored": sampling.prompt_logprobs is not None,
                  "masked": masks}
        return [name for name, needed in wanted.items() if needed]

    def _forget(self, request_id: str) -> None:
        held = self.held.pop(request_id, None)
        if held is not None:
            self.host_rows.release(held.row)
            self._extras.subtract(self._extras_of(held.data))
            if self.counts is not None:
                self.counts.forget(request_id)
            self.allowed.pop(request_id, None)

    def _fill(self, plan: StepPlan, order: list[str]) -> tuple[list[int], int]:
        """Write the step into the static buffers; the batch positions of the sampling requests, and how many
        token rows are sampled (one per sampling request, plus one per draft).

        The host arrays are built per sequence, not per token (`host_rows`): a decode row costs a few list
        lookups, a prefill chunk's token rows are expanded by numpy; one host-to-device copy per buffer.
        """
        held = [self.held[r] for r in order]
        counts = [plan.num_scheduled_tokens[r] for r in order]
        drafted = [(h, plan.drafts[h.request_id]) for h in held if h.request_id in plan.drafts] if plan.drafts else []
        for h, drafts in drafted:  # drafts run after the last token, so the rows read them from the token ids
            h.token_ids += drafts
        try:
            rows = StepRows.build(held, counts, self.host_rows, self.config.block_size)
        finally:
            for h, drafts in drafted:
                del h.token_ids[-len(drafts) :]
        sampling_rows = [i for i, request_id in enumerate(order) if request_id in plan.samples]
        logit_rows = rows.cu[np.array(sampling_rows, dtype=np.int64) + 1] - 1  # [num_sampling]
        if drafted:  # each draft's row samples too: [num_sampling + num_drafts]
            extra = [len(plan.drafts.get(order[i], ())) for i in sampling_rows]
            logit_rows = np.concatenate([np.arange(end - k, end + 1) for end, k in zip(logit_rows.tolist(), extra)])
        self._copy_in(rows, logit_rows)
        self._fill_late_tokens(*rows.late_tokens(held))
        self._fill_modules(rows)
        return sampling_rows, len(logit_rows)

    def _fill_late_tokens(self, rows: np.ndarray, sources: list[tuple[PendingStep, int]]) -> None:
        """Copy tokens still on the device into their `input_ids` rows; `sources[i]`: (pending step, its row)."""
        if not sources:
            return
        steps = {id(step): step for step, _ in sources}
        step_rows = np.array([step_row for _, step_row in sources], dtype=np.int64)  # [num_late]
        device = self.meta.input_ids.device
        for key, step in steps.items():
            mine = slice(None) if len(steps) == 1 else np.array([id(s) == key for s, _ in sources])
            rows_t = to_device(rows[mine], device)  # [num_late of this step]
            step_rows_t = to_device(step_rows[mine], device)  # [num_late of this step]
            self.meta.input_ids.index_copy_(0, rows_t, step.sampled.index_select(0, step_rows_t))

    def _copy_in(self, rows: StepRows, logit_rows: np.ndarray) -> None:
        meta, n, s = self.meta, rows.num_tokens, rows.num_seqs
        copy_into(meta.input_ids[:n], rows.token_ids)
        copy_into(meta.positions[:n], rows.positions)
        copy_into(meta.slot_mapping[:n], rows.slots)
        copy_into(meta.cu_query_lens[: s + 1], rows.cu.astype(np.int32))
        copy_into(meta.seq_lens[:s], rows.seq_lens.astype(np.int32))
        copy_into(meta.block_tables[:s], rows.tables)
        if len(logit_rows):
            copy_into(meta.logits_indices[: len(logit_rows)], logit_rows)
        meta.num_tokens, meta.num_seqs = n, s
        meta.max_query_len = int(rows.counts.max())
        meta.max_seq_len = int(rows.seq_lens.max())

    def _fill_modules(self, rows: StepRows) -> None:
        meta = self.meta
        entries = rows.modules(self.host_rows) if meta.modules is not None else None
        meta.has_modules = entries is not None
        if entries is not None:
            slots, gates = entries  # [num_tokens, max_k] each
            device = meta.input_ids.device
            meta.modules.fill(host_tensor(slots, device), host_tensor(gates, device))

    def _sample(self, plan: StepPlan, order: list[str], sampling_rows: list[int], logits: torch.Tensor,
                step: PendingStep) -> None:
        """Queue the step's sampling into `step`, and mark each sampled token a placeholder in the token ids."""
        for request_id in order:
            self.held[request_id].num_computed_tokens += plan.num_scheduled_tokens[request_id]
        for request_id, drafts in plan.drafts.items():  # drafts count as computed once the result keeps them
            self.held[request_id].num_computed_tokens -= len(drafts)
        request_ids = [order[i] for i in sampling_rows]
        held = [self.held[r] for r in request_ids]
        drafts = [plan.drafts.get(r, []) for r in request_ids] if plan.drafts else []
        rows, positions, before = self._sampling_rows(held, drafts)
        params = [h.data.sampling for h in rows]
        seeds = [self._seed_for(h, position) for h, position in zip(rows, positions)]
        scores = self._processed(logits, rows, params, positions, before) if self._extras["processed"] else logits
        if self._extras["structured"]:
            after = [b[-1] if b else None for b in before] if before is not None else None
            scores = self._constrained(scores, rows, [h.data.matcher for h in rows], after)
        drawable = None
        if self._extras["masked"]:  # -inf masks may have left a row nothing (penalties and biases stay finite)
            drawable = torch.isfinite(scores).any(dim=1)  # [num_sampling]
            scores = scores.masked_fill(~drawable[:, None], 0.0)  # a harmless draw, discarded when read
        sampled = sample_on_device(scores, params, seeds)  # [num_sampling]
        if self._extras["counted"]:  # a request with drafts counts the tokens its result keeps (`_keep`)
            self._count([None if h.request_id in plan.drafts else h for h in rows] if plan.drafts else rows, params,
                        sampled)
        step.request_ids, step.held, step.positions = request_ids, held, [len(h.token_ids) for h in held]
        step.params, step.drafts, step.sampled = params, drafts, sampled
        step.logprobs, step.drawable = gather_logprobs(logits, sampled, params), drawable
        step.counts = self.counts if drafts and self._extras["counted"] else None
        first_rows = itertools.accumulate((len(d) + 1 for d in drafts[:-1]), initial=0) if drafts else itertools.count()
        for h, first_row in zip(held, first_rows):  # (a request with drafts has a row per draft and one more)
            h.pending[len(h.token_ids)] = (step, first_row)
            h.token_ids.append(PLACEHOLDER)

    @staticmethod
    def _sampling_rows(held: list[_Held], drafts: list[list[int]]) -> tuple[list[_Held], list[int], list | None]:
        """Per sampling row: its request's state, the position of the token it draws, and the drafts before it (a
        request with drafts has a row per draft and one more, at consecutive positions; None: no drafts)."""
        if not drafts:
            return held, [len(h.token_ids) for h in held], None
        rows, positions, before = [], [], []
        for h, h_drafts in zip(held, drafts):
            rows += [h] * (len(h_drafts) + 1)
            positions += range(len(h.token_ids), len(h.token_ids) + len(h_drafts) + 1)
            before += [h_drafts[:j] for j in range(len(h_drafts) + 1)]
        return rows, positions, before

    def _processed(self, logits: torch.Tensor, held: list[_Held], params: list[SamplingParams],
                   positions: list[int], before: list | None) -> torch.Tensor:
        """`logits` with the penalties, biases and min_tokens of the rows that ask for them (`penalties`); row i
        draws the token at `positions[i]` (a draft's row: after the drafts `before[i]`)."""
        rows = [i for i, h in enumerate(held) if h.processed]
        if not rows:
            return logits
        row_of = self.counts.row_of if self.counts is not None else {}
        return process(logits, rows, [params[i] for i in rows], [row_of.get(held[i].request_id) for i in rows],
                       [positions[i] - held[i].data.num_prompt_tokens for i in rows], self.counts,
                       self.eos_ids, [self.allowed.get(held[i].request_id) for i in rows],
                       [before[i] for i in rows] if before is not None else None)

    def _count(self, held: list[_Held | None], params: list[SamplingParams], sampled: torch.Tensor) -> None:
        """Advance the device token counts and last tokens of the rows that hold them by the tokens just drawn
        (no host sync); rows whose `held` is None are skipped."""
        rows = [i for i, (h, p) in enumerate(zip(held, params))
                if h is not None and h.processed and needs_history(p)]
        if rows:
            index = to_device(torch.tensor(rows, dtype=torch.int64), sampled.device)  # [C]
            self.counts.record([held[i].request_id for i in rows], sampled.index_select(0, index))

    @staticmethod
    def _constrained(logits: torch.Tensor, held: list[_Held], matchers: list, after: list | None) -> torch.Tensor:
        """`logits` with each structured row's forbidden tokens at -inf; its matcher must have seen every token
        (a draft's row: and the drafts before it, `after`)."""
        from server.engine.structured import constrain

        if all(m is None for m in matchers):
            return logits
        late = [h.request_id for h, m in zip(held, matchers) if m is not None and h.pending]
        if late:
            raise RuntimeError(f"structured requests {late} sample before their last token was read back")
        return constrain(logits, matchers, after)

    @staticmethod
    def _seed_for(held: _Held, position: int) -> int:
        """The seed of the request's draw of its token at `position` (`sampling.draw_seed`); 0 if greedy."""
        if held.data.sampling.temperature == 0.0:
            return 0
        return draw_seed(held.data.seed, position)
