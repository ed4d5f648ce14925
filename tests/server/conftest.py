"""Fixtures for engine tests: the tiny Llama with a random three-module library written to disk."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig

from router.library import fingerprint_from_hf_config, random_library


@pytest.fixture(scope="module")
def setup(tiny_checkpoints, tmp_path_factory) -> tuple[str, str]:
    """(model dir, library dir): the tiny Llama and three random modules m0..m2 (std 0.2)."""
    model_dir = tiny_checkpoints("llama")
    library = random_library(fingerprint_from_hf_config(AutoConfig.from_pretrained(model_dir)), num_modules=3, std=0.2)
    path = tmp_path_factory.mktemp("lib") / "lib"
    library.write(path)
    return model_dir, str(path)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test module (`pytestmark = pytest.mark.usefixtures("one_thread")`).

    NOTE: the tiny model's ops are too small for two intra-op threads: with another process busy on the shared
    2-core machine, test_async_scheduling.py took 89 s on two threads and 4 s on one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
