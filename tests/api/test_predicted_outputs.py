"""OpenAI's Predicted Outputs and vLLM's n-gram speculation over HTTP: the same replies as without them, fewer
engine steps, the prediction counts in usage, and the speculation counters in /metrics."""

from __future__ import annotations

import string

import httpx
import pytest

from server.engine.config import EngineConfig
from server.engine.engine import Engine
from tests.api.conftest import MAX_MODEL_LEN, serve
from tests.api.test_metrics_and_disconnect import scrape

MESSAGES = [{"role": "user", "content": "reverse: the quick brown fox"}]


def _merge_free_characters(tokenizer) -> list[int]:
    """Ids of single-character tokens no two of which merge: a text over them tokenizes back to the very ids that
    wrote it (the random tiny model's free replies do not: bytes of cut UTF-8 sequences read back otherwise)."""
    chosen: dict[str, int] = {}
    for character in string.ascii_letters + string.digits:
        ids = tokenizer.encode(character, add_special_tokens=False)
        mine = chosen | {character: ids[0]}
        if len(ids) == 1 and all(tokenizer.encode(a + b, add_special_tokens=False) == [mine[a], mine[b]]
                                 for a in mine for b in mine):
            chosen = mine
    assert len(chosen) >= 8, chosen
    return sorted(chosen.values())


@pytest.fixture(scope="module")
def server(tiny_llama, library_dir):
    """A server whose engine also drafts by n-gram lookup (vLLM's --speculative-config)."""
    engine = Engine(EngineConfig(model=tiny_llama, library=library_dir, num_kv_blocks=64, max_model_len=MAX_MODEL_LEN,
                                 max_num_seqs=8, max_num_batched_tokens=256, seed=0, speculative_config=(
                                     '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2}')))
    with serve(engine) as served:
        yield served


@pytest.fixture(scope="module")
def greedy(server) -> dict:
    """Greedy, 24 tokens, over merge-free characters (allowed_token_ids: a static mask, drafts run under it)."""
    allowed = _merge_free_characters(server.engine.tokenizer)
    return {"temperature": 0.0, "max_tokens": 24, "extra_body": {"ignore_eos": True, "allowed_token_ids": allowed}}


def _steps(server) -> float:
    return sum(value for (name, _), value in scrape(server).items() if name == "tessera_batch_size_count")


def test_a_chat_reply_with_its_prediction_is_the_same_reply_in_fewer_steps(server, greedy):
    client = server.client()
    plain = client.chat.completions.create(model="reverse", messages=MESSAGES, **greedy)
    text = plain.choices[0].message.content
    assert plain.usage.completion_tokens_details is None  # no prediction: no prediction counts
    before = _steps(server)
    predicted = client.chat.completions.create(model="reverse", messages=MESSAGES, **greedy,
                                               prediction={"type": "content", "content": text})
    steps = _steps(server) - before
    assert predicted.choices[0].message.content == text
    assert predicted.usage.completion_tokens == plain.usage.completion_tokens == 24
    details = predicted.usage.completion_tokens_details
    assert details.accepted_prediction_tokens >= 20 and details.rejected_prediction_tokens == 0
    assert steps == 24 - details.accepted_prediction_tokens  # each step: its kept drafts and the token after them
    edited = [{"type": "text", "text": "".join(reversed(text))}]
    wrong = client.chat.completions.create(model="reverse", messages=MESSAGES, **greedy,
                                           prediction={"type": "content", "content": edited})
    assert wrong.choices[0].message.content == text
    assert wrong.usage.completion_tokens_details.rejected_prediction_tokens > 0


def test_a_streamed_completion_with_its_prediction_streams_the_same_text(server, greedy):
    client = server.client()
    body = {"model": "uppercase", "prompt": "convert: abcdef", **greedy}
    text = client.completions.create(**body).choices[0].text
    prediction = {"type": "content", "content": text[:10] + "QQQ" + text[12:]}  # an edit in the middle
    chunks = list(client.completions.create(**body | {"extra_body": greedy["extra_body"] | {"prediction": prediction}},
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    usage = chunks[-1].usage
    assert usage.completion_tokens == 24 and usage.completion_tokens_details.accepted_prediction_tokens >= 16
    assert usage.completion_tokens_details.rejected_prediction_tokens > 0


def test_ngram_speculation_changes_no_reply_and_is_counted_in_metrics(server, greedy):
    """The tiny model's greedy reply to a repetitive prompt repeats itself, so n-gram lookup finds drafts."""
    client = server.client()
    before = scrape(server)
    messages = [{"role": "user", "content": "abc abc abc abc abc abc abc"}]
    replies = [client.chat.completions.create(model=name, messages=messages, **greedy | {"max_tokens": 48})
               for name in (server.backbone, "reverse")]
    after = scrape(server)
    grew = lambda name, labels=(): after.get((name, labels), 0) - before.get((name, labels), 0)  # noqa: E731
    assert grew("tessera_spec_draft_tokens_total") > 0
    label = (("model_name", server.backbone),)
    assert grew("vllm:spec_decode_num_draft_tokens_total", label) == grew("tessera_spec_draft_tokens_total")
    assert grew("vllm:spec_decode_num_accepted_tokens_total", label) == grew("tessera_spec_accepted_tokens_total")
    assert grew("vllm:spec_decode_num_drafts_total", label) > 0
    for reply in replies:
        assert reply.usage.completion_tokens == 48
        assert reply.usage.completion_tokens_details is None  # no prediction in the request


@pytest.mark.parametrize("prediction,message", [
    ({"type": "text", "content": "x"}, "prediction.type"),
    ({"type": "content"}, "prediction.content"),
    ("plain text", "prediction"),
    ({"type": "content", "content": "ab " * (MAX_MODEL_LEN + 1)}, "more than max_model_len"),
    ({"type": "content", "content": "a" * (64 * MAX_MODEL_LEN + 1)}, "characters, more than"),
])
def test_a_bad_prediction_is_a_400_naming_it(server, prediction, message):
    response = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": "reverse", "messages": MESSAGES, "max_tokens": 4, "prediction": prediction})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and message in (error["param"] or "") + error["message"]
    assert "prediction" not in response.headers.get("x-tessera-ignored-fields", "")
