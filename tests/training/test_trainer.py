"""End to end on the tiny Llama: training lowers the loss, the library serves the trained math, resume is
exact, controller-only training leaves imported PEFT modules bit-identical."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from peft import LoraConfig, get_peft_model

from router.controller import ControllerSettings
from router.errors import LibraryError
from router.fingerprint import TARGETS
from router.info import TaskInfo
from router.library import ModuleLibrary, random_library
from router.peft_io import import_peft
from training.checkpoint import CheckpointError, checkpoint_dir
from training.losses import task_loss
from training.trainer import Trainer, train_library
from tests.training.helpers import PROMPTS, backbone, composition_deltas, merged

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:Setting `save_embedding_layers`:UserWarning")


@pytest.fixture(scope="module")
def trained(tiny_llama, examples, small_config, tmp_path_factory):
    """(trainer, report, library path) of one uninterrupted run of small_config."""
    root = tmp_path_factory.mktemp("trained")
    trainer = Trainer(tiny_llama, examples, small_config)
    report = trainer.run(root / "lib.ckpt", progress=False)
    library, _ = trainer.export()
    return trainer, report, library.write(root / "lib")


def test_backbone_stays_frozen_and_unchanged(trained, tiny_llama):
    trainer, report, _ = trained
    assert report.finished and report.steps == 6 and len(report.task_loss_history) == 6
    assert set(report.losses) == {"task", "decouple", "align", "sparse", "prior", "total"}
    assert all(not p.requires_grad for p in trainer.model.parameters())
    assert all(p.requires_grad for p in trainer.bank.module_parameters())
    fresh = backbone(tiny_llama).state_dict()
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(tensor, fresh[name]), name


def test_library_loads_and_serves_what_training_computed(trained, fingerprint, tiny_llama):
    trainer, _, path = trained
    library = ModuleLibrary.load(path, expect=fingerprint)
    assert list(library.tasks) == ["reverse", "upper"] and list(library.modules) == ["m0", "m1", "m2", "m3"]
    info = library.modules["m0"]
    assert (info.rank, info.alpha, info.targets, info.layers) == (4, 8.0, TARGETS, (0, 1))
    assert library.controller.settings == ControllerSettings(top_k=2, threshold=0.05, temperature=1.0)
    for row, task in enumerate(library.tasks):
        composition = library.controller.gates_for_task(task)
        assert composition.k >= 1
        with torch.no_grad(), trainer.bank.gating(trainer.controller.export_gates()[[row, row]]):
            got = trainer.model(PROMPTS).logits
        want = merged(tiny_llama, composition_deltas(library, composition))(PROMPTS).logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_training_lowers_each_tasks_loss(trained, fingerprint, tiny_llama):
    trainer, _, path = trained
    library = ModuleLibrary.load(path, expect=fingerprint)
    plain = backbone(tiny_llama)
    for index, task in enumerate(library.tasks):
        batch = trainer.batch([i for i, t in enumerate(trainer.row_tasks) if t == index])
        model = merged(tiny_llama, composition_deltas(library, library.controller.gates_for_task(task)))
        with torch.no_grad():
            before = task_loss(plain(batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"])
            after = task_loss(model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"])
        assert after < before - 0.5, (task, float(before), float(after))


def test_resume_after_a_stop_equals_the_uninterrupted_run(trained, tiny_llama, examples, small_config, tmp_path):
    out = tmp_path / "lib"
    stopped = train_library(tiny_llama, examples, out, dataclasses.replace(small_config, stop_after_steps=3),
                            progress=False)
    assert not stopped.finished and stopped.steps == 3 and stopped.path is None
    assert checkpoint_dir(out).is_dir() and not out.exists()
    with pytest.raises(CheckpointError, match="different training run"):
        train_library(tiny_llama, examples, out, dataclasses.replace(small_config, seed=1), progress=False)
    resumed = train_library(tiny_llama, examples, out, small_config, progress=False)
    assert resumed.finished and resumed.resumed_from == 3 and resumed.steps == 6 and resumed.path == out
    assert not checkpoint_dir(out).exists()
    reference = ModuleLibrary.load(trained[2])
    again = ModuleLibrary.load(out)
    assert resumed.task_loss_history == trained[1].task_loss_history[3:]
    for key, tensor in reference.flat_tensors().items():
        assert torch.equal(again.flat_tensors()[key], tensor), key
    assert torch.equal(again.controller.logits, reference.controller.logits)
    with pytest.raises(LibraryError, match="already exists and is not empty; choose another output or pass overwrite"):
        train_library(tiny_llama, examples, out, small_config, progress=False)


def _peft_module(model_dir, out, fingerprint, name, seed, **config):
    model = get_peft_model(backbone(model_dir), LoraConfig(init_lora_weights=False, **config))
    torch.manual_seed(seed)
    model.save_pretrained(str(out))
    return import_peft(out, fingerprint, name, f"PEFT adapter {name}")


def test_controller_only_training_keeps_imported_modules_bit_identical(tiny_llama, examples, small_config,
                                                                        fingerprint, tmp_path):
    modules = {
        "rev-lora": _peft_module(tiny_llama, tmp_path / "a", fingerprint, "rev-lora", 0, r=4, lora_alpha=8,
                                 target_modules=["q_proj", "v_proj"]),
        "up-lora": _peft_module(tiny_llama, tmp_path / "b", fingerprint, "up-lora", 1, r=2, lora_alpha=2,
                                target_modules=["down_proj"]),
    }
    tasks = [TaskInfo("reverse", "reverse a word"), TaskInfo("upper", "uppercase a word")]
    init = ModuleLibrary.build(fingerprint, modules, tasks, torch.zeros(2, 2), ControllerSettings(top_k=1))
    config = dataclasses.replace(small_config, train_modules=False, steps=3)
    report = train_library(tiny_llama, examples, tmp_path / "lib", config, init=init, progress=False)
    library = ModuleLibrary.load(report.path, expect=fingerprint)
    assert set(report.losses) == {"task", "prior", "total"}
    assert [t.description for t in library.tasks.values()] == ["reverse a word", "uppercase a word"]
    for name, (info, _) in modules.items():
        assert library.modules[name] == info
        for point, (a, b) in init.module_weights(name).items():
            got_a, got_b = library.module_weights(name)[point]
            assert torch.equal(got_a, a) and torch.equal(got_b, b), (name, point)
    assert not torch.equal(library.controller.logits, init.controller.logits)


def test_run_arguments_are_checked(tiny_llama, examples, small_config, fingerprint, tmp_path):
    no_init = dataclasses.replace(small_config, train_modules=False)
    with pytest.raises(ValueError, match="trains the controller only, over the modules of an init library"):
        train_library(tiny_llama, examples, tmp_path / "lib", no_init, progress=False)
    with pytest.raises(ValueError, match="points repeat"):
        Trainer(tiny_llama, examples, small_config, points=[(0, "q_proj"), (0, "q_proj")])
    with pytest.raises(ValueError, match=r"relation must be \[num_tasks, num_tasks\] = \[2, 2\]"):
        Trainer(tiny_llama, examples, small_config, relation=torch.zeros(3, 3))


def test_relation_given_by_task_names(tiny_llama, examples, small_config):
    trainer = Trainer(tiny_llama, examples, small_config, relation={"upper": {"reverse": 2.5}})
    assert [t.name for t in trainer.tasks] == ["reverse", "upper"]
    assert trainer._relation().tolist() == [[0.0, 2.5], [2.5, 0.0]]
    bad = [({"upper": {"translate": 1.0}}, "unknown task 'translate'"),
           ({"upper": {"reverse": -1.0}}, "finite weight >= 0"),
           ({"upper": {"upper": 1.0}}, "two different tasks"),
           ({"upper": {"reverse": 1.0}, "reverse": {"upper": 2.0}}, "two different weights")]
    for relation, message in bad:
        with pytest.raises(ValueError, match=message):
            Trainer(tiny_llama, examples, small_config, relation=relation)


def test_fine_tuning_an_init_library_starts_from_its_function(tiny_llama, examples, small_config, fingerprint):
    init = random_library(fingerprint, num_modules=3, tasks=("upper", "other"), rank=(2, 4, 2), std=0.2)
    trainer = Trainer(tiny_llama, examples, small_config, init=init)
    assert [t.name for t in trainer.tasks] == ["upper", "other", "reverse"]
    assert torch.equal(trainer.controller.logits[:2].detach(), init.controller.logits)
    composition = init.controller.gates_for_task("upper")
    gates = torch.zeros(2, 3)  # [batch, N]
    for name, gate in zip(composition.module_ids, composition.gates):
        gates[:, list(init.modules).index(name)] = gate
    with torch.no_grad(), trainer.bank.gating(gates):
        got = trainer.model(PROMPTS).logits
    want = merged(tiny_llama, composition_deltas(init, composition))(PROMPTS).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_searched_points_that_are_no_grid_are_written_exactly(tiny_llama, examples, small_config, fingerprint, tmp_path):
    points = [(0, "q_proj"), (1, "v_proj"), (1, "down_proj")]
    config = dataclasses.replace(small_config, prune_threshold=0.0)
    report = train_library(tiny_llama, examples, tmp_path / "lib", config, points=points, progress=False)
    library = ModuleLibrary.load(report.path, expect=fingerprint)
    for info in library.modules.values():
        assert info.all_points == points and sorted(library.module_weights(info.name)) == sorted(points)


def test_random_placement_is_the_seeded_control_under_the_budget(tiny_llama, examples, small_config, fingerprint,
                                                                 tmp_path):
    """placement=random: seeded random points within the budget (another seed, other points); a budget below the
    cheapest point is a clear error."""
    all_points = [(layer, t) for layer in range(fingerprint.num_layers) for t in TARGETS]
    cost = {p: sum(fingerprint.shape(p[1])) for p in all_points}
    chosen = {}
    for seed in (0, 1, 2):
        config = dataclasses.replace(small_config, placement="random", placement_budget=0.4, prune_threshold=0.0,
                                     seed=seed, steps=1)
        report = train_library(tiny_llama, examples, tmp_path / f"lib{seed}", config, progress=False)
        points = ModuleLibrary.load(report.path, expect=fingerprint).modules["m0"].all_points
        assert 0 < len(points) < len(all_points)
        assert sum(cost[p] for p in points) <= 0.4 * sum(cost.values())
        assert set(report.trained_points["m0"]) == set(points)
        chosen[seed] = tuple(sorted(points))
    assert len(set(chosen.values())) > 1
    tiny = dataclasses.replace(small_config, placement="random", placement_budget=1e-6, steps=1)
    with pytest.raises(ValueError, match="less than the cheapest point costs"):
        train_library(tiny_llama, examples, tmp_path / "none", tiny, progress=False)


def test_searched_placement_and_text_router_end_to_end(tiny_llama, examples, small_config, fingerprint, tmp_path):
    """placement=search picks points under the budget; the written library routes untagged prompts."""
    config = dataclasses.replace(small_config, placement="search", placement_budget=0.3, text_router=True,
                                 prune_threshold=0.0)
    report = train_library(tiny_llama, examples, tmp_path / "lib", config, progress=False)
    library = ModuleLibrary.load(report.path, expect=fingerprint)
    points = library.modules["m0"].all_points
    all_points = [(layer, t) for layer in range(fingerprint.num_layers) for t in TARGETS]
    cost = {p: sum(fingerprint.shape(p[1])) for p in all_points}
    assert 0 < len(points) < len(all_points)
    assert sum(cost[p] for p in points) <= 0.3 * sum(cost.values())
    assert report.routing_accuracy is not None and report.routing_accuracy >= 0.9
    routed = library.controller.route_text("reverse qwxyz")
    assert (routed.source, routed.task) == ("inferred", "reverse")
    assert routed.module_ids == library.controller.gates_for_task("reverse").module_ids
