"""The engine in a process of its own: `EngineProcess` on the API's side, `_EngineHost` in the engine's process.

In one process the HTTP server and the step loop share the interpreter lock, and streaming costs the server tens
of microseconds of Python per token (SSE chunk, socket write, asyncio hand-off): at a batch of 256 that is more
host time per step than a decode step of an 8B model takes on an H100, so the server would slow the engine it
serves. vLLM (EngineCore) and SGLang (the scheduler process) run their engines in processes of their own for this
reason; `EngineConfig.engine_process` does the same. `EngineProcess` answers everything the API asks of an
`Engine`, so the API does not know which one it has.

The engine's process loads the backbone and library and runs an ordinary `Engine` (its step loop is a thread
there too). What the API reads (tokenizer, the library's routing metadata without its weights, limits, sampling
defaults) comes over once when the engine is ready, and again after each module change. One duplex pipe carries
pickled tuples:

    API -> engine   ("add", Request) | ("abort", request_id) | ("call", call_id, method, args) | ("shutdown",)
    engine -> API   ("ready", EngineFacts) or ("failed", error), once;
                    ("events", [(request_id, output, error) or (None, StepStats, None)], dead error or None)
                        after each pass of the step loop that emitted something, in the order emitted;
                    ("reply", call_id, result, error, (library view, runtime modules))

A structured-output grammar is compiled in the API's process, as it is with a thread (that is where a bad schema
becomes a 400), and crosses as xgrammar's serialized form; the engine's process rebuilds it once per distinct
grammar (`_Grammars`). Errors cross as their type, arguments and attributes, rebuilt without calling `__init__`
(router's errors take other arguments than their message, so plain pickling would not rebuild them); one that
cannot cross becomes a RuntimeError with its text. If the engine's process dies, every request in flight fails
with `EngineDeadError` and /health answers 503, as when the step loop dies.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import hashlib
import itertools
import logging
import multiprocessing
import pickle
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass

from server.engine.config import EngineConfig
from server.engine.engine import Engine, EngineDeadError
from server.engine.request import Request, RequestOutput, StepStats

logger = logging.getLogger(__name__)

GRAMMAR_CACHE = 64
"""Distinct grammars each side keeps ready (serialized on the API's side, rebuilt on the engine's)."""


@dataclass
class EngineFacts:
    """What the API reads of the engine, sent when it is ready (the library and runtime modules again after every
    module change)."""

    config: EngineConfig
    tokenizer: object
    library: object | None
    """The library's `router.library.LibraryView` (no weights), or None."""
    runtime_modules: set[str]
    model_name: str
    max_model_len: int
    sampling_defaults: dict
    eos_ids: set[int]
    num_module_slots: int
    vocab_size: int
    fingerprint: object
    stats: StepStats


@dataclass(frozen=True)
class SerializedGrammar:
    """A compiled grammar in xgrammar's serialized form, for `Request.grammar` across the pipe."""

    text: str
    digest: str


def pack_error(error: BaseException) -> tuple:
    """`error` as (type, args, attributes), or as a RuntimeError with its text where those do not pickle."""
    packed = (type(error), error.args, dict(vars(error)))
    try:
        unpack_error(pickle.loads(pickle.dumps(packed)))
    except Exception:  # noqa: BLE001 - a local class, an unpicklable attribute: keep the words
        packed = (RuntimeError, (f"{type(error).__name__}: {error}",), {})
    return packed


def unpack_error(packed: tuple) -> BaseException:
    kind, args, attributes = packed
    error = kind.__new__(kind)  # not kind(*args): an __init__ may want other arguments than the message
    error.args = args
    error.__dict__.update(attributes)
    return error


class EngineProcess:
    """An `Engine` running in a child process (spawned, so CUDA starts fresh there); see the module docstring.

    Construction returns once the engine is loaded, or raises what loading it raised (a bad library's
    LibraryError, a ValueError for a bad config) as `Engine(config)` would. `build`, a picklable callable,
    makes the engine in the child instead of `Engine(config)` (benchmarks build theirs from weights in memory).
    """

    generate = Engine.generate  # written in terms of submit and abort

    def __init__(self, config: EngineConfig | None = None, step_observer: Callable[[StepStats], None] | None = None,
                 build: Callable[[], Engine] | None = None):
        if (config is None) == (build is None):
            raise ValueError("give an engine config or a build function, one of the two")
        self.step_observer = step_observer
        self.dead: BaseException | None = None
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        level = logging.getLogger("server").getEffectiveLevel()
        self._process = context.Process(target=_serve, args=(build or functools.partial(Engine, config), child, level),
                                        name="tessera-engine", daemon=True)
        self._process.start()
        child.close()  # ours only: with the child's end closed here, the child's death is an EOF on ours
        try:
            message = self._conn.recv()
        except EOFError:
            self._process.join(timeout=5)
            raise RuntimeError(f"the engine process exited while loading (exit code {self._process.exitcode}); "
                               "its log says why") from None
        if message[0] == "failed":
            self._process.join(timeout=30)
            raise unpack_error(message[1])
        self._use(message[1])
        self._last_stats = message[1].stats
        logger.info("engine process %d ready (%s)", self._process.pid, self.model_name)
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()  # sinks and calls against the reader's sweep when the process dies
        self._sinks: dict[str, Callable[[RequestOutput | BaseException], None]] = {}
        self._calls: dict[int, concurrent.futures.Future] = {}
        self._call_ids = itertools.count()
        self._grammar_compiler = None
        self._compiler_lock = threading.Lock()
        self._grammars: collections.OrderedDict = collections.OrderedDict()
        self._stopping = False
        self._reader = threading.Thread(target=self._read, name="tessera-engine-reader", daemon=True)
        self._reader.start()

    def _use(self, facts: EngineFacts) -> None:
        self.config = facts.config
        self.tokenizer, self.library, self.runtime_modules = facts.tokenizer, facts.library, facts.runtime_modules
        self.model_name, self.max_model_len, self.sampling_defaults = (facts.model_name, facts.max_model_len,
                                                                       facts.sampling_defaults)
        self.eos_ids, self.num_module_slots, self.fingerprint = facts.eos_ids, facts.num_module_slots, facts.fingerprint
        self._vocab_size = facts.vocab_size

    # -- life cycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """The step loop already runs in the engine's process; a stopped engine does not start again."""
        if self._stopping:
            raise RuntimeError("this engine process was shut down; build a new one")

    def shutdown(self) -> None:
        """Stop the engine's process (requests still running fail), and wait for it."""
        if self._stopping:
            return
        self._stopping = True
        self._send(("shutdown",))
        self._process.join(timeout=30)
        if self._process.is_alive():
            logger.warning("the engine process did not stop within 30 s; terminating it")
            self._process.terminate()
            self._process.join(timeout=5)
        self._reader.join(timeout=5)
        self._conn.close()
        self._fail_everything(RuntimeError("the engine was shut down"))

    def healthy(self) -> bool:
        return self.dead is None and (self._stopping or self._process.is_alive())

    @property
    def pid(self) -> int:
        return self._process.pid

    # -- requests ---------------------------------------------------------------------------------

    def submit(self, request: Request, sink: Callable[[RequestOutput | BaseException], None]) -> None:
        """Queue a request; `sink` receives its increments (or an exception) on the reader thread."""
        if request.grammar is not None and not isinstance(request.grammar, SerializedGrammar):
            request.grammar = self._serialized(request.grammar)
        with self._lock:
            refused = self._dead_error() if self.dead is not None else None
            if refused is None and request.request_id in self._sinks:
                refused = ValueError(f"request id {request.request_id!r} is already running")
            if refused is None:
                self._sinks[request.request_id] = sink
        if refused is not None:
            sink(refused)
        elif not self._send(("add", request)):
            self._settle(request.request_id, None, self._dead_error())

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def stats(self) -> StepStats:
        return self._last_stats

    def compile_grammar(self, spec) -> SerializedGrammar:
        """As `Engine.compile_grammar` (ValueError for a bad spec), in the form that crosses the pipe."""
        with self._compiler_lock:
            if self._grammar_compiler is None:
                from server.engine.structured import GrammarCompiler

                self._grammar_compiler = GrammarCompiler(self.tokenizer, self._vocab_size, self.eos_ids)
            cached = self._grammars.get(spec)
            if cached is not None:
                self._grammars.move_to_end(spec)
                return cached
        compiled = self._serialized(self._grammar_compiler.compile(spec))
        with self._compiler_lock:
            self._grammars[spec] = compiled
            if len(self._grammars) > GRAMMAR_CACHE:
                self._grammars.popitem(last=False)
        return compiled

    @staticmethod
    def _serialized(compiled) -> SerializedGrammar:
        text = compiled.serialize_json()
        return SerializedGrammar(text, hashlib.blake2b(text.encode(), digest_size=16).hexdigest())

    # -- modules added and removed while serving (as Engine's; futures resolve on the reader thread) ------

    def add_module(self, info, weights, replace: bool = False) -> concurrent.futures.Future:
        return self._call("add_module", info, weights, replace)

    def remove_module(self, name: str) -> concurrent.futures.Future:
        return self._call("remove_module", name)

    def reset_prefix_cache(self) -> concurrent.futures.Future:
        return self._call("reset_prefix_cache")

    def _call(self, method: str, *args) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        call_id = next(self._call_ids)
        with self._lock:
            if self.dead is None and not self._stopping:
                self._calls[call_id] = future
        if call_id not in self._calls:
            future.set_exception(self._dead_error() if self.dead is not None else
                                 RuntimeError("the engine is stopping; the module change did not run"))
        elif not self._send(("call", call_id, method, args)):
            with self._lock:
                self._calls.pop(call_id, None)
            future.set_exception(self._dead_error())
        return future

    # -- the pipe ---------------------------------------------------------------------------------

    def _send(self, message: tuple) -> bool:
        """Send `message`; False when the engine's process is gone."""
        try:
            with self._send_lock:
                self._conn.send(message)
            return True
        except (OSError, ValueError):  # a broken pipe, or our end closed by shutdown
            return False

    def _read(self) -> None:
        """The reader thread: deliver what the engine's process sends until it ends."""
        try:
            while True:
                message = self._conn.recv()
                if message[0] == "events":
                    for request_id, item, _ in message[1]:  # the steps' stats before the outputs: a caller woken by
                        if request_id is None:              # its last output then reads stats() at least as new as
                            self._observe(item)             # the step that finished it (as with the engine's thread)
                    for request_id, item, error in message[1]:
                        if request_id is not None:
                            self._settle(request_id, item, unpack_error(error) if error is not None else None)
                    if message[2] is not None and self.dead is None:
                        self._die(unpack_error(message[2]))
                elif message[0] == "reply":
                    _, call_id, result, error, modules = message
                    self.library, self.runtime_modules = modules  # before the caller hears: requests may use it now
                    with self._lock:
                        future = self._calls.pop(call_id, None)
                    if future is not None and error is not None:
                        future.set_exception(unpack_error(error))
                    elif future is not None:
                        future.set_result(result)
        except (EOFError, OSError):
            pass
        except Exception as error:  # noqa: BLE001 - a reader that stops must say so, not leave requests hanging
            logger.exception("the engine process's pipe failed")
            self._die(error)
        if not self._stopping and self.dead is None:
            self._process.join(timeout=2)
            self._die(RuntimeError(f"the engine process exited (exit code {self._process.exitcode})"))

    def _observe(self, stats: StepStats) -> None:
        self._last_stats = stats
        if self.step_observer is not None:
            self.step_observer(stats)

    def _settle(self, request_id: str, output: RequestOutput | None, error: BaseException | None) -> None:
        """Hand one increment or error to its request's sink (the last one: its sink is dropped)."""
        with self._lock:
            last = error is not None or output.finished
            sink = self._sinks.pop(request_id, None) if last else self._sinks.get(request_id)
        if sink is not None:
            sink(error if error is not None else output)

    def _die(self, error: BaseException) -> None:
        logger.critical("the engine process stopped serving: %s", error)
        self.dead = error
        self._fail_everything(self._dead_error())

    def _fail_everything(self, error: BaseException) -> None:
        with self._lock:
            sinks, self._sinks = self._sinks, {}
            calls, self._calls = self._calls, {}
        for sink in sinks.values():
            sink(error)
        for future in calls.values():
            future.set_exception(error)

    def _dead_error(self) -> EngineDeadError:
        return EngineDeadError(f"the engine stopped serving after an unrecoverable error ({self.dead}); restart the "
                               "server")


def _serve(build: Callable[[], Engine], conn, log_level: int) -> None:
    """The engine process's main: load, say ready (or why not), then serve the pipe until told to stop."""
    for number in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C (and systemd's stop) reach the whole group: the API's
        signal.signal(number, signal.SIG_IGN)       # process drains its streams, then stops us (or we see its EOF)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s[engine]: %(message)s")
    try:
        engine = build()
    except BaseException as error:  # noqa: BLE001 - the API's process raises it
        conn.send(("failed", pack_error(error)))
        return
    _EngineHost(engine, conn).run()


def _view(library):
    return library.view() if library is not None else None


class _Grammars:
    """Compiled grammars rebuilt from their serialized form, the most recently used `GRAMMAR_CACHE` kept."""

    def __init__(self, engine: Engine):
        self._engine = engine
        self._cache: collections.OrderedDict = collections.OrderedDict()

    def get(self, grammar: SerializedGrammar):
        compiled = self._cache.get(grammar.digest)
        if compiled is None:
            compiled = self._cache[grammar.digest] = self._engine.grammar_compiler().deserialize(grammar.text)
            if len(self._cache) > GRAMMAR_CACHE:
                self._cache.popitem(last=False)
        self._cache.move_to_end(grammar.digest)
        return compiled


class _EngineHost:
    """Runs in the engine's process: feeds the pipe's messages to the engine and sends back what it emits,
    one message per pass of the step loop (`Engine.after_iteration`)."""

    def __init__(self, engine: Engine, conn):
        self.engine, self.conn = engine, conn
        self._events: list[tuple] = []
        self._events_lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._grammars = _Grammars(engine)
        engine.step_observer = self._observe
        engine.after_iteration = self.flush

    def facts(self) -> EngineFacts:
        engine = self.engine
        return EngineFacts(engine.config, engine.tokenizer, _view(engine.library),
                           set(engine.runtime_modules), engine.model_name, engine.max_model_len,
                           engine.sampling_defaults, set(engine.eos_ids), engine.num_module_slots,
                           engine.model.hf_config.vocab_size, engine.fingerprint, engine.stats())

    def run(self) -> None:
        self.engine.start()
        self.send(("ready", self.facts()))
        try:
            while True:
                try:
                    message = self.conn.recv()
                except EOFError:  # the API's process is gone
                    break
                if message[0] == "shutdown":
                    break
                self.handle(message)
                if self.engine.dead is not None:  # no loop pass will flush what a dead engine refused here
                    self.flush()
        finally:
            self.engine.shutdown()
            self.flush()

    def handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "add":
            request = message[1]
            request_id = request.request_id
            try:
                if isinstance(request.grammar, SerializedGrammar):
                    request.grammar = self._grammars.get(request.grammar)
            except Exception as error:  # noqa: BLE001 - fails this request alone
                self._emit(request_id, error)
                self.flush()
                return
            self.engine.submit(request, lambda item: self._emit(request_id, item))
        elif kind == "abort":
            self.engine.abort(message[1])
        elif kind == "call":
            _, call_id, method, args = message
            future = getattr(self.engine, method)(*args)
            future.add_done_callback(lambda done: self._reply(call_id, done))
        else:
            logger.error("the engine process got an unknown message %r", kind)

    def _emit(self, request_id: str, item: RequestOutput | BaseException) -> None:
        event = (request_id, None, pack_error(item)) if isinstance(item, BaseException) else (request_id, item, None)
        with self._events_lock:
            self._events.append(event)

    def _observe(self, stats: StepStats) -> None:
        with self._events_lock:
            self._events.append((None, stats, None))

    def _reply(self, call_id: int, done: concurrent.futures.Future) -> None:
        error = done.exception()
        self.send(("reply", call_id, None if error is not None else done.result(),
                   pack_error(error) if error is not None else None,
                   (_view(self.engine.library), set(self.engine.runtime_modules))))

    def flush(self) -> None:
        with self._events_lock:
            events, self._events = self._events, []
        dead = self.engine.dead
        if events or dead is not None:
            self.send(("events", events, pack_error(dead) if dead is not None else None))

    def send(self, message: tuple) -> None:
        try:
            with self._send_lock:
                self.conn.send(message)
        except (OSError, ValueError):  # the API's process is gone; run() ends on the EOF
            pass
