"""Structured outputs: every sampled token of a request kept inside a JSON schema, JSON, a regex, a choice
of strings, an EBNF grammar or a structural tag (free text in which tags, once triggered, follow a schema).

xgrammar (the structured-output engine vLLM and SGLang use) compiles a constraint against the tokenizer's
vocabulary once (`GrammarCompiler`, which caches compiled grammars); each request then walks its own
`GrammarMatcher`. Before a step samples, the matcher of every constrained row fills that row of a bitmask
of allowed tokens, and disallowed logits become -inf; after the step, the scheduler feeds the matcher the
token it drew, and a matcher that has reached the end of its grammar ends the request (`stop`). Logprobs
stay those of the unconstrained distribution, as without a constraint.

A matcher must have seen a request's last token before its next row is filled. With asynchronous scheduling
the next step is launched while that token is still in flight, so its sampling waits (`ModelRunner.launch`):
its forward pass runs while the engine reads the step before back and the matchers advance, and then the masks
are filled and the sampling queued (vLLM splits execution and sampling for this too; see `Engine.step`).
xgrammar is imported only when a constraint is used.

Speculative decoding: the tokens a grammar forces next are drafted (`speculative.Drafter`); drafts are cut to
the longest prefix the grammar accepts (`grammar_prefix`), and the row of each draft is masked as the matcher
stands after the drafts before it (`constrain`'s `after`); both walk the matcher forward and roll it back, so
only the tokens a step keeps advance it (`Scheduler.update`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

import torch

from server.engine.transfer import to_device

GrammarKind = Literal["json_schema", "json_object", "regex", "choice", "grammar", "structural_tag"]
KINDS: tuple[str, ...] = ("json_schema", "json_object", "regex", "choice", "grammar", "structural_tag")


@dataclass(frozen=True)
class GrammarSpec:
    """One constraint, as the API received it."""

    kind: GrammarKind
    value: str = ""
    """json_schema: the schema as JSON text; regex: the pattern; grammar: EBNF (xgrammar's dialect, root rule
    `root`); choice: a JSON list of the strings allowed; structural_tag: a structural tag as JSON text
    (`structural_tag`); json_object: unused."""
    strict: bool = True
    """A JSON schema in it using a keyword the grammar cannot enforce (`UNENFORCED`) is a ValueError; False leaves
    such keywords unenforced (the schemas of tools, which guide calls as OpenAI's non-strict functions do)."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown structured output kind {self.kind!r}; expected one of {', '.join(KINDS)}")


def structural_tag(text: str, strict: bool = True):
    """The xgrammar structural tag of `text`, JSON in either form vLLM takes: `{"type": "structural_tag", "format":
    {...}}` (xgrammar's formats: free text until a trigger, then a tag whose content follows a JSON schema, a
    regex, a grammar, ...), or the first form, `{"structures": [{"begin": ..., "schema": {...}, "end": ...}],
    "triggers": [...]}`: free text in which a trigger (a prefix of some structure's `begin`) starts a structure,
    whose content follows its schema up to its `end`. Its schemas go through `prepared_schema` (with `strict`).
    ValueError names what is wrong."""
    import xgrammar

    try:
        tag = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"invalid structural tag: not JSON ({error.msg})") from None
    if not isinstance(tag, dict):
        raise ValueError("invalid structural tag: expected a JSON object")
    if "structures" not in tag:
        return _tag_schemas_prepared(tag, strict)
    structures, triggers = tag["structures"], tag.get("triggers")
    if not isinstance(structures, list) or not isinstance(triggers, list) or not triggers:
        raise ValueError("invalid structural tag: structures and triggers must be lists, with at least one trigger")
    needs = "invalid structural tag: each structure needs begin, end and a schema"
    try:
        given = [(s["begin"], s["end"], _any_if_true(s.get("schema", {}))) for s in structures]
    except (KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{needs} ({error})") from None
    schemas = [prepared_schema(schema, strict=strict) for _, _, schema in given]  # (its ValueError says what)
    try:
        items = [xgrammar.StructuralTagItem(begin=begin, end=end, schema=schema)
                 for (begin, end, _), schema in zip(given, schemas)]
    except (TypeError, ValueError) as error:
        raise ValueError(f"{needs} ({error})") from None
    return xgrammar.StructuralTag.from_legacy_structural_tag(items, triggers)


UNENFORCED = ("not", "if", "then", "else", "dependentSchemas", "dependentRequired", "contains", "minContains",
              "maxContains")
"""JSON schema keywords xgrammar 0.2 would ignore while generating (the output could break them): a schema with
one is refused, not served open. (uniqueItems is ignored too, and served: pydantic writes it for every set.)"""
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
"""Keywords whose value maps names to schemas."""
_SCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems")
_SCHEMA_VALUES = ("items", "additionalProperties", "additionalItems", "propertyNames", "unevaluatedProperties",
                  "unevaluatedItems")


def prepared_schema(schema, path: str = "#", strict: bool = True):
    """A JSON schema as the grammar engine (xgrammar 0.2) is given it, so that what it generates is valid JSON that
    the schema accepts; ValueError naming a keyword it cannot enforce (`UNENFORCED`) and where.

    - A string bounded by minLength / maxLength (and no pattern, format, enum or const of its own; of several
      types, one of them string, too) is bounded by a pattern instead: `{"type": "string", "maxLength": 6}` becomes
      `{"type": "string", "pattern": "^.{0,6}$"}`, the same strings. xgrammar (its issue #800) compiles a length
      bound into a character class that admits raw control characters, which would make the output invalid
      JSON; a pattern goes through its JSON-aware regex, which cannot. (Escape sequences are out of reach inside
      the bound either way.)
    - An allOf of several parts, which xgrammar would treat as any value, is merged into one schema where the parts
      agree (their `required` lists joined, their `properties` put together); parts that disagree on a keyword
      are a ValueError.

    Not `strict`: neither is an error; such keywords, and allOfs whose parts disagree, stay unenforced."""
    if not isinstance(schema, dict):
        return schema
    for keyword in UNENFORCED:
        if keyword in schema and strict:
            raise ValueError(f"unsupported json schema: {keyword!r} at {path} cannot be enforced while generating "
                             "(the grammar engine would ignore it); drop it or express it another way")
    out = dict(schema)
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: prepared_schema(value, f"{path}/{key}/{name}", strict)
                        for name, value in out[key].items()}
    for key in _SCHEMA_LISTS + _SCHEMA_VALUES:
        if isinstance(out.get(key), list):
            out[key] = [prepared_schema(value, f"{path}/{key}/{i}", strict) for i, value in enumerate(out[key])]
        elif key in out:
            out[key] = prepared_schema(out[key], f"{path}/{key}", strict)
    if isinstance(out.get("allOf"), list) and len(out["allOf"]) > 1:
        try:
            out = _merged_all_of(out, path)
        except ValueError:
            if strict:
                raise
    return _length_as_pattern(out)


def _merged_all_of(schema: dict, path: str) -> dict:
    merged = {key: value for key, value in schema.items() if key != "allOf"}
    for i, part in enumerate(schema["allOf"]):
        if not isinstance(part, dict) or "$ref" in part:
            raise ValueError(f"unsupported json schema: allOf at {path} has a part ({i}) that is a reference or not "
                             "an object; only parts that can be merged into one schema are supported")
        for key, value in part.items():
            if key not in merged:
                merged[key] = value
            elif key == "required" and isinstance(value, list):
                merged[key] = list(dict.fromkeys(merged[key] + value))
            elif key == "properties" and isinstance(value, dict):
                clash = [name for name in value if merged[key].get(name, value[name]) != value[name]]
                if clash:
                    raise ValueError(f"unsupported json schema: the parts of allOf at {path} give property "
                                     f"{clash[0]!r} different schemas")
                merged[key] = merged[key] | value
            elif merged[key] != value:
                raise ValueError(f"unsupported json schema: the parts of allOf at {path} disagree on {key!r}")
    return merged


def _length_as_pattern(schema: dict) -> dict:
    low, high = schema.get("minLength"), schema.get("maxLength")
    bounds = [bound for bound in (low, high) if bound is not None]
    kind = schema.get("type")
    if ((kind == "string" or isinstance(kind, list) and "string" in kind)
            and not {"pattern", "format", "enum", "const"} & schema.keys() and bounds
            and all(type(bound) is int for bound in bounds)):  # (a bool is not a bound)
        schema = {key: value for key, value in schema.items() if key not in ("minLength", "maxLength")}
        schema["pattern"] = f"^.{{{low or 0},{'' if high is None else high}}}$"
    return schema


def _tag_schemas_prepared(tag, strict: bool):
    """A structural tag (its JSON) with `prepared_schema` applied to every `json_schema` in it."""
    if isinstance(tag, list):
        return [_tag_schemas_prepared(item, strict) for item in tag]
    if not isinstance(tag, dict):
        return tag
    return {key: prepared_schema(value, strict=strict) if key == "json_schema" else _tag_schemas_prepared(value, strict)
            for key, value in tag.items()}


def _any_if_true(schema):
    """A structure's schema, `true` (any JSON value, as JSON Schema reads it) given as `{}`, which xgrammar takes."""
    return {} if schema is True else schema


def tool_call_tag(model_format: str, tools: list[dict], choice: str, parallel: bool, separator: str) -> str:
    """A structural tag (JSON text) for a reply that calls `tools` (OpenAI's function tool shape) in the tool-call
    format xgrammar names `model_format`, each call held to the format and to its tool's parameters schema (unless
    its `strict` is false), one call unless `parallel`:

    - `choice` "auto": free text, in which a call may start. The free text keeps every token (xgrammar would bar
      `<think>` from it, which would stop a thinking model served without a reasoning parser from thinking); the
      reply's reasoning, if any, is left to `DeferredMatcher`.
    - "required": nothing but calls, joined by `separator` (xgrammar's own required tag allows text after them).
    - a function's name: one call to that function, nothing else."""
    if model_format in MISTRAL_FORMATS:
        return mistral_tool_call_tag(tools, choice, parallel, named_arguments=model_format == "mistral_v11")
    import xgrammar
    from xgrammar.structural_tag import TagsWithSeparatorFormat, TriggeredTagsFormat

    named = {"type": "function", "function": {"name": choice}}
    tag = xgrammar.get_model_structural_tag(model_format, tools=tools,
                                            tool_choice=choice if choice in ("auto", "required") else named,
                                            reasoning=False, exclude_special_tokens=False, parallel_tool_calls=parallel)
    if choice == "required":
        if not isinstance(tag.format, TriggeredTagsFormat):
            raise ValueError(f"xgrammar's {model_format} format for required tool calls is not a set of tags")
        tag.format = TagsWithSeparatorFormat(tags=tag.format.tags, separator=separator, at_least_one=True,
                                             stop_after_first=not parallel)
    return tag.model_dump_json()


MISTRAL_FORMATS = ("mistral_v3", "mistral_v11")
"""Mistral's tool-call formats (xgrammar has no builtin tag for them): `[TOOL_CALLS]` then a JSON array of
`{"name": ..., "arguments": {...}}` (v3 tokenizers: Mistral-7B-Instruct-v0.3, Mixtral), or `[TOOL_CALLS]NAME[ARGS]{...}`
per call (v11 and later: Mistral Small 3.2, Magistral, Devstral)."""


def mistral_tool_call_tag(tools: list[dict], choice: str, parallel: bool, named_arguments: bool) -> str:
    """`tool_call_tag` for Mistral's formats (`MISTRAL_FORMATS`; `named_arguments` for v11's NAME[ARGS]{...}).

    Its markers are special tokens, which xgrammar matches as tokens, not text: a call begins at the token
    `[TOOL_CALLS]` (and v11's arguments after the token `[ARGS]`). Auto: free tokens until a call begins (one call,
    or one array of one call, unless `parallel`). Required: nothing but calls. A named function: one call to it."""
    functions = [tool["function"] for tool in tools if tool.get("type", "function") == "function"]
    if choice not in ("auto", "required"):
        functions = [f for f in functions if f["name"] == choice]
        if not functions:
            raise ValueError(f"tool_choice names function {choice!r}, which is not among the tools")
    free = {"type": "object"}  # a function whose strict is false keeps free arguments
    schemas = {f["name"]: (f.get("parameters") or free) if f.get("strict") is not False else free for f in functions}
    one = not parallel or choice not in ("auto", "required")
    single = one or not named_arguments  # (v3's one array holds every call)
    if named_arguments:  # one tag per call: [TOOL_CALLS]NAME[ARGS]{...}
        content = {"type": "or", "elements": [
            {"type": "sequence", "elements": [{"type": "const_string", "value": name},
                                              {"type": "token", "token": "[ARGS]"},
                                              {"type": "json_schema", "json_schema": schema}]}
            for name, schema in schemas.items()]}
    else:  # one tag for all calls: [TOOL_CALLS][{"name": ..., "arguments": ...}, ...]
        calls = {"type": "array", "minItems": 1, "items": {"anyOf": [
            {"type": "object", "properties": {"name": {"const": name}, "arguments": schema},
             "required": ["name", "arguments"], "additionalProperties": False} for name, schema in schemas.items()]}}
        content = {"type": "json_schema", "json_schema": calls | ({"maxItems": 1} if one else {})}
    tag = {"type": "tag", "begin": {"type": "token", "token": "[TOOL_CALLS]"}, "content": content, "end": ""}
    if choice == "auto":
        form = {"type": "token_triggered_tags", "trigger_tokens": ["[TOOL_CALLS]"], "tags": [tag],
                "stop_after_first": single}
    else:
        form = {"type": "tags_with_separator", "tags": [tag], "separator": "", "at_least_one": True,
                "stop_after_first": single}
    return json.dumps({"type": "structural_tag", "format": form})


def choice_grammar(choices: list[str]) -> str:
    """EBNF whose language is exactly `choices` (string literals escaped as JSON strings, which the EBNF
    dialect reads the same way)."""
    if not choices or any(not isinstance(c, str) or not c for c in choices):
        raise ValueError("choice needs a non-empty list of non-empty strings")
    return "root ::= " + " | ".join(json.dumps(c) for c in dict.fromkeys(choices))


class GrammarCompiler:
    """Compiles `GrammarSpec`s for one tokenizer and vocabulary (thread-safe; compiled grammars are cached)."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: set[int]):
        import xgrammar

        self._xgr = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                       stop_token_ids=sorted(stop_token_ids) or None)
        self._info = info
        self._compiler = xgrammar.GrammarCompiler(info, max_threads=2)
        self.vocab_size = vocab_size

    def compile(self, spec: GrammarSpec):
        """The compiled grammar of `spec`; ValueError naming what is wrong with it."""
        compiler = self._compiler
        try:
            if spec.kind == "json_object":
                return compiler.compile_builtin_json_grammar()
            if spec.kind == "json_schema":
                return compiler.compile_json_schema(_schema_prepared(spec.value, spec.strict), any_whitespace=False)
            if spec.kind == "regex":
                return compiler.compile_regex(spec.value)
            if spec.kind == "choice":
                return compiler.compile_grammar(choice_grammar(json.loads(spec.value)))
            if spec.kind == "structural_tag":
                return compiler.compile_structural_tag(structural_tag(spec.value, spec.strict))
            return compiler.compile_grammar(spec.value)
        except ValueError:
            raise
        except Exception as error:  # noqa: BLE001 - xgrammar reports bad input as RuntimeError and others
            raise ValueError(f"invalid {spec.kind.replace('_', ' ')}: {error}") from None

    def deserialize(self, text: str):
        """A compiled grammar from its `serialize_json()` text, made by a compiler over the same tokenizer and
        vocabulary (in another process: `server.engine.process`)."""
        return self._xgr.CompiledGrammar.deserialize_json(text, self._info)


def _schema_prepared(text: str, strict: bool) -> str:
    """A JSON schema's text through `prepared_schema` (text that is not JSON as it is, for xgrammar to report)."""
    try:
        schema = json.loads(text)
    except ValueError:
        return text
    return json.dumps(prepared_schema(schema, strict=strict))


def new_matcher(compiled, start_after: int | None = None):
    """A fresh matcher at the start of `compiled`'s grammar (one per request); with `start_after`, one whose
    grammar begins only after that token was sampled (`DeferredMatcher`)."""
    import xgrammar

    matcher = xgrammar.GrammarMatcher(compiled)
    return matcher if start_after is None else DeferredMatcher(matcher, start_after)


class DeferredMatcher:
    """A matcher that lets every token through until `start_after` is sampled, then constrains as `matcher`.

    A reasoning model's grammar applies to its answer, not to its reasoning: with a reasoning parser the
    grammar begins after the token that ends the reasoning (`</think>`), as vLLM does. It has the interface
    the scheduler and `constrain` use: `accept_token`, `rollback`, `is_terminated`, `find_jump_forward_tokens`
    and `fill_next_token_bitmask`."""

    def __init__(self, matcher, start_after: int):
        self.matcher, self.start_after, self.started = matcher, start_after, False
        self.num_inner = 0
        """Tokens the grammar's matcher accepted since it started."""

    def accept_token(self, token_id: int) -> bool:
        if self.started:
            accepted = self.matcher.accept_token(token_id)
            self.num_inner += accepted
            return accepted
        self.started = token_id == self.start_after
        return True

    def rollback(self, num_tokens: int) -> None:
        """Undo the last `num_tokens` accepted tokens; back past `start_after`, the grammar has not started."""
        inner = min(num_tokens, self.num_inner)
        if inner:
            self.matcher.rollback(inner)
            self.num_inner -= inner
        if num_tokens > inner:
            self.started = False

    def is_terminated(self) -> bool:
        return self.started and self.matcher.is_terminated()

    def find_jump_forward_tokens(self) -> list[int]:
        """The tokens the grammar forces next; none before it starts."""
        return self.matcher.find_jump_forward_tokens() if self.started else []

    def fill_next_token_bitmask(self, bitmask, row: int) -> None:
        if self.started:  # before, the row stays as allocated: every token allowed
            self.matcher.fill_next_token_bitmask(bitmask, row)


def grammar_prefix(matcher, drafts: list[int]) -> list[int]:
    """The longest prefix of `drafts` that `matcher`'s grammar allows next (the matcher is left as it was)."""
    num_valid = 0
    for token_id in drafts:
        if matcher.is_terminated() or not matcher.accept_token(token_id):
            break
        num_valid += 1
    if num_valid:
        matcher.rollback(num_valid)
    return drafts[:num_valid]


def constrain(logits: torch.Tensor, matchers: list, after: list[int | None] | None = None) -> torch.Tensor:
    """A copy of `logits` [S, vocab] with every token its row's matcher forbids at -inf; rows whose matcher
    is None are unchanged. The bitmask is filled on the host and applied on the logits' device, its copy there
    queued without a host wait.

    `after[row]`, for a draft's row (speculative decoding): the draft before it, which its matcher accepts
    first (a request's rows are consecutive, its first without one); every matcher is rolled back after."""
    import xgrammar

    rows = [i for i, m in enumerate(matchers) if m is not None]
    bitmask = xgrammar.allocate_token_bitmask(len(matchers), logits.shape[1])  # int32 [S, vocab / 32]: all allowed
    advanced: dict[int, list] = {}  # id(matcher) -> [matcher, drafts it accepted]
    for row in rows:
        matcher = matchers[row]
        if after is not None and after[row] is not None:
            if not matcher.accept_token(after[row]):  # the scheduler let through only drafts the grammar allows
                raise RuntimeError(f"draft token {after[row]} is outside its request's grammar")
            advanced.setdefault(id(matcher), [matcher, 0])[1] += 1
        if matcher.is_terminated():  # a draft, or the token the step before drew, ended the output (asynchronous
            continue  # scheduling ran this row anyway): the row's draw is never kept
        matcher.fill_next_token_bitmask(bitmask, row)
    for matcher, count in advanced.values():
        matcher.rollback(count)
    tail = logits.shape[1] % 32
    if tail and rows:  # the last word's bits past the vocabulary: allowed (a grammar of token-triggered tags clears
        bitmask[:, -1] |= ~((1 << tail) - 1)  # them, and xgrammar's CPU kernel then writes past the logits' rows)
    constrained = logits.clone()
    device = logits.device  # (queued copies: a blocking one would wait for the step's forward pass)
    xgrammar.apply_token_bitmask_inplace(constrained, to_device(bitmask, device),
                                         indices=to_device(torch.tensor(rows, dtype=torch.int32), device))
    return constrained
