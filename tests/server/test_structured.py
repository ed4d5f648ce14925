"""Structured outputs: constrained rows follow their grammar, mixed with free rows that stay exactly as they were."""

from __future__ import annotations

import json
import re

import pytest

from router.composition import Composition
from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.request import Request, SamplingParams
from server.engine.structured import GrammarSpec, choice_grammar

pytest.importorskip("xgrammar")  # a dependency; the bare GPU machine may lack it (see benchmarks/gpu_session.sh)

SCHEMA = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"},
                                           "size": {"type": "string", "pattern": "^[a-z]{1,4}$"}},
          "required": ["color", "ok", "size"], "additionalProperties": False}
SPECS = {
    "schema": GrammarSpec("json_schema", json.dumps(SCHEMA)),
    "regex": GrammarSpec("regex", r"(ab|ba)[0-9]{2}"),
    "choice": GrammarSpec("choice", json.dumps(["yes", "no", "not sure"])),
    "grammar": GrammarSpec("grammar", 'root ::= "(" item ("," item)? ")"\nitem ::= [xyz]'),
}
PROMPT = [5, 6, 7, 8, 9, 10, 11]
OVERLAPPED = {"async_scheduling": "on", "speculative_config": '{"grammar_tokens": 0}'}
"""Asynchronous scheduling without drafts: each step's grammar masks wait for the step before (deferred sampling);
with the default forced-token drafts the engine reads every step back instead."""


def _engine(setup, **overrides) -> Engine:
    model_dir, library = setup
    values = dict(model=model_dir, library=library, device="cpu", dtype="float32", block_size=4,
                  max_num_batched_tokens=16, num_kv_blocks=64, max_loaded_modules=3)
    return Engine(EngineConfig(**(values | overrides)))


def _text(outputs) -> str:
    return "".join(o.text for o in outputs)


def _check(name: str, text: str) -> None:
    if name == "schema":
        value = json.loads(text)
        assert set(value) == {"color", "ok", "size"} and value["color"] in ("red", "green", "blue")
        assert isinstance(value["ok"], bool) and re.fullmatch("[a-z]{1,4}", value["size"])
    elif name == "regex":
        assert re.fullmatch(r"(ab|ba)[0-9]{2}", text), text
    elif name == "choice":
        assert text in ("yes", "no", "not sure"), text
    else:
        assert re.fullmatch(r"\([xyz](,[xyz])?\)", text), text


def _requests(engine: Engine, sampling: SamplingParams, constrained: bool = True) -> list[Request]:
    compositions = [Composition(("m0",), (1.0,), "explicit"), Composition(), Composition(("m1", "m2"), (0.6, 0.4),
                                                                                         "explicit")]
    requests = []
    for i, (name, spec) in enumerate(SPECS.items()):
        grammar = engine.compile_grammar(spec) if constrained else None
        requests.append(Request(name, PROMPT[i:] + [40 + i], sampling, compositions[i % 3], grammar=grammar))
    requests.append(Request("free", PROMPT, sampling, compositions[0]))
    return requests


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("drafts", ["forced", "none"])
def test_each_row_follows_its_grammar_and_free_rows_are_untouched(setup, temperature, device, drafts):
    """On CUDA the bitmask is applied by xgrammar's CUDA kernel, inside the engine's decode-graph steps; there
    scheduling is asynchronous, and without drafts each step's sampling waits for the step before it."""
    on = {"device": device, "block_size": 4 if device == "cpu" else 16}
    if drafts == "none":
        on["speculative_config"] = '{"grammar_tokens": 0}'
    engine = _engine(setup, **on)
    sampling = SamplingParams(max_tokens=80, temperature=temperature, seed=3)
    outputs = engine.generate_batch(_requests(engine, sampling))
    if device == "cuda" and drafts == "none":
        assert engine.runner.num_deferred_samples > 0
    for name in SPECS:
        assert outputs[name][-1].finish_reason == "stop", name  # the grammar ended it, not max_tokens
        _check(name, _text(outputs[name]))
    unconstrained = _engine(setup, **on).generate_batch(_requests(engine, sampling, constrained=False))
    assert _text(outputs["free"]) == _text(unconstrained["free"])
    assert any(_text(outputs[n]) != _text(unconstrained[n]) for n in SPECS), "the constraints changed something"
    assert engine.scheduler.num_structured == 0 and engine.scheduler.blocks.num_used == 0


def test_async_scheduling_and_preemption_give_the_same_structured_tokens(setup):
    sampling = SamplingParams(max_tokens=60, temperature=1.0, seed=5, logprobs=1)
    reference = _engine(setup)
    expected = reference.generate_batch(_requests(reference, sampling))
    # (drafts of forced tokens finish the requests in fewer steps, and then the pool does not run out)
    small_pool = {"num_kv_blocks": 20, "max_num_batched_tokens": 8}
    for overrides, overlapped, waited in (  # (overlapped: some step's masks waited for the step before; waited:
            # some step was planned only after the one in flight was read, for its forced-token drafts)
            ({"async_scheduling": "on"}, True, True),
            (OVERLAPPED, True, False),
            ({"async_scheduling": "on", "speculative_config": '{"disable_by_batch_size": 2}'}, True, True),
            (small_pool | {"speculative_config": '{"grammar_tokens": 0}'}, False, False),
            (OVERLAPPED | small_pool, True, False)):
        engine = _engine(setup, **overrides)
        preempted = []
        engine.step_observer = lambda stats: preempted.append(stats.num_preempted)
        outputs = engine.generate_batch(_requests(engine, sampling))
        assert sum(preempted) > 0 or "num_kv_blocks" not in overrides, "the KV pool was meant to run out"
        assert (engine.runner.num_deferred_samples > 0, engine.num_token_waits > 0) == (overlapped, waited), overrides
        for name in (*SPECS, "free"):
            assert _text(outputs[name]) == _text(expected[name]), (overrides, name)
            assert [lp.token_id for o in outputs[name] for lp in o.logprobs] == [t for o in outputs[name]
                                                                                for t in o.token_ids]


TAG = {"structures": [{"begin": "<f>", "schema": {"type": "object", "properties": {"n": {"enum": [1, 2, 3]}},
                                                  "required": ["n"], "additionalProperties": False}, "end": "</f>"}],
       "triggers": ["<f"]}
"""A structural tag, vLLM's first form: free text, in which `<f` starts a `<f>{"n": 1|2|3}</f>` structure."""


def check_tagged(text: str) -> int:
    """The complete structures in `text` (each tag's content a JSON object of TAG's schema; the last one may be
    cut by max_tokens); fails if a structure broke its schema."""
    *tags, last = text.split("<f>")
    for tag in tags[1:]:
        content, end, _ = tag.partition("</f>")
        assert end and json.loads(content)["n"] in (1, 2, 3), text
    assert "</f>" not in last or json.loads(last.partition("</f>")[0])["n"] in (1, 2, 3), text
    return len(tags) - 1 + ("</f>" in last)


@pytest.mark.parametrize("overrides", [{}, OVERLAPPED])
def test_a_structural_tag_leaves_text_free_and_holds_each_triggered_structure_to_its_schema(setup, overrides):
    """A logit bias towards `<` and `f` makes the tiny model write the trigger again and again; each time, the tag's
    schema takes over until `</f>`. The same bias without the tag writes no structure."""
    engine = _engine(setup, **overrides)
    bias = tuple((token_id, 30.0) for token_id in engine.tokenizer.encode("<f", add_special_tokens=False))
    sampling = SamplingParams(max_tokens=60, temperature=1.0, seed=4, logit_bias=bias)
    tag = engine.compile_grammar(GrammarSpec("structural_tag", json.dumps(TAG)))
    new_form = {"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": ["<f"], "tags": [
        {"type": "tag", "begin": "<f>", "content": {"type": "json_schema", "json_schema": TAG["structures"][0]["schema"]},
         "end": "</f>"}]}}
    outputs = engine.generate_batch([
        Request("tagged", PROMPT, sampling, grammar=tag),
        Request("new_form", PROMPT, sampling, grammar=engine.compile_grammar(GrammarSpec("structural_tag",
                                                                                         json.dumps(new_form)))),
        Request("free", PROMPT, sampling)])
    assert check_tagged(_text(outputs["tagged"])) >= 2 and _text(outputs["new_form"]) == _text(outputs["tagged"])
    assert "<f>" not in _text(outputs["free"]) and "<f" in _text(outputs["free"])


@pytest.mark.parametrize(("tag", "message"), [
    ("[1]", "expected a JSON object"),
    ("{not json", "not JSON"),
    (json.dumps({"structures": [{"begin": "<f>"}], "triggers": ["<f"]}), "needs begin, end and a schema"),
    (json.dumps({"structures": [], "triggers": []}), "at least one trigger"),
    (json.dumps({"type": "structural_tag", "format": {"type": "nonsense"}}), "invalid structural tag"),
    (json.dumps({"structures": [{"begin": "<f>", "schema": 3, "end": "</f>"}], "triggers": ["<f"]}),
     "needs begin, end and a schema"),
])
def test_a_bad_structural_tag_is_a_value_error_saying_so(setup, tag, message):
    with pytest.raises(ValueError, match=message):
        _engine(setup).compile_grammar(GrammarSpec("structural_tag", tag))


@pytest.mark.parametrize("schema", [{}, True, None])
def test_a_structure_without_a_schema_takes_any_json(setup, schema):
    import xgrammar

    structure = {"begin": "<f>", "end": "</f>"} | ({} if schema is None else {"schema": schema})
    grammar = _engine(setup).compile_grammar(GrammarSpec("structural_tag", json.dumps(
        {"structures": [structure], "triggers": ["<f"]})))
    assert xgrammar.GrammarMatcher(grammar).accept_string('text <f>[1, "a"]</f> more')


def test_a_string_bounded_by_length_never_takes_a_raw_control_character(setup):
    """xgrammar 0.2 compiles minLength / maxLength into a character class that lets raw control characters into
    the string (invalid JSON); bounded by a pattern instead (`prepared_schema`), such a string keeps
    its bounds and takes only what JSON allows unescaped: in a JSON schema and in both forms of structural tag."""
    import xgrammar

    schema = {"type": "object", "properties": {"t": {"type": "string", "minLength": 2, "maxLength": 4},
                                               "u": {"type": ["string", "null"], "maxLength": 4}},
              "required": ["t", "u"], "additionalProperties": False}
    new_form = {"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": ["<f"], "tags": [
        {"type": "tag", "begin": "<f>", "content": {"type": "json_schema", "json_schema": schema}, "end": "</f>"}]}}
    legacy = {"structures": [{"begin": "<f>", "schema": schema, "end": "</f>"}], "triggers": ["<f"]}
    engine = _engine(setup)
    for spec, wrap in ((GrammarSpec("json_schema", json.dumps(schema)), "{}"),
                       (GrammarSpec("structural_tag", json.dumps(new_form)), "say <f>{}</f>"),
                       (GrammarSpec("structural_tag", json.dumps(legacy)), "say <f>{}</f>")):
        grammar = engine.compile_grammar(spec)

        def takes(value: str, other: str | None = None) -> bool:
            matcher = xgrammar.GrammarMatcher(grammar)
            text = wrap.replace("{}", '{"t": "' + value + '", "u": ' + (other or '"' + value + '"') + "}")
            return matcher.accept_string(text) and matcher.is_completed()

        assert takes("ab") and takes("a b!") and takes("é€x") and takes("ab", "null")
        assert not takes("a") and not takes("abcde")  # the bounds hold
        for control in ("\x15", "\t", "\x00", "\x1f"):
            assert not takes("a" + control + "b"), repr(control)
            assert not takes("ab", '"a' + control + '"'), repr(control)


def test_an_all_of_is_merged_and_keywords_only_as_property_names_are_fine(setup):
    """xgrammar would take any value for an allOf of several parts; merged, every part holds. A property named like
    a keyword the engine cannot enforce (`not`, `if`) is only a name."""
    import xgrammar

    schema = {"allOf": [{"type": "object", "properties": {"not": {"type": "integer"}}, "required": ["not"]},
                        {"properties": {"if": {"type": "string", "maxLength": 2}}, "required": ["if"]}],
              "additionalProperties": False}
    grammar = _engine(setup).compile_grammar(GrammarSpec("json_schema", json.dumps(schema)))

    def takes(text: str) -> bool:
        matcher = xgrammar.GrammarMatcher(grammar)
        return matcher.accept_string(text) and matcher.is_completed()

    assert takes('{"not": 3, "if": "ab"}')
    assert not takes('{"not": 3}') and not takes('{"if": "ab"}') and not takes("5")  # both parts' requirements
    assert not takes('{"not": 3, "if": "abc"}') and not takes('{"not": "x", "if": "ab"}')


def test_a_grammar_cut_by_max_tokens_ends_by_length(setup):
    engine = _engine(setup)
    grammar = engine.compile_grammar(GrammarSpec("regex", r"[a-z]{30}"))
    (last, *_) = reversed(engine.generate_batch([Request("r", PROMPT, SamplingParams(max_tokens=5), grammar=grammar)])["r"])
    assert last.finish_reason == "length" and last.num_output_tokens == 5


@pytest.mark.parametrize(("spec", "message"), [
    (GrammarSpec("json_schema", "{not json"), "invalid json schema"),
    (GrammarSpec("json_schema", json.dumps({"type": "wat"})), "invalid json schema"),
    (GrammarSpec("regex", "(unclosed"), "invalid regex"),
    (GrammarSpec("grammar", "root ::= missing_rule"), "invalid grammar"),
    (GrammarSpec("choice", json.dumps([])), "non-empty list"),
    (GrammarSpec("choice", json.dumps(["a", ""])), "non-empty strings"),
    (GrammarSpec("json_schema", json.dumps({"type": "object", "properties": {"b": {"not": {"type": "string"}}}})),
     "unsupported json schema: 'not' at #/properties/b cannot be enforced"),
    (GrammarSpec("json_schema", json.dumps({"type": "array", "items": {"if": {}, "then": {}}})), "'if' at #/items"),
    (GrammarSpec("json_schema", json.dumps({"allOf": [{"type": "integer"}, {"type": "string"}]})),
     "allOf at # disagree on 'type'"),
    (GrammarSpec("json_schema", json.dumps({"allOf": [{"$ref": "#/$defs/a"}, {"type": "string"}],
                                            "$defs": {"a": {"type": "string"}}})), "a reference"),
    (GrammarSpec("structural_tag", json.dumps({"structures": [{"begin": "<f>", "end": "</f>", "schema": {
        "type": "object", "dependentRequired": {"a": ["b"]}}}], "triggers": ["<f"]})), "'dependentRequired' at #"),
])
def test_bad_constraints_are_a_value_error_naming_the_kind(setup, spec, message):
    with pytest.raises(ValueError, match=message):
        _engine(setup).compile_grammar(spec)


def test_spec_kinds_and_choice_escaping():
    with pytest.raises(ValueError, match="unknown structured output kind 'xml'"):
        GrammarSpec("xml", "")
    assert choice_grammar(['say "hi"', "a\\b", "say \"hi\""]) == 'root ::= "say \\"hi\\"" | "a\\\\b"'


def test_a_deferred_grammar_starts_after_its_token_and_leaves_the_tokens_before_free(setup):
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    free = [t for o in _engine(setup).generate_batch([Request("f", PROMPT, greedy)])["f"] for t in o.token_ids]
    start = next(i for i, t in enumerate(free) if i >= 2 and t not in free[:i])  # the reasoning's end, say
    unseen = next(t for t in range(300) if t not in free)
    for overrides in ({}, {"async_scheduling": "on"}, OVERLAPPED):
        engine = _engine(setup, **overrides)
        grammar = engine.compile_grammar(SPECS["regex"])
        outputs = engine.generate_batch([
            Request("d", PROMPT, SamplingParams(max_tokens=12, temperature=0.0), grammar=grammar,
                    grammar_after=free[start]),
            Request("never", PROMPT, greedy, grammar=grammar, grammar_after=unseen),
            Request("f", PROMPT, greedy)])
        ids = [t for o in outputs["d"] for t in o.token_ids]
        assert ids[: start + 1] == free[: start + 1], overrides  # free until its token, itself included
        _check("regex", engine.tokenizer.decode(ids[start + 1:], skip_special_tokens=True))
        assert outputs["d"][-1].finish_reason == "stop"
        assert [t for o in outputs["never"] for t in o.token_ids] == free and outputs["never"][-1].finish_reason == \
            "length"


@pytest.mark.parametrize("overrides", [{}, {"async_scheduling": "on"}, OVERLAPPED])
def test_a_request_left_no_token_fails_alone_and_its_neighbours_go_on(setup, overrides):
    """min_tokens holding back the EOS a finished grammar needs, or allowed tokens the grammar forbids: that
    request fails with `NoDrawableTokenError` at the position where nothing was left; the others in its batch
    get the tokens they get alone."""
    from server.engine.request import NoDrawableTokenError

    engine = _engine(setup, **overrides)
    grammar = engine.compile_grammar(GrammarSpec("regex", "ab"))
    eos = min(engine.scheduler.eos_ids)
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    shaped = SamplingParams(max_tokens=8, seed=3)
    neighbours = [Request("free", PROMPT, greedy),
                  Request("shaped", PROMPT[1:], shaped, grammar=engine.compile_grammar(SPECS["regex"]))]
    alone = _engine(setup).generate_batch(neighbours)
    outputs = engine.generate_batch([
        Request("held", PROMPT, SamplingParams(max_tokens=8, min_tokens=5), grammar=grammar),
        Request("outside", PROMPT, SamplingParams(max_tokens=8, allowed_token_ids=(eos, 40)), grammar=grammar),
        Request("only_eos", PROMPT, SamplingParams(max_tokens=8, min_tokens=2, allowed_token_ids=(eos,))),
        *neighbours])
    for name, position in (("held", 2), ("outside", 0), ("only_eos", 0)):
        *before, error = outputs[name]
        assert isinstance(error, NoDrawableTokenError) and error.position == position, (name, error)
        assert sum(len(o.token_ids) for o in before) == position
    assert "min_tokens" in str(outputs["held"][-1]) and "the structured output" in str(outputs["held"][-1])
    for request in neighbours:
        assert [o.token_ids for o in outputs[request.request_id]] == [o.token_ids for o in alone[request.request_id]]
    assert not engine.has_work() and engine.scheduler.blocks.num_used == 0


def test_a_mask_leaves_the_bits_past_the_vocabulary_alone(tiny_checkpoints):
    """A grammar of token-triggered tags (Mistral's tool calls) clears the bitmask's bits past the vocabulary (386
    tokens here, not a multiple of 32), and xgrammar's CPU kernel then wrote -inf past the logits' rows (the heap
    broke within a few hundred steps). `constrain` sets those bits, so the mask is exactly the grammar's."""
    import torch
    import xgrammar

    from server.engine.structured import GrammarCompiler, constrain, mistral_tool_call_tag

    engine = Engine(EngineConfig(model=tiny_checkpoints("mistral", mistral_tools="v11"), num_kv_blocks=8))
    vocab = engine.model.hf_config.vocab_size
    assert vocab % 32
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    compiler = GrammarCompiler(engine.tokenizer, vocab, engine.eos_ids)
    grammar = compiler.compile(GrammarSpec("structural_tag", mistral_tool_call_tag(tools, "auto", False, True)))
    (opening,) = engine.tokenizer.encode("[TOOL_CALLS]", add_special_tokens=False)
    generator = torch.Generator().manual_seed(0)
    for step in range(300):
        matcher = xgrammar.GrammarMatcher(grammar)
        if step % 2:
            assert matcher.accept_token(opening)  # then only the function's name may follow
        logits = torch.randn(2, vocab, generator=generator)
        masked = constrain(logits, [matcher, None])
        expected = xgrammar.allocate_token_bitmask(1, vocab)
        matcher.fill_next_token_bitmask(expected, 0)
        allowed = torch.tensor([bool(expected[0, i // 32] >> (i % 32) & 1) for i in range(vocab)])
        assert torch.equal(masked[0], torch.where(allowed, logits[0], float("-inf")))
        assert torch.equal(masked[1], logits[1])
        assert 0 < int(allowed.sum()) < vocab if step % 2 else int(allowed.sum()) == vocab
