"""The `tessera` CLI as a user runs it: `python -m server.cli ...` in a subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from server.demo import DEMO_MODEL, DEMO_VERSION, ensure_demo

REPO = Path(__file__).resolve().parents[2]


def cli(*args: str, **popen) -> subprocess.Popen:
    env = os.environ | {"PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "server.cli", *args], cwd=REPO, env=env, text=True, **popen)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    process = cli(*args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(args, process.returncode, stdout, stderr)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_rejects_a_directory_without_config_json(tmp_path):
    result = run_cli("serve", "--model", str(tmp_path))
    assert result.returncode == 2
    assert "config.json" in result.stderr and str(tmp_path) in result.stderr


def test_serve_rejects_an_invalid_library(tiny_llama, tmp_path):
    (tmp_path / "library.json").write_text('{"format": "something else"}')
    result = run_cli("serve", "--model", tiny_llama, "--library", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.startswith(f"tessera: error: --library {tmp_path}:") and "Traceback" not in result.stderr


def test_engine_flags_come_from_engine_config():
    import dataclasses

    from server.engine.config import EngineConfig

    result = run_cli("serve", "--help")
    assert result.returncode == 0
    for field in dataclasses.fields(EngineConfig):
        assert "--" + field.name.replace("_", "-") in result.stdout


def wait_until_healthy(process: subprocess.Popen, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the server exited with {process.returncode}"
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise AssertionError(f"no healthy server at {url} within {timeout} s")


@pytest.mark.slow
def test_demo_starts_and_answers_a_tagged_chat(tmp_path):
    port, log = free_port(), tmp_path / "demo.log"
    started = time.monotonic()
    with open(log, "w") as out:
        process = cli("demo", "--port", str(port), "--cache-dir", str(tmp_path / "cache"), stdout=out, stderr=out)
        try:
            wait_until_healthy(process, f"http://127.0.0.1:{port}", timeout=110)
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
            response = client.chat.completions.create(
                model="reverse", messages=[{"role": "user", "content": "hello world"}], max_tokens=8
            )
        finally:
            process.terminate()
            process.wait(timeout=30)
    assert time.monotonic() - started < 120
    assert response.usage.completion_tokens >= 1
    assert response.to_dict()["tessera"]["composition"]["task"] == "reverse"
    text = log.read_text()
    assert "RANDOM" in text and "curl" in text and '"task": "reverse"' in text
    library_json = tmp_path / "cache" / DEMO_VERSION / "library" / "library.json"
    built = library_json.stat().st_mtime_ns
    model_dir, library_dir = ensure_demo(tmp_path / "cache")
    assert (model_dir.name, library_dir) == (DEMO_MODEL, library_json.parent)
    assert library_json.stat().st_mtime_ns == built, "a second start reuses the cache"
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [DEMO_VERSION], "no staging left behind"
