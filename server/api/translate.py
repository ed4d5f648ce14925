"""From an OpenAI request body to engine requests: the composition, the prompt, the sampling params."""

from __future__ import annotations

import json
from dataclasses import dataclass

from jinja2 import TemplateError

from router.compose import compose
from router.composition import Composition
from router.controller import TASK_JOIN
from router.text import AUTO
from server.api.errors import ROUTER_ERRORS, APIError, from_router
from server.api.protocol import ChatCompletionRequest, CompletionRequest
from server.api.tools import template_messages, template_tools
from server.engine.request import SamplingParams
from server.engine.structured import GrammarSpec

TASK_HEADER = "x-tessera-task"


@dataclass(frozen=True)
class Tags:
    """What a request asks for, before the router turns it into a composition."""

    task: str | None
    """The task tag from any route (model, body `task`, header); `auto` asks for text routing."""
    modules: dict[str, float] | None
    """Explicit module weights (body `modules`, or a module named as the model)."""
    param: str
    """The request parameter a routing error points at."""
    tasks: dict[str, float] | None = None
    """Task weights (body `tasks`): each task's composition scaled before they add."""


def _task_from_model(model: str, backbone: str, library) -> tuple[str | None, str | None]:
    """(task, module) that the `model` field names: the backbone, `backbone:NAME` or NAME; 404 otherwise.

    `auto` (or `backbone:auto`) is the task AUTO whether or not the library can route text; the router
    answers 404 when it cannot.
    """
    if model == backbone:
        return None, None
    prefix, sep, rest = model.rpartition(":")  # names never hold ":"; a backbone may
    name = rest if sep and prefix == backbone and rest else model
    if name == AUTO:
        return AUTO, None
    if library is not None and (name in library.tasks or TASK_JOIN in name):
        return name, None  # a task, or a composite `a+b` whose parts the router checks (404 if unknown)
    if library is not None and name in library.modules:
        return None, name
    raise APIError(404, f"model {model!r} does not exist: name the backbone {backbone!r}, a task or a module, "
                        f"alone or as {backbone!r}:NAME (GET /v1/models lists them)", "model", "model_not_found")


def resolve_composition(
    body, header_task: str | None, backbone: str, library, max_k: int, text: str | None = None
) -> Composition:
    """The composition a request asks for, by any of the equivalent tagging routes.

    With the task `auto`, `text` (see `routing_text`) is routed by the library's text router, which
    blocks on the sentence encoder: call this in a worker thread then.
    """
    return compose_tags(requested_tags(body, header_task, backbone, library), library, max_k, text)


def requested_tags(body, header_task: str | None, backbone: str, library) -> Tags:
    """The task or modules a request names, with conflicting tags rejected (400)."""
    model_task, model_module = _task_from_model(body.model, backbone, library)
    tasks = {t for t in (model_task, body.task, header_task) if t}
    if len(tasks) > 1:
        raise APIError(400, f"conflicting task tags: {sorted(tasks)}", "task", "conflicting_tags")
    task = tasks.pop() if tasks else None
    modules = body.modules
    if model_module is not None:
        if modules is not None or task is not None:
            raise APIError(400, f"model {body.model!r} is a module; do not also give task or modules",
                           "modules" if modules is not None else "task", "conflicting_tags")
        modules = {model_module: 1.0}
    if body.tasks is not None:
        if task is not None or modules is not None:
            raise APIError(400, "give task weights (tasks) alone, without a task tag, a module as the model or module "
                                "weights", "tasks", "conflicting_tags")
        return Tags(None, None, "tasks", dict(body.tasks))
    param = "modules" if modules is not None else "model" if model_task is not None else "task"
    return Tags(task, modules, param)


def compose_tags(tags: Tags, library, max_k: int, text: str | None = None) -> Composition:
    """The router's composition for `tags` (`text` is the prompt, for the task `auto`), errors as HTTP."""
    try:
        return compose(library, task=tags.task, modules=tags.modules, max_k=max_k, text=text, tasks=tags.tasks)
    except ROUTER_ERRORS as error:
        raise from_router(error, tags.param) from error


def routing_text(body, tokenizer) -> str:
    """The text that `auto` routes: a chat's last user message, or a completion's one prompt (decoded if ids)."""
    if isinstance(body, ChatCompletionRequest):
        users = [m for m in body.messages if m.role == "user"]
        if not users:
            raise APIError(400, f"model {AUTO!r} routes by the last user message, and there is none", "messages")
        return users[-1].text()
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        if len(prompt) != 1:
            raise APIError(400, f"model {AUTO!r} routes one prompt per request, got {len(prompt)}; send them "
                                "separately or tag a task", "prompt")
        prompt = prompt[0]
    return prompt if isinstance(prompt, str) else tokenizer.decode(prompt, skip_special_tokens=True)


def chat_prompt(body, tokenizer, add_special_tokens: bool = False) -> list[int]:
    """The token ids of a body's `messages` under the tokenizer's chat template, rendered as its
    `ChatTemplateControls` ask (the tokenizer's special tokens added too only when `add_special_tokens`); a
    template that refuses the conversation is a 400 with its message."""
    last = body.messages[-1].role
    if body.continue_final_message and last != "assistant":
        raise APIError(400, f"continue_final_message continues an assistant turn; the last message is {last!r}",
                       "messages")
    if body.add_generation_prompt and last == "assistant":
        raise APIError(400, "the last message must not be from the assistant (to continue it, set "
                            "continue_final_message and add_generation_prompt false)", "messages")
    if tokenizer.chat_template is None:
        raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions", "messages")
    try:
        text = tokenizer.apply_chat_template(
            template_messages(body), tools=template_tools(body), tokenize=False,
            add_generation_prompt=body.add_generation_prompt, continue_final_message=body.continue_final_message,
            **(body.chat_template_kwargs or {}))
    except (TemplateError, ValueError, TypeError) as error:  # e.g. the template's raise_exception on roles
        raise APIError(400, f"the chat template refused the messages: {error}", "messages") from None
    return tokenizer.encode(text, add_special_tokens=add_special_tokens)


def truncated(prompt: list[int], body, max_model_len: int) -> list[int]:
    """The prompt's last `truncate_prompt_tokens` tokens (-1: the context length), or the whole prompt."""
    keep = body.truncate_prompt_tokens
    if keep is None:
        return prompt
    return prompt[-(max_model_len if keep == -1 else keep):]


def check_token_ids(ids, vocab_size: int, param: str) -> None:
    if any(not 0 <= t < vocab_size for t in ids):
        raise APIError(400, f"{param} token ids must be in [0, {vocab_size})", param)


def completion_prompts(body: CompletionRequest, tokenizer, max_model_len: int) -> list[list[int]]:
    prompt, special = body.prompt, body.add_special_tokens is not False
    if isinstance(prompt, str):
        prompts = [tokenizer.encode(prompt, add_special_tokens=special)]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]
    elif prompt and all(isinstance(p, str) for p in prompt):
        prompts = [tokenizer.encode(p, add_special_tokens=special) for p in prompt]
    else:
        prompts = [list(p) for p in prompt]
    if not prompts or any(not p for p in prompts):
        raise APIError(400, "prompt must not be empty", "prompt")
    check_token_ids([t for p in prompts for t in p], len(tokenizer), "prompt")
    return [truncated(p, body, max_model_len) for p in prompts]


def echo_texts(body: CompletionRequest, prompts: list[list[int]], tokenizer) -> list[str] | None:
    """With `echo`: each prompt's text as the client sent it (token-id or truncated prompts decoded), else None."""
    if not body.echo:
        return None
    given = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if all(isinstance(p, str) for p in given) and body.truncate_prompt_tokens is None:
        return list(given)
    return [tokenizer.decode(p) for p in prompts]


def chat_echo(body: ChatCompletionRequest, tool_mode: str | None, reasoning: bool = False) -> str | None:
    """With `echo`: the last message's text when it is an assistant turn (the reply continues it), else None."""
    if not body.echo:
        return None
    if tool_mode is not None:
        raise APIError(400, "echo is not supported with tool calls", "echo")
    if reasoning:
        raise APIError(400, "echo is not supported with a reasoning parser (the server's --reasoning-parser)", "echo")
    last = body.messages[-1]
    return last.text() if last.role == "assistant" else None


def sampling_params(body, prompt_len: int, max_model_len: int, index: int, default_max: int | None,
                    vocab_size: int, bad_words: tuple[tuple[int, ...], ...] = (),
                    defaults: dict | None = None, allowed: tuple[int, ...] = ()) -> SamplingParams:
    """Sampling params of choice `index` (seeds advance per choice so n > 1 differ reproducibly); `bad_words`
    as `bad_word_ids` tokenized them and `allowed` as `allowed_token_ids` checked them, once per call; `defaults` (the model's, `Engine.sampling_defaults`) fill the sampling
    fields the body left out, and their max_new_tokens a chat's missing max_tokens."""
    defaults = defaults or {}

    def given(name: str):
        return getattr(body, name) if name in body.model_fields_set else defaults.get(name, getattr(body, name))

    param = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
    room = max_model_len - prompt_len
    if room < 1:
        raise APIError(400, f"prompt has {prompt_len} tokens; the context length is {max_model_len}",
                       "messages" if isinstance(body, ChatCompletionRequest) else "prompt", "context_length_exceeded")
    if default_max is None and "max_new_tokens" in defaults:
        default_max = min(defaults["max_new_tokens"], room)
    max_tokens = body.output_limit or (default_max if default_max is not None else room)
    if max_tokens > room:
        raise APIError(400, f"prompt ({prompt_len} tokens) plus {param} ({max_tokens}) exceeds the context length "
                            f"{max_model_len}", param, "context_length_exceeded")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=given("temperature"),
        top_p=given("top_p"),
        top_k=given("top_k"),
        min_p=given("min_p"),
        seed=None if body.seed is None else body.seed + index,
        stop=tuple(body.stop or ()),
        stop_token_ids=_stop_token_ids(body, vocab_size),
        include_stop_str_in_output=body.include_stop_str_in_output,
        skip_special_tokens=body.skip_special_tokens,
        ignore_eos=body.ignore_eos,
        logprobs=body.num_logprobs,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        repetition_penalty=given("repetition_penalty"),
        logit_bias=_logit_bias(body, vocab_size),
        min_tokens=_min_tokens(body, max_tokens, param),
        allowed_token_ids=allowed,
        bad_words=bad_words,
        prompt_logprobs=body.prompt_logprobs if body.prompt_logprobs is not None else
        (body.num_logprobs if getattr(body, "echo", False) else None),
    )


def _logit_bias(body, vocab_size: int) -> tuple[tuple[int, float], ...]:
    biases = tuple(sorted((int(token), float(bias)) for token, bias in (body.logit_bias or {}).items() if bias))
    check_token_ids([token for token, _ in biases], vocab_size, "logit_bias")
    return biases


def allowed_token_ids(body, vocab_size: int) -> tuple[int, ...]:
    """A body's `allowed_token_ids`, sorted and without repeats; a 400 for one outside the vocabulary."""
    ids = tuple(sorted(set(body.allowed_token_ids or ())))
    check_token_ids(ids, vocab_size, "allowed_token_ids")
    return ids


def bad_word_ids(body, tokenizer) -> tuple[tuple[int, ...], ...]:
    """The token sequences a body's `bad_words` ban: each word as it tokenizes alone and after a space (at the
    start of the text and inside it), without repeats."""
    sequences: dict[tuple[int, ...], None] = {}
    for word in body.bad_words or ():
        for spelling in (word.lstrip(), " " + word.lstrip()):
            ids = tuple(tokenizer.encode(spelling, add_special_tokens=False))
            if ids:
                sequences[ids] = None
    return tuple(sequences)


def _stop_token_ids(body, vocab_size: int) -> tuple[int, ...]:
    ids = tuple(dict.fromkeys(body.stop_token_ids or ()))
    check_token_ids(ids, vocab_size, "stop_token_ids")
    return ids


def _min_tokens(body, max_tokens: int, param: str) -> int:
    if body.min_tokens > max_tokens:
        raise APIError(400, f"min_tokens ({body.min_tokens}) exceeds {param} ({max_tokens})", "min_tokens")
    return body.min_tokens


def grammar_spec(body) -> tuple[GrammarSpec, str] | None:
    """The structured-output constraint a body asks for, and the parameter that asked; None for free text."""
    fmt, outputs = body.response_format, body.structured_outputs
    if fmt is not None and fmt.type != "text" and outputs is not None:
        raise APIError(400, "give response_format or structured_outputs, not both", "structured_outputs")
    if outputs is not None:
        if outputs.json_ is not None:
            schema = outputs.json_ if isinstance(outputs.json_, str) else json.dumps(outputs.json_)
            return GrammarSpec("json_schema", schema), "structured_outputs"
        for kind in ("regex", "grammar"):
            if getattr(outputs, kind) is not None:
                return GrammarSpec(kind, getattr(outputs, kind)), "structured_outputs"
        if outputs.choice is not None:
            return GrammarSpec("choice", json.dumps(outputs.choice)), "structured_outputs"
        if outputs.structural_tag is not None:
            tag = outputs.structural_tag
            return GrammarSpec("structural_tag", tag if isinstance(tag, str) else json.dumps(tag)), "structured_outputs"
        return GrammarSpec("json_object"), "structured_outputs"
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "structural_tag":
        return GrammarSpec("structural_tag", fmt.structural_tag()), "response_format"
    if fmt.type == "json_schema" and fmt.json_schema.schema_ is not None:
        strict = fmt.json_schema.strict is not False  # false: OpenAI's best effort, unenforceable keywords allowed
        return GrammarSpec("json_schema", json.dumps(fmt.json_schema.schema_), strict=strict), "response_format"
    return GrammarSpec("json_object"), "response_format"
