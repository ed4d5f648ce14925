"""The suite's backbone: a small Llama with a one-token-per-character tokenizer, pretrained on generic strings.

The backbone must know the chat format, the alphabet and how to copy, but none of the suite's tasks, so
that a module has something to learn and the backbone alone scores near zero. Its pretraining data
(`pretraining_text`) is therefore generic, never a task's input -> output mapping:

- copy conversations (share `copy_share`): a user message made of 1 to `instruction_words` instruction-like
  words (a share `comma_share` of the gaps between them written ", ") drawn from a word list (which holds the
  task words too, "reverse", "sort", ..., so they carry no meaning) and a colon, then a random string; the
  assistant echoes the string unchanged;
- raw strings (the rest): random words, numbers and "x+y" sums over ALPHABET, no chat format.

Random strings come in the input styles the tasks use (lowercase, lowercase and digits, uppercase, words
with spaces, numbers), so the model has seen every input shape, copied, before any task training.

Models are cached by a hash of their BackboneConfig and BACKBONE_VERSION (`ensure_backbone`); the
pretraining loss history and wall time are kept in the model directory's PRETRAIN_RECORD.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import string
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from router.atomic import build_cache_entry
from training.suite.tasks import ALPHABET

logger = logging.getLogger(__name__)

BACKBONE_VERSION = "suite-backbone-v1"
"""Part of every cache key: bump it when the pretraining data or procedure changes."""
PRETRAIN_RECORD = "pretrain.json"
"""File in the model directory with the config, the loss history, the wall time and the held-out copy exact
match of pretraining."""
CPU_THREADS = 1
"""Torch threads of pretraining on CPU (see torch_threads)."""
COPY_CHECK_STRINGS = 32
"""Held-out strings of the copy check at the end of pretraining."""
PAD, UNK, IM_START, IM_END = "<|pad|>", "<|unk|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (PAD, UNK, IM_START, IM_END)
EXTRA_CHARACTERS = "\n"
"""Characters the chat template adds that ALPHABET lacks; one token each too."""
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""ChatML: <|im_start|>role\\ncontent<|im_end|>\\n per turn; the generation prompt opens an assistant turn."""
INSTRUCTION_WORDS = (
    "please", "now", "the", "this", "string", "text", "input", "letters", "characters", "numbers", "word",
    "repeat", "copy", "echo", "write", "say", "return", "give", "show", "print", "read", "take", "keep",
    "reverse", "uppercase", "sort", "add", "shift", "count", "convert", "each", "letter", "by", "to", "then",
    "two", "a", "3", "it", "back", "again", "exactly", "same",
)
"""Words of the pretraining instructions; the task words are among them, so none of them predicts anything
but a copy."""


@dataclass(frozen=True)
class BackboneConfig:
    """Sizes of the suite's Llama backbone and how it is pretrained."""

    hidden_size: int = 64
    """Model width."""
    num_layers: int = 2
    """Decoder layers. NOTE: on the 2-core CPU budget, 4 layers of width 64 learned to copy as well in
    twice the time, but rank-8 modules then learned the tasks worse in the same number of steps."""
    num_heads: int = 4
    """Attention (query) heads; head_dim = hidden_size / num_heads."""
    num_kv_heads: int = 2
    """Key/value heads (grouped-query attention when fewer than num_heads)."""
    intermediate_size: int = 128
    """SwiGLU MLP width."""
    max_position_embeddings: int = 256
    """Context length the model is configured for (RoPE); pretraining uses at most seq_len."""
    steps: int = 1250
    """Pretraining optimiser steps. NOTE: copying appears abruptly: with the defaults the held-out copy
    exact match was 0.09 after 500 steps, 0.77 after 1000 and 0.98 after 1250."""
    batch_size: int = 32
    """Sequences per pretraining step."""
    learning_rate: float = 5e-3
    """Peak AdamW learning rate (warm-up over the first 5% of steps, constant, then linear decay to 10% over
    the last 20%: the copy ability appears late, so the rate stays high until then)."""
    seq_len: int = 64
    """Longest pretraining sequence in tokens (longer ones are cut); fits a copy conversation of
    max_string_len characters."""
    max_string_len: int = 12
    """Longest random string in a copy conversation, in characters; cover the suite's input and answer
    lengths (SuiteConfig.max_len) so copying generalises to them."""
    instruction_words: int = 3
    """Most words in a pretraining instruction (each copy conversation draws 1 to this many). NOTE: a composite's
    prompt names both instructions ("shift each letter by 3, then convert to uppercase": 9 words), longer than
    any 3-word instruction, so on "small" (kept at 3: its recorded results) the composite prompt is outside what
    the backbone learned to copy after. A "small" pretrained with up to 9 words and seq_len 128 needed 2000 steps
    (152 s on 2 cores) to copy 97% of held-out strings; 1250 steps at seq_len 64, which cuts long instructions,
    copied 9%. "full" covers the composites (training.suite.tasks.instruction_words)."""
    comma_share: float = 0.0
    """Share of the gaps between instruction words written ", " instead of " " (composite prompts join their
    instructions with ", then "); 0 draws nothing, so the pretraining stream of a config without commas is
    unchanged."""
    copy_share: float = 1.0
    """Share of pretraining sequences that are copy conversations; the rest are raw repeated strings. 1 on
    CPU, where the copy ability must appear within about a minute and every copy conversation counts
    towards it (an early, not controlled, trial with 10% raw strings copied 0.41 of held-out strings after
    1500 steps); "full" mixes in raw strings."""
    seed: int = 0
    """Seeds the weights and the pretraining data."""

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                     "max_position_embeddings", "steps", "batch_size", "seq_len", "max_string_len",
                     "instruction_words"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"BackboneConfig.{name} must be an integer >= 1, got {value!r}")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"BackboneConfig: hidden_size ({self.hidden_size}) must be divisible by num_heads "
                             f"({self.num_heads}), and num_heads by num_kv_heads ({self.num_kv_heads})")
        if self.seq_len > self.max_position_embeddings:
            raise ValueError(f"BackboneConfig.seq_len ({self.seq_len}) exceeds max_position_embeddings "
                             f"({self.max_position_embeddings})")
        if not 0 <= self.copy_share <= 1 or not 0 <= self.comma_share <= 1 or not 0 < self.learning_rate < 1:
            raise ValueError(f"BackboneConfig: copy_share and comma_share must be in [0, 1] and learning_rate in "
                             f"(0, 1), got {self.copy_share!r}, {self.comma_share!r} and {self.learning_rate!r}")


SETTINGS: dict[str, BackboneConfig] = {
    "tiny": BackboneConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64,
                           steps=120, batch_size=16),
    "small": BackboneConfig(),
    "full": BackboneConfig(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, intermediate_size=1536,
                           max_position_embeddings=1024, steps=4000, batch_size=64, learning_rate=1e-3,
                           seq_len=192, max_string_len=32, copy_share=0.8, instruction_words=9, comma_share=0.15),
}
"""Named backbones: "tiny" for tests (pretrains in seconds, does not learn to copy), "small" for the demo
and the quality suite on CPU (about a minute on 2 cores), "full" for one GPU."""


def write_char_tokenizer(path: str | Path) -> None:
    """Save (save_pretrained) a tokenizer with one token per ALPHABET character and per template character,
    the SPECIAL_TOKENS, and the ChatML CHAT_TEMPLATE; eos is <|im_end|>, pad <|pad|>, unknown characters
    map to <|unk|>."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    symbols = list(SPECIAL_TOKENS) + list(EXTRA_CHARACTERS) + list(ALPHABET)
    model = Tokenizer(models.WordLevel(vocab={s: i for i, s in enumerate(symbols)}, unk_token=UNK))
    model.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    model.decoder = decoders.Fuse()
    model.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=model, pad_token=PAD, unk_token=UNK, eos_token=IM_END,
                                        chat_template=CHAT_TEMPLATE)
    tokenizer.save_pretrained(str(path))


def random_string(rng: random.Random, length: int) -> str:
    """A random string of `length` characters (at least 1) in one of the suite's input styles."""
    length = max(length, 1)
    style = rng.randrange(6)
    if style == 4 and length >= 3:  # a sum-like pair of numbers
        left = rng.randint(1, length - 2)
        return "".join(rng.choice(string.digits) for _ in range(left)) + "+" + "".join(
            rng.choice(string.digits) for _ in range(length - left - 1))
    pools = (string.ascii_lowercase, string.ascii_lowercase + string.digits, string.ascii_uppercase,
             string.ascii_lowercase + " ", string.digits, ALPHABET)
    text = "".join(rng.choice(pools[style % len(pools)]) for _ in range(length))
    return text if text.strip() else "x" * length


def pretraining_text(rng: random.Random, config: BackboneConfig) -> tuple[str, str]:
    """One pretraining sequence (module docstring) as (context, target): the loss is on the target only.

    A copy conversation's context is the user turn and the assistant turn's header, its target the echoed
    string and the end of the turn; raw strings have no context.
    """
    if rng.random() < config.copy_share:
        words = [rng.choice(INSTRUCTION_WORDS) for _ in range(rng.randint(1, config.instruction_words))]
        instruction = words[0]
        for word in words[1:]:
            instruction += (", " if config.comma_share and rng.random() < config.comma_share else " ") + word
        text = random_string(rng, rng.randint(1, config.max_string_len))
        return f"{IM_START}user\n{instruction}: {text}{IM_END}\n{IM_START}assistant\n", f"{text}{IM_END}\n"
    pieces, size = [], 0
    while size < config.seq_len:
        piece = random_string(rng, rng.randint(2, config.max_string_len))
        pieces += [piece, piece]
        size += 2 * len(piece) + 2
    return "", " ".join(pieces)[: config.seq_len]


def _batch(tokenizer, rng: random.Random, config: BackboneConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) [batch, seq] of one pretraining step; labels are -100 on context and padding."""
    rows = []
    for _ in range(config.batch_size):
        context, target = (tokenizer(part, add_special_tokens=False)["input_ids"]
                           for part in pretraining_text(rng, config))
        rows.append(((context + target)[: config.seq_len], ([-100] * len(context) + target)[: config.seq_len]))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)  # [batch, seq]
    labels = torch.full((len(rows), width), -100, dtype=torch.long)  # [batch, seq]
    for index, (ids, row_labels) in enumerate(rows):
        input_ids[index, : len(ids)] = torch.tensor(ids)
        labels[index, : len(ids)] = torch.tensor(row_labels)
    return input_ids, labels


def _learning_rate(step: int, config: BackboneConfig) -> float:
    """Linear warm-up over the first 5% of steps, constant, then linear decay to 10% over the last 20%."""
    warmup, decay_from = max(1, config.steps // 20), int(config.steps * 0.8)
    if step < warmup:
        return config.learning_rate * (step + 1) / warmup
    if step < decay_from:
        return config.learning_rate
    return config.learning_rate * (1 - 0.9 * (step - decay_from) / max(1, config.steps - decay_from))


def _build_model(tokenizer, config: BackboneConfig):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, head_dim=config.hidden_size // config.num_heads,
        max_position_embeddings=config.max_position_embeddings, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(config.seed)
    return LlamaForCausalLM(hf_config)


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block on `count` torch intra-op threads, restoring the previous number afterwards.

    NOTE: pretraining the small backbone on the shared 2-core machine took 52 s on one thread and 158 s on
    two (OpenMP workers of a tiny model wait on each other when any other process runs); on an idle machine
    two threads were about 25% faster. Small models on CPU therefore train on one thread.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _pretrain(model, tokenizer, config: BackboneConfig, device: torch.device, progress: bool) -> list[float]:
    """Run the pretraining steps on `model` in place; the loss of every step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.01)
    rng, losses = random.Random(f"suite-pretrain:{config.seed}"), []
    model.train()
    for step in tqdm(range(config.steps), disable=not progress, desc="pretrain", unit="step"):
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, config)
        input_ids, labels = _batch(tokenizer, rng, config)
        loss = model(input_ids=input_ids.to(device), labels=labels.to(device)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(round(loss.item(), 5))
    return losses


def copy_exact_match(model, tokenizer, config: BackboneConfig, count: int = COPY_CHECK_STRINGS) -> float:
    """Share of `count` held-out random strings (lengths up to max_string_len) that `model` echoes exactly
    when asked to repeat them, greedily."""
    from training.suite.evaluate import generate_answers

    rng = random.Random(f"suite-copy-check:{config.seed}")
    texts = [random_string(rng, rng.randint(1, config.max_string_len)) for _ in range(count)]
    replies = generate_answers(model.eval(), tokenizer, [f"repeat the string: {t}" for t in texts],
                               config.max_string_len + 2)
    return sum(reply == text for reply, text in zip(replies, texts)) / count


def pretrain_backbone(out: str | Path, config: BackboneConfig, progress: bool = False) -> Path:
    """Build a LlamaForCausalLM of `config`'s sizes, pretrain it (fp32; CUDA when available, else CPU on
    CPU_THREADS threads) on generic strings (module docstring) and save model (safetensors), tokenizer and
    PRETRAIN_RECORD to `out`.

    `out` is written in place; ensure_backbone is the atomic, cached way to get a backbone.
    """
    from transformers import AutoTokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_char_tokenizer(out)
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = _build_model(tokenizer, config).to(device)
    start = time.perf_counter()
    with torch_threads(CPU_THREADS if device.type == "cpu" else torch.get_num_threads()):
        losses = _pretrain(model, tokenizer, config, device, progress)
        seconds = time.perf_counter() - start
        model = model.eval().to("cpu")
        copy_match = copy_exact_match(model, tokenizer, config)
    model.save_pretrained(str(out))
    record = {"version": BACKBONE_VERSION, "config": asdict(config), "loss_history": losses,
              "seconds": round(seconds, 2), "device": device.type, "copy_exact_match": copy_match}
    (out / PRETRAIN_RECORD).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    logger.info("pretrained the suite backbone in %.0f s: loss %.3f -> %.3f (first/last 10 steps), held-out "
                "copy exact match %.2f", seconds, sum(losses[:10]) / len(losses[:10]),
                sum(losses[-10:]) / len(losses[-10:]), copy_match)
    return out


def config_hash(config: BackboneConfig) -> str:
    """12 hex digits identifying `config` and BACKBONE_VERSION (the cache key)."""
    payload = json.dumps({"version": BACKBONE_VERSION, "config": asdict(config)}, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:12]


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/tessera, or ~/.cache/tessera."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tessera"


def _complete(path: Path) -> bool:
    return all((path / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer.json",
                                                    PRETRAIN_RECORD))


def ensure_backbone(config: BackboneConfig | str, cache_dir: str | Path | None = None, progress: bool = False) -> Path:
    """The directory of the backbone pretrained with `config` (or SETTINGS[config] for a name), built on
    first use and reused after.

    It lives in `cache_dir` (default: default_cache_dir()) under suite-backbone-<config_hash>. The build
    happens in a temporary sibling renamed into place, so an entry is complete or absent; when two
    processes build at once the first rename wins and the other's build is dropped.
    """
    if isinstance(config, str):
        if config not in SETTINGS:
            raise ValueError(f"unknown backbone setting {config!r}; choose from {sorted(SETTINGS)}")
        config = SETTINGS[config]
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / f"suite-backbone-{config_hash(config)}"
    if _complete(target):
        logger.debug("reusing the suite backbone %s", target)
        return target
    logger.info("pretraining the suite backbone into %s (once; %d steps)", target, config.steps)
    return build_cache_entry(target, lambda staging: pretrain_backbone(staging, config, progress), _complete)
