"""Host time to turn one request's new token into text, against how long its output already is.

    python benchmarks/serving/emit_scaling.py          # output lengths 100, 1000, 8000, 32000

Every step the engine gives each running request's detokenizer its output so far (`Engine._emit`,
`Detokenizer.update`). That must cost the same at token 32,000 as at token 100, or a batch of long outputs
(reasoning models) pays its length every step. The benchmark keeps a random 32,000-token output of the
word-level tokenizer bench_engine uses (`engine_models.word_tokenizer`), after a 50-token prompt, in one list as
the engine does, and times `update` for 200 consecutive tokens at each length, with a stop string that never
matches (so stop strings are searched). It prints microseconds per token and writes nothing.

The API's side of a reasoning model's stream is timed the same way: `ReasoningStream.feed` (what the streamed
chat path runs per increment) against `ReasoningParser.split` of the whole reply so far (what it ran before), on
a `<think>` block of that many words.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.serving.engine_models import word_tokenizer  # noqa: E402
from server.api.reasoning import REASONING_PARSERS, ReasoningStream  # noqa: E402
from server.engine.detokenize import Detokenizer  # noqa: E402


def main(argv: list[str] | None = None) -> dict[int, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[100, 1000, 8000, 32000])
    parser.add_argument("--timed", type=int, default=200, help="tokens timed at each length")
    args = parser.parse_args(argv)
    tokenizer = word_tokenizer(32000)
    rng = random.Random(0)
    prompt = 50
    token_ids = [rng.randrange(100, 32000) for _ in range(prompt + max(args.lengths))]
    result = {}
    for length in args.lengths:
        detokenizer = Detokenizer(tokenizer, ("stop string never met",))
        start = max(length - args.timed, 1)
        for end in range(1, start):  # the output up to where timing starts, token by token, as served
            detokenizer.update(token_ids, False, prompt, prompt + end)
        began = time.perf_counter()
        for end in range(start, length):
            detokenizer.update(token_ids, False, prompt, prompt + end)
        result[length] = 1e6 * (time.perf_counter() - began) / (length - start)
        print(f"output of {length:6d} tokens: {result[length]:6.1f} us per new token")
    parser = REASONING_PARSERS["qwen3"]
    for length in args.lengths:
        pieces = ["<think>"] + ["word " if i % 50 else "\n" for i in range(length)]
        start = max(length - args.timed, 1)
        stream, text = ReasoningStream(parser, "detect"), ""
        for piece in pieces[:start]:
            stream.feed(piece, False)
            text += piece
        timed = pieces[start:]
        began = time.perf_counter()
        for piece in timed:
            stream.feed(piece, False)
        streamed = 1e6 * (time.perf_counter() - began) / len(timed)
        began = time.perf_counter()
        for piece in timed:
            text += piece
            parser.split(text, "detect", False)
        whole = 1e6 * (time.perf_counter() - began) / len(timed)
        print(f"reasoning of {length:6d} words: {streamed:6.1f} us per new word streamed, {whole:6.1f} re-splitting")
    return result


if __name__ == "__main__":
    main()
