"""The step's memory and optimisation options on the tiny Llama: micro-batches and activation checkpointing
train what one whole pass trains, the learning-rate schedules, gradient clipping, held-out evaluation, and their
errors."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from router.library import ModuleLibrary
from tests.training.conftest import two_task_examples
from training.checkpoint import checkpoint_dir
from training.config import TrainConfig
from training.data import DataError, Example, collate
from training.losses import task_loss
from training.step import StepRunner, lr_factor
from training.trainer import Trainer, train_library

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _trained(model_dir, examples, config) -> tuple[dict[str, torch.Tensor], tuple[float, ...]]:
    trainer = Trainer(model_dir, examples, config)
    steps = [StepRunner(trainer, torch.zeros(2, 2)).step(step)[0]["task"] for step in range(config.steps)]
    return {name: p.detach().clone() for name, p in trainer.parameters_by_name().items()}, tuple(steps)


@pytest.mark.parametrize("architecture", ["llama", "mistral", "qwen2", "qwen3"])
def test_activation_checkpointing_trains_bit_for_bit_what_the_plain_forward_trains(tiny_checkpoints, architecture,
                                                                                  examples, small_config):
    model_dir = tiny_checkpoints(architecture)
    config = dataclasses.replace(small_config, steps=3)  # every loss term on: decoupling sees u in the reruns too
    plain, plain_losses = _trained(model_dir, examples, config)
    rerun, rerun_losses = _trained(model_dir, examples, dataclasses.replace(config, gradient_checkpointing=True))
    assert rerun_losses == plain_losses
    for name, tensor in plain.items():
        assert torch.equal(rerun[name], tensor), name


def test_activation_checkpointing_keeps_only_the_layers_inputs(tiny_llama, examples, small_config):
    def saved_bytes(config) -> int:
        trainer = Trainer(tiny_llama, examples, config)
        batch = trainer.batch(list(range(4)))
        total = 0

        def pack(tensor):
            nonlocal total
            total += tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            with trainer.bank.gating(trainer.controller(batch["task_ids"])):
                trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return total

    plain = saved_bytes(dataclasses.replace(small_config, lambda_decouple=0.0))
    checkpointed = saved_bytes(dataclasses.replace(small_config, lambda_decouple=0.0, gradient_checkpointing=True))
    assert 0 < checkpointed < plain / 2, (checkpointed, plain)


def test_micro_batches_add_up_to_the_whole_batch(tiny_llama, examples, small_config):
    config = dataclasses.replace(small_config, steps=3, lambda_decouple=0.0)  # decoupling is per pass (documented)
    whole, whole_losses = _trained(tiny_llama, examples, config)
    for size in (1, 3):
        parts, parts_losses = _trained(tiny_llama, examples, dataclasses.replace(config, micro_batch_size=size))
        assert parts_losses == pytest.approx(whole_losses, rel=1e-5)
        for name, tensor in whole.items():
            torch.testing.assert_close(parts[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_a_run_resumes_with_another_micro_batch_size_and_checkpointing(tiny_llama, examples, small_config, tmp_path):
    out = tmp_path / "lib"
    stopped = train_library(tiny_llama, examples, out, dataclasses.replace(small_config, stop_after_steps=2,
                                                                           micro_batch_size=2), progress=False)
    assert stopped.steps == 2 and checkpoint_dir(out).is_dir()
    resumed = train_library(tiny_llama, examples, out, dataclasses.replace(small_config, gradient_checkpointing=True),
                            progress=False)
    assert resumed.finished and resumed.resumed_from == 2 and resumed.path == out


def test_learning_rate_schedules():
    def factors(**fields):
        config = TrainConfig(steps=10, **fields)
        return [lr_factor(config, step) for step in range(10)]

    assert factors(lr_schedule="constant", warmup_ratio=0.0) == [1.0] * 10
    assert factors(lr_schedule="constant", warmup_steps=4) == [0.25, 0.5, 0.75] + [1.0] * 7
    assert factors(lr_schedule="linear", warmup_steps=2) == pytest.approx([0.5, 1.0] + [1 - i / 8 for i in range(8)])
    assert factors(lr_schedule="constant", warmup_ratio=0.2) == [0.5, 1.0] + [1.0] * 8  # 20% of 10 steps
    assert factors(lr_schedule="constant", warmup_ratio=0.2, warmup_steps=4)[:4] == [0.25, 0.5, 0.75, 1.0]  # steps win
    default = TrainConfig(steps=1000)  # cosine after a 5% warmup
    assert default.warmup == 50 and lr_factor(default, 24) == 0.5 and lr_factor(default, 50) == 1.0
    assert lr_factor(default, 525) == pytest.approx(0.5) and lr_factor(default, 999) < 1e-4
    assert TrainConfig(steps=8).warmup == 0  # 5% of 8 rounds to none
    cosine = factors(lr_schedule="cosine", warmup_ratio=0.0)
    assert cosine == pytest.approx([0.5 * (1 + math.cos(math.pi * i / 10)) for i in range(10)])
    assert cosine[0] == 1.0 and all(a > b > 0 for a, b in zip(cosine, cosine[1:]))


def test_every_learning_rate_follows_the_schedule(tiny_llama, examples, small_config):
    config = dataclasses.replace(small_config, steps=4, warmup_steps=2, lr_schedule="cosine")
    trainer = Trainer(tiny_llama, examples, config)
    runner = StepRunner(trainer, torch.zeros(2, 2))
    for step in range(4):
        runner.step(step)
        gates, modules = trainer.optimizer.param_groups
        assert gates["lr"] == pytest.approx(config.gate_learning_rate * lr_factor(config, step))
        assert modules["lr"] == pytest.approx(config.learning_rate * lr_factor(config, step))
    assert modules["lr"] == pytest.approx(config.learning_rate * 0.5 * (1 + math.cos(math.pi / 2)))


def test_gradients_are_clipped_to_max_grad_norm(tiny_llama, examples, small_config):
    trainer = Trainer(tiny_llama, examples, dataclasses.replace(small_config, max_grad_norm=0.05))
    runner = StepRunner(trainer, torch.zeros(2, 2))
    runner.step(0)
    grads = [p.grad for group in trainer.optimizer.param_groups for p in group["params"] if p.grad is not None]
    assert runner.grad_norm > 0.05
    assert float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) == \
        pytest.approx(0.05, rel=1e-4)
    unclipped = StepRunner(Trainer(tiny_llama, examples, small_config), torch.zeros(2, 2))
    unclipped.step(0)
    assert unclipped.grad_norm is None


@pytest.mark.parametrize(("fields", "message"), [
    ({"micro_batch_size": 0}, r"micro_batch_size must be None or an integer in \[1, batch_size=8\], got 0"),
    ({"micro_batch_size": 9}, r"micro_batch_size must be None or an integer in \[1, batch_size=8\], got 9"),
    ({"warmup_steps": -1}, "warmup_steps must be an integer >= 0, got -1"),
    ({"lr_schedule": "step"}, "lr_schedule must be one of constant, linear, cosine, got 'step'"),
    ({"max_grad_norm": -1.0}, "max_grad_norm must be a finite number in"),
])
def test_bad_options_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**fields)


def test_held_out_examples_are_scored_at_every_checkpoint_without_changing_the_training(
        trained_plain, tiny_llama, examples, small_config, tmp_path):
    held_out = two_task_examples(count=3, seed=7)
    report = train_library(tiny_llama, examples, tmp_path / "lib", small_config, progress=False, eval_examples=held_out)
    assert [step for step, _ in report.eval_history] == [2, 4, 6]
    for _, losses in report.eval_history:
        assert set(losses) == {"reverse", "upper", "mean"}
        assert losses["mean"] == pytest.approx((losses["reverse"] + losses["upper"]) / 2)
    assert report.eval_history[-1][1]["mean"] < report.eval_history[0][1]["mean"]
    reference, library = trained_plain
    assert report.task_loss_history == reference.task_loss_history
    again = ModuleLibrary.load(tmp_path / "lib")
    for key, tensor in ModuleLibrary.load(library).flat_tensors().items():
        assert torch.equal(again.flat_tensors()[key], tensor), key

    trainer = Trainer(tiny_llama, examples, small_config, eval_examples=held_out)  # step 0: the score by hand
    gates = trainer.controller.export_gates()
    for index, task in enumerate(["reverse", "upper"]):
        rows = [row for row, t in zip(trainer.eval_rows, trainer.eval_row_tasks) if t == index]
        batch = collate(rows, [index] * len(rows), trainer.tokenizer.pad_token_id or 0)
        with torch.no_grad(), trainer.bank.gating(gates[[index] * len(rows)]):
            logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        assert trainer.evaluate()[task] == pytest.approx(float(task_loss(logits, batch["labels"])), rel=1e-5)


def test_held_out_examples_of_an_untrained_task_are_refused(tiny_llama, examples, small_config):
    stranger = Example("sort", [{"role": "user", "content": "sort cba"}, {"role": "assistant", "content": "abc"}])
    with pytest.raises(DataError, match=r"evaluation example 2: task 'sort' is not trained in this run; the tasks are "
                                        r"\['reverse', 'upper'\]"):
        Trainer(tiny_llama, examples, small_config, eval_examples=[examples[0], stranger])


@pytest.fixture(scope="module")
def trained_plain(tiny_llama, examples, small_config, tmp_path_factory):
    """(report, library path) of small_config trained without evaluation examples."""
    out = tmp_path_factory.mktemp("plain") / "lib"
    return train_library(tiny_llama, examples, out, small_config, progress=False), out


def test_task_sampling_temperature_evens_out_an_imbalanced_mixture(tiny_llama, small_config):
    examples = two_task_examples(count=20)
    examples = [e for e in examples if e.task == "reverse"] + [e for e in examples if e.task == "upper"][:4]

    def upper_share(temperature: float) -> float:
        runner = StepRunner(Trainer(tiny_llama, examples, dataclasses.replace(
            small_config, task_sampling_temperature=temperature)), torch.zeros(2, 2))
        rows = [row for step in range(150) for row in runner.batch_indices(step)]
        assert runner.batch_indices(7) == runner.batch_indices(7)  # a function of the step: resumes draw the same
        tasks = runner.trainer.row_tasks
        return sum(tasks[row] == 1 for row in rows) / len(rows)

    assert upper_share(1.0) == pytest.approx(4 / 24)  # shuffled epochs: exactly the data's share
    assert upper_share(1e6) == pytest.approx(0.5, abs=0.06)  # every task alike
    assert 4 / 24 + 0.06 < upper_share(2.0) < 0.5 - 0.06  # sqrt of the sizes: 2 / (2 + sqrt(20)) = 0.31
    assert upper_share(0.5) < 4 / 24 - 0.06  # squares favour the large task: 16 / 416


def test_a_tenfold_imbalance_is_warned_about_under_uniform_sampling(tiny_llama, small_config, caplog):
    examples = two_task_examples(count=20)
    lopsided = [e for e in examples if e.task == "reverse"] + [e for e in examples if e.task == "upper"][:2]
    with caplog.at_level("WARNING", logger="training.trainer"):
        Trainer(tiny_llama, lopsided, small_config)
        Trainer(tiny_llama, lopsided, dataclasses.replace(small_config, task_sampling_temperature=3.0))
        Trainer(tiny_llama, examples, small_config)
    warnings = [r.getMessage() for r in caplog.records if "imbalanced" in r.getMessage()]
    assert warnings == ["the tasks are imbalanced (reverse: 20 examples, upper: 2); steps sample examples uniformly, "
                        "so small tasks are seen rarely: --task-sampling-temperature 3 samples them more often"]


def test_bad_task_sampling_temperature_is_refused():
    with pytest.raises(ValueError, match=r"task_sampling_temperature must be a finite number in \(0.0, inf\), got 0"):
        TrainConfig(task_sampling_temperature=0)


def test_no_forward_pass_holds_more_than_micro_batch_size_rows(tiny_llama, examples, small_config, monkeypatch):
    sizes = []
    batch = Trainer.batch

    def recorded(self, indices):
        sizes.append(len(indices))
        return batch(self, indices)

    monkeypatch.setattr(Trainer, "batch", recorded)
    config = dataclasses.replace(small_config, micro_batch_size=1, placement="search", placement_budget=0.5, steps=2)
    trainer = Trainer(tiny_llama, examples, config)  # the placement search's and the relation's gradient passes
    runner = StepRunner(trainer, trainer._relation())
    runner.step(0)
    assert sizes and max(sizes) == 1, sizes
    sizes.clear()
    Trainer(tiny_llama, examples, dataclasses.replace(config, micro_batch_size=None))._relation()
    assert max(sizes) == config.batch_size


def test_the_held_out_loss_scores_what_export_would_write(tiny_llama, examples, small_config):
    trainer = Trainer(tiny_llama, examples, small_config, eval_examples=two_task_examples(count=3, seed=7))
    with torch.no_grad():  # let half the points' insertion gates fall under prune_threshold (0.1)
        for adapter in trainer.bank.adapters[::2]:
            adapter.gate_logit.fill_(-3.0)  # sigmoid 0.047: still in the forward pass, pruned at export
        for adapter in trainer.bank.adapters:
            adapter.b.normal_(std=0.5)  # B = 0 at init would hide every module
    previewed, unpruned = trainer.evaluate(), trainer._evaluate()
    assert previewed != unpruned  # the pruned points matter to the loss
    assert all(torch.equal(a.col_keep, torch.ones_like(a.col_keep)) for a in trainer.bank.adapters)  # restored
    trainer.export()  # prunes the bank: it then computes what the library serves
    assert trainer.evaluate() == previewed


@pytest.mark.gpu
def test_training_on_cuda_in_bfloat16_with_every_memory_option(tiny_llama, examples, small_config, tmp_path):
    config = dataclasses.replace(small_config, device="cuda", dtype="auto", micro_batch_size=2, steps=4,
                                 lr_schedule="cosine", warmup_steps=1, max_grad_norm=1.0)
    plain = Trainer(tiny_llama, examples, config)
    assert plain.dtype == torch.bfloat16 and next(plain.model.parameters()).is_cuda
    checkpointed = Trainer(tiny_llama, examples, dataclasses.replace(config, gradient_checkpointing=True))
    for trainer in (plain, checkpointed):
        runner = StepRunner(trainer, trainer._relation().cuda())
        for step in range(config.steps):
            losses, _ = runner.step(step)
            assert all(math.isfinite(value) for value in losses.values()), losses
    for name, tensor in plain.parameters_by_name().items():  # close, not equal: CUDA's backward kernels may use atomics
        torch.testing.assert_close(checkpointed.parameters_by_name()[name], tensor, rtol=1e-2, atol=1e-3, msg=name)
    report = train_library(tiny_llama, examples, tmp_path / "lib", dataclasses.replace(config, gradient_checkpointing=True),
                           progress=False, eval_examples=two_task_examples(count=2, seed=7))
    assert report.finished and ModuleLibrary.load(report.path).modules and report.eval_history
