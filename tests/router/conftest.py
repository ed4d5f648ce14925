"""Fixtures for router tests: the tiny Llama's fingerprint and small random libraries on disk."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoConfig

from router.library import fingerprint_from_hf_config, random_library


@pytest.fixture(scope="session")
def fingerprint(tiny_llama):
    """Fingerprint of the tiny Llama: hidden 64, 2 layers, q/o 64->64, k/v 64->32, MLP 64<->128."""
    return fingerprint_from_hf_config(AutoConfig.from_pretrained(tiny_llama))


@pytest.fixture
def library(fingerprint):
    """Four random modules of mixed ranks, three tasks."""
    return random_library(fingerprint, num_modules=4, rank=(4, 8, 8, 2), std=0.2)


@pytest.fixture
def written(library, tmp_path) -> Path:
    """`library` written to tmp_path/lib."""
    return library.write(tmp_path / "lib")
