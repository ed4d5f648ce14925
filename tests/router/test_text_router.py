"""Text routing: the head, its place in the library format, every rejection, and routing real prompts.

Only the tests marked with the `encoder` fixture load all-MiniLM-L6-v2 (once per process).
"""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

from router.compose import compose
from router.errors import CompositionError, LibraryError, LowConfidenceError, NoTextRouterError
from router.library import ModuleLibrary, random_library
from router.text import TextEncoder, TextRouterHead, TextRouterSettings
from tests.router.helpers import edit_json, edit_tensors
from tests.router.prompts import TASKS, prompts, trained_head
from training.text_router import TextRouterConfig, fit_text_router


def random_head(hidden: int, num_tasks: int = 3, seed: int = 0) -> TextRouterHead:
    gen = torch.Generator().manual_seed(seed)
    width = hidden or 384
    w1 = torch.randn(hidden, 384, generator=gen) if hidden else None  # [hidden, 384]
    b1 = torch.randn(hidden, generator=gen) if hidden else None  # [hidden]
    return TextRouterHead(torch.randn(num_tasks, width, generator=gen), torch.randn(num_tasks, generator=gen), w1, b1)


@pytest.fixture
def routed(fingerprint):
    """A random library over TASKS with a random MLP text router (hidden 8, min_confidence 0.4)."""
    library = random_library(fingerprint, num_modules=4, tasks=TASKS, rank=4, std=0.2)
    return library.with_text_router(random_head(8), TextRouterSettings(min_confidence=0.4))


@pytest.fixture
def written_routed(routed, tmp_path):
    return routed.write(tmp_path / "routed")


@pytest.fixture(scope="module")
def encoder():
    encoder = TextEncoder.shared()
    encoder.load()
    return encoder


@pytest.mark.parametrize("hidden", [0, 8])
def test_head_predicts_probabilities_and_round_trips(hidden):
    head = random_head(hidden)
    assert (head.hidden, head.embed_dim, head.num_tasks) == (hidden, 384, 3)
    x = torch.nn.functional.normalize(torch.randn(5, 384), dim=1)  # [5, 384]
    probs = head.predict(x)
    assert probs.shape == (5, 3) and torch.allclose(probs.sum(dim=1), torch.ones(5))
    expected = {"w2", "b2"} | ({"w1", "b1"} if hidden else set())
    assert set(head.tensors()) == {f"text_router.{k}" for k in expected}
    copy = TextRouterHead.from_tensors(head.tensors(), 3, 384, hidden)
    assert torch.equal(copy.predict(x), probs)
    with pytest.raises(ValueError, match=r"embeddings have shape \[5, 10\], expected \[n, 384\]"):
        head.predict(torch.zeros(5, 10))


@pytest.mark.parametrize("hidden", [0, 8])
def test_library_round_trip_with_text_router(fingerprint, tmp_path, hidden):
    settings = TextRouterSettings(min_confidence=0.25)
    library = random_library(fingerprint, tasks=TASKS).with_text_router(random_head(hidden), settings)
    loaded = ModuleLibrary.load(library.write(tmp_path / "lib"), expect=fingerprint)
    meta = loaded.to_json()["controller"]["text_router"]
    assert meta == {"encoder": "all-MiniLM-L6-v2", "embed_dim": 384, "hidden": hidden, "min_confidence": 0.25}
    saved, original = loaded.controller.text_router, library.controller.text_router
    assert saved.settings == original.settings
    assert saved.tensors().keys() == original.tensors().keys()
    assert all(torch.equal(saved.tensors()[k], v) for k, v in original.tensors().items())
    assert loaded.controller.gates_for_task("uppercase") == library.controller.gates_for_task("uppercase")
    bigger = loaded.with_module(dataclasses.replace(loaded.modules["m0"], name="extra"), loaded.module_weights("m0"))
    assert bigger.controller.text_router is saved, "adding a module keeps the text router"


def test_library_without_text_router_loads_as_before(written, fingerprint):
    library = ModuleLibrary.load(written, expect=fingerprint)
    assert library.controller.text_router is None and "text_router" not in library.to_json()["controller"]
    with pytest.raises(NoTextRouterError, match="the module library has no text router"):
        library.controller.route_text("reverse this")
    with pytest.raises(NoTextRouterError, match="no module library is loaded"):
        compose(None, task="auto", text="reverse this")


def _router(meta):
    return meta["controller"]["text_router"]


JSON_CASES = {
    "not an object": (lambda m: m["controller"].update(text_router=[1]), r"text_router must be an object, got \[1\]"),
    "unknown key": (lambda m: _router(m).update(pooling="cls"), r"unknown text_router settings \['pooling'\]"),
    "missing key": (lambda m: _router(m).pop("hidden"), r"text_router is missing \['hidden'\]"),
    "encoder": (lambda m: _router(m).update(encoder="bge-small"), "text_router encoder 'bge-small' is not supported"),
    "embed_dim": (lambda m: _router(m).update(embed_dim=768), "embed_dim 768 does not match the encoder .* 384"),
    "hidden negative": (lambda m: _router(m).update(hidden=-1), "hidden must be an integer >= 0 .* got -1"),
    "hidden bool": (lambda m: _router(m).update(hidden=True), "hidden must be an integer >= 0 .* got True"),
    "hidden mismatch": (
        lambda m: _router(m).update(hidden=16), r"text_router.w1: shape \[8, 384\], expected \[16, 384\]"
    ),
    "linear but MLP tensors": (lambda m: _router(m).update(hidden=0), (
        r"unexpected text router tensors \['text_router.b1', 'text_router.w1'\] \(hidden 0 needs"
    )),
    "min_confidence high": (
        lambda m: _router(m).update(min_confidence=1.0), r"min_confidence must be a number in \[0, 1\), got 1.0"
    ),
    "min_confidence type": (lambda m: _router(m).update(min_confidence="0.5"), "min_confidence must be a number"),
    "task without a head output": (
        lambda m: m["tasks"].append({"name": "extra"}),
        r"text_router.w2: shape \[3, 8\], expected \[4, 8\] \[num_tasks, hidden\]",
    ),
    "tensors without settings": (
        lambda m: m["controller"].pop("text_router"),
        "holds text router tensors .* but library.json's controller has no text_router",
    ),
}


@pytest.mark.parametrize("case", JSON_CASES)
def test_invalid_text_router_json(written_routed, case):
    change, message = JSON_CASES[case]
    edit_json(written_routed, change)
    with pytest.raises(LibraryError, match=message):
        ModuleLibrary.load(written_routed)


def _set(key, value):
    return lambda tensors: tensors.__setitem__(key, value(tensors[key]) if callable(value) else value)


TENSOR_CASES = {
    "w1 shape": (
        _set("text_router.w1", torch.zeros(8, 383)),
        r"controller text_router.w1: shape \[8, 383\], expected \[8, 384\] \[hidden, embed_dim\]",
    ),
    "b1 shape": (_set("text_router.b1", torch.zeros(9)), r"text_router.b1: shape \[9\], expected \[8\] \[hidden\]"),
    "b2 shape": (
        _set("text_router.b2", torch.zeros(3, 1)), r"text_router.b2: shape \[3, 1\], expected \[3\] \[num_tasks\]"
    ),
    "NaN": (
        _set("text_router.w2", lambda t: t.index_fill(1, torch.tensor([0]), float("nan"))),
        "text_router.w2: contains NaN or Inf",
    ),
    "Inf": (
        _set("text_router.b1", lambda t: t.index_fill(0, torch.tensor([2]), float("inf"))),
        "text_router.b1: contains NaN or Inf",
    ),
    "integer dtype": (
        _set("text_router.w1", lambda t: t.to(torch.int64)), "text_router.w1: expected a floating-point tensor"
    ),
    "missing": (lambda t: t.pop("text_router.b1"), r"text router tensor text_router.b1 is missing \(hidden 8 needs"),
    "extra": (_set("text_router.scale", torch.ones(1)), r"unexpected text router tensors \['text_router.scale'\]"),
}


@pytest.mark.parametrize("case", TENSOR_CASES)
def test_invalid_text_router_tensors(written_routed, case):
    change, message = TENSOR_CASES[case]
    edit_tensors(written_routed, "controller.safetensors", change)
    with pytest.raises(LibraryError, match=message):
        ModuleLibrary.load(written_routed)


def test_in_memory_checks(fingerprint):
    library = random_library(fingerprint, tasks=TASKS)
    with pytest.raises(LibraryError, match=r"text_router.w2: shape \[2, 8\], expected \[3, 8\] \[num_tasks, hidden\]"):
        library.with_text_router(random_head(8, num_tasks=2))
    nan_head = random_head(0)
    nan_head.b2[1] = float("nan")
    with pytest.raises(LibraryError, match="text_router.b2: contains NaN or Inf"):
        library.with_text_router(nan_head)
    with pytest.raises(LibraryError, match="min_confidence must be a number in"):
        library.with_text_router(random_head(0), TextRouterSettings(min_confidence=-0.1))
    with pytest.raises(LibraryError, match="give both w1 and b1"):
        TextRouterHead(torch.zeros(3, 8), torch.zeros(3), torch.zeros(8, 384), None)
    with pytest.raises(LibraryError, match="task name 'auto' is reserved"):
        random_library(fingerprint, tasks=("reverse", "auto"))


def test_fit_rejects_bad_input():
    ok = (["reverse abc", "reverse xyz", "add 1 and 2", "add 3 and 4"], ["reverse", "reverse", "add", "add"])
    with pytest.raises(ValueError, match="got 4 prompts but 3 task labels"):
        fit_text_router(ok[0], ok[1][:3], ["reverse", "add"])
    with pytest.raises(ValueError, match=r"task labels \['add'\] are not in task_names \['reverse', 'sum'\]"):
        fit_text_router(*ok, ["reverse", "sum"])
    with pytest.raises(ValueError, match="task 'add' has 1 prompts; every task needs at least 2"):
        fit_text_router(ok[0][:3], ok[1][:3], ["reverse", "add"])
    with pytest.raises(ValueError, match="every prompt must be a non-empty string"):
        fit_text_router([" ", *ok[0][1:]], ok[1], ["reverse", "add"])
    message = r"steps must be an integer >= 1, got 0; holdout_fraction must be in \(0, 1\), got 1.0"
    with pytest.raises(ValueError, match=message):
        fit_text_router(*ok, ["reverse", "add"], TextRouterConfig(holdout_fraction=1.0, steps=0))


def test_encoder_embeds_unit_vectors_consistently(encoder):
    texts = ["reverse the letters of apple", "what is 2 plus 3?", "a much longer prompt " * 20]
    batch = encoder.encode(texts)
    assert batch.shape == (3, 384) and batch.dtype == torch.float32
    assert torch.allclose(batch.norm(dim=1), torch.ones(3), atol=1e-5)
    single = torch.cat([encoder.encode([t]) for t in texts])
    assert torch.allclose(batch, single, atol=1e-5), "padding must not change an embedding"
    assert batch[0] @ batch[1] < 0.9 and encoder.encode([]).shape == (0, 384)
    with pytest.raises(TypeError, match="sequence of strings"):
        encoder.encode("one string")


def test_encoder_is_shared_and_thread_safe(encoder):
    results, texts = {}, [f"convert word{i} to uppercase" for i in range(4)]

    def work(i):
        results[i] = (TextEncoder.shared(), TextEncoder.shared().encode([texts[i]]))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(results[i][0] is encoder for i in range(4))
    assert torch.allclose(torch.cat([results[i][1] for i in range(4)]), encoder.encode(texts), atol=1e-5)


def test_trained_router_routes_prompts_by_kind(encoder, fingerprint):
    head, accuracy = trained_head()
    assert accuracy >= 0.95
    small = TextRouterConfig(hidden=8, steps=20, seed=3)
    runs = [fit_text_router(*prompts(4, seed=3), TASKS, small) for _ in range(2)]
    assert runs[0][1] == runs[1][1], "a seeded fit is deterministic"
    assert all(torch.equal(v, runs[1][0].tensors()[k]) for k, v in runs[0][0].tensors().items())
    library = random_library(fingerprint, tasks=TASKS).with_text_router(head)
    texts, labels = prompts(4, seed=7)
    for text, task in zip(texts, labels):
        composition = library.controller.route_text(text)
        assert composition.source == "inferred" and composition.task == task, text
        tagged = library.controller.gates_for_task(task)
        assert (composition.module_ids, composition.gates) == (tagged.module_ids, tagged.gates)
        assert compose(library, task="auto", text=text) == composition
    with pytest.raises(CompositionError, match="needs a non-empty prompt"):
        library.controller.route_text("  ")
    with pytest.raises(CompositionError, match="needs a non-empty prompt"):
        compose(library, task="auto")


def test_low_confidence_is_refused(encoder, fingerprint):
    library = random_library(fingerprint, tasks=TASKS)
    uniform = library.with_text_router(TextRouterHead(torch.zeros(3, 384), torch.zeros(3)))
    with pytest.raises(LowConfidenceError, match=r"best task 'reverse' has probability 0.333, under .* 0.5; tag"):
        uniform.controller.route_text("reverse the letters of apple")
    head, _ = trained_head()
    text = "write river backwards"
    probability = library.with_text_router(head).controller.text_router.classify([text])[0][1]
    at = library.with_text_router(head, TextRouterSettings(min_confidence=probability))
    assert at.controller.route_text(text).task == "reverse"
    above = library.with_text_router(head, TextRouterSettings(min_confidence=min(probability + 1e-4, 0.9999999)))
    with pytest.raises(LowConfidenceError) as caught:
        above.controller.route_text(text)
    assert caught.value.task == "reverse" and caught.value.confidence == pytest.approx(probability)
