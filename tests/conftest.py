"""Shared fixtures: tiny real checkpoints written to disk once per session, and the `gpu` marker."""

from __future__ import annotations

import pytest
import torch

from server.model.tiny import TinyConfig, write_checkpoint


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """A factory: `tiny_checkpoints("qwen3")` -> path of that tiny architecture, written once."""
    cache: dict[tuple, str] = {}

    def make(architecture: str = "llama", **overrides) -> str:
        key = (architecture, tuple(sorted(overrides.items())))
        if key not in cache:
            path = tmp_path_factory.mktemp(f"tiny-{architecture}")
            cache[key] = str(write_checkpoint(path, TinyConfig(architecture=architecture, **overrides)))
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_llama(tiny_checkpoints) -> str:
    """Path of a tiny Llama checkpoint (tokenizer with chat template included)."""
    return tiny_checkpoints("llama")
