"""The suite's backbone: the char tokenizer, the pretraining data rule, and the cached tiny backbone."""

from __future__ import annotations

import json
import random
import time
from dataclasses import replace

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from training.data import IGNORE, Example, encode
from training.suite.backbone import (
    PRETRAIN_RECORD, SETTINGS, BackboneConfig, config_hash, ensure_backbone, pretraining_text, write_char_tokenizer,
)
from training.suite.data import make_items
from training.suite.tasks import ALPHABET, COMPOSITES, TASKS, answer_for, instruction_words


@pytest.fixture(scope="module")
def char_tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("char-tokenizer")
    write_char_tokenizer(path)
    return AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory):
    cache = tmp_path_factory.mktemp("suite-cache")
    started = time.perf_counter()
    path = ensure_backbone("tiny", cache)
    return cache, path, time.perf_counter() - started


def test_one_token_per_character_and_round_trip(char_tokenizer):
    ids = char_tokenizer(ALPHABET, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(ALPHABET) == len(set(ids))
    assert char_tokenizer.unk_token_id not in ids
    for char, token_id in zip(ALPHABET, ids):
        assert char_tokenizer.convert_ids_to_tokens(token_id) == char
        assert char_tokenizer.decode([token_id]) == char
    assert char_tokenizer.decode(ids) == ALPHABET
    assert char_tokenizer("a~b", add_special_tokens=False)["input_ids"][1] == char_tokenizer.unk_token_id


def test_chat_template_renders_and_encodes_through_training_data(char_tokenizer):
    assert char_tokenizer.eos_token == "<|im_end|>" and char_tokenizer.pad_token_id is not None
    messages = [{"role": "user", "content": "reverse the string: ab c"}, {"role": "assistant", "content": "c ba"}]
    text = char_tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "<|im_start|>user\nreverse the string: ab c<|im_end|>\n<|im_start|>assistant\nc ba<|im_end|>\n"
    prompt = char_tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert text.startswith(prompt) and prompt.endswith("<|im_start|>assistant\n")
    ids, labels = encode(char_tokenizer, Example("reverse", messages), 256)
    learned = [i for i, label in zip(ids, labels) if label != IGNORE]
    assert char_tokenizer.decode(learned) == "c ba<|im_end|>\n"
    assert learned[-2] == char_tokenizer.eos_token_id


def test_pretraining_text_never_follows_a_task():
    """Copy conversations echo their string: no task's answer differs from its input and still appears."""
    config = replace(SETTINGS["small"], copy_share=0.5)
    rng, copies, raws = random.Random(0), 0, 0
    for _ in range(400):
        context, target = pretraining_text(rng, config)
        assert set(target.replace("<|im_end|>", "")) <= set(ALPHABET) | {"\n"}
        if not context:
            raws += 1
            continue
        copies += 1
        string = context.split(": ", 1)[1].split("<|im_end|>")[0]
        assert target == f"{string}<|im_end|>\n"
        for name in TASKS:
            try:
                mapped = answer_for([name], string)
            except ValueError:
                continue
            assert mapped == string or target != f"{mapped}<|im_end|>\n"
    assert 150 < copies < 250 and raws == 400 - copies


def _instructions(config: BackboneConfig, count: int = 400) -> list[str]:
    rng = random.Random(0)
    contexts = [pretraining_text(rng, config)[0] for _ in range(count)]
    return [c.split("user\n", 1)[1].rsplit(": ", 1)[0] for c in contexts if c]


def test_pretraining_instructions_cover_the_composites_on_full():
    """The "full" backbone has copied after instructions as long as a composite's, with the comma of ", then"."""
    longest = max(instruction_words(chain) for chain in COMPOSITES.values())
    assert longest > 3 and SETTINGS["full"].instruction_words >= longest
    long = _instructions(replace(SETTINGS["small"], instruction_words=9, comma_share=0.15))
    words = [len(i.replace(",", "").split()) for i in long]
    assert max(words) == 9 and min(words) == 1
    assert any(", " in i for i in long)
    small = _instructions(SETTINGS["small"])
    assert max(len(i.split()) for i in small) == 3 and not any("," in i for i in small)
    with pytest.raises(ValueError, match="comma_share must be in"):
        BackboneConfig(comma_share=1.5)


def test_config_hash_names_the_config():
    assert config_hash(SETTINGS["tiny"]) == config_hash(replace(SETTINGS["tiny"]))
    assert config_hash(SETTINGS["tiny"]) != config_hash(replace(SETTINGS["tiny"], seed=1))
    with pytest.raises(ValueError, match="divisible by num_heads"):
        BackboneConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="unknown backbone setting 'huge'"):
        ensure_backbone("huge")


def test_tiny_backbone_builds_once_and_is_reused(tiny_backbone):
    cache, path, seconds = tiny_backbone
    assert path.parent == cache and path.name == f"suite-backbone-{config_hash(SETTINGS['tiny'])}"
    assert [p.name for p in cache.iterdir()] == [path.name], "no staging directory is left behind"
    built = (path / "model.safetensors").stat().st_mtime_ns
    started = time.perf_counter()
    assert ensure_backbone(SETTINGS["tiny"], cache) == path
    reused = time.perf_counter() - started
    assert (path / "model.safetensors").stat().st_mtime_ns == built  # not rebuilt
    assert reused < min(1.0, seconds), (reused, seconds)  # and quicker than the build (which took 0.9 s on one run)


def test_tiny_backbone_loads_and_its_pretraining_loss_fell(tiny_backbone):
    _, path, _ = tiny_backbone
    model = AutoModelForCausalLM.from_pretrained(str(path))
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    config = SETTINGS["tiny"]
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == config.num_layers
    assert model.config.vocab_size == len(tokenizer) and model.config.eos_token_id == tokenizer.eos_token_id
    record = json.loads((path / PRETRAIN_RECORD).read_text())
    losses = record["loss_history"]
    assert record["config"]["steps"] == config.steps == len(losses)
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10
    assert 0.0 <= record["copy_exact_match"] <= 1.0


def test_suite_items_encode_on_the_tiny_backbone(tiny_backbone):
    _, path, _ = tiny_backbone
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    for item in make_items(list(TASKS), 3, "train"):
        example = Example(item.task, [{"role": "user", "content": item.prompt},
                                      {"role": "assistant", "content": item.answer}])
        ids, labels = encode(tokenizer, example, 256)
        assert tokenizer.unk_token_id not in ids
        assert sum(label != IGNORE for label in labels) == len(item.answer) + 2  # the answer, <|im_end|>, "\n"


def test_merged_composition_matches_the_training_module_bank(tiny_backbone):
    """evaluate.merge_composition (weights merged) computes what training's hooked ModuleBank computes."""
    import torch

    from router.library import fingerprint_from_hf_config, random_library
    from training.modules import ModuleBank, ModuleSpec
    from training.suite.evaluate import merge_composition, task_composition

    _, path, _ = tiny_backbone
    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    fingerprint = fingerprint_from_hf_config(model.config)
    library = random_library(fingerprint, num_modules=3, tasks=("reverse", "uppercase"), rank=4, std=0.2, seed=1)
    composition = task_composition(library, ["reverse", "uppercase"])
    single = [library.controller.gates_for_task(t) for t in ("reverse", "uppercase")]
    expected_gates = {}
    for one in single:
        for name, gate in zip(one.module_ids, one.gates):
            expected_gates[name] = expected_gates.get(name, 0.0) + gate
    assert dict(zip(composition.module_ids, composition.gates)) == pytest.approx(expected_gates)
    specs = [ModuleSpec(name, info.rank, info.alpha, tuple(library.module_weights(name)))
             for name, info in library.modules.items()]
    bank = ModuleBank(specs, fingerprint, gate_init=0.5)
    bank.set_insertion_gates(False)
    for index, spec in enumerate(specs):
        for point, (a, b) in library.module_weights(spec.name).items():
            bank.load_pair(index, point, a, b)
    gates = torch.zeros(1, len(specs))  # [batch, num_modules]
    for name, gate in zip(composition.module_ids, composition.gates):
        gates[0, [s.name for s in specs].index(name)] = gate
    ids = torch.tensor([[2, 10, 11, 12, 13, 3]])  # [batch, seq]
    with torch.no_grad():
        merged = merge_composition(model, library, composition)(input_ids=ids).logits
        plain = model(input_ids=ids).logits
        bank.install(model)
        with bank.gating(gates):
            hooked = model(input_ids=ids).logits
    assert not torch.allclose(merged, plain, atol=1e-3)
    torch.testing.assert_close(merged, hooked, atol=1e-4, rtol=1e-4)


def test_batched_greedy_replies_equal_one_by_one(tiny_backbone):
    from training.suite.evaluate import generate_answers

    _, path, _ = tiny_backbone
    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    prompts = [item.prompt for item in make_items(list(TASKS), 2, "test")]
    batched = generate_answers(model, tokenizer, prompts, max_new_tokens=6, batch_size=12)
    assert batched == [generate_answers(model, tokenizer, [p], max_new_tokens=6)[0] for p in prompts]
    assert tokenizer.padding_side == "right", "the tokenizer's padding side is restored"
