"""Chat JSONL parsing (every error kind names file and line), assistant-only labels, truncation, padding."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from training.data import IGNORE, DataError, Example, collate, encode, hold_out, load_examples

USER, ASSISTANT = {"role": "user", "content": "reverse abc"}, {"role": "assistant", "content": "cba"}


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return AutoTokenizer.from_pretrained(tiny_llama)


def _write(tmp_path, *lines: str):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_reads_openai_and_sharegpt_lines(tmp_path):
    sharegpt = {"task": "rev", "conversations": [{"from": "system", "value": "be brief"},
                                                  {"from": "human", "value": "reverse abc"},
                                                  {"from": "gpt", "value": "cba"}]}
    path = _write(tmp_path, json.dumps({"task": "rev", "messages": [USER, ASSISTANT]}), "", json.dumps(sharegpt))
    first, second = load_examples(path)
    assert first == Example("rev", [USER, ASSISTANT])
    assert second.messages == [{"role": "system", "content": "be brief"}, USER, ASSISTANT]


BAD_LINES = [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    (json.dumps({"messages": [USER, ASSISTANT]}), "missing 'task'"),
    (json.dumps({"task": "a:b", "messages": [USER, ASSISTANT]}), "task name 'a:b' is invalid"),
    (json.dumps({"task": "t"}), "give exactly one of 'messages'"),
    (json.dumps({"task": "t", "messages": [USER, ASSISTANT], "conversations": []}), "give exactly one of 'messages'"),
    (json.dumps({"task": "t", "messages": []}), "'messages' must be a non-empty list"),
    (json.dumps({"task": "t", "messages": ["hi", ASSISTANT]}), "messages[0] must be an object, got str"),
    (json.dumps({"task": "t", "messages": [{"role": "tool", "content": "x"}, ASSISTANT]}), "unknown role 'tool'"),
    (json.dumps({"task": "t", "conversations": [{"from": "bot", "value": "x"}]}), "unknown from 'bot'"),
    (json.dumps({"task": "t", "messages": [USER, {"role": "assistant", "content": 3}]}),
     "messages[1]: 'content' must be a string, got int"),
    (json.dumps({"task": "t", "messages": [USER, {"role": "assistant", "content": "  "}]}),
     "messages[1]: 'content' is empty"),
    (json.dumps({"task": "t", "messages": [USER]}), "no assistant turn"),
]


@pytest.mark.parametrize("line, expected", BAD_LINES)
def test_every_error_names_file_line_and_problem(tmp_path, line, expected):
    good = json.dumps({"task": "t", "messages": [USER, ASSISTANT]})
    path = _write(tmp_path, good, good, line)
    with pytest.raises(DataError) as error:
        load_examples(path)
    assert f"{path}:3: " in str(error.value) and expected in str(error.value)


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(DataError, match="no examples"):
        load_examples(_write(tmp_path, "", "  "))
    with pytest.raises(DataError, match="cannot read the examples"):
        load_examples(tmp_path / "absent.jsonl")


def test_labels_cover_assistant_turns_and_their_end_only(tokenizer):
    messages = [{"role": "system", "content": "be brief"}, USER, ASSISTANT,
                {"role": "user", "content": "reverse xyz"}, {"role": "assistant", "content": "zyx"}]
    ids, labels = encode(tokenizer, Example("rev", messages), max_seq_len=512)
    assert len(ids) == len(labels)
    assert all(label in (IGNORE, token) for token, label in zip(ids, labels))
    learned = tokenizer.decode([label for label in labels if label != IGNORE])
    assert learned == "cba<|im_end|>\nzyx<|im_end|>\n"
    assert tokenizer.decode(ids).startswith("<|im_start|>system\nbe brief<|im_end|>")


def test_truncation_keeps_the_start(tokenizer):
    ids, labels = encode(tokenizer, Example("rev", [USER, ASSISTANT]), max_seq_len=512)
    short_ids, short_labels = encode(tokenizer, Example("rev", [USER, ASSISTANT]), max_seq_len=5)
    assert (short_ids, short_labels) == (ids[:5], labels[:5])


def test_a_template_that_rewrites_earlier_turns_is_rejected(tokenizer):
    rewriting = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    rewriting.chat_template = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(DataError, match="not prefix-stable at message 1"):
        encode(rewriting, Example("rev", [USER, ASSISTANT]), max_seq_len=64)


def test_collate_pads_right_with_masks():
    batch = collate([([5, 6, 7], [IGNORE, 6, 7]), ([8], [IGNORE])], [1, 0], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [IGNORE, IGNORE, IGNORE]]
    assert torch.equal(batch["task_ids"], torch.tensor([1, 0]))


def test_a_conversation_may_open_with_the_assistant(tokenizer):
    ids, labels = encode(tokenizer, Example("rev", [ASSISTANT, USER]), max_seq_len=64)
    assert tokenizer.decode([label for label in labels if label != IGNORE]) == "cba<|im_end|>\n"


def test_a_template_that_raises_is_a_data_error(tokenizer):
    strict = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    strict.chat_template = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}x"
    with pytest.raises(DataError, match="chat template cannot render 2 turn.*user first"):
        encode(strict, Example("rev", [ASSISTANT, USER]), max_seq_len=64)


def test_hold_out_takes_a_seeded_share_of_every_task():
    examples = [Example(task, [{"role": "user", "content": f"{task} {i}"}, {"role": "assistant", "content": "x"}])
                for task, count in (("a", 20), ("b", 3), ("c", 1)) for i in range(count)]
    train, held = hold_out(examples, 0.25, seed=0)
    counts = {task: sum(e.task == task for e in held) for task in "abc"}
    assert counts == {"a": 5, "b": 1, "c": 0}  # a task of one example keeps it for training
    assert len(train) + len(held) == len(examples) and not {id(e) for e in train} & {id(e) for e in held}
    assert [e for e in examples if e in held] == held and [e for e in examples if e in train] == train  # file order
    assert hold_out(examples, 0.25, seed=0) == (train, held)
    assert hold_out(examples, 0.25, seed=1)[1] != held
    assert {e.task: 0 for e in hold_out(examples, 0.99, seed=0)[0]} == {"a": 0, "b": 0, "c": 0}  # one of each stays
    with pytest.raises(ValueError, match=r"held-out share must be in \(0, 1\), got 1.0"):
        hold_out(examples, 1.0, seed=0)
