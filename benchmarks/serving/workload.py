"""What each request asks for: its prompt, its output length and its task tag.

Prompts come from a JSONL dataset or are random words. Dataset lines are one of
  ShareGPT:        {"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", ...}]}
  OpenAI messages: {"messages": [{"role": "user", "content": "..."}, ...], "task": "..."}   (task optional)
The latter is the training data format (`training/` writes it). The prompt is every message before the
first assistant turn; the rest of the conversation (the reference answer) is not sent. A line may also carry
`"prediction": "..."`, sent as OpenAI's Predicted Outputs (`prediction` of chat and completions bodies; the
Responses API has none).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.serving.config import BenchConfig, LengthDist, popularity

TASK_HEADER = "X-Tessera-Task"
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "chatgpt": "assistant", "system": "system"}
_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an "
    "they you were her she there been one all we their has would when if so no will more time about can "
    "what some other into could two my first than then its them only new people like these any may well "
    "model task module server request token batch memory layer weight answer reverse sort count letter word"
).split()


@dataclass(frozen=True)
class Prompt:
    """One conversation's prompt, and the task it is tagged with in the dataset (if any)."""

    messages: tuple[dict, ...]
    """OpenAI chat messages up to (not including) the first assistant turn."""
    task: str | None = None
    """The dataset's `task` field."""
    prediction: str | None = None
    """The dataset's `prediction` field: text the reply is expected to repeat (OpenAI's Predicted Outputs)."""


@dataclass
class BenchRequest:
    """One request to send: its body, extra headers, and the label its metrics are grouped under."""

    label: str
    """The task name, `explicit` for a module composition, `none` for an untagged request."""
    body: dict
    """The JSON body, streaming with usage."""
    headers: dict[str, str] = field(default_factory=dict)
    """Extra headers (the task header when tagging by header)."""


def _messages(record: dict, where: str) -> list[dict]:
    if "conversations" in record:
        messages = []
        for turn in record["conversations"]:
            role = _SHAREGPT_ROLES.get(str(turn.get("from", "")).lower()) if isinstance(turn, dict) else None
            if role is None or not isinstance(turn.get("value"), str):
                raise ValueError(f"{where}: a ShareGPT turn needs `from` (human, gpt or system) and a string `value`")
            messages.append({"role": role, "content": turn["value"]})
        return messages
    if "messages" in record and isinstance(record["messages"], list):
        for message in record["messages"]:
            if not isinstance(message, dict) or not isinstance(message.get("content"), str) or "role" not in message:
                raise ValueError(f"{where}: every message needs a `role` and a string `content`")
        return [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
    raise ValueError(f"{where}: expected a `conversations` (ShareGPT) or `messages` (OpenAI) list")


def load_dataset(path: str | Path) -> list[Prompt]:
    """Every usable prompt of a JSONL file; a malformed line is an error naming its line number."""
    prompts = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object")
            messages = _messages(record, where)
            first_answer = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), len(messages))
            prompt = messages[:first_answer]
            if not prompt or prompt[-1]["role"] != "user":
                raise ValueError(f"{where}: the conversation must open with a user turn before any answer")
            task, prediction = record.get("task"), record.get("prediction")
            if task is not None and (not isinstance(task, str) or not task):
                raise ValueError(f"{where}: `task` must be a non-empty string")
            if prediction is not None and not isinstance(prediction, str):
                raise ValueError(f"{where}: `prediction` must be a string (the text the reply should repeat)")
            prompts.append(Prompt(tuple(prompt), task, prediction))
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def random_words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choices(_WORDS, k=count))


def random_prompt(rng: random.Random, dist: LengthDist) -> Prompt:
    """Random words; the server's usage reports how many tokens they make."""
    return Prompt(({"role": "user", "content": random_words(rng, dist.sample(rng))},))


def _pick(rng: random.Random, names: tuple[str, ...], weights: list[float], k: int) -> list[str]:
    """`k` distinct names drawn by weight, one after another without replacement."""
    pool, chosen = list(zip(names, weights)), []
    for _ in range(k):
        index = rng.choices(range(len(pool)), weights=[w for _, w in pool])[0]
        chosen.append(pool.pop(index)[0])
    return chosen


class Workload:
    """An endless, seeded stream of requests for one config (`modules`: names for --modules-k)."""

    def __init__(self, config: BenchConfig, modules: tuple[str, ...] = ()):
        self.config = config
        self.rng = random.Random(config.seed)
        self.prompts = load_dataset(config.dataset) if config.dataset else None
        self.order: list[int] = []
        self.modules = config.modules or modules
        if config.modules_k is not None and config.modules_k > len(self.modules):
            raise ValueError(f"--modules-k {config.modules_k} but the server lists {len(self.modules)} modules")
        self.task_weights = popularity(config.task_dist, max(1, len(config.tasks)))
        self.module_weights = popularity(config.task_dist, max(1, len(self.modules)))
        self.system = None
        if config.prefix_len:  # its own generator, so the prompts after it are those of a run without one
            self.system = {"role": "system", "content": random_words(random.Random(f"prefix-{config.seed}"),
                                                                     config.prefix_len)}

    def _prompt(self) -> Prompt:
        if self.prompts is None:
            prompt = random_prompt(self.rng, self.config.input_dist)
        else:
            if not self.order:
                self.order = list(range(len(self.prompts)))
                self.rng.shuffle(self.order)
            prompt = self.prompts[self.order.pop()]
        if self.system is None:
            return prompt
        return Prompt((self.system, *prompt.messages), prompt.task, prompt.prediction)

    def _tag(self, prompt: Prompt, body: dict, headers: dict[str, str]) -> str:
        config = self.config
        if config.modules_k is not None:
            names = _pick(self.rng, self.modules, self.module_weights, config.modules_k)
            body["modules"] = {name: round(self.rng.uniform(0.1, 1.0), 3) for name in names}
            return "explicit"
        task = _pick(self.rng, config.tasks, self.task_weights, 1)[0] if config.tasks else prompt.task
        if task is None:
            return "none"
        if config.tag_via == "model":
            body["model"] = task
        elif config.tag_via == "header":
            headers[TASK_HEADER] = task
        else:
            body["task"] = task
        return task

    def sample(self) -> BenchRequest:
        """The next request."""
        config, prompt = self.config, self._prompt()
        max_tokens = config.output_dist.sample(self.rng)
        if config.endpoint == "responses":  # OpenAI's Responses API: usage comes with response.completed
            body: dict = {"model": config.model, "max_output_tokens": max_tokens, "stream": True,
                          "input": list(prompt.messages)}
        else:
            body = {"model": config.model, "max_tokens": max_tokens, "stream": True,
                    "stream_options": {"include_usage": True}}
        if config.endpoint == "chat":
            body["messages"] = list(prompt.messages)
        elif config.endpoint == "completions":
            body["prompt"] = "\n\n".join(m["content"] for m in prompt.messages)
        if config.ignore_eos:
            body["ignore_eos"] = True
        if prompt.prediction is not None and config.endpoint != "responses":
            body["prediction"] = {"type": "content", "content": prompt.prediction}
        headers: dict[str, str] = {}
        label = self._tag(prompt, body, headers)
        return BenchRequest(label, body, headers)
