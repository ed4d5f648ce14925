"""The engine: one step loop on its own thread, requests in and token increments out.

A step reads like this: the scheduler plans, the runner runs, the scheduler updates, and every request
that changed gets its new text. The step loop runs on a dedicated thread because a forward pass is
compute-bound; requests arrive and increments leave through thread-safe hand-offs (`Increments`: a reader
that falls behind gets what accumulated as one increment).

With asynchronous scheduling (`EngineConfig.async_scheduling`) a step is pipelined: the scheduler plans
step N+1 and the runner launches it while step N still runs on the device (its sampled tokens are
placeholders, fed to N+1 on the device); then N's result is read, the scheduler updates and every
changed request gets its text. The CPU work of one step thus overlaps the device work of the next; at
most one launched step waits to be read (`_pending`), and none once the engine is idle. The rules that
keep the outputs identical to the synchronous loop are in `scheduler`'s docstring. Structured outputs keep
the overlap too: when a grammar mask of N+1 needs N's token, N+1's forward pass is launched, N is read (its
matchers advance) while that pass runs, and only then is N+1's sampling queued (`ModelRunner.launch`).
Speculative decoding overlaps only in part: drafts are found from every token, so the step in flight is read
back before the next is planned when it runs drafts or when a request likely to draft next has a token in it
(`Scheduler.needs_tokens`); a drafting request that found no drafts last time runs overlapped plain steps.

A failed step fails the requests it held and the loop goes on; a failure the device cannot recover from (a
CUDA error, after which its context is unusable) or a fault in the loop itself ends the engine instead:
`dead` is set, every request then in or after it gets `EngineDeadError`, and the API's /health answers 503,
so an orchestrator restarts the server rather than routing to it.

No step needs a sync boundary (reading N before planning N+1): the one case that would (a request
preempted while its token is in flight, readmitted at once) waits one step instead. Blocks and module
slots freed while a launched step still uses them are safe to hand out again because every later write
to them is queued behind that step on the same device stream. A step with nothing to run is read at
once, together with the pending one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import queue
import random
import threading
import time
from collections.abc import AsyncIterator, Callable

from server.engine.config import EngineConfig
from server.engine.detokenize import Detokenizer
from server.engine.plan import StepPlan
from server.engine.request import NoDrawableTokenError, Request, RequestOutput, StepStats
from server.engine.runner import PendingStep
from server.engine.scheduler import RequestState
from server.engine.setup import EngineParts, bind_device, build_parts, check_library_fits, module_loader

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine's step loop ended on an unrecoverable error; nothing more is served until a restart."""


def is_fatal(error: BaseException) -> bool:
    """Whether a failed step leaves the device unusable: a CUDA error (illegal access, device-side assert, ...),
    after which every later launch fails too. Out-of-memory is not fatal: the step's requests fail, the rest go
    on."""
    if isinstance(error, EngineDeadError):
        return True
    text = str(error)
    return type(error).__name__ == "AcceleratorError" or "CUDA error" in text or "device-side assert" in text


class Increments:
    """One request's increments, from the thread that emits them to the asyncio task that reads them.

    A reader that has fallen behind gets everything that accumulated as one increment
    (`RequestOutput.joined`), as vLLM's output collector does: when the HTTP loop is the bottleneck
    (hundreds of streams on a fast device), each stream then costs one chunk per pass of the loop instead of one
    per token, so the loop catches up instead of falling further behind. A reader that keeps up sees one
    increment per step, or with `interval` N (`EngineConfig.stream_interval`) one per N tokens: the first
    increment, the last and an error wake it at once. The loop is woken once per batch of increments, not once
    per increment."""

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: int = 1):
        self._loop = loop
        self._interval = interval
        self._lock = threading.Lock()
        self._outputs: list[RequestOutput] = []
        """Increments not yet read, oldest first (joined when read, so a long wait costs no repeated copies)."""
        self._tokens = 0
        """Tokens in them."""
        self._error: BaseException | None = None
        self._ready = asyncio.Event()
        self._wake_pending = False
        self._started = False
        """Whether the first increment has been read."""

    def _due(self) -> bool:
        """Whether what has gathered is for the reader now (under the lock)."""
        return self._error is not None or bool(self._outputs) and (
            not self._started or self._outputs[-1].finished or self._tokens >= self._interval)

    def put(self, item: RequestOutput | BaseException) -> None:
        """From any thread: add an increment, or the error that ends the request."""
        with self._lock:
            if isinstance(item, BaseException):
                self._error = item
            else:
                self._outputs.append(item)
                self._tokens += len(item.token_ids)
            if self._wake_pending or not self._due():
                return
            self._wake_pending = True
        self._loop.call_soon_threadsafe(self._ready.set)

    async def get(self) -> RequestOutput:
        """On the loop: what has gathered, as one increment, once it is due; raises the error once the output
        before it has been read."""
        while True:
            with self._lock:
                if self._due():
                    if not self._outputs:
                        raise self._error
                    outputs, self._outputs, self._tokens, self._started = self._outputs, [], 0, True
                    break
                self._wake_pending = False
                self._ready.clear()
            await self._ready.wait()
        return RequestOutput.joined(outputs)


class Engine:
    """Owns the backbone, the library, the scheduler and the runner; see the module docstring."""

    def __init__(
        self,
        config: EngineConfig,
        step_observer: Callable[[StepStats], None] | None = None,
        parts: EngineParts | None = None,
    ):
        """Load everything `config` names, or run on `parts` already built (`setup.assemble_parts`)."""
        self.config = config
        self.step_observer = step_observer
        parts = parts if parts is not None else build_parts(config)
        self.tokenizer = parts.tokenizer
        self.library = parts.library
        self.model = parts.model
        self.scheduler = parts.scheduler
        self.runner = parts.runner
        self.max_model_len = parts.max_model_len
        self.sampling_defaults = parts.sampling_defaults
        """What the sampling fields a request leaves out become (`EngineConfig.generation_config`)."""
        self.async_scheduling = config.async_scheduling_on(str(self.model.device))
        self.scheduler.overlapped = self.async_scheduling
        self._pending: tuple[StepPlan, PendingStep] | None = None
        self.num_token_waits = 0
        """Steps planned only after the step in flight was read back, for speculative decoding (`needs_tokens`)."""
        self.model_name = config.served_name()  # a Hub id is served by its id
        self._rng = random.Random(config.seed)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._sinks: dict[str, Callable[[RequestOutput | BaseException], None]] = {}
        self._detok: dict[str, Detokenizer] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.dead: BaseException | None = None
        """The error that ended the step loop, or None while it serves."""
        self._last_stats = self._stats()
        self._grammar_compiler = None
        self._compiler_lock = threading.Lock()
        self.runtime_modules: set[str] = set()
        """Modules added while serving (add_module); only these can be removed again."""
        self.after_iteration: Callable[[], None] | None = None
        """Called on the loop's thread after each pass of the step loop (a step, or an inbox drained before an idle
        wait) and when the loop dies: an engine in a process of its own (`server.engine.process`) sends what the pass
        emitted."""

    # -- life cycle -------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="tessera-engine", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    # -- requests ---------------------------------------------------------------------------------

    async def generate(self, request: Request) -> AsyncIterator[RequestOutput]:
        """Stream `request`'s increments; leaving the iteration early aborts it and frees its blocks."""
        increments = Increments(asyncio.get_running_loop(), self.config.stream_interval)
        self.submit(request, increments.put)
        finished = False
        try:
            while not finished:
                item = await increments.get()
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(request.request_id)

    def submit(self, request: Request, sink: Callable[[RequestOutput | BaseException], None]) -> None:
        """Queue a request; `sink` receives its increments (or an exception) from the engine thread."""
        if self.dead is not None:
            sink(self._dead_error())
            return
        self._inbox.put(("add", request, sink))
        self._wake.set()
        if self.dead is not None:  # it died between the check and the put: nobody else will read the inbox
            self._refuse_inbox()

    def healthy(self) -> bool:
        """Whether the engine serves: its loop has not died (and, once started, its thread runs)."""
        return self.dead is None and (self._thread is None or self._thread.is_alive() or self._stopping)

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id, None))
        self._wake.set()

    def stats(self) -> StepStats:
        return self._last_stats

    @property
    def eos_ids(self) -> set[int]:
        """The token ids that end generation unless a request ignores EOS."""
        return self.scheduler.eos_ids

    @property
    def num_module_slots(self) -> int:
        return self.scheduler.modules.num_slots

    def compile_grammar(self, spec):
        """A structured-output constraint (`structured.GrammarSpec`) compiled for this backbone's tokenizer,
        for `Request.grammar`; ValueError when the spec is bad. Blocking (milliseconds for a typical schema;
        cached): the API calls it in a worker thread."""
        return self.grammar_compiler().compile(spec)

    def grammar_compiler(self):
        """The engine's one `structured.GrammarCompiler`, built on first use."""
        with self._compiler_lock:  # building the compiler reads the whole vocabulary: once per engine
            if self._grammar_compiler is None:
                from server.engine.structured import GrammarCompiler

                self._grammar_compiler = GrammarCompiler(self.tokenizer, self.model.hf_config.vocab_size,
                                                         self.scheduler.eos_ids)
        return self._grammar_compiler

    @functools.cached_property
    def fingerprint(self):
        """The backbone's router BackboneFingerprint (what a module or library must match)."""
        from router.library import fingerprint_from_hf_config

        return fingerprint_from_hf_config(self.model.hf_config)

    # -- modules added and removed while serving --------------------------------------------------

    def add_module(self, info, weights, replace: bool = False) -> concurrent.futures.Future:
        """Add one module (router ModuleInfo and weights, e.g. from router.peft_io.import_peft) to the served
        library, between steps. Requests can name it as soon as the future is done; no task uses it (its
        controller logit is router.library.NO_TASK_LOGIT). Fails (in the future) on a name that exists
        (unless `replace` and add_module added it: then it is swapped, under remove_module's rule), a
        backbone mismatch or a rank above the pool's."""
        return self._between_steps(lambda: self._add_module(info, weights, replace))

    def reset_prefix_cache(self) -> concurrent.futures.Future:
        """Forget every cached prefix, between steps (vLLM's /reset_prefix_cache, for cold-cache benchmarks);
        running requests keep their blocks. The future's result: how many blocks were forgotten."""
        return self._between_steps(self._reset_prefix_cache)

    def _reset_prefix_cache(self) -> int:
        forgotten = self.scheduler.blocks.reset_cache()
        logger.info("prefix cache reset: %d blocks forgotten", forgotten)
        self._publish_stats(self._stats())
        return forgotten

    def remove_module(self, name: str) -> concurrent.futures.Future:
        """Remove a module add_module added, between steps; fails while a request waits for it or runs with it."""
        return self._between_steps(lambda: self._remove_module(name))

    def _between_steps(self, change: Callable[[], object]) -> concurrent.futures.Future:
        """Run `change` on the engine thread between two steps (inline when the loop is not running)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        if self._stopping and self._thread is not None:
            future.set_exception(RuntimeError("the engine is stopping; the module change did not run"))
        elif self._thread is None:
            self._run_change(change, future)
        else:
            self._inbox.put(("change", change, future))
            self._wake.set()
        return future

    @staticmethod
    def _run_change(change: Callable[[], object], future: concurrent.futures.Future) -> None:
        try:
            result = change()
        except Exception as error:  # noqa: BLE001 - the caller gets it through the future
            future.set_exception(error)
        else:
            future.set_result(result)

    def _add_module(self, info, weights, replace: bool) -> None:
        if not self.config.modules_added_while_serving():
            raise ValueError("modules cannot be added while serving: start the engine with runtime_modules "
                             "(`tessera serve --runtime-modules`) or a lora_resolver_dir")
        from router.library import with_standalone_module

        library, replacing = self.library, replace and info.name in self.runtime_modules
        if replacing:
            self._check_unused(info.name)
            library = library.without_module(info.name)
        elif info.name in {self.model_name, "auto", *(library.tasks if library is not None else ())}:
            raise ValueError(f"{info.name!r} already names the backbone, a task or `auto`; requests could not "
                             "address the module by it")
        library = with_standalone_module(library, self.fingerprint, info, weights)
        check_library_fits(library, self.model)
        self.scheduler.modules.forget(info.name)  # a replaced module's slot holds the old weights
        self._use_library(library)
        self.runtime_modules.add(info.name)
        logger.info("%s module %r (rank %d) while serving", "replaced" if replacing else "added", info.name,
                    info.rank)

    def _remove_module(self, name: str) -> None:
        if name not in self.runtime_modules:
            from router.errors import UnknownModuleError

            known = sorted(self.runtime_modules)
            if self.library is not None and name in self.library.modules:
                raise ValueError(f"module {name!r} came with the library at start-up; only modules added while "
                                 f"serving can be removed (added: {known})")
            raise UnknownModuleError(name, known)
        self._check_unused(name)
        self._use_library(self.library.without_module(name))
        self.scheduler.modules.forget(name)
        self.runtime_modules.discard(name)
        logger.info("removed module %r", name)

    def _check_unused(self, name: str) -> None:
        users = [s.request_id for s in (*self.scheduler.waiting, *self.scheduler.running)
                 if name in s.request.composition.module_ids]
        if users:
            raise ValueError(f"module {name!r} is in use by {len(users)} waiting or running requests; "
                             "retry once they finish")

    def _use_library(self, library) -> None:
        self.library = library
        self.runner.load_module = module_loader(library, self.model.dtype, self.model.device,
                                                self.config.max_cpu_modules)

    # -- the step loop ----------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            bind_device(self.model.device)  # this thread's current CUDA device is its own
            while not self._stopping:
                self._drain_inbox()
                if not self.has_work():
                    self._iterated()
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                self._guarded(self.step)
                self._iterated()
            self._guarded(self._flush)
            self._refuse_queued_changes()
            self._iterated()
        except BaseException as error:  # noqa: BLE001 - a dead loop must say so, not leave requests hanging
            self._die(error)
            self._iterated()

    def _iterated(self) -> None:
        if self.after_iteration is not None:
            self.after_iteration()

    def _die(self, error: BaseException) -> None:
        logger.critical("the engine stopped serving: %s", error, exc_info=error)
        self.dead = error
        for request_id in list(self._sinks):
            self._fail(request_id, self._dead_error())
        self._refuse_inbox()

    def _dead_error(self) -> EngineDeadError:
        return EngineDeadError(f"the engine stopped serving after an unrecoverable error ({self.dead}); restart the "
                               "server")

    def _queued(self):
        """The inbox's items, taken until it is empty."""
        while True:
            try:
                yield self._inbox.get_nowait()
            except queue.Empty:
                return

    def _refuse_inbox(self) -> None:
        """Fail everything queued for a dead engine."""
        for kind, _, sink in self._queued():
            if kind == "add":
                sink(self._dead_error())
            elif kind == "change":
                sink.set_exception(self._dead_error())

    def _refuse_queued_changes(self) -> None:
        """Fail the module changes still queued when the loop stops (their callers wait on them); keep the rest."""
        kept = []
        for item in self._queued():
            if item[0] == "change":
                item[2].set_exception(RuntimeError("the engine stopped before the module change ran"))
            else:
                kept.append(item)
        for item in kept:
            self._inbox.put(item)

    def _guarded(self, action: Callable[[], None]) -> None:
        try:
            action()
        except Exception as error:  # noqa: BLE001 - a failed step fails its requests, not the server
            logger.exception("engine step failed")
            self._fail_all(error)
            if is_fatal(error):  # the device is gone: every later step would fail as well
                raise EngineDeadError(str(error)) from error

    def has_work(self) -> bool:
        """Whether requests wait or run, or a launched step is still to be read."""
        return self.scheduler.has_work() or self._pending is not None

    def _drain_inbox(self) -> None:
        for kind, payload, sink in self._queued():
            try:
                if kind == "add":
                    self._add(payload, sink)
                elif kind == "change":
                    self._run_change(payload, sink)
                else:
                    self._finish(payload, "abort")
                    self._publish_stats(self._stats())
            except Exception as error:  # noqa: BLE001 - one bad item fails alone
                logger.exception("engine could not take a queued %s", kind)
                if kind == "add":
                    self._fail(payload.request_id, error, sink)
                elif kind == "change" and not sink.done():
                    sink.set_exception(error)

    def _add(self, request: Request, sink) -> None:
        if request.request_id in self._sinks:
            sink(ValueError(f"request id {request.request_id!r} is already running"))
            return
        missing = [m for m in request.composition.module_ids if self.library is None or m not in self.library.modules]
        if missing:  # composed against a library that has since lost a module (remove_module)
            from router.errors import UnknownModuleError

            sink(UnknownModuleError(missing[0], list(self.library.modules) if self.library is not None else []))
            return
        slots = self.scheduler.modules.num_slots
        if request.composition.k > slots:  # it could never be admitted, and would hold up every request behind it
            from router.errors import CompositionError

            sink(CompositionError(f"the composition uses {request.composition.k} modules but the module pool has "
                                  f"{slots} slots; start the server with --max-loaded-modules {request.composition.k} "
                                  "or more"))
            return
        seed = request.sampling.seed if request.sampling.seed is not None else self._rng.getrandbits(63)
        self._sinks[request.request_id] = sink
        sampling = request.sampling
        self._detok[request.request_id] = Detokenizer(self.tokenizer, sampling.stop,
                                                      include_stop=sampling.include_stop_str_in_output,
                                                      skip_special_tokens=sampling.skip_special_tokens)
        self.scheduler.add(request, seed)

    def step(self) -> None:
        """One engine step: schedule, launch, then read and emit this step (or, asynchronously, the previous one)."""
        started = time.perf_counter()
        if self._pending is not None and self.scheduler.needs_tokens:  # drafts are found from every token, the
            self._flush()  # last one included (and a step that ran drafts decides where its requests go on)
            self.num_token_waits += 1
        plan = self.scheduler.schedule()
        launched = self.runner.launch(plan)
        if self.async_scheduling:
            previous, self._pending = self._pending, (plan, launched)
            if previous is not None:
                self._collect(*previous)
            launched.sample()  # deferred if a grammar mask needed the previous step's token, which its matcher has now
            if plan.is_empty:  # nothing runs: read it now, so an idle engine holds no pending step
                self._flush()
        else:
            self._collect(plan, launched)
        seconds = time.perf_counter() - started
        self._publish_stats(self._stats(plan, seconds))

    def _collect(self, plan: StepPlan, launched: PendingStep) -> None:
        """Read a launched step's tokens (the host sync), update the scheduler, emit what changed."""
        result = launched.result()
        for state in self.scheduler.update(plan, result):
            self._emit(state)
        for request_id in result.undrawable:  # fails alone; its neighbours go on
            state = self.scheduler.states.get(request_id)
            if state is not None and request_id in self._sinks:
                self._fail(request_id, NoDrawableTokenError(state.request, state.num_output_ids))

    def _flush(self) -> None:
        """Read the pending step, if any."""
        if self._pending is not None:
            previous, self._pending = self._pending, None
            self._collect(*previous)

    def _publish_stats(self, stats: StepStats) -> None:
        self._last_stats = stats
        if self.step_observer is not None:
            self.step_observer(stats)

    def _emit(self, state: RequestState) -> None:
        request_id = state.request_id
        finished = state.finish_reason is not None
        # the output is token_ids[start:end], read in place (a copy per step would cost a long output its length
        # every step); finishing drops placeholders only, never outputs, so `end` stands
        token_ids, start, end = state.token_ids, state.num_prompt_tokens, state.num_prompt_tokens + state.num_output_ids
        detok = self._detok[request_id]
        cut = state.stopped_by_token and not detok.include_stop  # the ending token's text is left out, as vLLM
        if detok.stop and len(state.new_logprobs) > 1:  # kept drafts: stop strings checked token by token
            text, stopped, end = self._text_by_token(state, detok, end, cut, finished)
        else:
            text, stopped = detok.update(token_ids, finished, start, end - cut)
        if stopped and not finished:
            self.scheduler.finish(request_id, "stop")
            finished = True
        logprobs = tuple(state.new_logprobs) if state.request.sampling.logprobs is not None else None
        prompt_logprobs = None
        if state.request.sampling.prompt_logprobs is not None and not state.prompt_logprobs_sent:
            prompt_logprobs, state.prompt_logprobs_sent = (None, *state.prompt_logprobs), True
        new_ids = tuple(token_ids[end - len(state.new_logprobs) : end])
        state.new_logprobs = []
        output = RequestOutput(
            request_id=request_id,
            text=text,
            token_ids=new_ids,
            logprobs=logprobs,
            finished=finished,
            finish_reason=state.finish_reason,
            num_prompt_tokens=state.num_prompt_tokens,
            num_output_tokens=end - start,
            num_cached_tokens=state.num_cached_tokens or 0,
            stop_reason=(detok.matched_stop or state.stop_token) if finished else None,
            prompt_logprobs=prompt_logprobs,
            speculation=state.drafter and (state.drafter.num_drafted, state.drafter.num_accepted),
        )
        sink = self._sinks.pop(request_id) if finished else self._sinks[request_id]
        if finished:
            self._detok.pop(request_id, None)
        sink(output)

    def _text_by_token(self, state: RequestState, detok: Detokenizer, end: int, cut: bool,
                       finished: bool) -> tuple[str, bool, int]:
        """The text of several new tokens (kept drafts), whether a stop string matched, and where the output ends
        in the request's token ids (`end` unless a stop string cut it): the text is checked one token at a time,
        so a stop string ends the output at the token whose text completes it, as plain decoding ends it, and
        the tokens after it are dropped."""
        token_ids, start = state.token_ids, state.num_prompt_tokens
        text = ""
        for stop_at in range(end - len(state.new_logprobs) + 1, end - cut):
            piece, stopped = detok.update(token_ids, False, start, stop_at)
            text += piece
            if stopped:
                self.scheduler.truncate(state, stop_at - start)
                return text, True, stop_at
        piece, stopped = detok.update(token_ids, finished, start, end - cut)
        return text + piece, stopped, end

    def _finish(self, request_id: str, reason: str) -> None:
        state = self.scheduler.finish(request_id, reason)
        sink = self._sinks.pop(request_id, None)
        self._detok.pop(request_id, None)
        if state is not None and sink is not None:
            sink(
                RequestOutput(request_id, "", (), None, True, reason, state.num_prompt_tokens, state.num_output_ids,
                              state.num_cached_tokens or 0)
            )

    def _fail_all(self, error: Exception) -> None:
        self._pending = None
        self.runner.drop_deferred()
        self.scheduler.cancel_in_flight()
        for request_id in list(self._sinks):
            self._fail(request_id, RuntimeError(f"engine step failed: {error}"))
        self._publish_stats(self._stats())

    def _fail(self, request_id: str, error: BaseException, sink=None) -> None:
        """End a request with `error` for its caller (its sink, else `sink`); its blocks free at once."""
        self.scheduler.finish(request_id, "error")
        self._detok.pop(request_id, None)
        sink = self._sinks.pop(request_id, sink)
        if sink is not None:
            sink(error)

    def _stats(self, plan: StepPlan | None = None, seconds: float = 0.0) -> StepStats:
        """The engine's state now, and what `plan`'s step did (nothing when no step ran: an abort or a
        failure, which must not count the last step's preemptions and loads again)."""
        scheduler = self.scheduler
        step = dict(num_seqs=0, num_tokens=0, num_preempted=0)
        if plan is not None:
            step.update(num_seqs=len(plan.num_scheduled_tokens), num_tokens=plan.num_tokens,
                        num_preempted=scheduler.num_preempted_last_step, num_module_loads=len(plan.module_loads),
                        prefix_cache_queries=scheduler.prefix_queries_last_step,
                        prefix_cache_hits=scheduler.prefix_hits_last_step,
                        num_drafts=len(plan.drafts), num_draft_tokens=scheduler.drafted_last_step,
                        num_accepted_tokens=scheduler.take_accepted())
        return StepStats(
            **step,
            num_running=len(scheduler.running),
            num_waiting=len(scheduler.waiting),
            kv_blocks_used=scheduler.blocks.num_used,
            kv_blocks_total=scheduler.blocks.num_blocks,
            step_seconds=seconds,
            modules_resident=scheduler.modules.num_resident,
            module_slots_total=scheduler.modules.num_slots,
            kv_blocks_cached=scheduler.blocks.num_cached,
            running_modules=scheduler.modules.pinned,
            waiting_modules=scheduler.waiting_module_ids(),
        )

    # -- synchronous use (tests, offline batches) -------------------------------------------------

    def generate_batch(self, requests: list[Request]) -> dict[str, list[RequestOutput]]:
        """Run `requests` to completion on the calling thread (the loop thread must not be running)."""
        if self._thread is not None:
            raise RuntimeError("generate_batch runs steps inline; call it on an engine that was not started")
        outputs: dict[str, list[RequestOutput]] = {r.request_id: [] for r in requests}
        for request in requests:
            self._add(request, outputs[request.request_id].append)
        while self.has_work():
            self._drain_inbox()
            self.step()
        return outputs
