"""Streamed detokenization (tokenizers' DecodeStream) releases exactly the increments of the whole re-decode:
random token sequences, multi-byte text cut between tokens, special tokens, stop strings, early finishes."""

from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from server.engine.detokenize import Detokenizer, streaming_backend
from server.model.tiny import write_tokenizer
from training.suite.backbone import write_char_tokenizer

TEXT = "héllo wörld 日本語 🙂 naïve café, the tall hall: ẞ€ \u00a0ok"


def _sentencepiece_like() -> PreTrainedTokenizerFast:
    """A Llama-2-style tokenizer: BPE over "▁"-joined words with byte fallback (<0xNN> tokens)."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for piece in ["▁", "a", "c", "e", "f", "h", "l", "o", "t", "w", "▁t", "he", "▁the", "ll", "é", "日", "▁a"]:
        vocab[piece] = len(vocab)
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("l", "l"), ("▁", "a")]
    model = Tokenizer(models.BPE(vocab, merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    model.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    model.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=model, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tokenizers")
    write_tokenizer(root / "tiny")
    write_char_tokenizer(root / "char")
    return {"tiny": AutoTokenizer.from_pretrained(str(root / "tiny")),
            "char": AutoTokenizer.from_pretrained(str(root / "char")),
            "sentencepiece": _sentencepiece_like()}


def _increments(tokenizer, ids: list[int], stop: tuple[str, ...], stream: bool, end: int) -> list[tuple[str, bool]]:
    """What the engine releases as the output grows one token at a time, finishing at `end` or a stop."""
    detokenizer = Detokenizer(tokenizer, stop, stream=stream)
    assert (detokenizer.backend is not None) == stream
    increments = []
    for n in range(1, end + 1):
        increments.append(detokenizer.update(ids[:n], finished=n == end))
        if increments[-1][1]:
            break
    return increments


def _cases(tokenizer, rng: random.Random, random_ids: bool) -> list[list[int]]:
    """Cuts of real multi-byte text, the text with special and random tokens inserted, and random ids."""
    encoded = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    specials = tokenizer.all_special_ids
    cases = []
    for _ in range(120):
        ids = encoded[: rng.randrange(1, len(encoded) + 1)]
        cases.append(ids)
        mixed = list(encoded)
        for _ in range(4):
            mixed.insert(rng.randrange(len(mixed) + 1), rng.choice(specials + [rng.randrange(len(tokenizer))]))
        cases.append(mixed)
        if random_ids:
            cases.append([rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 40))])
    return cases


def _stops(text: str, rng: random.Random) -> tuple[str, ...]:
    """None, or a piece of the text (it will match), and one that only its last character starts."""
    if not text or rng.random() < 0.3:
        return ()
    at = rng.randrange(len(text))
    return (text[at : at + rng.randrange(1, 5)], text[-1:] + "\u2603x")


@pytest.mark.parametrize("name", ["tiny", "char", "sentencepiece"])
def test_streamed_increments_equal_the_whole_redecode(tokenizers, name):
    tokenizer = tokenizers[name]
    rng = random.Random(name)
    # NOTE: random byte tokens of a byte-fallback tokenizer make whole decodes rewrite text already released
    # (an invalid <0xNN> run turns every byte of it into U+FFFD), which no incremental decode reproduces.
    cases = _cases(tokenizer, rng, random_ids=name != "sentencepiece")
    cut_mid_character = with_stop = 0
    for ids in cases:
        stop = _stops(tokenizer.decode(ids, skip_special_tokens=True), rng)
        end = rng.randrange(1, len(ids) + 1) if rng.random() < 0.3 else len(ids)
        want = _increments(tokenizer, ids, stop, stream=False, end=end)
        assert _increments(tokenizer, ids, stop, stream=True, end=end) == want, (ids[:end], stop)
        cut_mid_character += any(tokenizer.decode(ids[:n], skip_special_tokens=True).endswith("\ufffd")
                                 for n in range(1, end + 1))
        with_stop += any(stopped for _, stopped in want)
    assert with_stop > 10
    assert cut_mid_character > 10 or name == "char"  # one token per character: nothing to cut


def test_stream_holds_a_cut_character_and_releases_the_rest_at_the_finish(tokenizers):
    tokenizer = tokenizers["tiny"]
    ids = tokenizer("a🙂", add_special_tokens=False)["input_ids"]
    assert len(ids) > 2, "the emoji must span several byte-level tokens"
    detokenizer = Detokenizer(tokenizer, ())
    assert detokenizer.update(ids[:1], finished=False) == ("a", False)
    assert detokenizer.update(ids[:2], finished=False) == ("", False)
    assert detokenizer.update(ids[:2], finished=True) == ("\ufffd", False)


def test_only_plain_fast_tokenizers_stream(tokenizers):
    class Decodes:
        def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
            return " ".join(map(str, ids))

    assert streaming_backend(tokenizers["tiny"]) is tokenizers["tiny"]._tokenizer
    assert streaming_backend(Decodes()) is None
    detokenizer = Detokenizer(Decodes(), ("3 4",))
    assert detokenizer.backend is None
    assert detokenizer.update([1, 2], finished=False) == ("1 2", False)
    assert detokenizer.update([1, 2, 3], finished=False) == (" ", False)  # "3" may start the stop: held back
    assert detokenizer.update([1, 2, 3, 4], finished=False) == ("", True)
    tokenizers["char"].clean_up_tokenization_spaces = True
    try:
        assert streaming_backend(tokenizers["char"]) is None
    finally:
        tokenizers["char"].clean_up_tokenization_spaces = False


def test_the_earliest_stop_string_ends_the_text_whichever_is_listed_first(tiny_llama):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    ids = tokenizer.encode("the cat sat on the mat", add_special_tokens=False)
    detokenizer = Detokenizer(tokenizer, ("mat", "sat"), stream=False)
    text, stopped = detokenizer.update(ids, finished=False)  # both stops arrive in one update
    assert stopped and text == "the cat " and detokenizer.matched_stop == "sat"


def test_a_stop_string_kept_in_the_text_is_not_held_back(tiny_llama):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    ids = tokenizer.encode("the cat sat on the mat", add_special_tokens=False)
    for stream in (False, True):
        kept = Detokenizer(tokenizer, ("sat on",), stream=stream, include_stop=True)
        cut = Detokenizer(tokenizer, ("sat on",), stream=stream)
        texts, stops, checked = ["", ""], [False, False], False
        for end in range(1, len(ids) + 1):
            for i, detokenizer in enumerate((kept, cut)):
                if not stops[i]:
                    new, stops[i] = detokenizer.update(ids[:end], finished=False)
                    texts[i] += new
            if tokenizer.decode(ids[:end]).endswith("sat"):  # a stop's prefix: held back only when cut
                assert texts[0] == "the cat sat" and texts[1] == "the cat "
                checked = True
        assert checked and stops == [True, True] and kept.matched_stop == "sat on"
        assert texts == ["the cat sat on", "the cat "]


@pytest.mark.parametrize("name", ["tiny", "sentencepiece"])
def test_a_long_output_is_read_in_place_and_its_text_kept_short(tokenizers, name):
    """A request's output is read where it lies in its token ids (`start`, `end`: no copy per step), and the text
    kept is only what a stop string can still reach, so an update costs the same at token 20,000 as at token 20;
    the releases are still exactly the whole decode's, up to a stop string met far into the output."""
    tokenizer = tokenizers[name]
    rng = random.Random(3)
    filler = tokenizer("the tall hall: ", add_special_tokens=False)["input_ids"]
    output = [token for _ in range(20_000 // len(filler)) for token in filler]  # about 20,000 tokens,
    output += tokenizer(TEXT, add_special_tokens=False)["input_ids"]  # then multi-byte text with the stop string
    stop = "ẞ€"
    prompt = [rng.randrange(len(tokenizer)) for _ in range(7)]
    token_ids = prompt + output + [-1]  # (a placeholder after the output, as asynchronous steps leave one)
    detokenizer = Detokenizer(tokenizer, (stop, "never"), stream=True)
    released, longest = "", 0
    for end in range(len(prompt) + 1, len(token_ids)):
        piece, stopped = detokenizer.update(token_ids, False, len(prompt), end)
        released += piece
        longest = max(longest, len(detokenizer._text))
        if stopped:
            break
    whole = tokenizer.decode(output, skip_special_tokens=True)
    assert stopped and released == whole[: whole.index(stop)]
    assert detokenizer._base > 0 and longest < 3 * 4096  # a window, not the 20,000 tokens' text
    later = Detokenizer(tokenizer, (), stream=True)  # no stop string found: the whole text, released in pieces
    text = "".join(later.update(token_ids, n == len(token_ids) - 1, len(prompt), n)[0]
                   for n in range(len(prompt) + 1, len(token_ids)))
    assert text == whole and later._base > len(whole) - 3 * 4096
