"""Shared fixtures: tiny real checkpoints written to disk once per session, and the `gpu` marker.

Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. The flag is set here, in the
root conftest, before any test module is imported: Triton reads parts of it when it is first imported
(which peft and transformers do), so setting it later, in a conftest that pytest loads only when it
reaches tests/kernels, left the kernels half-interpreted whenever an earlier test module imported peft.
On a CUDA machine the kernels compile for the device as usual.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402 - after the flag, like everything that may import triton

from server.model.tiny import TinyConfig, write_checkpoint  # noqa: E402


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
