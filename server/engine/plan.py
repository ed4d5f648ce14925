"""What the scheduler tells the runner each step (`StepPlan`), and what comes back (`StepResult`).

Requests new to the runner (first admission, or readmission after preemption) come in full; requests
it already holds come as deltas: the tokens to run this step and any blocks added. The runner keeps its
own copy of each request's token ids, appending what it samples, so deltas never repeat them.

A token sampled by a step that is still running on the device is held as `PLACEHOLDER` (scheduler and
runner alike) until the step's result is read: with asynchronous scheduling the next step is planned
and launched before then, and the runner feeds such a token to that next step from the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from server.engine.request import SamplingParams, TokenLogprob

PLACEHOLDER = -1
"""Token id of a sampled token not read back yet; never sent to the runner in `NewRequestData`."""

LOGIT_ROWS = 512
"""Token rows whose logits a step makes at once beyond a full batch's ([rows, vocab] fp32: 256 MiB at a 128k
vocabulary): prompt scoring goes in chunks of this many, and a step samples at most max(max_num_seqs, this)
rows, drafts included."""


@dataclass
class NewRequestData:
    """A request the runner has not seen (or dropped at preemption)."""

    request_id: str
    token_ids: list[int]
    """Prompt plus every token generated so far (recomputed after a preemption)."""
    block_ids: list[int]
    """KV blocks held, in order."""
    num_computed_tokens: int
    """Tokens whose KV is already in the cache (0 for a new request)."""
    module_slots: tuple[int, ...]
    """Pool slot of every module of the composition."""
    gates: tuple[float, ...]
    """Gate of every module of the composition."""
    sampling: SamplingParams
    seed: int
    """Seed of this request's sampling generator."""
    num_prompt_tokens: int = 0
    """Leading entries of `token_ids` that are the prompt."""
    matcher: object | None = None
    """The request's structured-output matcher (`structured`), shared with the scheduler, which feeds it
    every sampled token; the runner masks the request's logits with it."""


@dataclass
class RunningRequestData:
    """A delta for a request the runner holds."""

    request_id: str
    new_block_ids: list[int]
    """Blocks appended to its block table this step."""


@dataclass
class StepPlan:
    """One step: which requests run, with how many tokens each, and what changes in the pools."""

    step_id: int = 0
    """The scheduler's count of plans; results are applied (`Scheduler.update`) in this order."""
    new: list[NewRequestData] = field(default_factory=list)
    running: list[RunningRequestData] = field(default_factory=list)
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    """Tokens each scheduled request runs this step, in batch order (new first, then running)."""
    samples: set[str] = field(default_factory=set)
    """Requests whose last scheduled token reaches the end of their known tokens, so they sample."""
    module_loads: list[tuple[int, str]] = field(default_factory=list)
    """(slot, module id) to write into the pool before the forward pass."""
    dropped: list[str] = field(default_factory=list)
    """Requests the runner must forget (finished, aborted or preempted since the last step)."""
    drafts: dict[str, list[int]] = field(default_factory=dict)
    """Per speculating request: the draft tokens it runs after its last token (counted in its scheduled tokens);
    it samples at each of those positions (`speculative`)."""

    @property
    def num_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())

    @property
    def is_empty(self) -> bool:
        return not self.num_scheduled_tokens


@dataclass
class StepResult:
    """Plain lists, no tensors: the token each sampling request drew, and its logprobs if asked."""

    request_ids: list[str] = field(default_factory=list)
    sampled_token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob | None] = field(default_factory=list)
    prompt_logprobs: dict[str, tuple[int, list[TokenLogprob]]] = field(default_factory=dict)
    """Per request that asked for prompt logprobs and ran prompt tokens this step: (the position of the
    first prompt token they score, their logprobs in position order)."""
    accepted: dict[str, tuple[list[int], list[TokenLogprob | None]]] = field(default_factory=dict)
    """Per request that ran drafts: the drafts it kept (the model drew them as drafted), with their logprobs; its
    `sampled_token_ids` entry is the token drawn after them."""
    undrawable: set[str] = field(default_factory=set)
    """Requests whose logits this step, after their own processing and grammar, had no finite entry: their
    row's token is no draw (`NoDrawableTokenError`)."""
