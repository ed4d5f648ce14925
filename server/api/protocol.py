"""Request bodies of the OpenAI-compatible endpoints, with Tessera's extensions `task` and `modules`.

Unknown fields are ignored, as OpenAI-compatible servers do; fields Tessera cannot honour (suffix) are
rejected with a 400 naming them rather than silently dropped. Every check is a field validator, so the
error's location names the parameter. Beside OpenAI's fields, vLLM's sampling extensions (`min_p`,
`repetition_penalty`, `min_tokens`, `ignore_eos`, `stop_token_ids`, `include_stop_str_in_output`,
`skip_special_tokens`, `truncate_prompt_tokens`, `prompt_logprobs`), its `structured_outputs` (json,
regex, choice, grammar, json_object; the alternative to OpenAI's `response_format`) and its chat-template
controls (`add_generation_prompt`, `continue_final_message`, `chat_template_kwargs`, `echo`) are accepted.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, field_validator, model_validator


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False
    """vLLM's: with include_usage, every chunk carries the usage so far, not only the last one."""


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Prediction(BaseModel):
    """OpenAI's Predicted Outputs: text the reply is expected to mostly repeat (say, a file being edited)."""

    type: Literal["content"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ToolCallFunction(BaseModel):
    name: str = Field(min_length=1)
    arguments: str
    """The arguments as JSON text, as OpenAI sends them."""


class ToolCall(BaseModel):
    id: str = Field(min_length=1)
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = None
    """An assistant turn's calls, sent back in a later request."""
    tool_call_id: str | None = None
    """A tool turn: the call it answers."""
    reasoning: str | None = None
    """An assistant turn's reasoning, sent back (vLLM's name; `reasoning_content` is the older one)."""
    reasoning_content: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class FunctionDefinition(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None
    """JSON schema of the arguments; none takes any JSON object."""
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str = Field(min_length=1)


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(BaseModel):
    """`response_format.json_schema`, as OpenAI defines it."""

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict | None = Field(default=None, alias="schema")
    """The JSON schema; none allows any JSON object."""
    strict: bool | None = None


class TagStructure(BaseModel):
    """One structure of vLLM's first structural tag form: `begin`, content following `schema`, `end`."""

    begin: str = Field(min_length=1)
    schema_: dict = Field(default_factory=dict, alias="schema")
    """The content's JSON schema; none (`{}`) allows any JSON value."""
    end: str


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`, and vLLM's structural tags: `{"type": "structural_tag", "format": {...}}`
    (xgrammar's format) or `{"type": "structural_tag", "structures": [...], "triggers": [...]}`."""

    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: JsonSchemaFormat | None = None
    format: dict | None = None
    structures: list[TagStructure] | None = None
    triggers: list[str] | None = None

    @field_validator("json_schema")
    @classmethod
    def _schema_with_its_type(cls, value, info: ValidationInfo):
        if value is not None and info.data.get("type") != "json_schema":
            raise ValueError("json_schema is only allowed with type json_schema")
        return value

    @model_validator(mode="after")
    def _schema_for_its_type(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs a json_schema object: {\"name\": ..., \"schema\": {...}}")
        tag_fields = [name for name in ("format", "structures", "triggers") if getattr(self, name) is not None]
        if self.type != "structural_tag" and tag_fields:
            raise ValueError(f"{', '.join(tag_fields)} only go with type structural_tag")
        if self.type == "structural_tag" and sorted(tag_fields) not in (["format"], ["structures", "triggers"]):
            raise ValueError("type structural_tag needs either format, or structures and triggers")
        return self

    def structural_tag(self) -> str:
        """The structural tag as JSON text (`structured.structural_tag` reads it)."""
        if self.format is not None:
            return json.dumps({"type": "structural_tag", "format": self.format})
        return json.dumps({"structures": [s.model_dump(by_alias=True) for s in self.structures],
                           "triggers": self.triggers})


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs` extension: exactly one constraint."""

    json_: dict | str | None = Field(default=None, alias="json")
    """A JSON schema (object or JSON text)."""
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    """EBNF in xgrammar's dialect, root rule `root`."""
    json_object: bool | None = None
    structural_tag: str | dict | None = None
    """A structural tag (JSON text or object), in either of the forms `response_format` takes."""

    @model_validator(mode="after")
    def _exactly_one(self):
        names = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")
        given = [name for name in names if getattr(self, "json_" if name == "json" else name) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(names)}; got {given or 'none'}")
        return self


class _NotesIgnored(BaseModel):
    """A request body that drops the fields it does not know, as vLLM's do, but keeps their names
    (`ignored_fields`), so the API can say what it ignored instead of dropping it unseen."""

    model_config = ConfigDict(extra="ignore")
    _ignored: tuple[str, ...] = PrivateAttr(default=())

    @model_validator(mode="wrap")
    @classmethod
    def _note_unknown(cls, data, handler):
        body = handler(data)
        if isinstance(data, dict):
            known = set(cls.model_fields) | {f.alias for f in cls.model_fields.values() if f.alias}
            body._ignored = tuple(sorted(key for key in data if key not in known))
        return body


class _Common(_NotesIgnored):
    """Fields shared by chat and text completions."""

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=-1)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    """vLLM's: drop tokens less likely than min_p times the most likely one (after temperature); 0 is off."""
    n: int = Field(default=1, ge=1, le=16)
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = Field(default=None, max_length=64)
    """vLLM's: token ids that end the output (kept in token ids, not in text), besides EOS."""
    include_stop_str_in_output: bool = False
    """vLLM's: the text ends after the matched stop string instead of before it."""
    skip_special_tokens: bool = True
    """vLLM's: leave special tokens (e.g. `<|im_end|>`) out of the output text."""
    truncate_prompt_tokens: int | None = None
    """vLLM's: keep only the prompt's last this many tokens (-1: as many as the context holds)."""
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    """Token id (as a string, as OpenAI sends it) -> bias in [-100, 100], added to its logit."""
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    """vLLM's: > 1 discourages tokens of the prompt and the output so far; 1 is off."""
    min_tokens: int = Field(default=0, ge=0)
    """vLLM's: EOS and stop tokens are not drawn before this many tokens."""
    allowed_token_ids: list[int] | None = Field(default=None, min_length=1)
    """vLLM's: only these tokens can be drawn."""
    bad_words: list[str] | None = Field(default=None, max_length=128)
    """vLLM's: words never generated (each as it tokenizes alone and after a space)."""
    prompt_logprobs: int | None = Field(default=None, ge=0, le=20)
    """vLLM's: return the logprob and rank of every prompt token, plus this many top alternatives."""
    ignore_eos: bool = False
    priority: int = 0
    """vLLM's: with --scheduling-policy priority, lower values are served first (and preempted last)."""
    request_id: str | None = Field(default=None, min_length=1, max_length=256)
    """vLLM's: the id the response's is built from (an `X-Request-Id` header wins over it)."""
    return_tokens_as_token_ids: bool = False
    """vLLM's: logprobs name their tokens `token_id:<id>` instead of by their text."""
    add_special_tokens: bool | None = None
    """vLLM's: add the tokenizer's special tokens (e.g. BOS) when tokenizing the prompt: a completion's text by
    default, a chat's rendered template only when true (templates write their own)."""
    cache_salt: str | None = Field(default=None, min_length=1, max_length=256)
    """vLLM's: only requests with the same salt share prefix-cached KV (multi-tenant isolation)."""
    prediction: Prediction | None = None
    """OpenAI's Predicted Outputs: its tokens are drafted for speculative decoding (`engine.speculative`); the
    reply is the same with or without it, only faster where it matches."""
    use_beam_search: bool = False
    """vLLM's: the `n` best beams of a beam search of width n (`server.api.beam_search`) instead of sampling."""
    length_penalty: float = 1.0
    """vLLM's, with use_beam_search: beams rank by cumulative logprob / length ** length_penalty."""
    user: str | None = None
    task: str | None = Field(default=None, min_length=1)
    modules: dict[str, float] | None = None
    tasks: dict[str, float] | None = None
    """Task weights, `{"reverse": 1.0, "uppercase": -0.5}`: each task's composition scaled, then summed."""
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structural_tag: str | None = None
    """vLLM's older structured-output fields (vLLM dropped them in 0.12 and now ignores them, so the constraint
    fails open there): honoured as the `structured_outputs` they stand for."""

    @model_validator(mode="after")
    def _guided_fields(self):
        legacy = {"json": self.guided_json, "regex": self.guided_regex, "choice": self.guided_choice,
                  "grammar": self.guided_grammar, "structural_tag": self.structural_tag}
        given = {kind: value for kind, value in legacy.items() if value is not None}
        if not given:
            return self
        if len(given) > 1 or self.structured_outputs is not None:
            named = [kind if kind == "structural_tag" else f"guided_{kind}" for kind in given]
            named += ["structured_outputs"] if self.structured_outputs else []
            raise ValueError(f"give one structured-output constraint, got {', '.join(named)}")
        self.structured_outputs = StructuredOutputs.model_validate(given)
        return self

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, value: int) -> int:
        if value == 0 or value < -1:
            raise ValueError("must be -1 (off) or >= 1")
        return value

    @field_validator("stop")
    @classmethod
    def _stop(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 8 or any(not s for s in stops):
            raise ValueError("at most 8 non-empty stop strings")
        return stops

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _truncation(cls, value):
        if value is not None and value != -1 and value < 1:
            raise ValueError("must be -1 (the context length) or >= 1")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _token_biases(cls, value):
        for key, bias in (value or {}).items():
            if not key.isdigit():
                raise ValueError(f"keys must be token ids, got {key!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"bias of token {key} must be in [-100, 100], got {bias}")
        if value is not None and len(value) > 1024:
            raise ValueError(f"at most 1024 biased tokens, got {len(value)}")
        return value

    @field_validator("bad_words")
    @classmethod
    def _words(cls, value):
        if value is not None and any(not word.strip() for word in value):
            raise ValueError("bad words must not be empty or blank")
        return value

    @field_validator("stream_options")
    @classmethod
    def _usage_needs_stream(cls, value, info: ValidationInfo):
        if value is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed with stream=true")
        return value

    @field_validator("modules")
    @classmethod
    def _some_modules(cls, value):
        if value is not None and not value:
            raise ValueError("must name at least one module, as {name: weight}")
        return value


class ChatTemplateControls(BaseModel):
    """vLLM's controls of how `messages` render under the chat template (chat completions and /tokenize)."""

    add_generation_prompt: bool = True
    """End the prompt with the template's opening of an assistant turn."""
    continue_final_message: bool = False
    """The last message is an assistant turn left open, which the output continues."""
    chat_template_kwargs: dict | None = None
    """Extra variables for the chat template (e.g. Qwen3's `enable_thinking`)."""

    @field_validator("continue_final_message")
    @classmethod
    def _one_way_to_end(cls, value, info: ValidationInfo):
        if value and info.data.get("add_generation_prompt", True):
            raise ValueError("continues the last message: set add_generation_prompt to false with it")
        return value

    @field_validator("chat_template_kwargs")
    @classmethod
    def _free_names(cls, value):
        taken = sorted(set(value or ()) & TEMPLATE_ARGUMENTS)
        if taken:
            raise ValueError(f"{taken} are set by the server or by their own request fields")
        return value


TEMPLATE_ARGUMENTS = frozenset({"conversation", "messages", "tools", "documents", "chat_template", "tokenize",
                                "add_generation_prompt", "continue_final_message", "return_dict", "return_tensors",
                                "padding", "truncation", "max_length", "tokenizer_kwargs",
                                "return_assistant_tokens_mask"})
"""Names `chat_template_kwargs` may not use: arguments of `apply_chat_template` itself."""


class ChatCompletionRequest(ChatTemplateControls, _Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    """With tool_choice required: allow several calls in one turn (else exactly one)."""
    echo: bool = False
    """vLLM's: the reply starts with the last message's text when that message is an assistant turn."""

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_needs_logprobs(cls, value, info: ValidationInfo):
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs=true")
        return value

    @field_validator("tools")
    @classmethod
    def _distinct_tools(cls, value):
        names = [tool.function.name for tool in value or ()]
        if len(set(names)) != len(names):
            raise ValueError(f"tool names must be distinct, got {names}")
        return value

    @property
    def output_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value):
        if value:
            raise ValueError("suffix is not supported")
        return value

    @property
    def output_limit(self) -> int | None:
        return self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs


class TokenizeRequest(ChatTemplateControls):
    """POST /tokenize, vLLM's body: a prompt, or chat messages rendered with the chat template, tokenized
    exactly as /v1/completions and /v1/chat/completions tokenize them. `model` is accepted and not used:
    every served model shares the backbone's tokenizer."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    """Rendered with the chat template's controls (`ChatTemplateControls`), as a chat completion renders them."""
    add_special_tokens: bool = True
    """The tokenizer's special tokens (e.g. BOS): a prompt gets them unless false, as a completion does; messages
    only when this is given true, as a chat does."""
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _prompt_or_messages(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt or messages")
        return self


class DetokenizeRequest(BaseModel):
    """POST /detokenize, vLLM's body."""

    model: str | None = None
    tokens: list[int]


class LoadAdapterRequest(BaseModel):
    """POST /v1/load_lora_adapter, vLLM's body: a PEFT LoRA directory on the server's disk, served as a module."""

    model_config = ConfigDict(extra="ignore")
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)
    load_inplace: bool = False
    """Replace an adapter loaded earlier under the same name (refused while a request uses it)."""


class UnloadAdapterRequest(BaseModel):
    """POST /v1/unload_lora_adapter, vLLM's body: the name of a module loaded while serving."""

    model_config = ConfigDict(extra="ignore")
    lora_name: str = Field(min_length=1)


class ResponseContentPart(BaseModel):
    """A text part of a Responses API item (images and files are not served)."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["input_text", "output_text", "text", "reasoning_text", "summary_text"]
    text: str


class ResponseInputItem(BaseModel):
    """One item of a Responses API `input`: a message, a function call the model made, its output, or the
    model's earlier reasoning."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["message", "function_call", "function_call_output", "reasoning"] = "message"
    role: Literal["user", "system", "developer", "assistant"] | None = None
    content: str | list[ResponseContentPart] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | None = None
    summary: list[ResponseContentPart] | None = None

    @model_validator(mode="after")
    def _fields_of_its_type(self):
        needs = {"message": ("role", "content"), "function_call": ("call_id", "name", "arguments"),
                 "function_call_output": ("call_id", "output"), "reasoning": ()}[self.type]
        missing = [name for name in needs if getattr(self, name) is None]
        if missing:
            raise ValueError(f"a {self.type} item needs {', '.join(missing)}")
        return self

    def text(self) -> str:
        parts = self.content if isinstance(self.content, list) else None
        if parts is None:
            return self.content or ""
        return "".join(part.text for part in parts)


class ResponsesTool(BaseModel):
    type: Literal["function"]
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class ResponsesNamedTool(BaseModel):
    type: Literal["function"]
    name: str = Field(min_length=1)


class ResponsesTextFormat(BaseModel):
    """`text.format`: plain text, any JSON object, or JSON under a schema."""

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict | None = Field(default=None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class ResponsesText(BaseModel):
    model_config = ConfigDict(extra="ignore")
    format: ResponsesTextFormat | None = None


class ResponsesRequest(_NotesIgnored):
    """POST /v1/responses, OpenAI's Responses API: the conversation comes in `input`, after the stored turns
    of `previous_response_id` when given (`server.api.response_store`).

    Served as a chat completion (`openai_responses.chat_request`). Beside OpenAI's fields, Tessera's `task` and
    `modules` and these of the chat endpoint are accepted: `RESPONSES_EXTRAS`."""

    model: str = Field(min_length=1)
    input: str | list[ResponseInputItem]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stream: bool = False
    tools: list[ResponsesTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ResponsesNamedTool | None = None
    parallel_tool_calls: bool = True
    text: ResponsesText | None = None
    store: bool | None = None
    """Keep the response (in memory) for `previous_response_id` and GET /v1/responses/{id}: the default, as
    OpenAI's, unless false or the server keeps none (the response's `store` says which)."""
    metadata: dict[str, str] | None = None
    previous_response_id: str | None = None
    include: list[str] | None = None
    """Of OpenAI's extras, `message.output_text.logprobs` is honoured; the others are ignored."""
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    """With `message.output_text.logprobs` included: alternatives per token."""
    truncation: Literal["disabled", "auto"] = "disabled"
    user: str | None = None
    task: str | None = Field(default=None, min_length=1)
    modules: dict[str, float] | None = None
    tasks: dict[str, float] | None = None
    seed: int | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: str | list[str] | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    logit_bias: dict[str, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    chat_template_kwargs: dict | None = None
    priority: int | None = None
    request_id: str | None = None
    cache_salt: str | None = None

    @field_validator("input")
    @classmethod
    def _some_input(cls, value):
        if not value:
            raise ValueError("must not be empty")
        return value

    @field_validator("truncation")
    @classmethod
    def _no_truncation(cls, value):
        if value == "auto":
            raise ValueError("auto truncation is not supported; shorten the input (or use truncate_prompt_tokens "
                             "on /v1/chat/completions)")
        return value


RESPONSES_EXTRAS = ("task", "modules", "tasks", "seed", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                    "frequency_penalty", "stop", "ignore_eos", "min_tokens", "logit_bias", "allowed_token_ids",
                    "bad_words", "chat_template_kwargs", "priority", "request_id", "cache_salt")
"""ResponsesRequest fields passed to the chat completion as they are, when given."""


def ignored_fields(body: BaseModel) -> tuple[str, ...]:
    """The top-level fields of a request body that no part of Tessera reads, sorted."""
    return getattr(body, "_ignored", ())
