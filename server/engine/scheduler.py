"""Continuous batching with a token budget, chunked prefill, and preemption by recompute.

Every request counts `num_computed_tokens` against its known tokens (prompt plus output). A step gives
each scheduled request some tokens: 1 for a decode, a chunk for a prefill. Running requests go first, in
admission order; waiting ones are admitted first come, first served (or by priority) while the token
budget, the sequence limit, free KV blocks and module slots allow. A request whose modules cannot get slots
is passed over for a while (`SchedulerConfig.module_wait_steps`) rather than holding up the whole queue. When a running
request needs a block and none is free, the most recently admitted running request is preempted: its
blocks and slots are freed and it waits at the front of the queue, to be recomputed from its prompt and
output so far.

Prefix caching (`kv_pool`): a request admitted (or readmitted) starts from the longest run of cached
full blocks that match its tokens under its composition, and computes only the rest; at least its last
token is always computed, since sampling needs its logits. A block is registered in the cache as soon as
a step is planned to fill it (or, when it holds a token still in flight, once `update` reads that token),
so requests admitted later in the same step share it: n > 1 choices, or a burst of requests with one
system prompt, compute their prefix once. That is sound because every layer writes the step's KV before
its attention reads any, and later steps run after this one on the device.

`schedule` counts the tokens it gives a request as computed at once, and a request that samples gets a
`PLACEHOLDER` token until `update` reads the step's result. So the next step can be planned while this
one still runs (asynchronous scheduling), with these rules:

- a request whose placeholder will certainly end it (max_tokens or max_model_len reached) is not
  scheduled again; one that ends on the token's value (EOS, stop token, stop string, a grammar's end,
  abort) was, and that row's result is ignored: the request is finished, its blocks freed, the runner
  told to drop it;
- placeholders are replaced in step order, also for requests preempted meanwhile (they sit in
  `waiting`); a request holding a placeholder is never (re)admitted, so `NewRequestData` carries only
  real token ids;
- a finished request loses its unread placeholders, so its output is exactly its real tokens.

Speculative decoding (`speculative`): once every request has its tokens, what is left of the budget goes to
drafts (`StepPlan.drafts`) in equal shares, so speculation never displaces work. A step samples at most
max(max_num_seqs, LOGIT_ROWS) rows, drafts included, so their logits take no more memory than a full batch's
or a chunk of prompt scoring's. A request with a `Drafter` whose step reaches its last token (a
decode, or the chunk that ends its prompt) runs up to k draft tokens after it, in blocks that are free (drafts
never preempt). Its own tokens count as computed when planned; `update` appends every token the step kept
(`StepResult.accepted`, then the sampled one) and counts the kept drafts as computed, since their KV was
written for the very tokens kept. Drafts need every token known: under asynchronous scheduling the engine reads
the step in flight back before planning the next when that step runs drafts, or when a request with a token in
flight found drafts after its known tokens the last time `update` looked (`needs_tokens`); otherwise steps
overlap, and a drafting request whose token is in flight runs a plain step (it drafts once its tokens are
known again).
"""

from __future__ import annotations

import bisect
import enum
from collections import Counter, deque
from dataclasses import dataclass, field

from server.engine.kv_pool import BlockPool, block_hashes, composition_root
from server.engine.module_pool import ModulePool
from server.engine.plan import LOGIT_ROWS, PLACEHOLDER, NewRequestData, RunningRequestData, StepPlan, StepResult
from server.engine.request import Request, TokenLogprob
from server.engine.speculative import Drafter, SpeculativeConfig


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class RequestState:
    """The scheduler's view of one request."""

    request: Request
    token_ids: list[int]
    seed: int
    num_computed_tokens: int = 0
    """Tokens scheduled so far (their KV is in the cache once the steps that run them finish)."""
    num_placeholders: int = 0
    """Trailing entries of `token_ids` that are `PLACEHOLDER`s: sampled by steps not read back yet."""
    block_ids: list[int] = field(default_factory=list)
    module_slots: tuple[int, ...] | None = None
    status: Status = Status.WAITING
    finish_reason: str | None = None
    new_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    """Logprobs of tokens sampled since the engine last read them."""
    num_cached_tokens: int | None = None
    """Prompt tokens its first admission found in the prefix cache (None until admitted)."""
    block_hashes: list[bytes] = field(default_factory=list)
    """Prefix-cache hashes of its first full blocks (tokens only grow, and the composition is fixed)."""
    hash_root: bytes | None = None
    num_registered_blocks: int = 0
    """Leading blocks of `block_ids` that are in the prefix cache (taken from it, or registered)."""
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    """Logprobs of its prompt tokens from position 1 on, as far as steps have scored them."""
    prompt_logprobs_sent: bool = False
    stop_token: int | None = None
    """The stop token id (not EOS) that ended it."""
    stopped_by_token: bool = False
    """Its last token is the EOS or stop token that ended it (whose text the output leaves out)."""
    matcher: object | None = None
    """Its structured-output matcher (`structured.new_matcher`), fed every token it samples; None when free."""
    arrival: int = 0
    """Its place in the order requests reached the scheduler."""
    module_waits: int = 0
    """Steps in which it could not be admitted for want of module slots (and later requests went first)."""
    drafter: Drafter | None = None
    """Its draft proposer (`speculative`) when it speculates; None when it decodes a token per step."""

    @property
    def rank(self) -> tuple[int, int]:
        """Its place under the priority policy: lower priority values first, then earlier arrivals."""
        return self.request.priority, self.arrival

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def output_ids(self) -> list[int]:
        """Generated tokens known so far (placeholders excluded)."""
        return self.token_ids[self.num_prompt_tokens : len(self.token_ids) - self.num_placeholders]

    @property
    def num_output_ids(self) -> int:
        """len(output_ids), without copying them."""
        return len(self.token_ids) - self.num_placeholders - self.num_prompt_tokens

    def will_finish(self, max_model_len: int) -> bool:
        """Whether the length limits end it once its placeholders are read, whatever their values."""
        if self.num_placeholders == 0:
            return False
        num_outputs = len(self.token_ids) - self.num_prompt_tokens
        return num_outputs >= self.request.sampling.max_tokens or len(self.token_ids) >= max_model_len


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of one step."""

    max_num_seqs: int
    """Requests running at once at most."""
    max_num_batched_tokens: int
    """Tokens per step at most."""
    max_model_len: int
    """Prompt plus output tokens at most."""
    policy: str = "fcfs"
    """fcfs: first come, first served; priority: by `Request.priority` (lower first), then arrival (vLLM's
    --scheduling-policy)."""
    module_wait_steps: int = 32
    """A waiting request whose modules cannot get slots (all are pinned by running requests) lets later
    requests whose modules can be admitted go past it, as vLLM skips requests over its LoRA limit, for this
    many steps; then it holds the line, so the pinned slots drain and it cannot starve. 0: strict order."""

    def __post_init__(self) -> None:
        if self.module_wait_steps < 0:
            raise ValueError(f"module_wait_steps must be >= 0, got {self.module_wait_steps}")
        if self.policy not in POLICIES:
            raise ValueError(f"scheduling_policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")


POLICIES = ("fcfs", "priority")

_NO_SLOTS = -1


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockPool, modules: ModulePool, eos_ids: set[int],
                 speculative: SpeculativeConfig | None = None):
        self.config = config
        self.speculative = speculative
        """Where drafts come from; None: no request speculates."""
        self.blocks = blocks
        self.modules = modules
        self.eos_ids = eos_ids
        self.waiting: deque[RequestState] = deque()
        self.waiting_modules: Counter[str] = Counter()
        """How many waiting requests use each module (only modules some waiting request uses)."""
        self.running: list[RequestState] = []
        self.states: dict[str, RequestState] = {}
        self._known_to_runner: set[str] = set()
        self._dropped: list[str] = []
        self._in_flight: dict[int, dict[str, RequestState]] = {}
        """Per planned step not updated yet: the requests that sample in it, in batch order."""
        self._drafting_in_flight: set[int] = set()
        """The steps not updated yet that run drafts."""
        self.overlapped = False
        """Whether steps are planned while the one before runs (the engine's asynchronous scheduling): only then
        are drafters looked at after each step read back (`needs_tokens`)."""
        self._num_steps = 0
        self._num_arrivals = 0
        self.num_preempted_last_step = 0
        self.num_structured = 0
        """Unfinished requests with a structured-output matcher."""
        self.num_drafting = 0
        """Unfinished requests with a draft proposer."""
        self.drafted_last_step = 0
        """Draft tokens the last planned step runs."""
        self.accepted_unreported = 0
        """Draft tokens kept by the steps updated since the engine last reported (`take_accepted`)."""
        self.prefix_queries_last_step = 0
        """Tokens of the requests admitted in the last step that were looked up in the prefix cache."""
        self.prefix_hits_last_step = 0
        """Of those, tokens found cached (not computed)."""

    def add(self, request: Request, seed: int) -> RequestState:
        state = RequestState(request, list(request.prompt_token_ids), seed, arrival=self._num_arrivals)
        self._num_arrivals += 1
        if request.grammar is not None:
            from server.engine.structured import new_matcher

            state.matcher = new_matcher(request.grammar, request.grammar_after)
            self.num_structured += 1
        if self.speculative is not None:
            drafter = Drafter(self.speculative, request.prediction, state.matcher)
            if drafter.max_drafts:
                state.drafter = drafter
                self.num_drafting += 1
        self.states[request.request_id] = state
        self._enqueue(state)
        return state

    @property
    def speculating(self) -> bool:
        """Whether a step planned now may run drafts: requests with drafters are unfinished, and no more requests
        run than `SpeculativeConfig.disable_by_batch_size` allows."""
        if not self.num_drafting:
            return False
        limit = self.speculative.disable_by_batch_size
        return not limit or len(self.running) <= limit

    @property
    def needs_tokens(self) -> bool:
        """Whether the next step must be planned with every token known (the engine reads the step in flight back
        first): a step in flight runs drafts (what each request keeps decides where it goes on), or drafts may run
        now and a request with a token in flight found drafts after its tokens when last looked at (`Drafter.hot`),
        so its next step should draft. Otherwise steps overlap, and a drafting request whose token is in flight
        runs its next step without drafts."""
        if self._drafting_in_flight:
            return True
        if not self.speculating:
            return False
        return any(s.num_placeholders and s.drafter is not None and s.drafter.hot for s in self.running)

    def waiting_module_ids(self) -> tuple[str, ...]:
        """Modules that waiting requests use."""
        return tuple(self.waiting_modules)

    def _enqueue(self, state: RequestState, preempted: bool = False) -> None:
        """Queue `state` for admission: FCFS at the back (a preempted request at the front); by priority at its
        rank's place (a preempted request keeps its arrival, so it goes before later ones of its priority)."""
        if self.config.policy == "priority":
            ranks = [waiting.rank for waiting in self.waiting]
            self.waiting.insert(bisect.bisect_right(ranks, state.rank), state)
        elif preempted:
            self.waiting.appendleft(state)
        else:
            self.waiting.append(state)
        self.waiting_modules.update(state.request.composition.module_ids)

    def _unwait_modules(self, state: RequestState) -> None:
        for module_id in state.request.composition.module_ids:
            self.waiting_modules[module_id] -= 1
            if not self.waiting_modules[module_id]:
                del self.waiting_modules[module_id]

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> StepPlan:
        self._num_steps += 1
        plan = StepPlan(step_id=self._num_steps, dropped=self._take_dropped())
        self._in_flight[plan.step_id] = {}
        budget = self.config.max_num_batched_tokens
        self.num_preempted_last_step = self.prefix_queries_last_step = self.prefix_hits_last_step = 0
        self.drafted_last_step = 0
        preempted = False
        by_priority = self.config.policy == "priority"
        for state in sorted(self.running, key=_rank) if by_priority else list(self.running):
            if budget == 0 or state.status is not Status.RUNNING or state.will_finish(self.config.max_model_len):
                continue
            num_tokens = min(len(state.token_ids) - state.num_computed_tokens, budget)
            new_blocks = self._grow(state, num_tokens, plan)
            if new_blocks is None:
                preempted = True
                continue
            self._put(plan, state, num_tokens, new_blocks)
            budget -= num_tokens
        passed_over = 0  # waiting requests at the front that wait for module slots
        while (len(self.waiting) > passed_over and budget > 0 and not preempted
               and len(self.running) < self.config.max_num_seqs):
            state = self.waiting[passed_over]
            num_tokens = self._admit(state, budget, plan)
            if num_tokens == _NO_SLOTS:
                state.module_waits += 1
                if state.module_waits > self.config.module_wait_steps:  # passed over long enough: it holds the line
                    break
                passed_over += 1
                continue
            if num_tokens == 0:
                break
            budget -= num_tokens
        if self.speculating and budget > 0:
            rows = max(self.config.max_num_seqs, LOGIT_ROWS) - len(plan.samples)  # rows sampled: logits memory
            self._add_drafts(plan, min(budget, rows))
        plan.dropped += self._take_dropped()
        return plan

    def _add_drafts(self, plan: StepPlan, budget: int) -> None:
        """Spend `budget` (what is left after every real token) on drafts, so speculation never displaces work: each
        request with a drafter that samples in this step after all its known tokens (a decode, or the chunk that
        ends its prompt) gets an equal share of what is left (what one does not use goes to the next), within its
        max_tokens and max_model_len (the step may keep every draft and one more token) and the free blocks
        (drafts never preempt)."""
        states = [self.states[r] for r in plan.num_scheduled_tokens if r in plan.samples]  # in batch order
        states = [s for s in states if s.drafter is not None and s.num_placeholders == 1]  # (this step's token)
        block_deltas = None
        for index, state in enumerate(states):
            request_id = state.request_id
            num_known = len(state.token_ids) - 1
            room = (len(state.block_ids) + self.blocks.num_free) * self.blocks.block_size - num_known
            share = -(-budget // (len(states) - index))
            limit = min(share, room, state.request.sampling.max_tokens - state.num_output_ids - 1,
                        self.config.max_model_len - num_known - 1)
            drafts = state.drafter.propose(state.token_ids, num_known, state.num_prompt_tokens, limit)
            if drafts and state.matcher is not None:
                from server.engine.structured import grammar_prefix

                drafts = grammar_prefix(state.matcher, drafts)
            if not drafts:
                continue
            if block_deltas is None:
                block_deltas = {d.request_id: d.block_ids for d in plan.new} | {
                    d.request_id: d.new_block_ids for d in plan.running}
            new_blocks = self.blocks.allocate(self.blocks.blocks_for(num_known + len(drafts)) - len(state.block_ids))
            state.block_ids += new_blocks
            block_deltas[request_id] += new_blocks
            plan.num_scheduled_tokens[request_id] += len(drafts)
            plan.drafts[request_id] = drafts
            self._drafting_in_flight.add(plan.step_id)
            self.drafted_last_step += len(drafts)
            budget -= len(drafts)
            if budget == 0:
                return

    def _grow(self, state: RequestState, num_tokens: int, plan: StepPlan) -> list[int] | None:
        """Blocks `state` needs for `num_tokens` more tokens, preempting others (or itself) for room: the last
        admitted (FCFS) or the lowest ranked (priority) of the requests this step has not scheduled yet, which
        running requests are visited in that order, so never one already in the plan."""
        need = self.blocks.blocks_for(state.num_computed_tokens + num_tokens) - len(state.block_ids)
        while need > self.blocks.num_free:
            if self.config.policy == "priority":
                victim = max((r for r in self.running if r.request_id not in plan.num_scheduled_tokens), key=_rank)
            else:
                victim = self.running[-1]
            self._preempt(victim)
            if victim is state:
                return None
        new_blocks = self.blocks.allocate(max(need, 0))
        state.block_ids += new_blocks
        return new_blocks

    def _admit(self, state: RequestState, budget: int, plan: StepPlan) -> int:
        """Admit waiting `state` if blocks and module slots allow; the tokens it got (0: no blocks now, or a
        token in flight; `_NO_SLOTS`: its modules cannot all have slots now)."""
        if state.num_placeholders:  # preempted while its last token was in flight: wait until it is read
            return 0
        hits = self._cached_prefix(state)
        num_cached = len(hits) * self.blocks.block_size
        num_tokens = min(len(state.token_ids) - num_cached, budget)
        need = self.blocks.blocks_for(num_cached + num_tokens) - len(hits)
        if need > self.blocks.num_free - self.blocks.num_free_among(hits):
            return 0
        acquired = self.modules.acquire(state.request.composition.module_ids)
        if acquired is None:
            return _NO_SLOTS
        state.module_slots, loads = acquired
        plan.module_loads += loads
        self.blocks.take(hits)
        state.block_ids = hits + self.blocks.allocate(need)
        state.num_computed_tokens = num_cached
        state.num_registered_blocks = len(hits)
        if state.num_cached_tokens is None:
            state.num_cached_tokens = min(num_cached, state.num_prompt_tokens)
        if self.blocks.caching:
            self.prefix_queries_last_step += len(state.token_ids)
            self.prefix_hits_last_step += num_cached
        state.status = Status.RUNNING
        if self.waiting[0] is state:
            self.waiting.popleft()
        else:  # admitted past requests that wait for module slots
            self.waiting.remove(state)
        self._unwait_modules(state)
        self.running.append(state)
        self._put(plan, state, num_tokens, state.block_ids)
        return num_tokens

    def _cached_prefix(self, state: RequestState) -> list[int]:
        """The cached blocks `state` can start from: the longest cached run of its full blocks, leaving at
        least its last token to compute."""
        if not self.blocks.caching or state.request.sampling.prompt_logprobs is not None:
            return []  # a prompt scored token by token is computed whole
        return self.blocks.lookup(self._hashes(state, (len(state.token_ids) - 1) // self.blocks.block_size))

    def _hashes(self, state: RequestState, num_blocks: int) -> list[bytes]:
        """The prefix-cache hashes of `state`'s first `num_blocks` blocks, whose tokens must all be known."""
        have = len(state.block_hashes)
        if num_blocks > have:
            size = self.blocks.block_size
            if PLACEHOLDER in state.token_ids[have * size : num_blocks * size]:
                raise RuntimeError(f"request {state.request_id!r}: block hashes asked for unread tokens")
            if state.hash_root is None:
                composition = state.request.composition
                generations = tuple(self.modules.generation(m) for m in composition.module_ids)
                state.hash_root = composition_root(composition.module_ids, composition.gates, generations,
                                                   state.request.cache_salt)
            parent = state.block_hashes[-1] if have else None
            state.block_hashes += block_hashes(state.hash_root, state.token_ids, have, num_blocks, size, parent)
        return state.block_hashes[:num_blocks]

    def _register_full_blocks(self, state: RequestState) -> None:
        """Register in the prefix cache the blocks of `state` that planned steps fill and whose tokens are
        known (a block holding a placeholder waits for `update` to read it).

        At once, not after the step: a request admitted later in the same step may share them, since each
        layer writes the whole step's KV before any of the step's attention reads it, and any later step runs
        after this one on the device. (A failed step resets the cache: `cancel_in_flight`.)"""
        size = self.blocks.block_size
        num_known = len(state.token_ids) - state.num_placeholders  # placeholders are always last
        num_full = min(state.num_computed_tokens, num_known) // size
        if num_full <= state.num_registered_blocks:
            return
        hashes = self._hashes(state, num_full)
        for index in range(state.num_registered_blocks, num_full):
            self.blocks.register(state.block_ids[index], hashes[index])
        state.num_registered_blocks = num_full

    def _put(self, plan: StepPlan, state: RequestState, num_tokens: int, new_blocks: list[int]) -> None:
        if state.request_id in self._known_to_runner:
            plan.running.append(RunningRequestData(state.request_id, new_blocks))
        else:
            plan.new.append(self._new_data(state))
            self._known_to_runner.add(state.request_id)
        plan.num_scheduled_tokens[state.request_id] = num_tokens
        state.num_computed_tokens += num_tokens
        if self.blocks.caching:
            self._register_full_blocks(state)
        if state.num_computed_tokens == len(state.token_ids):
            plan.samples.add(state.request_id)
            self._in_flight[plan.step_id][state.request_id] = state
            state.token_ids.append(PLACEHOLDER)
            state.num_placeholders += 1

    def _new_data(self, state: RequestState) -> NewRequestData:
        if state.num_placeholders:
            raise RuntimeError(f"request {state.request_id!r} would reach the runner with unread placeholder tokens")
        composition = state.request.composition
        return NewRequestData(
            request_id=state.request_id,
            token_ids=list(state.token_ids),
            block_ids=list(state.block_ids),
            num_computed_tokens=state.num_computed_tokens,
            module_slots=state.module_slots or (),
            gates=composition.gates,
            sampling=state.request.sampling,
            seed=state.seed,
            num_prompt_tokens=state.num_prompt_tokens,
            matcher=state.matcher,
        )

    def _preempt(self, state: RequestState) -> None:
        self._release(state)
        state.status = Status.WAITING
        state.num_computed_tokens = 0
        self._enqueue(state, preempted=True)
        self.num_preempted_last_step += 1

    def _release(self, state: RequestState) -> None:
        """Free blocks and module pins, and tell the runner to forget the request."""
        self.blocks.free(state.block_ids)
        state.block_ids = []
        state.num_registered_blocks = 0
        if state.module_slots is not None:
            self.modules.release(state.request.composition.module_ids)
            state.module_slots = None
        if state in self.running:
            self.running.remove(state)
        if state.request_id in self._known_to_runner:
            self._known_to_runner.discard(state.request_id)
            self._dropped.append(state.request_id)

    def _take_dropped(self) -> list[str]:
        dropped, self._dropped = self._dropped, []
        return dropped

    def update(self, plan: StepPlan, result: StepResult) -> list[RequestState]:
        """Read `plan`'s sampled tokens into its placeholders and check stops; the requests that changed.

        Plans are updated in the order they were scheduled. Rows of requests finished since the plan was
        made are ignored; requests preempted since then (waiting) still get their token.
        """
        if plan.step_id not in self._in_flight:
            raise RuntimeError(f"step {plan.step_id} is not in flight (updated twice, or never scheduled)")
        if min(self._in_flight) < plan.step_id:
            raise RuntimeError(f"step {plan.step_id} updated before step {min(self._in_flight)}")
        samplers = self._in_flight.pop(plan.step_id)
        self._drafting_in_flight.discard(plan.step_id)
        self._add_prompt_logprobs(result)
        sampled = {r: (t, lp) for r, t, lp in zip(result.request_ids, result.sampled_token_ids, result.logprobs)}
        changed = []
        for request_id, state in samplers.items():
            if request_id not in sampled:
                raise RuntimeError(f"step {plan.step_id}'s result has no token for request {request_id!r}")
            undrawable = request_id in result.undrawable  # the engine fails it, after the drafts it kept
            if state.status is Status.FINISHED or (undrawable and not result.accepted.get(request_id, ((),))[0]):
                continue
            reason = self._take_kept(state, plan.drafts[request_id], result) if request_id in plan.drafts else None
            if reason is None and not undrawable:
                token_id, logprob = sampled[request_id]
                state.token_ids[len(state.token_ids) - state.num_placeholders] = token_id
                state.num_placeholders -= 1
                state.new_logprobs.append(logprob)
                reason = self._finish_reason(state, token_id)
                if state.matcher is not None:
                    reason = self._advance_matcher(state, token_id) or reason
            if self.blocks.caching:  # a block the tokens complete (before a finish frees it, still cached)
                self._register_full_blocks(state)
            if reason is not None:
                self.finish(request_id, reason)
            elif state.drafter is not None and self.overlapped and self.speculating:
                state.drafter.hot = state.drafter.peek(state.token_ids, len(state.token_ids) - state.num_placeholders,
                                                       state.num_prompt_tokens)
            changed.append(state)
        return changed

    def _take_kept(self, state: RequestState, drafts: list[int], result: StepResult) -> str | None:
        """Put the drafts `state`'s step kept before its placeholder (the token drawn after them), in order, until
        one ends the request: its finish reason, or None. Their KV was written for these very tokens, so they
        count as computed; a grammar's matcher advances by each."""
        kept, logprobs = result.accepted.get(state.request_id, ((), ()))
        state.drafter.record(len(drafts), len(kept))
        state.num_computed_tokens += len(kept)
        self.accepted_unreported += len(kept)
        for token_id, logprob in zip(kept, logprobs):
            state.token_ids.insert(len(state.token_ids) - state.num_placeholders, token_id)
            state.new_logprobs.append(logprob)
            reason = self._finish_reason(state, token_id)
            if state.matcher is not None:
                reason = self._advance_matcher(state, token_id) or reason
            if reason is not None:
                return reason
        return None

    def take_accepted(self) -> int:
        """The draft tokens kept since the last call (a step may update two plans, or none)."""
        accepted, self.accepted_unreported = self.accepted_unreported, 0
        return accepted

    def _add_prompt_logprobs(self, result: StepResult) -> None:
        """Append a step's prompt logprobs to their requests; positions already there (scored again after
        a preemption) are skipped."""
        for request_id, (first, logprobs) in result.prompt_logprobs.items():
            state = self.states.get(request_id)
            if state is None:
                continue
            for position, logprob in enumerate(logprobs, start=first):
                if position == len(state.prompt_logprobs) + 1:
                    state.prompt_logprobs.append(logprob)

    @staticmethod
    def _advance_matcher(state: RequestState, token_id: int) -> str | None:
        """Feed a structured request's matcher its token; `stop` once the grammar is complete."""
        if not state.matcher.accept_token(token_id):  # the mask allowed it, so this is a bug, not bad input
            raise RuntimeError(f"request {state.request_id!r}: sampled token {token_id} is outside its grammar")
        return "stop" if state.matcher.is_terminated() else None

    def cancel_in_flight(self) -> None:
        """Forget every step not updated yet (after a failed step, whose requests were all finished), and every
        cached prefix: blocks registered for a step that failed may never have been written."""
        self._in_flight.clear()
        self._drafting_in_flight.clear()
        self.blocks.reset_cache()

    def _finish_reason(self, state: RequestState, token_id: int) -> str | None:
        sampling = state.request.sampling
        if token_id in sampling.stop_token_ids:
            state.stop_token, state.stopped_by_token = token_id, True
            return "stop"
        if token_id in self.eos_ids and not sampling.ignore_eos:
            state.stopped_by_token = True
            return "stop"
        num_known = len(state.token_ids) - state.num_placeholders
        if state.num_output_ids >= sampling.max_tokens or num_known >= self.config.max_model_len:
            return "length"
        return None

    def truncate(self, state: RequestState, num_outputs: int) -> None:
        """Drop `state`'s outputs after its first `num_outputs`: a stop string ended it there, and drafts it kept in
        the same step had run past it. Finished already (by a token the drafts reached), it now ends on the stop
        string instead; otherwise the caller finishes it."""
        end = len(state.token_ids) - state.num_placeholders
        dropped = end - state.num_prompt_tokens - num_outputs
        del state.token_ids[end - dropped : end]
        del state.new_logprobs[len(state.new_logprobs) - dropped :]
        state.stopped_by_token, state.stop_token = False, None
        if state.status is Status.FINISHED:
            state.finish_reason = "stop"

    def finish(self, request_id: str, reason: str) -> RequestState | None:
        """End a request now (finished, stopped by a stop string, or aborted); its blocks free at once."""
        state = self.states.pop(request_id, None)
        if state is None:
            return None
        if state.status is Status.WAITING:
            self.waiting.remove(state)
            self._unwait_modules(state)
        self._release(state)
        if state.num_placeholders:
            del state.token_ids[-state.num_placeholders :]
            state.num_placeholders = 0
        state.status = Status.FINISHED
        state.finish_reason = reason
        if state.matcher is not None:
            self.num_structured -= 1
        if state.drafter is not None:
            self.num_drafting -= 1
        return state


def _rank(state: RequestState) -> tuple[int, int]:
    return state.rank
