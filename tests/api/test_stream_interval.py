"""`--stream-interval`: a streamed reply comes in chunks of several tokens, with the same text, logprobs and usage
as one streamed token by token, from the engine on a thread and in a process of its own."""

from __future__ import annotations

import pytest

from tests.api.conftest import make_engine, serve

INTERVAL = 4


@pytest.fixture(scope="module", params=[False, True], ids=["thread", "process"])
def server(request, tiny_llama, library_dir):
    with serve(make_engine(tiny_llama, library_dir, stream_interval=INTERVAL,
                           engine_process=request.param)) as served:
        yield served


def _stream(client, **body):
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **body))
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    logprobs = [lp for c in chunks if c.choices and c.choices[0].logprobs for lp in c.choices[0].logprobs.content]
    return content, logprobs, chunks[-1].usage


def test_chunks_gather_tokens_and_the_reply_is_unchanged(server):
    client = server.client()
    body = dict(model="uppercase", messages=[{"role": "user", "content": "a b c"}], max_tokens=30,
                temperature=0, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**body)
    content, logprobs, usage = _stream(client, **body)
    assert "".join(c.choices[0].delta.content for c in content) == whole.choices[0].message.content
    assert [(lp.token, lp.logprob) for lp in logprobs] == [(lp.token, lp.logprob)
                                                           for lp in whole.choices[0].logprobs.content]
    assert usage.completion_tokens == whole.usage.completion_tokens == 30
    assert len(logprobs) == 30
    per_chunk = [len(c.choices[0].logprobs.content) for c in content]
    assert all(n >= INTERVAL for n in per_chunk[1:-1])  # (the first token comes at once: tests/server)
    assert len(content) <= 1 + -(-29 // INTERVAL)
