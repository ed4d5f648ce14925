"""compose(): task tag, explicit weights, neither, and every error."""

from __future__ import annotations

import pytest

from router.compose import compose
from router.composition import NO_COMPOSITION
from router.errors import CompositionError, UnknownModuleError, UnknownTaskError
from router.library import random_library


def test_task_uses_the_controller(library):
    composition = compose(library, task="uppercase")
    assert composition == library.controller.gates_for_task("uppercase")
    assert composition.source == "tag" and composition.task == "uppercase" and composition.k == 2


def test_unknown_task_is_an_error_not_the_backbone(library):
    with pytest.raises(UnknownTaskError) as info:
        compose(library, task="translate")
    assert str(info.value) == "unknown task 'translate'; known: reverse, summarize, uppercase"


def test_explicit_weights_are_the_gates(library):
    composition = compose(library, modules={"m2": 0.7, "m0": 0.0, "m1": 1.5})
    assert composition.module_ids == ("m2", "m1") and composition.gates == (0.7, 1.5)
    assert composition.source == "explicit" and composition.task is None


def test_neither_is_the_backbone(library):
    assert compose(library) is NO_COMPOSITION
    assert compose(None) is NO_COMPOSITION
    assert NO_COMPOSITION.source == "none" and NO_COMPOSITION.k == 0


def test_both_is_an_error(library):
    with pytest.raises(CompositionError, match="either a task or explicit module weights, not both"):
        compose(library, task="reverse", modules={"m0": 1.0})


@pytest.mark.parametrize(
    ("modules", "message"),
    [
        ({}, "non-empty object"),
        ({"m0": float("nan")}, "weight of module 'm0' must be a finite number, got nan"),
        ({"m1": float("inf")}, "got inf"),
        ({"m0": True}, "got True"),
        ({"m0": "1"}, "got '1'"),
        ({"m0": 1, "m1": 1, "m2": 1}, "at most 2 modules per request, got 3"),
    ],
)
def test_bad_explicit_weights(library, modules, message):
    with pytest.raises(CompositionError, match=message):
        compose(library, modules=modules, max_k=2)


def test_negative_weights_subtract_and_zero_weights_are_dropped(library):
    composition = compose(library, modules={"m0": -0.5, "m1": 0, "m2": 1.25})
    assert composition.module_ids == ("m0", "m2") and composition.gates == (-0.5, 1.25)


def test_zero_weights_do_not_count_against_max_k(library):
    assert compose(library, modules={"m0": 1, "m1": 0, "m2": 0.5}, max_k=2).module_ids == ("m0", "m2")


def test_unknown_module_lists_at_most_ten(fingerprint):
    many = random_library(fingerprint, num_modules=12, rank=1, targets=("q_proj",))
    with pytest.raises(UnknownModuleError) as info:
        compose(many, modules={"m0": 1.0, "m99": 1.0})
    message = str(info.value)
    assert message.startswith("unknown module 'm99'; known: m0, m1, m10, m11, m2,") and message.endswith(", ...")
    assert message.count(",") == 10


def test_no_library_loaded():
    with pytest.raises(UnknownTaskError, match="unknown task 'reverse'; no module library is loaded"):
        compose(None, task="reverse")
    with pytest.raises(UnknownModuleError, match="unknown module 'm0'; no module library is loaded"):
        compose(None, modules={"m0": 1.0})


def test_composite_tag_adds_each_tasks_composition(library):
    first, second = (library.controller.gates_for_task(t) for t in ("reverse", "uppercase"))
    composite = compose(library, task="reverse+uppercase")
    expected: dict[str, float] = {}
    for part in (first, second):
        for module, gate in zip(part.module_ids, part.gates):
            expected[module] = expected.get(module, 0.0) + gate
    assert dict(zip(composite.module_ids, composite.gates)) == pytest.approx(expected)
    assert list(composite.gates) == sorted(composite.gates, reverse=True)
    assert composite.source == "tag" and composite.task == "reverse+uppercase"
    assert sum(composite.gates) == pytest.approx(2.0)  # each task's renormalised gates at full strength


@pytest.mark.parametrize("task, error, message", [
    ("reverse+translate", UnknownTaskError, "unknown task 'translate'"),
    ("reverse+", CompositionError, "empty part"),
    ("reverse+reverse", CompositionError, "each task once"),
])
def test_bad_composite_tags(library, task, error, message):
    with pytest.raises(error, match=message):
        compose(library, task=task)


def test_composite_over_max_k_is_an_error_not_a_cut(library):
    union = {m for t in ("reverse", "uppercase", "summarize")
             for m in library.controller.gates_for_task(t).module_ids}
    with pytest.raises(CompositionError, match=f"together use {len(union)} modules, more than the 1"):
        compose(library, task="reverse+uppercase+summarize", max_k=1)


def test_task_weights_scale_each_tasks_gates_before_they_add(library):
    controller = library.controller
    parts = {task: controller.gates_for_task(task) for task in ("reverse", "uppercase")}
    weights = {"reverse": 0.5, "uppercase": -2.0}
    expected: dict[str, float] = {}
    for task, weight in weights.items():
        for module, gate in zip(parts[task].module_ids, parts[task].gates):
            expected[module] = expected.get(module, 0.0) + weight * gate
    composition = compose(library, tasks=weights)
    assert dict(zip(composition.module_ids, composition.gates)) == pytest.approx(expected)
    assert [abs(g) for g in composition.gates] == sorted((abs(g) for g in composition.gates), reverse=True)
    assert composition.source == "tag" and composition.task == "reverse+uppercase"
    assert compose(library, tasks={"reverse": 1.0, "uppercase": 1.0}) == compose(library, task="reverse+uppercase")
    alone = compose(library, tasks={"uppercase": 1.0})
    assert (alone.module_ids, alone.gates) == (parts["uppercase"].module_ids, parts["uppercase"].gates)
    assert compose(library, tasks={"reverse": 0.0}) is NO_COMPOSITION


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"tasks": {}}, CompositionError, "non-empty object"),
    ({"tasks": {"reverse": float("nan")}}, CompositionError, "weight of task 'reverse' must be a finite number"),
    ({"tasks": {"translate": 1.0}}, UnknownTaskError, "unknown task 'translate'"),
    ({"tasks": {"reverse": 1.0}, "task": "uppercase"}, CompositionError, "task weights alone"),
    ({"tasks": {"reverse": 1.0, "uppercase": 1.0, "summarize": 1.0}, "max_k": 2}, CompositionError, "more than the 2"),
])
def test_bad_task_weights(library, kwargs, error, message):
    with pytest.raises(error, match=message):
        compose(library, **kwargs)
