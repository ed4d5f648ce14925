"""A real uvicorn server over a real engine on a tiny checkpoint and a random module library.

`serve(engine)` runs uvicorn in a background thread (`server.api.background`) on a free port of 127.0.0.1;
test modules wrap it in module-scoped fixtures, so each module starts one server.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import openai
import pytest
from transformers import AutoConfig

from router.library import LibraryView, ModuleLibrary, fingerprint_from_hf_config, random_library
from server.api.background import serve_in_background
from server.engine.config import EngineConfig
from server.engine.engine import Engine

MAX_MODEL_LEN = 256
TASKS = ("reverse", "uppercase", "summarize")


@dataclass
class Served:
    """A running server: its base URL and the engine behind it."""

    url: str
    engine: Engine

    @property
    def backbone(self) -> str:
        return self.engine.model_name

    @functools.cached_property
    def library(self) -> ModuleLibrary:
        """The served library with its weights (read from disk when the engine runs in a process of its own)."""
        library = self.engine.library
        return ModuleLibrary.load(self.engine.config.library) if isinstance(library, LibraryView) else library

    def client(self, api_key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=60)


@contextmanager
def serve(engine: Engine, api_key: str | None = None) -> Iterator[Served]:
    """Serve `engine` with uvicorn on a fresh port until the block ends."""
    with serve_in_background(engine, api_key) as url:
        yield Served(url, engine)


@pytest.fixture(scope="session")
def library_dir(tiny_llama, tmp_path_factory) -> str:
    """A random (untrained) library for the tiny Llama: 4 modules, 3 tasks, large enough to change outputs."""
    fingerprint = fingerprint_from_hf_config(AutoConfig.from_pretrained(tiny_llama))
    library = random_library(fingerprint, num_modules=4, tasks=TASKS, rank=8, std=0.2, seed=0)
    return str(library.write(tmp_path_factory.mktemp("library") / "lib"))


def make_engine(model: str, library: str | None, **overrides) -> Engine:
    """An engine for the API tests; `engine_process=True` in `overrides` gives a `process.EngineProcess`."""
    config = EngineConfig(model=model, library=library, num_kv_blocks=64, max_model_len=MAX_MODEL_LEN,
                          max_num_seqs=8, max_num_batched_tokens=256, seed=0, **overrides)
    if config.engine_process:
        from server.engine.process import EngineProcess

        return EngineProcess(config)
    return Engine(config)


@pytest.fixture(scope="module")
def server(tiny_llama, library_dir) -> Iterator[Served]:
    """One server per test module."""
    with serve(make_engine(tiny_llama, library_dir)) as served:
        yield served
