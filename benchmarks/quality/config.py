"""`QualityConfig`: one frozen config per benchmark setting (tiny, small, full), and what it implies for
the suite data (SuiteConfig) and for training (TrainConfig).

Every system is trained with the same data, batch size and learning rate; Tessera's regularisers are
TrainConfig's defaults (the sweeps are what would justify other values).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from training.config import TrainConfig
from training.suite.data import SuiteConfig

LORA_STEPS = ("equal_data", "equal_steps")


@dataclass(frozen=True)
class QualityConfig:
    """Sizes of one benchmark setting."""

    backbone: str
    """Suite backbone, a key of training.suite.backbone.SETTINGS (pretrained once, then cached)."""
    train_per_task: int
    """Training items per base task (SuiteConfig.train_per_task)."""
    test_per_task: int
    """Held-out test items per base and per composite task (SuiteConfig.test_per_task)."""
    val_per_task: int
    """Held-out validation items per base task, drawn from the training side of the split with another seed
    and never trained on; the learning rate is chosen on these, never on the test items."""
    min_len: int
    """Shortest task input in characters."""
    max_len: int
    """Longest task input in characters."""
    steps: int
    """Optimiser steps of Tessera, of every ablation and of the shared LoRA."""
    batch_size: int
    """Examples per optimiser step, every system."""
    learning_rate: float = 1e-4
    """AdamW rate of module (LoRA) weights, every system; TrainConfig's default unless validation says otherwise.
    NOTE: "small" uses 3e-3: after 1000 steps Tessera's mean validation exact match was 0.28 at 1e-3, 0.38 at
    3e-3 and 0.37 at 6e-3 (per-task LoRA 0.12 at 1e-3, 0.29 at 3e-3); 1e-4 is far too slow for 1000 steps
    on this backbone (the learning-rate sweep)."""
    num_modules: int = 8
    """Tessera's modules N."""
    rank: int = 8
    """Tessera's module rank R (alpha = 2R, TrainConfig's ratio; the LoRA baselines get the same alpha / r)."""
    noise: float = 0.0
    """Training-input noise of the main table (SuiteConfig.noise)."""
    max_seq_len: int = 128
    """Tokens kept per training example; the suite's conversations are far shorter."""
    lora_steps: str = "equal_data"
    """Steps of each per-task LoRA: `equal_data` trains each for steps / num_tasks (rounded up), so each task's
    data is seen as often as Tessera sees it and the family takes Tessera's total steps; `equal_steps` trains
    each for `steps` (num_tasks times the compute)."""
    answer_margin: int = 4
    """Generated tokens allowed beyond the longest reference answer (max_tokens), every system."""
    device: str = "auto"
    """Torch device for training and serving: auto (cuda when available, else cpu), cpu or cuda."""
    threads: int = 1
    """torch CPU threads. NOTE: on the shared 2-core machine a PEFT step of the small backbone took 0.11 s on
    one thread and 0.4-4 s on two (threads waiting on each other under load)."""
    sweep_modules: tuple[int, ...] = (2, 4, 6, 8)
    """Module counts N of the module-count sweep."""
    sweep_learning_rates: tuple[float, ...] = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3)
    """Learning rates of the learning-rate sweep."""
    sweep_noise: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3)
    """Training-input noise levels of the noise sweep."""
    sweep_max_len: tuple[int, ...] = (6, 10, 14)
    """Longest input lengths of the length sweep (training and test items drawn with max_len set to each)."""
    sweep_top_k: tuple[int, ...] = (1, 2, 3)
    """Modules per task composition (TrainConfig.top_k) of the top-k sweep."""
    sweep_ranks: tuple[int, ...] = (4, 8, 16)
    """Module ranks r of the rank sweep (alpha = 2r throughout; trainable parameters scale with r)."""
    sweep_gate_temperatures: tuple[float, ...] = (0.5, 1.0, 2.0)
    """Gate temperatures T (TrainConfig.gate_temperature) of the temperature sweep."""
    sweep_gate_thresholds: tuple[float, ...] = (0.0, 0.05, 0.2)
    """Gate thresholds (TrainConfig.gate_threshold) of the threshold sweep."""
    sweep_regulariser_scales: tuple[float, ...] = (0.1, 1.0, 10.0)
    """Multiples of TrainConfig's default weight tried for each regulariser (lambda_decouple, lambda_align,
    lambda_sparse, lambda_prior), one regulariser at a time; 0 is the main table's ablation of it."""
    sweep_placement_budgets: tuple[float, ...] = (0.25, 0.5, 1.0)
    """Placement sweep: shares (0, 1] of the every-point parameter cost the modules may use. Below 1 the
    gradient-clustering search (TrainConfig.placement "search", placement_budget) chooses the points; 1 is every
    point (placement "all", TrainConfig's default: at the whole budget there is nothing to choose)."""
    sweep_seeds: tuple[int, ...] = (0, 1, 2, 3)
    """Training seeds of the seed sweep (the data stays the run's): the spread every other sweep's differences
    are read against."""
    sweep_compute: tuple[int, ...] = (1, 3, 6)
    """Multiples of `steps` of the compute sweep, Tessera and per-task LoRA alike (6 with `equal_data` gives each
    per-task adapter `steps` steps, the equal-steps baseline's compute, and Tessera as much in all)."""
    sweep_task_sampling: tuple[float, ...] = (1.0, 2.0, 3.0, 10.0)
    """Task sampling temperatures (TrainConfig.task_sampling_temperature) of the task-sampling sweep, trained on an
    imbalanced mixture: `imbalanced_tasks` keep only `imbalanced_items` training items each."""
    imbalanced_tasks: tuple[str, ...] = ("uppercase", "caesar", "count")
    """Tasks cut to `imbalanced_items` training items in the task-sampling sweep (those the backbone learns best, so
    what they lose to the imbalance shows)."""
    imbalanced_items: int = 40
    """Training items each of `imbalanced_tasks` keeps in the task-sampling sweep (the others keep train_per_task)."""
    sweep_schedules: tuple[str, ...] = ("constant", "cosine", "cosine+warmup", "cosine+warmup+clip")
    """Points of the schedule sweep: a learning-rate schedule (TrainConfig.lr_schedule: constant, linear or cosine),
    optionally with "+warmup" (TrainConfig.warmup_steps: 5% of the steps) and "+clip" (TrainConfig.max_grad_norm
    1.0, transformers' Trainer's default); benchmarks.quality.sweeps.schedule_overrides."""
    sweep_module_dropouts: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2)
    """Points of the module-dropout sweep (TrainConfig.module_dropout; PEFT's lora_dropout, commonly 0.05-0.1)."""
    sweep_baseline: bool = True
    """Also train and evaluate per-task LoRA at every point of the noise and length sweeps."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "sweep_modules", tuple(self.sweep_modules))
        object.__setattr__(self, "sweep_learning_rates", tuple(self.sweep_learning_rates))
        object.__setattr__(self, "sweep_noise", tuple(self.sweep_noise))
        object.__setattr__(self, "sweep_max_len", tuple(self.sweep_max_len))
        object.__setattr__(self, "sweep_regulariser_scales", tuple(self.sweep_regulariser_scales))
        for name in ("sweep_top_k", "sweep_ranks", "sweep_gate_temperatures", "sweep_gate_thresholds",
                     "sweep_placement_budgets", "sweep_seeds", "sweep_compute", "sweep_schedules",
                     "sweep_task_sampling", "sweep_module_dropouts", "imbalanced_tasks"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("train_per_task", "test_per_task", "val_per_task", "steps", "batch_size", "num_modules",
                     "rank", "max_seq_len", "answer_margin", "threads", "imbalanced_items"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"QualityConfig.{name} must be an integer >= 1, got {value!r}")
        if self.lora_steps not in LORA_STEPS:
            raise ValueError(f"QualityConfig.lora_steps must be one of {LORA_STEPS}, got {self.lora_steps!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"QualityConfig.device must be auto, cpu or cuda, got {self.device!r}")
        if not self.sweep_modules or min(self.sweep_modules) < 1:
            raise ValueError(f"QualityConfig.sweep_modules must be counts >= 1, got {self.sweep_modules}")
        if not self.sweep_regulariser_scales or min(self.sweep_regulariser_scales) <= 0:
            raise ValueError("QualityConfig.sweep_regulariser_scales must be multiples > 0, "
                             f"got {self.sweep_regulariser_scales}")
        if not self.sweep_seeds or min(self.sweep_seeds) < 0:
            raise ValueError(f"QualityConfig.sweep_seeds must be seeds >= 0, got {self.sweep_seeds}")
        if not self.sweep_compute or not all(isinstance(m, int) and not isinstance(m, bool) and m >= 1
                                             for m in self.sweep_compute):
            raise ValueError(f"QualityConfig.sweep_compute must be integer multiples >= 1, got {self.sweep_compute}")
        if not self.sweep_placement_budgets or not all(0 < b <= 1 for b in self.sweep_placement_budgets):
            raise ValueError("QualityConfig.sweep_placement_budgets must be shares in (0, 1], "
                             f"got {self.sweep_placement_budgets}")
        from benchmarks.quality.sweeps import schedule_overrides

        for value in self.sweep_schedules or ("",):
            self.train(0, **schedule_overrides(value, self.steps))  # ValueError naming a bad point
        for temperature in self.sweep_task_sampling:
            self.train(0, task_sampling_temperature=temperature)
        for dropout in self.sweep_module_dropouts:
            self.train(0, module_dropout=dropout)
        from training.suite.tasks import TASKS

        unknown = [task for task in self.imbalanced_tasks if task not in TASKS]
        if unknown:
            raise ValueError(f"QualityConfig.imbalanced_tasks: unknown task {unknown[0]!r}; tasks are {sorted(TASKS)}")
        self.suite(0)  # SuiteConfig checks lengths and noise

    def suite(self, seed: int, **overrides) -> SuiteConfig:
        """The suite data config of this setting (overrides: noise, max_len for the sweeps)."""
        values = dict(train_per_task=self.train_per_task, test_per_task=self.test_per_task, min_len=self.min_len,
                      max_len=self.max_len, noise=self.noise, seed=seed)
        return SuiteConfig(**(values | overrides))

    def train(self, seed: int, **overrides) -> TrainConfig:
        """Tessera's TrainConfig: this setting's sizes, every regulariser at TrainConfig's default, and a constant
        learning rate without warmup: the rate the baselines' PEFT loops train at (benchmarks.quality.baselines), so
        the systems are compared at equal optimisation, and the rate every recorded table was trained with.
        TrainConfig's own default schedule (cosine after a warmup) comes from this benchmark's schedule sweep."""
        rank = overrides.pop("rank", self.rank)
        steps = overrides.pop("steps", self.steps)
        values = dict(num_modules=self.num_modules, rank=rank, alpha=2.0 * rank, steps=steps,
                      batch_size=self.batch_size, learning_rate=self.learning_rate, max_seq_len=self.max_seq_len,
                      seed=seed, checkpoint_every=steps, device=self.device, lr_schedule="constant", warmup_ratio=0.0)
        return TrainConfig(**(values | overrides))

    def replace(self, **changes) -> "QualityConfig":
        return dataclasses.replace(self, **changes)


ABLATIONS: dict[str, dict] = {
    "tessera_no_decouple": {"lambda_decouple": 0.0},
    "tessera_no_align": {"lambda_align": 0.0},
    "tessera_no_insertion_gates": {"lambda_sparse": 0.0, "prune_threshold": 0.0},
    "tessera_no_prior": {"lambda_prior": 0.0},
}
"""Ablation system name -> the TrainConfig fields it changes from Tessera's."""

SETTINGS: dict[str, QualityConfig] = {
    "tiny": QualityConfig(backbone="tiny", train_per_task=16, test_per_task=4, val_per_task=2, min_len=3, max_len=5,
                          steps=6, batch_size=4, learning_rate=1e-3, num_modules=4, rank=2, max_seq_len=96,
                          threads=1, sweep_modules=(2, 4), sweep_learning_rates=(1e-3, 3e-3), sweep_noise=(0.0, 0.2),
                          sweep_max_len=(4, 5), sweep_regulariser_scales=(1.0, 10.0),
                          sweep_top_k=(1, 2), sweep_ranks=(2, 4), sweep_gate_temperatures=(1.0, 2.0),
                          sweep_gate_thresholds=(0.05, 0.2), sweep_placement_budgets=(0.5, 1.0), sweep_schedules=("constant", "cosine+warmup+clip"),
                          sweep_task_sampling=(1.0, 3.0), imbalanced_items=4, sweep_module_dropouts=(0.0, 0.1),
                          sweep_seeds=(0, 1), sweep_compute=(1, 2)),
    "small": QualityConfig(backbone="small", train_per_task=400, test_per_task=50, val_per_task=25, min_len=3,
                           max_len=8, steps=1000, batch_size=16, learning_rate=3e-3, sweep_max_len=(5, 8, 11)),
    "full": QualityConfig(backbone="full", train_per_task=2000, test_per_task=200, val_per_task=100, min_len=3,
                          max_len=16, steps=4000, batch_size=32, learning_rate=1e-3, num_modules=8, rank=16,
                          max_seq_len=256, sweep_max_len=(8, 16, 24)),
}
"""The benchmark settings: "tiny" for the test (under a minute), "small" the CPU result, "full" one GPU (not yet
run: its learning rate is a guess for the larger backbone, to be checked on validation like small's)."""
