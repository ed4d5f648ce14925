"""`TrainConfig`: every knob of `tessera train`, one documented field each.

The defaults are provisional: they are reasonable starting points for a 0.5B-8B Llama-family backbone
and a few thousand chat examples, and the sweeps in `benchmarks/quality` are what justify (or replace)
them. The CLI builds one flag per field from the docstrings below (training.cli).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from router.fingerprint import TARGETS

DTYPES = ("auto", "float32", "bfloat16", "float16")
LR_SCHEDULES = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class TrainConfig:
    """How a module library is trained on a frozen backbone (see training.trainer)."""

    num_modules: int = 8
    """N, modules in the bank. 8 lets top-2 compositions cover 28 pairs, plenty for tens of tasks."""
    rank: int = 8
    """r, the rank of every new module (A is [r, in], B is [out, r]). 8 is the common LoRA default.
    NOTE: suite, small setting (benchmarks/RESULTS.md): 4, 8 and 16 within the seed spread."""
    alpha: float = 16.0
    """LoRA alpha; a module's update is (alpha / r) * B A. alpha = 2r is the common LoRA default."""
    targets: tuple[str, ...] = TARGETS
    """Projections adapted in every layer when no placement is given (names of router.fingerprint.TARGETS).
    All seven by default: the placement search, not this default, is what narrows them. On a mixture-of-experts
    backbone (Mixtral, Qwen2-MoE, Qwen3-MoE) the default keeps the four attention projections; the experts stay frozen."""
    top_k: int = 2
    """Modules a task's composition keeps at export (ControllerSettings.top_k), and in the forward pass of
    training with straight_through. 2 keeps serving cost at two modules per request. NOTE: suite, small
    setting (benchmarks/RESULTS.md): 1, 2 and 3 within the seed spread."""
    gate_temperature: float = 1.0
    """T in gates = sigmoid(logits / T), in training and in the exported controller. 1 = plain sigmoid.
    NOTE: suite, small setting (benchmarks/RESULTS.md): 0.5, 1 and 2 within the seed spread."""
    gate_threshold: float = 0.05
    """Gates below this are dropped after top-k (ControllerSettings.threshold), in training with
    straight_through and at export. 0.05 drops modules a task barely uses. NOTE: suite, small setting
    (benchmarks/RESULTS.md): 0, 0.05 and 0.2 never bind there (kept top-2 gates stay above 0.35)."""
    straight_through: bool = True
    """True: the forward pass uses the exported gates (top-k, threshold, renormalised), so training sees
    exactly what is served, while gradients reach every gate through the soft sigmoid (straight-through
    estimator). False: soft sigmoid gates over all N modules in training (served top-k then differs)."""
    controller_init_std: float = 1.0
    """Std of the random initial gate logits, in logit units. 1 gives each task a different initial top-k,
    which breaks the symmetry between modules that all start at B = 0."""
    lambda_decouple: float = 0.01
    """Weight of the decoupling loss (squared cosines between module outputs; training.losses).
    NOTE: suite, small setting (benchmarks/RESULTS.md): 10x costs 6 points of test exact match; 0.1x and 0
    are within the seed spread of the default."""
    lambda_align: float = 0.1
    """Weight of the alignment loss (KL from the composed model to one sampled module alone); 0 skips its
    extra forward pass. NOTE: suite, small setting (benchmarks/RESULTS.md): 0.1x and 10x each lose 10 points
    of test and validation exact match, the clearest optimum of the four weights."""
    lambda_sparse: float = 0.001
    """Weight of the sparsity loss (mean insertion gate); pushes unneeded insertion points to zero.
    NOTE: suite, small setting (benchmarks/RESULTS.md): flat within the seed spread from 0.1x to 10x."""
    lambda_prior: float = 0.001
    """Weight of the task-relation prior (related tasks get similar gate vectors).
    NOTE: suite, small setting (benchmarks/RESULTS.md): 0 loses 5 points; 0.1x-10x within the seed spread
    (10x over three seeds: the default's mean)."""
    relation_batches: int = 2
    """Batches per task used to estimate the task-relation matrix R from gradient similarity, when R is
    not given. 2 is enough for a cosine between mean gradients on small data; more costs one
    forward/backward each."""
    insertion_gate_init: float = 0.9
    """Initial value (in (0, 1)) of every insertion gate sigmoid(logit). 0.9 starts nearly open, so points
    are pruned only when the sparsity loss wins over the task loss."""
    prune_threshold: float = 0.1
    """At export, insertion points whose gate is below this are removed from the library (per point, see
    training.export); 0 disables pruning."""
    placement: str = "all"
    """Where modules go when no points are given: `all` (every layer x `targets`), `search` (the
    gradient-clustering placement search of training.placement, under `placement_budget`) or `random`
    (seeded random points under the same budget: the control the search is measured against)."""
    placement_budget: float = 0.25
    """With placement search or random: the share (0, 1] of the all-points parameter cost the chosen points
    may use."""
    text_router: bool = True
    """Fit a text router (training.text_router) on each example's first user message, so untagged (`auto`)
    requests are routed; needs two or more tasks with two or more examples each."""
    learning_rate: float = 1e-4
    """AdamW learning rate of the module weights A and B. 1e-4 is the common LoRA rate. NOTE: not what the
    suite's small backbone (64 wide, 2 layers) wants: after 1000 steps 1e-4 reaches 4.7% and 3e-3 38.7% mean
    exact match (benchmarks/RESULTS.md, the quality setting uses 3e-3); kept for 0.5B-8B backbones until the
    full setting measures a larger one."""
    gate_learning_rate: float = 5e-3
    """AdamW learning rate of the controller logits and insertion-gate logits; logits must move by O(1),
    so they get a larger rate than the weights."""
    weight_decay: float = 0.0
    """AdamW weight decay of the module weights (never of logits). 0, the common LoRA default."""
    module_dropout: float = 0.0
    """Dropout on every module's input in training forwards (PEFT's lora_dropout: the modules' branch only, the
    backbone sees its input whole; never at evaluation or serving). 0 draws nothing, so training is bit-identical
    to a run without the option. Masks are seeded by (seed, step, the row's place in the batch, the point), so
    resume, micro-batches and checkpointing keep every mask. NOTE: suite, small setting (benchmarks/RESULTS.md):
    0.05, 0.1 and 0.2 over three training seeds gain nothing on validation (40.0 at 0, 34.7-39.6 with dropout), so
    the default is off; PEFT's users set 0.05-0.1 against overfitting small datasets over several epochs."""
    steps: int = 1000
    """Optimiser steps. Data is walked in seeded shuffled epochs, so steps * batch_size / examples epochs."""
    batch_size: int = 8
    """Examples per optimiser step."""
    task_sampling_temperature: float = 1.0
    """How each step's rows are drawn across tasks. 1: examples uniformly, in seeded shuffled epochs (each example
    once per epoch), so a task's share of the rows is its share of the data. T != 1: every row first draws a task
    with probability proportional to (its examples)^(1/T), then one of that task's examples (seeded by the step,
    with replacement): above 1 small tasks are seen more often (large T approaches the same share for every task),
    below 1 large tasks dominate. The temperature of multi-task mixtures (as in T5's training). NOTE: suite, small
    setting, with three tasks cut to 40 training items against 400, three training seeds (benchmarks/RESULTS.md):
    mean test exact match 9.2% at 1, 12.9% at 2, 18.2% at 3, 17.2% at 10 (validation 10.4-16.2%), the small tasks
    gaining most; 3 beat 1 in every seed, 10 did not. 1 stays the default, as for balanced data the share of every
    task is its share of the data either way."""
    micro_batch_size: int | None = None
    """Examples per forward and backward pass; a step accumulates the gradients of batch_size / micro_batch_size
    passes (the last may be smaller). A memory knob that leaves the training math as it is: the task and alignment
    losses are weighted by each pass's share of their tokens, so they equal the whole batch's, and only the
    decoupling loss, a cosine over the tokens of one pass, is taken per pass and averaged. The gradient passes of
    the placement search and of the relation estimate are cut the same way. None: one pass of batch_size. Not part
    of the run's signature, so a run may resume with another micro-batch size."""
    gradient_checkpointing: bool = False
    """Keep only each decoder layer's input in the forward pass and recompute the layer in the backward pass
    (activation checkpointing), with the gates the forward pass used: about one more forward's compute for the
    activation memory of one layer instead of all. For long sequences on a large backbone. Not part of the run's
    signature."""
    lr_schedule: str = "cosine"
    """How every learning rate moves over the steps after warmup: `constant`, `linear` (falling in a straight line
    towards 0 at the end of the run) or `cosine` (along half a cosine towards 0), as transformers' schedules of
    those names (training.step.lr_factor). NOTE: suite, small setting, three training seeds (benchmarks/RESULTS.md):
    mean validation exact match constant 40.0%, cosine 41.8%, cosine after a 5% warmup 44.2% (test 39.6%, 43.9%,
    41.9%); cosine beat constant on test in all three seeds, the warmup on validation in two. So the default is cosine
    after warmup_ratio's warmup, PEFT's and transformers' common recipe. The recorded quality tables train at a
    constant rate, as their baselines do (benchmarks.quality.config.QualityConfig.train)."""
    warmup_steps: int = 0
    """Steps over which every learning rate rises linearly to its value (step i of the warmup uses (i + 1) /
    warmup_steps of it), before lr_schedule applies. 0: warmup_ratio decides."""
    warmup_ratio: float = 0.05
    """Share of `steps` to warm up over when warmup_steps is 0 (rounded; transformers' warmup_ratio); 0: no
    warmup. See lr_schedule's NOTE."""
    max_grad_norm: float = 0.0
    """Clip the global norm of all trainable gradients (modules, gates, controller) to this before each update,
    as transformers' Trainer does with 1.0; 0 turns clipping off. The norm before clipping is reported."""
    max_seq_len: int = 1024
    """Tokens kept per example; longer conversations are cut at the end (training.data.encode)."""
    seed: int = 0
    """Seeds module and controller init, data order and the alignment's module sample."""
    checkpoint_every: int = 100
    """Steps between checkpoints in the sibling directory OUT.ckpt; a rerun resumes from the last one."""
    stop_after_steps: int | None = None
    """Stop (after writing a checkpoint) once this many steps are done, without exporting: a planned
    preemption. None runs to the end."""
    device: str = "auto"
    """Torch device: auto (cuda when available, else cpu), cpu, cuda or cuda:N."""
    dtype: str = "auto"
    """Backbone dtype: auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16 or float16. Module,
    gate and controller parameters are always float32."""
    train_modules: bool = True
    """False: keep every module's weights frozen and train the controller only (with --init-library over
    imported modules, e.g. PEFT adapters)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))
        positive_ints = ("num_modules", "rank", "top_k", "steps", "batch_size", "max_seq_len",
                         "checkpoint_every", "relation_batches")
        for name in positive_ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be an integer >= 1, got {value!r}")
        for name in ("alpha", "gate_temperature", "learning_rate", "gate_learning_rate", "task_sampling_temperature"):
            self._check_float(name, low=0.0, low_open=True)
        for name in ("lambda_decouple", "lambda_align", "lambda_sparse", "lambda_prior", "weight_decay",
                     "controller_init_std"):
            self._check_float(name, low=0.0)
        self._check_float("gate_threshold", low=0.0, high=1.0)
        self._check_float("prune_threshold", low=0.0, high=1.0)
        self._check_float("insertion_gate_init", low=0.0, high=1.0, low_open=True)
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
            raise ValueError(f"TrainConfig.targets must be distinct names from {TARGETS}, got {list(self.targets)}")
        if self.stop_after_steps is not None and (isinstance(self.stop_after_steps, bool) or self.stop_after_steps < 1):
            raise ValueError(f"TrainConfig.stop_after_steps must be None or >= 1, got {self.stop_after_steps!r}")
        if self.micro_batch_size is not None and (isinstance(self.micro_batch_size, bool)
                                                  or not isinstance(self.micro_batch_size, int)
                                                  or not 1 <= self.micro_batch_size <= self.batch_size):
            raise ValueError(f"TrainConfig.micro_batch_size must be None or an integer in [1, batch_size="
                             f"{self.batch_size}], got {self.micro_batch_size!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"TrainConfig.warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"TrainConfig.lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        self._check_float("max_grad_norm", low=0.0)
        self._check_float("warmup_ratio", low=0.0, high=1.0)
        self._check_float("module_dropout", low=0.0, high=1.0)
        if self.placement not in ("all", "search", "random"):
            raise ValueError(f"TrainConfig.placement must be all, search or random, got {self.placement!r}")
        self._check_float("placement_budget", low=0.0, high=1.0 + 1e-9, low_open=True)
        if self.dtype not in DTYPES:
            raise ValueError(f"TrainConfig.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"TrainConfig.device must be auto, cpu, cuda or cuda:N, got {self.device!r}")

    @property
    def warmup(self) -> int:
        """Warmup steps in effect: warmup_steps, else warmup_ratio of the steps (rounded)."""
        return self.warmup_steps or round(self.warmup_ratio * self.steps)

    @property
    def pass_rows(self) -> int:
        """Rows one forward pass holds at most: micro_batch_size, else batch_size."""
        return self.micro_batch_size or self.batch_size

    def _check_float(self, name: str, low: float, high: float = math.inf, low_open: bool = False) -> None:
        value = getattr(self, name)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or value < low or (low_open and value == low) or value >= high:
            bound = f"({low}, {high})" if low_open else f"[{low}, {high})"
            raise ValueError(f"TrainConfig.{name} must be a finite number in {bound}, got {value!r}")
