"""Module dropout (TrainConfig.module_dropout, PEFT's lora_dropout): the masks it draws, and that it stays a pure
function of (seed, step, row place, point) through micro-batches, activation checkpointing and resume."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from training.checkpoint import checkpoint_dir
from training.config import TrainConfig
from training.modules import Dropout
from training.trainer import train_library
from tests.training.test_step_options import _trained

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def test_masks_drop_p_of_the_real_positions_and_scale_the_rest():
    x = torch.randn(3, 40, 64) + 5.0  # [batch, seq, in], no zeros of its own
    dropout = Dropout(0.25, (11, 12, 11), (40, 17, 40))
    out = dropout.apply(x, point=3)
    kept = out != 0
    assert kept[1, 17:].all()  # padding is never dropped (and never read)
    real = torch.cat([kept[0].flatten(), kept[1, :17].flatten(), kept[2].flatten()])
    assert abs(real.float().mean().item() - 0.75) < 0.03
    torch.testing.assert_close(out[kept], x[kept] / 0.75)
    assert torch.equal(kept[0], kept[2])  # the same row seed draws the same mask
    assert not torch.equal(kept[0], dropout.apply(x, point=4) != 0)  # another point, another mask
    assert torch.equal(out, dropout.apply(x, point=3))  # a rerun draws what the first run drew
    less_padding = Dropout(0.25, (12,), (17,)).apply(x[1:2, :20], point=3)  # the row in a narrower batch
    assert torch.equal(less_padding[0, :17] != 0, kept[1, :17])


def test_dropout_changes_the_training_and_zero_is_the_plain_run(tiny_llama, examples, small_config):
    config = dataclasses.replace(small_config, steps=3)
    plain, plain_losses = _trained(tiny_llama, examples, config)
    zero, zero_losses = _trained(tiny_llama, examples, dataclasses.replace(config, module_dropout=0.0))
    assert zero_losses == plain_losses and all(torch.equal(zero[n], t) for n, t in plain.items())
    dropped, dropped_losses = _trained(tiny_llama, examples, dataclasses.replace(config, module_dropout=0.3))
    assert dropped_losses[0] == plain_losses[0]  # B starts at 0: the first forward's modules add nothing either way
    assert dropped_losses[1:] != plain_losses[1:]
    assert all(torch.isfinite(torch.tensor(dropped_losses)))
    assert any(not torch.equal(dropped[n], t) for n, t in plain.items())


def test_micro_batches_and_checkpointing_draw_the_same_masks(tiny_llama, examples, small_config):
    config = dataclasses.replace(small_config, steps=3, module_dropout=0.2, lambda_decouple=0.0)
    whole, whole_losses = _trained(tiny_llama, examples, config)
    parts, parts_losses = _trained(tiny_llama, examples, dataclasses.replace(config, micro_batch_size=3))
    assert parts_losses == pytest.approx(whole_losses, rel=1e-5)
    for name, tensor in whole.items():
        torch.testing.assert_close(parts[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    checkpointed = dataclasses.replace(config, lambda_decouple=small_config.lambda_decouple)
    plain, plain_losses = _trained(tiny_llama, examples, checkpointed)
    rerun, rerun_losses = _trained(tiny_llama, examples, dataclasses.replace(checkpointed, gradient_checkpointing=True))
    assert rerun_losses == plain_losses
    for name, tensor in plain.items():
        assert torch.equal(rerun[name], tensor), name


def test_a_resumed_run_draws_the_uninterrupted_runs_masks(tiny_llama, examples, small_config, tmp_path):
    config = dataclasses.replace(small_config, module_dropout=0.2, text_router=False)
    whole = train_library(tiny_llama, examples, tmp_path / "whole", config, progress=False)
    stopped = train_library(tiny_llama, examples, tmp_path / "cut", dataclasses.replace(config, stop_after_steps=3),
                            progress=False)
    assert stopped.steps == 3 and checkpoint_dir(tmp_path / "cut").is_dir()
    resumed = train_library(tiny_llama, examples, tmp_path / "cut", config, progress=False)
    assert resumed.resumed_from == 3 and resumed.finished
    assert resumed.losses == whole.losses
    for name in ("library.json", "modules.safetensors", "controller.safetensors"):
        assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


@pytest.mark.parametrize("value", [1.0, -0.1, float("nan")])
def test_bad_dropout_is_refused(value):
    with pytest.raises(ValueError, match="module_dropout must be a finite number in"):
        TrainConfig(module_dropout=value)
