"""test_text_routing's tests again, against an engine in a process of its own: the library's controller, text
router included, crosses to the API's process without the module weights, and routes untagged prompts there."""

from __future__ import annotations

import pytest

from tests.api.conftest import make_engine, serve
from tests.api.test_text_routing import *  # noqa: F401,F403 - run again against the process engine


@pytest.fixture(scope="module")
def routed(tiny_llama, routed_library):
    with serve(make_engine(tiny_llama, routed_library, engine_process=True)) as served:
        yield served
