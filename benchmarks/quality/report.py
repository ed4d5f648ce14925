"""results.json (written atomically) and the markdown tables printed at the end of a run."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from router.atomic import write_file


def write_text(path: Path, text: str) -> Path:
    """Write `text` to `path` atomically (router.atomic.write_file)."""
    return write_file(path, text)


def write_json(path: Path, data: dict) -> Path:
    """Write `data` as indented JSON to `path` atomically."""
    return write_text(path, json.dumps(data, indent=1) + "\n")


def git_state(root: Path) -> dict:
    """The commit the code ran at and whether the work tree had uncommitted changes (None outside git)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": bool(dirty)}


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _rows(results: dict):
    """(system, mode, record, system entry) for every evaluation, in results order."""
    for name, system in results["systems"].items():
        for mode, record in system["evaluations"].items():
            yield name, mode, record, system


def main_table(results: dict) -> str:
    """Exact match (%) per base task, mean over base tasks and over composites; parameters; training time."""
    tasks = results["tasks"]
    head = ["system", "mode", *tasks, "mean", "composites", "trained params", "library params", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, mode, record, system in _rows(results):
        params = system.get("params", {})
        trained = params.get("trained")
        trained = trained.get("total") if isinstance(trained, dict) else trained
        cells = [name, mode, *(_pct(record["per_task"].get(t, {}).get("accuracy")) for t in tasks),
                 _pct(record["mean_base"]),
                 _pct(record["mean_composite"]), f"{trained:,}" if trained else "0",
                 f"{params.get('library', 0):,}", f"{system.get('train_seconds', 0.0):.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def composite_table(results: dict) -> str:
    """Exact match (%) per composite task for every mode that served composites."""
    composites = results["composites"]
    head = ["system", "mode", *composites, "mean"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, mode, record, _ in _rows(results):
        if record["mean_composite"] is None:
            continue
        cells = [name, mode, *(_pct(record["per_task"][c]["accuracy"]) for c in composites),
                 _pct(record["mean_composite"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tessera_table(results: dict) -> str:
    """Utilisation and routing of every Tessera library."""
    head = ["system", "modules used", "utilisation", "text routing accuracy (test prompts)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, system in results["systems"].items():
        if "utilisation" not in system:
            continue
        use = system["utilisation"]
        routing = system["evaluations"].get("untagged", {}).get("routing_accuracy")
        lines.append(f"| {name} | {len(use['used_modules'])} of {use['num_modules']} | {_pct(use['utilisation'])} "
                     f"| {_pct(routing)} |")
    return "\n".join(lines)


def sweep_table(results: dict) -> str:
    """Mean exact match (%) on the base tasks at every sweep point (test; validation in brackets)."""
    lines = []
    for sweep, points in results.get("sweeps", {}).items():
        lines.append(f"\n{sweep}:\n\n| value | Tessera test (val) | per-task LoRA test (val) | Tessera trained params "
                     "| training s |\n|---|---|---|---|---|")
        for point in points:
            lora = point.get("per_task_lora")
            lora_text = "-" if lora is None else f"{_pct(lora['test'])} ({_pct(lora['val'])})"
            trained = point.get("params", {}).get("tessera", {}).get("trained", {}).get("total")
            lines.append(f"| {point['value']} | {_pct(point['tessera']['test'])} ({_pct(point['tessera']['val'])}) "
                         f"| {lora_text} | {'-' if trained is None else f'{trained:,}'} "
                         f"| {sum(point['train_seconds'].values()):.0f} |")
        if sweep == "seed":
            lines.append("\n" + seed_spread(points))
    return "\n".join(lines)


def seed_spread(points: list[dict]) -> str:
    """One line per system of the seed sweep: mean, lowest and highest test exact match over the seeds, mean on
    validation."""
    parts = []
    for key, name in (("tessera", "Tessera"), ("per_task_lora", "per-task LoRA")):
        if not all(key in point for point in points):
            continue
        test = [point[key]["test"] for point in points]
        val = [point[key]["val"] for point in points]
        parts.append(f"{name}: test mean {_pct(sum(test) / len(test))} (lowest {_pct(min(test))}, highest "
                     f"{_pct(max(test))}), validation mean {_pct(sum(val) / len(val))}")
    return f"Over {len(points)} training seeds: " + "; ".join(parts) + "."


def markdown(results: dict) -> str:
    """Every table of a run, with a heading each."""
    parts = ["Exact match (%) on held-out base tasks:\n", main_table(results),
             "\nExact match (%) on composite tasks (never trained on, except by the reference composite_lora, "
             "trained on each composite itself):\n", composite_table(results),
             "\nTessera libraries:\n", tessera_table(results)]
    if results.get("sweeps"):
        parts += ["\nSweeps (mean exact match % over base tasks, Tessera tagged):", sweep_table(results)]
    return "\n".join(parts) + "\n"
