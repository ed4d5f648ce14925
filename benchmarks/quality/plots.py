"""PNG plots of the sweeps: mean held-out exact match over the base tasks against the swept value."""

from __future__ import annotations

from pathlib import Path

LABELS = {
    "modules": ("modules N", False),
    "learning_rate": ("learning rate", True),
    "noise": ("training-input noise (share of characters replaced)", False),
    "max_len": ("longest input (characters)", False),
    "top_k": ("modules per composition (top-k)", False),
    "rank": ("module rank r", True),
    "temperature": ("gate temperature T", True),
    "threshold": ("gate threshold", False),
    "placement": ("placement budget (share of every point's parameters; 1 = every point)", False),
    "placement_random": ("random placement budget (share of every point's parameters; 1 = every point)", False),
    "seed": ("training seed (same data)", False),
    "compute": ("optimiser steps, multiple of the main run's (per-task LoRA alike)", False),
    "task_sampling": ("task sampling temperature T (imbalanced mixture)", True),
    "schedule": ("learning-rate schedule (+warmup: 5% of the steps; +clip: gradient norm 1.0)", False),
    "module_dropout": ("module dropout p (modules' input)", False),
    "lambda_decouple": ("decoupling weight lambda1", True),
    "lambda_align": ("alignment weight lambda2", True),
    "lambda_sparse": ("insertion-gate sparsity weight lambda3", True),
    "lambda_prior": ("task-relation prior weight lambda4", True),
}
"""Sweep -> (x-axis label, logarithmic x axis)."""


def plot_sweep(sweep: str, points: list[dict], path: Path) -> Path:
    """One sweep's plot: Tessera (tagged) on test (solid) and validation (dashed), per-task LoRA when present."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label, log_x = LABELS[sweep]
    xs = [point["value"] for point in points]
    figure, axes = plt.subplots(figsize=(5.0, 3.4), dpi=100)
    series = [("tessera", "Tessera (tagged)", "tab:blue"), ("per_task_lora", "per-task LoRA", "tab:orange")]
    for key, name, colour in series:
        if not all(key in point for point in points):
            continue
        axes.plot(xs, [100 * p[key]["test"] for p in points], "o-", color=colour, label=f"{name}, test")
        axes.plot(xs, [100 * p[key]["val"] for p in points], "s--", color=colour, alpha=0.6, label=f"{name}, val")
    if log_x:
        axes.set_xscale("log")
    axes.set_xlabel(label)
    axes.set_ylabel("mean exact match (%)")
    axes.set_ylim(-2, 102)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=7)
    axes.set_title(f"sweep: {sweep}", fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp)
    plt.close(figure)
    tmp.replace(path)
    return path


def plot_sweeps(sweeps: dict[str, list[dict]], out: Path) -> list[Path]:
    """One PNG per sweep, `sweep_<name>.png` in `out`."""
    return [plot_sweep(sweep, points, out / f"sweep_{sweep}.png") for sweep, points in sweeps.items() if points]
