"""`tessera run-batch`: OpenAI batch files served offline, as vLLM's `run-batch`.

The input is OpenAI's batch input format, one request per line:

    {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "reverse", ...}}

Every line goes to the real API (the app served on 127.0.0.1 in this process), up to `--max-concurrency` at
once, so the engine batches them as it batches live traffic and every tag, composition and field works as
it does online. The output is OpenAI's batch output format, one line per input line and in the same order:

    {"id": "batch_req_...", "custom_id": "q1", "response": {"status_code": 200, "request_id": ..., "body": {...}},
     "error": null}

An API error (a 4xx, say an unknown task) is that line's `response`, with its status and OpenAI error body.
A line that is not a request (bad JSON, a missing field, a custom_id used twice, a stream) gets `response`
null and `error` {"code", "message"} naming its line number; the other lines are served. The output file is
written whole or not at all (atomically), so a run cut short never leaves a half file that looks finished.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

URLS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")
"""The endpoints a batch line may call."""


@dataclass
class Line:
    number: int
    """1-based, as editors count."""
    custom_id: str | None = None
    url: str | None = None
    body: dict | None = None
    error: str | None = None
    """Why the line is not a request; None for a request."""


def read_lines(path: Path) -> list[Line]:
    """The batch's lines (blank lines skipped), each a request or the reason it is not one."""
    lines, seen = [], set()
    for number, text in enumerate(path.read_text().splitlines(), start=1):
        if not text.strip():
            continue
        lines.append(_parse(number, text, seen))
    return lines


def _parse(number: int, text: str, seen: set[str]) -> Line:
    try:
        item = json.loads(text)
    except json.JSONDecodeError as error:
        return Line(number, error=f"line {number} is not JSON: {error.msg}")
    if not isinstance(item, dict):
        return Line(number, error=f"line {number} is not a JSON object")
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return Line(number, error=f"line {number} has no custom_id (a non-empty string)")
    line = Line(number, custom_id)
    if custom_id in seen:
        line.error = f"line {number}: custom_id {custom_id!r} is used by an earlier line"
    elif item.get("method", "POST") != "POST":
        line.error = f"line {number}: method must be POST, got {item.get('method')!r}"
    elif item.get("url") not in URLS:
        line.error = f"line {number}: url must be one of {', '.join(URLS)}, got {item.get('url')!r}"
    elif not isinstance(item.get("body"), dict):
        line.error = f"line {number}: body must be a JSON object"
    elif item["body"].get("stream"):
        line.error = f"line {number}: a batch does not stream; drop stream from the body"
    else:
        line.url, line.body = item["url"], item["body"]
    seen.add(custom_id)
    return line


async def serve_lines(base_url: str, lines: list[Line], max_concurrency: int, progress=None) -> list[dict]:
    """Every line's output record, in the lines' order."""
    import httpx

    gate = asyncio.Semaphore(max_concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=None) as client:
        async def one(line: Line) -> dict:
            if line.error is not None:
                return _record(line, None, {"code": "invalid_request", "message": line.error})
            async with gate:
                response = await client.post(line.url, json=line.body)
            if progress is not None:
                progress()
            response_body = response.json()
            response_record = {"status_code": response.status_code,
                                "request_id": response.headers.get("x-request-id"), "body": response_body}
            return _record(line, response_record, None)

        return await asyncio.gather(*(one(line) for line in lines))


def _record(line: Line, response: dict | None, error: dict | None) -> dict:
    return {"id": f"batch_req_{uuid.uuid4().hex[:24]}", "custom_id": line.custom_id, "response": response,
            "error": error}


def write_atomically(path: Path, records: list[dict]) -> None:
    """All the records, or (on any failure) nothing new at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(handle, "w") as out:
            for record in records:
                out.write(json.dumps(record, separators=(",", ":")) + "\n")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def run_batch(engine, input_path: Path, output_path: Path, max_concurrency: int = 64) -> dict[str, int]:
    """Serve every line of `input_path` with `engine` and write the outputs; counts of what happened."""
    from server.api.background import serve_in_background

    lines = read_lines(input_path)
    requests = sum(line.error is None for line in lines)
    logger.info("batch %s: %d lines, %d requests", input_path, len(lines), requests)
    bar = _progress(requests)
    with serve_in_background(engine) as url:
        records = asyncio.run(serve_lines(url, lines, max_concurrency, bar.update if bar is not None else None))
    if bar is not None:
        bar.close()
    write_atomically(output_path, records)
    served = sum(r["response"] is not None and r["response"]["status_code"] == 200 for r in records)
    counts = {"lines": len(lines), "served": served, "api_errors": requests - served,
              "invalid_lines": len(lines) - requests}
    logger.info("batch %s -> %s: %s", input_path, output_path, counts)
    return counts


def _progress(total: int):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is an extra; the counts are logged either way
        return None
    return tqdm(total=total, unit="req", desc="run-batch")
