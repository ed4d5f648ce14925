"""Task-tagged chat data: JSONL reading, chat-template encoding with assistant-only labels, padding.

One example per line, a JSON object with a `task` (a valid task name, router.info.NAME) and either
OpenAI `messages` ([{"role": "system"|"user"|"assistant", "content": str}, ...]) or ShareGPT
`conversations` ([{"from": "system"|"human"|"gpt", "value": str}, ...]). Every error names the file, the
line number and what is wrong.

Labels: the conversation is rendered once with the tokenizer's chat template. For every assistant turn i
the template is rendered twice more, for messages[:i] with the generation prompt and for messages[:i+1];
both must be prefixes of the full rendering (a template that rewrites earlier turns is rejected), and the
characters between their ends are the assistant's: its content plus the template's end-of-turn text, so
the model learns to stop (a conversation opening with the assistant has no earlier turns to render: its
first span starts where its content does). Tokens whose first character falls in such a span get their
own id as label, all others -100. No `{% generation %}` support is needed.

Truncation: the token sequence is cut to its first `max_seq_len` tokens (the start of a conversation is
kept; the end is what a long example loses). An example left with no labelled token is dropped by the
trainer with a warning.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from router.errors import LibraryError
from router.info import check_name

logger = logging.getLogger(__name__)

IGNORE = -100
"""Label of tokens the loss skips (torch's cross_entropy ignore_index)."""
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}


class DataError(ValueError):
    """Training data that cannot be used; the message names the file and line where it applies."""


@dataclass(frozen=True)
class Example:
    """One task-tagged conversation."""

    task: str
    """Task name, a valid library task name."""
    messages: list[dict]
    """OpenAI-style turns: {"role": "system" | "user" | "assistant", "content": str}."""


def _messages(record: dict, where: str) -> list[dict]:
    """The record's turns in OpenAI form, from `messages` or ShareGPT `conversations`."""
    has_openai, has_sharegpt = "messages" in record, "conversations" in record
    if has_openai == has_sharegpt:
        raise DataError(f"{where}: give exactly one of 'messages' (OpenAI) or 'conversations' (ShareGPT)")
    key = "messages" if has_openai else "conversations"
    role_key, content_key = ("role", "content") if has_openai else ("from", "value")
    known = ROLES if has_openai else tuple(SHAREGPT_ROLES)
    turns = record[key]
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: '{key}' must be a non-empty list of turns")
    messages = []
    for index, turn in enumerate(turns):
        at = f"{where}: {key}[{index}]"
        if not isinstance(turn, dict):
            raise DataError(f"{at} must be an object, got {type(turn).__name__}")
        role, content = turn.get(role_key), turn.get(content_key)
        if role not in known:
            raise DataError(f"{at}: unknown {role_key} {role!r}; expected one of {list(known)}")
        if not isinstance(content, str):
            raise DataError(f"{at}: '{content_key}' must be a string, got {type(content).__name__}")
        if not content.strip():
            raise DataError(f"{at}: '{content_key}' is empty")
        messages.append({"role": role if has_openai else SHAREGPT_ROLES[role], "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant turn, so there is nothing to learn")
    return messages


def parse_line(line: str, where: str) -> Example:
    """One JSONL line as an Example; `where` ("file:line") prefixes every error."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from error
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "task" not in record:
        raise DataError(f"{where}: missing 'task'")
    try:
        task = check_name("task", record["task"])
    except LibraryError as error:
        raise DataError(f"{where}: {error}") from error
    return Example(task, _messages(record, where))


def load_examples(path: str | Path) -> list[Example]:
    """Every example of a JSONL file (blank lines skipped); raises DataError naming file and line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot read the examples ({error})") from error
    examples = [parse_line(line, f"{path}:{number}") for number, line in enumerate(lines, 1) if line.strip()]
    if not examples:
        raise DataError(f"{path}: no examples")
    logger.info("read %d examples of %d tasks from %s", len(examples), len({e.task for e in examples}), path)
    return examples


def hold_out(examples: list[Example], share: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(training, held-out) examples: `share` of each task's examples, drawn with `seed`, held out for evaluation
    (at least one of a task with two or more examples, at most all but one, rounded to the nearest count). Both
    keep the file's order."""
    if not 0 < share < 1:
        raise ValueError(f"the held-out share must be in (0, 1), got {share!r}")
    rng = random.Random(seed)
    by_task: dict[str, list[int]] = {}
    for index, example in enumerate(examples):
        by_task.setdefault(example.task, []).append(index)
    held: set[int] = set()
    for indices in by_task.values():
        if len(indices) >= 2:
            count = min(max(round(share * len(indices)), 1), len(indices) - 1)
            held.update(rng.sample(indices, count))
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])


def _render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as error:  # noqa: BLE001 - templates raise anything (jinja errors, raise_exception)
        raise DataError(f"the chat template cannot render {len(messages)} turn(s) of this conversation "
                        f"({type(error).__name__}: {error})") from error


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character spans of its assistant turns."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the tokenizer has no chat template; training needs one to render conversations")
    text = _render(tokenizer, messages)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        through = _render(tokenizer, messages[: index + 1])
        if index:
            before = _render(tokenizer, messages[:index], generation_prompt=True)
        else:  # transformers renders no empty conversation: the turn starts where its content does
            before = through[: through.rfind(message["content"])]
        if not (text.startswith(before) and text.startswith(through) and len(before) <= len(through)):
            raise DataError(
                f"the chat template is not prefix-stable at message {index}: rendering the conversation up to "
                "an assistant turn does not give a prefix of the whole rendering, so its span cannot be found"
            )
        spans.append((len(before), len(through)))
    return text, spans


def encode(tokenizer, example: Example, max_seq_len: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one example: labels are the ids on assistant tokens, IGNORE elsewhere.

    Both are cut to the first `max_seq_len` tokens (module docstring: Truncation).
    """
    text, spans = assistant_spans(tokenizer, example.messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    labels = [IGNORE] * len(ids)
    span_index = 0
    for position, (start, _) in enumerate(encoded["offset_mapping"]):
        while span_index < len(spans) and start >= spans[span_index][1]:
            span_index += 1
        if span_index < len(spans) and spans[span_index][0] <= start:
            labels[position] = ids[position]
    return ids[:max_seq_len], labels[:max_seq_len]


def collate(rows: list[tuple[list[int], list[int]]], task_ids: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad encoded rows into a batch: input_ids, attention_mask, labels [batch, seq], task_ids [batch]."""
    if not rows or len(rows) != len(task_ids):
        raise ValueError(f"collate needs one task id per row and at least one row, got {len(rows)} and {len(task_ids)}")
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # [batch, seq]
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)  # [batch, seq]
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # [batch, seq]
    for row, (ids, row_labels) in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(row_labels)
        attention_mask[row, : len(ids)] = 1
    return {
        "input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
        "task_ids": torch.tensor(task_ids, dtype=torch.long),  # [batch]
    }


def routing_prompt(example: Example) -> str:
    """The text a request would be routed by: the last user message before the first assistant turn (what
    the server embeds for a chat request tagged `auto`)."""
    prompt = ""
    for message in example.messages:
        if message["role"] == "assistant":
            break
        if message["role"] == "user":
            prompt = message["content"]
    return prompt
