"""The engine in a process of its own (`server.engine.process`) behind a real server.

The API test modules that exercise the engine from every side (chat and completions, every tagging route,
structured outputs, metrics and client disconnects, adapters loaded and unloaded while serving) run here a second
time, against an `EngineProcess`: their tests are imported below and their server fixtures replaced (text routing's
run in `test_engine_process_routing`, since their `client` fixture is another server's). The tests after them
check what only a separate process has: the weights stay in it, and its death is a 503, not a hang.
"""

from __future__ import annotations

import functools
import itertools
import os
import signal
import threading
import time

import httpx
import openai
import pytest

from router.errors import LibraryError
from router.library import LibraryView
from server.engine.config import EngineConfig
from server.engine.engine import Engine, EngineDeadError
from server.engine.process import EngineProcess, pack_error, unpack_error
from server.engine.request import NoDrawableTokenError, Request, SamplingParams
from tests.api.conftest import make_engine, serve
from tests.api.test_metrics_and_disconnect import *  # noqa: F401,F403 - run again against the process engine
from tests.api.test_openai_client import *  # noqa: F401,F403
from tests.api.test_runtime_adapters import *  # noqa: F401,F403
from tests.api.test_runtime_adapters import _engine
from tests.api.test_structured_outputs import *  # noqa: F401,F403


@pytest.fixture(scope="module")
def server(tiny_llama, library_dir):
    with serve(make_engine(tiny_llama, library_dir, engine_process=True)) as served:
        yield served


@pytest.fixture(scope="module")
def served(tiny_llama, library_dir):  # test_runtime_adapters' server, with runtime modules on
    with serve(_engine(tiny_llama, library_dir, process=True)) as served, \
            httpx.Client(base_url=served.url, timeout=60) as http:
        yield served, http


def test_the_api_process_routes_with_the_library_but_holds_none_of_its_weights(server):
    engine = server.engine
    assert isinstance(engine, EngineProcess) and engine.pid != os.getpid()
    assert isinstance(engine.library, LibraryView) and not hasattr(engine.library, "weights")
    assert set(engine.library.tasks) == {"reverse", "uppercase", "summarize"}
    assert engine.healthy()


def test_errors_cross_the_pipe_with_their_type_and_fields():
    from router.errors import UnknownModuleError

    unknown = unpack_error(pack_error(UnknownModuleError("ghost", ["m0", "m1"])))
    assert type(unknown) is UnknownModuleError and "ghost" in str(unknown) and unknown.name == "ghost"
    request = Request("r", [1, 2], SamplingParams(min_tokens=4))
    undrawable = unpack_error(pack_error(NoDrawableTokenError(request, 3)))
    assert type(undrawable) is NoDrawableTokenError and undrawable.position == 3 and "min_tokens" in str(undrawable)

    class Local(Exception):  # not importable in another process
        pass

    fallback = unpack_error(pack_error(Local("the words")))
    assert type(fallback) is RuntimeError and str(fallback) == "Local: the words"


def test_a_library_that_does_not_load_fails_construction_with_its_error(tiny_llama, tmp_path):
    (tmp_path / "library.json").write_text("{not json")
    with pytest.raises(LibraryError):
        EngineProcess(EngineConfig(model=tiny_llama, library=str(tmp_path), num_kv_blocks=64, max_model_len=256))


def test_a_dead_engine_process_fails_its_requests_and_health_says_503(tiny_llama, library_dir):
    engine = make_engine(tiny_llama, library_dir, engine_process=True)
    with serve(engine) as served:
        client = served.client()
        streamed, failure = [], []

        def stream() -> None:
            try:
                for chunk in client.chat.completions.create(
                        model="reverse", messages=[{"role": "user", "content": "go on"}], max_tokens=200,
                        temperature=0, stream=True, extra_body={"ignore_eos": True}):
                    streamed.append(chunk)
            except Exception as error:  # noqa: BLE001 - what the client saw
                failure.append(error)

        reader = threading.Thread(target=stream)
        reader.start()
        deadline = time.monotonic() + 30
        while len(streamed) < 3:
            assert time.monotonic() < deadline and reader.is_alive(), (streamed, failure)
            time.sleep(0.01)
        os.kill(engine.pid, signal.SIGKILL)
        reader.join(timeout=30)
        assert not reader.is_alive()
        assert len(failure) == 1 and "the engine process exited (exit code -9)" in str(failure[0]), failure
        assert isinstance(engine.dead, RuntimeError) and not engine.healthy()
        health = httpx.get(served.url + "/health", timeout=10)
        assert health.status_code == 503 and health.json()["error"]["code"] == "engine_dead"
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(model="reverse", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=2)
        assert caught.value.status_code == 503
    with pytest.raises(EngineDeadError):
        engine.add_module(None, None).result(timeout=5)


def failing_launches(config: EngineConfig, failures: dict[int, str]) -> Engine:
    """An engine (built in the engine's process) whose step number n raises RuntimeError(failures[n])."""
    engine = Engine(config)
    launch, steps = engine.runner.launch, itertools.count()

    def launch_or_fail(plan):
        step = next(steps)
        if step in failures:
            raise RuntimeError(failures[step])
        return launch(plan)

    engine.runner.launch = launch_or_fail
    return engine


def _config(tiny_llama, library_dir) -> EngineConfig:
    return EngineConfig(model=tiny_llama, library=library_dir, num_kv_blocks=64, max_model_len=256, max_num_seqs=8,
                        max_num_batched_tokens=256, seed=0)


def test_a_failed_step_fails_its_requests_and_the_engine_process_serves_on(tiny_llama, library_dir):
    build = functools.partial(failing_launches, _config(tiny_llama, library_dir), {2: "a step that failed"})
    with serve(EngineProcess(build=build)) as served:
        client = served.client()
        with pytest.raises(openai.InternalServerError, match="a step that failed"):
            client.completions.create(model="reverse", prompt="abc", max_tokens=8)
        again = client.completions.create(model="reverse", prompt="abc", max_tokens=4, extra_body={"ignore_eos": True})
        assert again.usage.completion_tokens == 4 and served.engine.healthy()


def test_a_device_error_in_the_engine_process_is_a_503_until_restarted(tiny_llama, library_dir):
    fatal = "CUDA error: an illegal memory access was encountered"
    engine = EngineProcess(build=functools.partial(failing_launches, _config(tiny_llama, library_dir), {3: fatal}))
    with serve(engine) as served:
        client = served.client()
        with pytest.raises(openai.InternalServerError, match="illegal memory access"):  # its step failed
            client.completions.create(model="reverse", prompt="abc", max_tokens=8)
        deadline = time.monotonic() + 10
        while engine.dead is None:  # the loop's death follows its step's failure in the next message
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert isinstance(engine.dead, EngineDeadError) and not engine.healthy()
        with pytest.raises(openai.APIStatusError) as caught:
            client.completions.create(model="reverse", prompt="abc", max_tokens=8)
        assert caught.value.status_code == 503 and "illegal memory access" in str(caught.value)
        assert engine._process.is_alive(), "the step loop died, not the process"
        assert httpx.get(served.url + "/health", timeout=10).status_code == 503
    assert not engine._process.is_alive(), "shut down with the server"
