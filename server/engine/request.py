"""What the API hands the engine, and what streams back.

`n > 1` is the API's business: it submits n requests (seeds seed, seed + 1, ...) and merges them, so
the engine only ever sees single-sequence requests.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

from router.composition import NO_COMPOSITION, Composition


@dataclass(frozen=True)
class SamplingParams:
    """How one request's tokens are chosen and when it stops. Validated by the API."""

    max_tokens: int = 16
    """Generated tokens at most."""
    temperature: float = 1.0
    """0 means greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]."""
    top_k: int = -1
    """Keep the k most likely tokens; -1 keeps all."""
    min_p: float = 0.0
    """Drop tokens less likely than min_p times the most likely one, after temperature and before top-k and
    top-p (vLLM's order); 0 is off."""
    seed: int | None = None
    """Seeds this request's own generator, so its output does not depend on batch neighbours."""
    stop: tuple[str, ...] = ()
    """Stop strings; the text returned ends at the earliest match."""
    include_stop_str_in_output: bool = False
    """The text ends after the matched stop string instead of before it (vLLM)."""
    skip_special_tokens: bool = True
    """Leave special tokens out of the output text (their ids stay in the token ids)."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end generation (in addition to EOS unless `ignore_eos`)."""
    ignore_eos: bool = False
    """Keep generating past EOS (benchmarks force full output lengths this way)."""
    logprobs: int | None = None
    """None: no logprobs; k >= 0: the sampled token's logprob plus the top k alternatives."""
    presence_penalty: float = 0.0
    """Subtracted from the logit of every token generated at least once (OpenAI)."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per time it was generated (OpenAI)."""
    repetition_penalty: float = 1.0
    """Divides positive (multiplies negative) logits of tokens in the prompt or the output (vLLM, HF); 1 is off."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias) added to the logits (OpenAI)."""
    min_tokens: int = 0
    """EOS and stop tokens are not drawn before this many tokens were generated (vLLM)."""
    allowed_token_ids: tuple[int, ...] = ()
    """Only these tokens can be drawn (vLLM); empty: any token."""
    bad_words: tuple[tuple[int, ...], ...] = ()
    """Token sequences never generated (vLLM's `bad_words`, tokenized): a sequence's last token is not drawn where
    the output so far ends in the tokens before it (at once, for a one-token sequence)."""
    prompt_logprobs: int | None = None
    """None: none; k >= 0: the logprob of every prompt token after the first given the ones before it,
    plus the top k alternatives (for scoring, e.g. OpenAI's `echo` with `logprobs`). Such a request
    computes its whole prompt: it takes nothing from the prefix cache."""


@dataclass
class Request:
    """One sequence to generate, as the engine receives it."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    composition: Composition = NO_COMPOSITION
    arrival_time: float = field(default_factory=time.monotonic)
    grammar: object | None = None
    """A compiled structured-output constraint (`Engine.compile_grammar`), or None; each request walks its own
    matcher of it."""
    priority: int = 0
    """Under the priority scheduling policy: lower values are admitted first and preempted last (vLLM's)."""
    grammar_after: int | None = None
    """With `grammar`: a token id the constraint begins after (a reasoning model's end of reasoning, so the
    grammar shapes the answer only); None: from the first token."""
    prediction: tuple[int, ...] = ()
    """OpenAI's Predicted Outputs: token ids the output is expected to (mostly) repeat, proposed as draft tokens
    (`speculative`); the output is the same with or without them, only the number of steps differs."""
    cache_salt: str | None = None
    """vLLM's: the request shares prefix-cached KV only with requests of the same salt (say, a tenant's secret),
    so one tenant cannot learn from timing what another's prompts hold; None shares with every unsalted one."""


class NoDrawableTokenError(ValueError):
    """A request's own constraints left no token to draw at some output position (say, `min_tokens` holding back
    EOS where the grammar allows nothing else, or `allowed_token_ids` outside the grammar). The request fails
    alone, with this message; its batch neighbours go on."""

    def __init__(self, request: "Request", position: int):
        sampling = request.sampling
        named = [name for name, given in (
            ("min_tokens", sampling.min_tokens), ("allowed_token_ids", sampling.allowed_token_ids),
            ("bad_words", sampling.bad_words), ("stop_token_ids", sampling.stop_token_ids),
            ("the structured output", request.grammar is not None)) if given]
        super().__init__(f"no token can be drawn at output position {position}: the request's constraints "
                         f"({', '.join(named) or 'logit processing'}) exclude every token there")
        self.position = position


@dataclass(frozen=True)
class TokenLogprob:
    """Logprob of one generated token and its top alternatives."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    """(token id, logprob) of the most likely tokens, best first."""
    rank: int | None = None
    """Prompt tokens: 1 + how many tokens were more likely (None where not computed)."""


@dataclass(frozen=True)
class RequestOutput:
    """One increment of a request's output, streamed through its asyncio queue."""

    request_id: str
    text: str
    """New detokenized text since the previous increment (stop strings already cut)."""
    token_ids: tuple[int, ...]
    """New token ids since the previous increment."""
    logprobs: tuple[TokenLogprob, ...] | None
    """Per new token, when the request asked for logprobs."""
    finished: bool
    finish_reason: str | None
    """`stop` (EOS, stop token or stop string), `length` (max_tokens or context), `abort`, or None."""
    num_prompt_tokens: int
    num_output_tokens: int
    """Tokens generated so far in total."""
    num_cached_tokens: int = 0
    """Prompt tokens whose KV came from the prefix cache instead of being computed."""
    stop_reason: str | int | None = None
    """With finish_reason `stop`: the stop string matched, or the stop token id drawn (None for EOS), as vLLM."""
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    """Per prompt token (None for the first, which nothing predicts), in the first increment of a request
    that asked for them (`SamplingParams.prompt_logprobs`); None otherwise."""
    speculation: tuple[int, int] | None = None
    """For a request that speculates: (draft tokens its steps ran so far, of those the ones kept: the model drew
    them as drafted); None for one that does not."""

    @staticmethod
    def joined(outputs: list[RequestOutput]) -> RequestOutput:
        """Consecutive increments of one request as one, as if the engine had emitted them together: what a reader
        that fell behind receives (`Engine.generate`). Linear in their total length."""
        if len(outputs) == 1:
            return outputs[0]
        last = outputs[-1]
        logprobs = [o.logprobs for o in outputs if o.logprobs is not None]
        return dataclasses.replace(
            last, text="".join(o.text for o in outputs), token_ids=tuple(t for o in outputs for t in o.token_ids),
            logprobs=tuple(lp for part in logprobs for lp in part) if logprobs else None,
            prompt_logprobs=next((o.prompt_logprobs for o in outputs if o.prompt_logprobs is not None), None))


@dataclass(frozen=True)
class StepStats:
    """What one engine step did, reported to the step observer (metrics) after every step."""

    num_seqs: int
    """Sequences in the step's batch."""
    num_tokens: int
    """Tokens in the step's batch (prefill chunks plus decodes)."""
    num_running: int
    """Requests holding KV blocks after the step."""
    num_waiting: int
    """Requests queued for admission after the step (preempted ones included)."""
    kv_blocks_used: int
    kv_blocks_total: int
    num_preempted: int
    """Requests preempted during this step."""
    step_seconds: float
    """Wall time of the step."""
    num_module_loads: int = 0
    """Modules whose weights this step copied into pool slots (the module pool's misses)."""
    modules_resident: int = 0
    """Modules in pool slots after the step (pinned or evictable)."""
    module_slots_total: int = 0
    """Slots of the module pool."""
    prefix_cache_queries: int = 0
    """Tokens of the requests admitted this step that were looked up in the prefix cache."""
    prefix_cache_hits: int = 0
    """Of those, tokens found cached."""
    num_drafts: int = 0
    """Sequences that ran draft tokens this step (speculative decoding)."""
    num_draft_tokens: int = 0
    """Draft tokens this step ran."""
    num_accepted_tokens: int = 0
    """Draft tokens kept by the steps read back since the last report (this step's, unless steps overlap)."""
    kv_blocks_cached: int = 0
    """KV blocks registered in the prefix cache after the step (held or free)."""
    running_modules: tuple[str, ...] = ()
    """Modules that running requests use, after the step."""
    waiting_modules: tuple[str, ...] = ()
    """Modules that waiting requests use, after the step."""
