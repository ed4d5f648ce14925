"""The synthetic suite's tasks and data: answers on known inputs, determinism, disjoint splits, noise, JSONL."""

from __future__ import annotations

import random

import pytest

from training.data import load_examples
from training.suite.data import Item, SuiteConfig, is_test_input, make_items, to_examples, write_jsonl
from training.suite.tasks import (
    ALPHABET, COMPOSITES, TASKS, alphabet_of, answer_for, chain_in_domain, instruction_words, prompt_for,
    split_task,
)

KNOWN = {
    "reverse": ("ab3c", "c3ba"),
    "uppercase": ("ab cd", "AB CD"),
    "sort": ("dcaba", "aabcd"),
    "add": ("12+305", "317"),
    "caesar": ("xyz Ab", "abc De"),
    "count": ("banana", "3"),
}
KNOWN_COMPOSITES = {
    "caesar+reverse": ("abz", "ced"),
    "sort+uppercase": ("dcab", "ABCD"),
    "caesar+uppercase": ("xya", "ABD"),
    "sort+caesar": ("zyax", "dabc"),
}


@pytest.mark.parametrize("name", sorted(KNOWN))
def test_base_task_answers(name):
    text, expected = KNOWN[name]
    assert TASKS[name].answer(text) == expected
    assert answer_for([name], text) == expected


@pytest.mark.parametrize("name", sorted(KNOWN_COMPOSITES))
def test_composite_answers_chain_the_two_tasks(name):
    text, expected = KNOWN_COMPOSITES[name]
    first, second = COMPOSITES[name]
    assert name == f"{first}+{second}"
    assert answer_for(split_task(name), text) == expected == TASKS[second].answer(TASKS[first].answer(text))


def test_every_composite_chains_inside_the_second_tasks_training_domain():
    for name, (first, second) in COMPOSITES.items():
        assert chain_in_domain(first, second), name
    # the rule can fail: uppercase outputs capitals caesar never trains on, reverse passes on digits uppercase never sees
    assert not chain_in_domain("uppercase", "caesar") and not chain_in_domain("reverse", "uppercase")
    assert instruction_words(["caesar", "uppercase"]) == 9 and instruction_words(["reverse"]) == 3
    inputs, outputs = alphabet_of("caesar")
    assert inputs == outputs == set("abcdefghijklmnopqrstuvwxyz")


def test_suite_has_six_tasks_and_two_composites():
    assert set(KNOWN) <= set(TASKS) and len(COMPOSITES) >= 2
    assert set(KNOWN_COMPOSITES) == set(COMPOSITES)


def test_prompts_name_every_instruction_in_order():
    assert prompt_for(["reverse"], "abcd") == "reverse the string: abcd"
    assert prompt_for(["reverse", "uppercase"], "abcd") == "reverse the string, then convert to uppercase: abcd"


def test_inputs_and_answers_stay_in_the_alphabet():
    rng = random.Random(3)
    for name, task in TASKS.items():
        for length in range(1, 17):
            text = task.make_input(rng, length)
            assert text and set(text) <= set(ALPHABET), (name, text)
            assert set(task.answer(text)) <= set(ALPHABET), (name, text)
            assert set(prompt_for([name], text)) <= set(ALPHABET)


def test_bad_names_and_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="unknown base task 'nope'"):
        prompt_for(["nope"], "x")
    with pytest.raises(ValueError, match="unknown suite task"):
        make_items(["nope"], 1, "test")
    with pytest.raises(TypeError, match="sequence of task names"):
        answer_for("reverse", "x")
    with pytest.raises(ValueError, match="split must be one of"):
        make_items(["reverse"], 1, "valid")
    with pytest.raises(ValueError, match="add expects two non-negative integers"):
        TASKS["add"].answer("12-3")
    with pytest.raises(ValueError, match="min_len <= max_len"):
        SuiteConfig(min_len=5, max_len=4)
    with pytest.raises(ValueError, match="found only"):
        make_items(["sort"], 100, "test", SuiteConfig(min_len=1, max_len=1))


def test_items_are_deterministic_under_a_seed():
    names = list(TASKS) + list(COMPOSITES)
    config = SuiteConfig(noise=0.2, seed=5)
    for split in ("train", "test"):
        assert make_items(names, 20, split, config) == make_items(names, 20, split, config)
    assert make_items(["reverse"], 20, "train", config) != make_items(["reverse"], 20, "train", SuiteConfig(seed=6))


def test_items_are_consistent():
    config = SuiteConfig(min_len=3, max_len=9)
    for item in make_items(list(TASKS) + list(COMPOSITES), 15, "test", config):
        assert item.task == "+".join(item.tasks) and item.clean_input is None
        assert item.prompt == prompt_for(item.tasks, item.input)
        assert item.answer == answer_for(item.tasks, item.input)
        assert is_test_input(item.input)


def test_train_and_test_inputs_are_disjoint():
    config = SuiteConfig(min_len=2, max_len=5)
    names = list(TASKS) + list(COMPOSITES)
    test = make_items(names, 40, "test", config)
    train = make_items(list(TASKS), 300, "train", config)
    assert not {item.input for item in test} & {item.input for item in train}
    for name in names:
        inputs = [item.input for item in test if item.task == name]
        assert len(inputs) == len(set(inputs)) == 40


def test_noise_is_train_only_at_the_asked_rate():
    config = SuiteConfig(noise=0.2, min_len=8, max_len=12)
    train = make_items(list(TASKS), 300, "train", config)
    changed = total = 0
    for item in train:
        clean = item.clean_input or item.input
        assert item.answer == answer_for(item.tasks, clean)
        assert len(clean) == len(item.input)
        changed += sum(a != b for a, b in zip(clean, item.input))
        total += len(clean)
    assert abs(changed / total - 0.2) < 0.02  # about 18,000 characters: the std of the share is 0.003
    clean_train = make_items(list(TASKS), 300, "train", SuiteConfig(min_len=8, max_len=12))
    assert [i.clean_input or i.input for i in train] == [i.input for i in clean_train]
    assert all(item.clean_input is None for item in make_items(list(TASKS), 50, "test", config))


def test_examples_and_jsonl_load_as_training_data(tmp_path):
    items = make_items(["reverse", "add"], 3, "train", SuiteConfig(noise=0.3))
    examples = to_examples(items)
    assert [e.task for e in examples] == ["reverse"] * 3 + ["add"] * 3
    assert examples[0].messages == [{"role": "user", "content": items[0].prompt},
                                    {"role": "assistant", "content": items[0].answer}]
    path = write_jsonl(items, tmp_path / "data" / "suite.jsonl")
    assert load_examples(path) == examples
    assert [p.name for p in path.parent.iterdir()] == ["suite.jsonl"]


def test_jsonl_refuses_composites(tmp_path):
    items = make_items(["caesar+reverse"], 2, "test")
    with pytest.raises(ValueError, match="'caesar\\+reverse' is a composite"):
        write_jsonl(items, tmp_path / "x.jsonl")
    assert not (tmp_path / "x.jsonl").exists()
    assert isinstance(items[0], Item) and items[0].task == "caesar+reverse"
