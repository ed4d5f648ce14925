"""The live-server fixtures of tests/api: one real uvicorn server per test module, tiny model, random library."""

from tests.api.conftest import library_dir, server  # noqa: F401 - fixtures, registered by import
