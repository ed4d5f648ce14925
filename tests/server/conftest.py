"""Fixtures for engine tests: the tiny Llama with a random three-module library written to disk."""

from __future__ import annotations

import pytest
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
