"""The training-quality benchmark: scoring and equal-parameter units, and the tiny setting end to end
(through the CLI, with sweeps) checked for consistency against the libraries it wrote."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig

from benchmarks.quality.config import ABLATIONS, SETTINGS
from benchmarks.quality.metrics import Outcome, exact_match, mean_accuracy, task_accuracy, utilisation
from benchmarks.quality.params import all_points, equal_param_rank, library_params, rank_cost
from benchmarks.quality.run import EQUAL_STEPS, main
from benchmarks.quality.sweeps import REGULARISERS, SWEEPS, check_sweep_names
from benchmarks.quality.systems import COMPOSITE_REFERENCE, composite_module, make_data
from router.compose import compose
from router.controller import ControllerSettings
from router.library import ModuleLibrary, fingerprint_from_hf_config, random_library
from training.config import TrainConfig

SYSTEMS = {"backbone", "per_task_lora", "shared_lora", "tessera", *ABLATIONS, EQUAL_STEPS, COMPOSITE_REFERENCE}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_exact_match_is_exact_and_needs_a_stop():
    assert exact_match("cba", "cba", "stop")
    assert not exact_match("cba ", "cba", "stop") and not exact_match("CBA", "cba", "stop")
    assert not exact_match("cb", "cba", "stop") and not exact_match("", "cba", "stop")
    assert not exact_match("cba", "cba", "length") and not exact_match("cba", "cba", "refused")


def test_task_accuracy_and_mean():
    def outcome(task, correct):
        return Outcome(task, "x", "y", "y" if correct else "n", "stop", (), (), None, correct)

    table = task_accuracy([outcome("a", True), outcome("a", False), outcome("b", True), outcome("a", True)])
    assert list(table) == ["a", "b"]
    assert table["a"] == {"correct": 2, "total": 3, "accuracy": 2 / 3} and table["b"]["accuracy"] == 1.0
    assert mean_accuracy(table, ["a", "b"]) == pytest.approx((2 / 3 + 1) / 2)
    with pytest.raises(ValueError, match="no outcomes"):
        mean_accuracy(table, ["a", "c"])


@pytest.mark.parametrize("target, adapters, cost, rank", [
    (64 * 100, 6, 100, 11),  # 10.67 ranks each: 11 (66) is closer than 10 (60)
    (64 * 100 + 90, 6, 100, 11),
    (63 * 100, 6, 100, 11),  # 10.5 ranks each: 60 and 66 are both 3 off; a tie goes to the larger rank
    (64 * 100, 1, 100, 64),
    (50, 6, 100, 1),  # never below rank 1
])
def test_equal_param_rank_is_the_closest_rank(target, adapters, cost, rank):
    assert equal_param_rank(target, adapters, cost) == rank
    brute_force = min(range(1, 200), key=lambda r: (abs(adapters * r * cost - target), -r))
    assert brute_force == rank


def test_equal_param_rank_rejects_bad_sizes():
    with pytest.raises(ValueError, match="positive sizes"):
        equal_param_rank(0, 6, 100)
    with pytest.raises(ValueError, match="positive sizes"):
        equal_param_rank(100, 0, 100)


def test_utilisation_counts_modules_with_five_percent_of_some_tasks_gate_mass(tiny_llama):
    backbone = fingerprint_from_hf_config(AutoConfig.from_pretrained(tiny_llama))
    base = random_library(backbone, num_modules=4, tasks=("a", "b"), rank=2, settings=ControllerSettings(top_k=2))
    logits = torch.tensor([[4.0, -3.2, -9.0, -9.0], [-9.0, -9.0, 2.0, 1.5]])  # [num_tasks, num_modules]
    library = ModuleLibrary.build(backbone, {n: (base.modules[n], base.weights[n]) for n in base.modules},
                                  list(base.tasks.values()), logits, ControllerSettings(top_k=2))
    # task a: sigmoid(4) = 0.982, sigmoid(-3.2) = 0.039 -> m1 carries 3.8% (< 5%); task b: m2 and m3 both used
    use = utilisation(library, ["a", "b"])
    assert use["used_modules"] == ["m0", "m2", "m3"] and use["utilisation"] == 0.75
    assert use["gate_shares"]["a"]["m1"] < 0.05 and sum(use["gate_shares"]["b"].values()) == pytest.approx(1.0)


def test_validation_items_are_unseen_in_training():
    data = make_data(SETTINGS["tiny"], seed=0)
    trained = {(item.task, item.clean_input or item.input) for item in data.train}
    assert data.val and all((item.task, item.input) not in trained for item in data.val)
    assert {item.task for item in data.test} == set(data.tasks) | set(data.composites)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The tiny setting through the CLI, with sweeps (about 30 s, once per module; its tests are marked slow)."""
    out = tmp_path_factory.mktemp("quality")
    cache = tmp_path_factory.mktemp("backbones")
    assert main(["--setting", "tiny", "--out", str(out), "--sweeps", "--backbone-cache", str(cache)]) == 0
    return out, json.loads((out / "results.json").read_text())


def _library(out, system) -> ModuleLibrary:
    return ModuleLibrary.load(out / system["library"])


@pytest.mark.slow
def test_every_system_and_task_is_scored_from_its_outcomes(tiny_run):
    out, results = tiny_run
    tasks, composites = results["tasks"], results["composites"]
    assert set(results["systems"]) == SYSTEMS and len(tasks) >= 6 and composites
    assert results["setting"] == "tiny" and results["seed"] == 0 and "commit" in results["git"]
    for name, system in results["systems"].items():
        for mode, record in system["evaluations"].items():
            wanted = tasks if mode == "untagged" else composites if name == COMPOSITE_REFERENCE else tasks + composites
            assert list(record["per_task"]) == wanted, (name, mode)
            for task, row in record["per_task"].items():
                mine = [o for o in record["outcomes"] if o["task"] == task]
                assert row["total"] == len(mine) == results["config"]["test_per_task"]
                assert row["correct"] == sum(o["correct"] for o in mine)
                assert 0 <= row["accuracy"] == row["correct"] / row["total"] <= 1
            for o in record["outcomes"]:
                assert o["correct"] == exact_match(o["output"], o["answer"], o["finish_reason"])
            if name == COMPOSITE_REFERENCE:
                assert record["mean_base"] is None
                continue
            assert record["mean_base"] == pytest.approx(sum(record["per_task"][t]["accuracy"] for t in tasks) / len(tasks))
    assert set(results["wall_seconds"]) >= {"backbone", "data", "train", "evaluate", "sweeps", "total"}
    tables = (out / "tables.md").read_text()
    assert all(f"| {name} |" in tables for name in SYSTEMS)


@pytest.mark.slow
def test_parameter_counts_match_the_libraries_on_disk(tiny_run):
    out, results = tiny_run
    systems, num_tasks = results["systems"], len(results["tasks"])
    tessera = _library(out, systems["tessera"])
    config = SETTINGS["tiny"]
    points = all_points(tessera.backbone, tessera.modules["m0"].targets)
    cost = rank_cost(tessera.backbone, points)
    trained = systems["tessera"]["params"]["trained"]
    assert trained["modules"] == config.num_modules * config.rank * cost
    assert trained["total"] == trained["modules"] + len(points) + num_tasks * config.num_modules
    for name, system in systems.items():
        if system["library"] is not None:
            assert system["params"]["library"] == library_params(_library(out, system)), name
    assert systems["tessera"]["params"]["library"] <= trained["modules"]
    for name in ("per_task_lora", EQUAL_STEPS):
        lora = systems[name]
        assert lora["info"]["rank"] == equal_param_rank(trained["total"], num_tasks, cost)
        assert lora["params"]["trained"] == lora["params"]["library"] == num_tasks * lora["info"]["rank"] * cost
    assert systems["per_task_lora"]["info"]["steps_per_adapter"] == math.ceil(config.steps / num_tasks)
    assert systems[EQUAL_STEPS]["info"]["steps_per_adapter"] == config.steps
    reference = systems[COMPOSITE_REFERENCE]
    assert reference["info"]["rank"] == systems["per_task_lora"]["info"]["rank"]
    assert reference["info"]["steps_per_adapter"] == config.steps
    assert reference["params"]["trained"] == reference["params"]["library"] == (
        len(results["composites"]) * reference["info"]["rank"] * cost)
    shared = systems["shared_lora"]
    assert shared["params"]["trained"] == shared["params"]["library"] == equal_param_rank(trained["total"], 1, cost) * cost


@pytest.mark.slow
def test_utilisation_and_routing_match_their_definitions(tiny_run):
    out, results = tiny_run
    for name, system in results["systems"].items():
        if system["kind"] != "tessera":
            assert "utilisation" not in system
            continue
        library = _library(out, system)
        used = set()
        for task in results["tasks"]:
            composition = library.controller.gates_for_task(task)
            used |= {m for m, g in zip(composition.module_ids, composition.gates) if g / sum(composition.gates) >= 0.05}
        assert set(system["utilisation"]["used_modules"]) == used
        assert system["utilisation"]["utilisation"] == len(used) / len(library.modules)
    untagged = results["systems"]["tessera"]["evaluations"]["untagged"]
    routed = [o["routed_task"] == o["task"] for o in untagged["outcomes"]]
    assert untagged["routing_accuracy"] == sum(routed) / len(routed)


@pytest.mark.slow
def test_composites_use_both_tags_or_both_modules(tiny_run):
    out, results = tiny_run
    systems = results["systems"]
    tessera = _library(out, systems["tessera"])
    lora_modules = systems["per_task_lora"]
    for composite in results["composites"]:
        first, second = composite.split("+")
        both = compose(tessera, task=composite)
        parts = set(tessera.controller.gates_for_task(first).module_ids) | set(
            tessera.controller.gates_for_task(second).module_ids)
        assert set(both.module_ids) == parts
        served = [o for o in systems["tessera"]["evaluations"]["tagged"]["outcomes"] if o["task"] == composite]
        assert served and all(o["modules"] == list(both.module_ids) for o in served)
        assert all(math.isclose(sum(o["gates"]), 2.0) for o in served)  # each task's gates sum to one
        explicit = [o for o in lora_modules["evaluations"]["explicit"]["outcomes"] if o["task"] == composite]
        assert all(o["modules"] == [f"lora-{first}", f"lora-{second}"] and o["gates"] == [1.0, 1.0] for o in explicit)
        prompted = [o for o in systems["backbone"]["evaluations"]["prompted"]["outcomes"] if o["task"] == composite]
        assert all(o["modules"] == [] for o in prompted)
        reference = [o for o in systems[COMPOSITE_REFERENCE]["evaluations"]["explicit"]["outcomes"]
                     if o["task"] == composite]
        assert reference and all(o["modules"] == [composite_module(composite)] and o["gates"] == [1.0]
                                 for o in reference)


@pytest.mark.slow
def test_sweeps_and_plots(tiny_run):
    out, results = tiny_run
    config = SETTINGS["tiny"]
    grids = {"modules": config.sweep_modules, "learning_rate": config.sweep_learning_rates,
             "noise": config.sweep_noise, "max_len": config.sweep_max_len, "top_k": config.sweep_top_k,
             "rank": config.sweep_ranks, "temperature": config.sweep_gate_temperatures,
             "threshold": config.sweep_gate_thresholds, "placement": config.sweep_placement_budgets,
             "placement_random": config.sweep_placement_budgets, "seed": config.sweep_seeds, "compute": config.sweep_compute,
             "schedule": config.sweep_schedules, "task_sampling": config.sweep_task_sampling,
             "module_dropout": config.sweep_module_dropouts}
    defaults = TrainConfig()
    for name in REGULARISERS:
        grids[name] = tuple(round(scale * getattr(defaults, name), 12) for scale in config.sweep_regulariser_scales)
    assert set(results["sweeps"]) == set(grids)
    for sweep, points in results["sweeps"].items():
        assert [p["value"] for p in points] == list(grids[sweep])
        for point in points:
            assert all(0 <= point["tessera"][split] <= 1 for split in ("test", "val"))
            assert ("per_task_lora" in point) == (sweep in ("noise", "max_len", "seed", "compute"))
        assert sum(bool(p.get("reused_main")) for p in points) == (sweep != "task_sampling")  # its mixture is another
    sampled = results["sweeps"]["task_sampling"]  # trained on the imbalanced mixture: fewer items, same steps
    assert all(p["steps"]["tessera"] == config.steps for p in sampled)
    main_trained = results["systems"]["tessera"]["params"]["trained"]
    # the search and the random control stay within their share of every point's cost
    for point in results["sweeps"]["placement"] + results["sweeps"]["placement_random"]:
        trained = point["params"]["tessera"]["trained"]
        if point["value"] >= 1:
            assert trained == main_trained
        else:
            assert 0 < trained["modules"] <= point["value"] * main_trained["modules"]
            assert trained["insertion_gates"] < main_trained["insertion_gates"]
    seeds = results["sweeps"]["seed"]  # another training seed over the same data gives another library
    assert seeds[0]["reused_main"] and not seeds[1].get("reused_main")
    main_modules = load_file(out / "systems" / "tessera" / "modules.safetensors")
    other_modules = load_file(out / "sweeps" / "seed" / "1" / "tessera" / "modules.safetensors")
    assert main_modules.keys() == other_modules.keys()
    assert not any(torch.equal(main_modules[name], other_modules[name]) for name in main_modules)
    main_steps = {"tessera": results["systems"]["tessera"]["info"]["steps"],
                  "per_task_lora": results["systems"]["per_task_lora"]["info"]["steps_per_adapter"]}
    for point in results["sweeps"]["compute"]:  # both systems get the multiple of their own steps
        if not point.get("reused_main"):
            assert point["steps"] == {name: point["value"] * steps for name, steps in main_steps.items()}
    assert "Over 2 training seeds: Tessera: test mean" in (out / "tables.md").read_text()
    assert sorted(results["plots"]) == sorted(f"sweep_{s}.png" for s in grids)
    for name in results["plots"]:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) < 300_000


def test_sweep_names_are_checked(tmp_path, capsys):
    assert check_sweep_names(["lambda_align", "modules"]) == ("lambda_align", "modules")
    assert set(REGULARISERS) < set(SWEEPS)
    with pytest.raises(ValueError, match="unknown sweep 'lambda_x'; choose from modules"):
        check_sweep_names(["modules", "lambda_x"])
    with pytest.raises(SystemExit) as exit_info:
        main(["--setting", "tiny", "--out", str(tmp_path / "run"), "--sweeps", "modules,nope"])
    assert exit_info.value.code == 2
    assert "unknown sweep 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
