"""Beam search (vLLM's `use_beam_search`, with `n` the beam width and `length_penalty`), run over the engine.

Each step extends every live beam by one token: one engine request per beam (the beam's tokens as its
prompt, one new token, the top 2 x width logprobs), all in the same batch and under the call's composition,
so the prefix cache serves each beam's earlier tokens. Of the candidates, those that end the beam (EOS, or a
`stop_token_ids` token) are set aside as finished and the best `width` others live on, by cumulative logprob.
After `max_tokens` steps (or when no beam lives) the finished and the live beams are ranked by

    cumulative logprob / (generated tokens, the ending token not counted) ** length_penalty

and the best `n` are the choices, best first. Logprobs are the model's, before temperature and sampling
filters, as beam search ranks them, so the sampling fields do not apply (temperature, top_p, top_k, min_p and
seed are ignored; fields that would change the distribution are refused).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from server.api.errors import APIError
from server.api.responses import reply, tessera_field
from server.api.serving import Call, Runner, usage
from server.engine.request import Request, SamplingParams
from server.metrics import RequestTiming, task_label

MAX_WIDTH = 10
"""The widest beam: each step reads 2 x width logprobs per beam, and the engine gives at most 20."""

_REFUSED = ("stream", "logprobs", "top_logprobs", "prompt_logprobs", "echo", "response_format", "structured_outputs",
            "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "min_tokens",
            "allowed_token_ids", "bad_words", "stop")
"""Fields that beam search does not honour, refused rather than ignored."""


def check(body) -> None:
    """A 400 naming the first field that cannot go with `use_beam_search`."""
    if body.n > MAX_WIDTH:
        raise APIError(400, f"beam search takes n (the beam width) up to {MAX_WIDTH}, got {body.n}", "n")
    defaults = type(body).model_fields
    for name in _REFUSED:
        if name in defaults and getattr(body, name) not in (defaults[name].default, None, [], {}):
            raise APIError(400, f"{name} is not supported with use_beam_search", name)
    if getattr(body, "tools", None) and getattr(body, "tool_choice", None) != "none":
        raise APIError(400, "tool calls are not supported with use_beam_search", "tools")


@dataclass
class Beam:
    tokens: list[int]
    """Generated tokens, the ending one included."""
    logprob: float = 0.0
    """Cumulative logprob of `tokens`."""
    ended: bool = False
    """Whether its last token ended it (EOS or a stop token)."""

    def score(self, length_penalty: float) -> float:
        length = max(len(self.tokens) - self.ended, 1)
        return self.logprob / (length ** length_penalty)


async def search(runner: Runner, call: Call, index: int, length_penalty: float) -> list[Beam]:
    """The best `call.n` beams from the prompt of choice `index`, best first."""
    engine, params, prompt = runner.engine, call.params[index], call.prompts[index]
    width = call.n
    ends = set(params.stop_token_ids) | (set() if params.ignore_eos else set(engine.eos_ids))
    step = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, logprobs=2 * width)
    live, finished = [Beam([])], []
    for position in range(params.max_tokens):
        tops = await asyncio.gather(*(_top(engine, call, f"{index}-{position}-{j}", prompt + beam.tokens, step)
                                      for j, beam in enumerate(live)))
        candidates = []
        for beam, top in zip(live, tops):
            for token, logprob in top:
                grown = Beam(beam.tokens + [token], beam.logprob + logprob, token in ends)
                (finished if grown.ended else candidates).append(grown)
        live = sorted(candidates, key=lambda b: b.logprob, reverse=True)[:width]
        if not live:
            break
    return sorted(finished + live, key=lambda b: b.score(length_penalty), reverse=True)[:width]


async def _top(engine, call: Call, suffix: str, tokens: list[int], params: SamplingParams):
    """The most likely next tokens after `tokens`, with their logprobs: one engine request."""
    request = Request(f"{call.call_id}-beam-{suffix}", tokens, params, call.composition, priority=call.priority,
                      cache_salt=call.cache_salt)
    last = None
    async for output in engine.generate(request):
        last = output if output.logprobs else last
    return last.logprobs[0].top


async def collect(runner: Runner, call: Call, length_penalty: float) -> dict:
    """The response body of a beam-search call: per distinct prompt its `n` best beams, best first."""
    started = time.monotonic()
    distinct = range(0, len(call.prompts), call.n)
    results = await asyncio.gather(*(search(runner, call, i, length_penalty) for i in distinct))
    tokenizer, choices, generated = runner.tokenizer, [], 0
    for first, beams in zip(distinct, results):
        params = call.params[first]
        for beam in beams:
            text_ids = beam.tokens[:-1] if beam.ended else beam.tokens
            text = tokenizer.decode(text_ids, skip_special_tokens=params.skip_special_tokens)
            reason = "stop" if beam.ended else "length"
            stop_reason = beam.tokens[-1] if beam.ended and beam.tokens[-1] in params.stop_token_ids else None
            if call.kind == "chat":
                message, reason = reply(call, text, reason)
                choice = {"index": len(choices), "message": message}
            else:
                choice = {"index": len(choices), "text": text}
            choices.append(choice | {"logprobs": None, "finish_reason": reason, "stop_reason": stop_reason})
            generated += len(beam.tokens)
    timing = RequestTiming(started)
    timing.end, timing.num_prompt_tokens, timing.num_output_tokens = time.monotonic(), call.num_prompt_tokens, generated
    runner.metrics.observe_request(task_label(call.composition), "stop", timing, call.composition.module_ids)
    body = call.envelope(stream=False)
    body.update(choices=choices, usage=usage(call.num_prompt_tokens, generated, 0),
                tessera=tessera_field(call))
    return body

