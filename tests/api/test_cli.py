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

from server.demo import DEMO_MODEL, DEMO_VERSION, ensure_demo, load_record
from training.suite.backbone import SETTINGS, config_hash
from training.suite.tasks import TASKS, prompt_for

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


@pytest.mark.parametrize("where", [(), ("--engine-process",)], ids=["thread", "process"])
def test_serve_rejects_an_invalid_library(tiny_llama, tmp_path, where):
    (tmp_path / "library.json").write_text('{"format": "something else"}')
    result = run_cli("serve", "--model", tiny_llama, "--library", str(tmp_path), *where)
    assert result.returncode == 2
    assert result.stderr.startswith(f"tessera: error: --library {tmp_path}:") and "Traceback" not in result.stderr


def test_serve_rejects_bad_lora_modules(tiny_llama, tmp_path):
    backbone = Path(tiny_llama).name
    for spec, message in (("sql", "give NAME=PATH"), (f"sql={tmp_path / 'nope'}", "not a directory"),
                          (f"auto={tmp_path}", "names the backbone or text routing"),
                          (f"{backbone}={tmp_path}", "names the backbone or text routing")):
        result = run_cli("serve", "--model", tiny_llama, "--lora-modules", spec)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith(f"tessera: error: --lora-modules {spec!r}") and message in result.stderr
        assert "Traceback" not in result.stderr


def test_serve_rejects_a_speculative_config_it_cannot_run(tiny_llama):
    for text, message in (('{"method": "eagle", "num_speculative_tokens": 3}', "method 'eagle' is not supported"),
                          ("{method: ngram}", "is not JSON")):
        result = run_cli("serve", "--model", tiny_llama, "--speculative-config", text)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("tessera: error: speculative_config") and message in result.stderr
        assert "Traceback" not in result.stderr


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
def test_demo_starts_and_answers_a_tagged_and_an_untagged_chat(tmp_path):
    """The tiny demo setting: built (backbone pretraining and library training included) and served in well
    under a minute; a tagged chat echoes its composition, an untagged one is routed by the text router."""
    port, log, cache = free_port(), tmp_path / "demo.log", tmp_path / "cache"
    started = time.monotonic()
    with open(log, "w") as out:
        process = cli("demo", "--setting", "tiny", "--port", str(port), "--cache-dir", str(cache),
                      stdout=out, stderr=out)
        try:
            wait_until_healthy(process, f"http://127.0.0.1:{port}", timeout=110)
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
            tagged = client.chat.completions.create(
                model=DEMO_MODEL, messages=[{"role": "user", "content": prompt_for(["reverse"], "hello")}],
                max_tokens=8, temperature=0, extra_body={"task": "reverse"})
            untagged = client.chat.completions.create(
                model="auto", messages=[{"role": "user", "content": prompt_for(["uppercase"], "hello")}],
                max_tokens=8, temperature=0)
        finally:
            process.terminate()
            process.wait(timeout=30)
    assert time.monotonic() - started < 120
    assert tagged.usage.completion_tokens >= 1
    composition = tagged.to_dict()["tessera"]["composition"]
    assert composition["task"] == "reverse" and composition["source"] == "tag" and composition["modules"]
    assert untagged.to_dict()["tessera"]["composition"] | {"modules": None} == {
        "modules": None, "source": "inferred", "task": "uppercase"}
    text = log.read_text()
    assert "RANDOM" not in text and "held-out exact match per task" in text
    assert '"task": "' in text and '"model": "auto"' in text and text.count("curl -s") == 2
    entry = cache / f"{DEMO_VERSION}-tiny"
    record = load_record(entry / DEMO_MODEL)
    assert set(record["exact_match"]) == set(TASKS) and record["setting"] == "tiny"
    library_json = entry / "library" / "library.json"
    built = library_json.stat().st_mtime_ns
    model_dir, library_dir = ensure_demo(cache, "tiny")
    assert (model_dir, library_dir) == (entry / DEMO_MODEL, library_json.parent)
    assert library_json.stat().st_mtime_ns == built, "a second start reuses the cache"
    backbone = f"suite-backbone-{config_hash(SETTINGS['tiny'])}"
    assert {p.name for p in cache.iterdir()} == {backbone, entry.name}, "no staging left behind"


def test_demo_rejects_an_unknown_setting(tmp_path):
    with pytest.raises(ValueError, match="unknown demo setting 'huge'"):
        ensure_demo(tmp_path, "huge")
    result = run_cli("demo", "--setting", "huge")
    assert result.returncode == 2 and "invalid choice: 'huge'" in result.stderr


def test_serve_over_tls_with_a_key_from_the_environment_cors_and_a_root_path(tiny_llama, tmp_path):
    """What a deployment without a proxy in front sets: HTTPS, the key in $TESSERA_API_KEY (not in the process
    list), browsers of one origin allowed, and the prefix a proxy would add."""
    import shutil

    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    port = free_port()
    env = os.environ | {"PYTHONPATH": str(REPO), "TESSERA_API_KEY": "env-key"}
    process = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--model", tiny_llama, "--port", str(port),
                                "--ssl-keyfile", str(key), "--ssl-certfile", str(cert), "--num-kv-blocks", "16",
                                "--allowed-origins", "https://ui.example", "--root-path", "/llm"],
                               cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"https://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None and time.monotonic() < deadline, "no healthy HTTPS server"
            try:
                if httpx.get(url + "/health", verify=str(cert), timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.25)
        with httpx.Client(base_url=url, verify=str(cert), timeout=30) as http:
            assert http.get("/v1/models").status_code == 401
            models = http.get("/v1/models", headers={"Authorization": "Bearer env-key"})
            assert models.status_code == 200 and models.json()["data"]
            preflight = http.options("/v1/chat/completions", headers={
                "Origin": "https://ui.example", "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type"})
            assert preflight.status_code == 200
            assert preflight.headers["access-control-allow-origin"] == "https://ui.example"
            other = http.options("/v1/chat/completions", headers={"Origin": "https://evil.example",
                                                                  "Access-Control-Request-Method": "POST"})
            assert "access-control-allow-origin" not in other.headers
            docs = http.get("/openapi.json", headers={"Authorization": "Bearer env-key"}).json()
            assert docs["servers"] == [{"url": "/llm"}]  # the root path the app was told
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)  # TLS only
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_half_a_tls_pair_is_a_clear_error(tiny_llama, tmp_path):
    result = run_cli("serve", "--model", tiny_llama, "--ssl-keyfile", str(tmp_path / "k.pem"))
    assert result.returncode == 2 and "--ssl-keyfile and --ssl-certfile go together" in result.stderr


@pytest.mark.parametrize("where", [(), ("--engine-process",)], ids=["thread", "process"])
def test_sigterm_lets_a_running_stream_finish_before_the_server_exits(tiny_llama, where):
    """A rolling restart: the server stops taking connections, every stream in flight runs to its end, then the
    process exits cleanly (and an engine process with it, whether the signal reached only the server or, as
    systemd sends it, its whole group)."""
    import json
    import signal

    port = free_port()
    process = cli("serve", "--model", tiny_llama, "--port", str(port), "--num-kv-blocks", "64", *where,
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(process, url, timeout=90)
        body = {"model": Path(tiny_llama).name, "prompt": "abc", "max_tokens": 120, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        events = []
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data: ") and len(events) == 2:  # mid-stream
                    os.killpg(process.pid, signal.SIGTERM) if where else process.send_signal(signal.SIGTERM)
                if line.startswith("data: "):
                    events.append(line.removeprefix("data: "))
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["usage"]["completion_tokens"] == 120  # every token, none cut
        assert process.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once shut down
        if where:  # no engine process is left behind
            deadline = time.monotonic() + 10
            while _group_alive(process.pid):
                assert time.monotonic() < deadline, "the engine process outlived the server"
                time.sleep(0.05)
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health", timeout=2)
    finally:
        if process.poll() is None:
            process.kill()
        if _group_alive(process.pid):
            os.killpg(process.pid, signal.SIGKILL)


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True
