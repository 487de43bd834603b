"""PNG plots of one benchmark run, drawn with matplotlib (the ``bench`` extra).

matplotlib is imported inside each function with the non-interactive Agg backend, so
the rest of the benchmark runs without it.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_latency_threads(result: dict[str, Any], path: Path) -> Path | None:
    """Plot invoke() latency p50 (solid) and p95 (dashed) against interpreter threads, per model.

    Returns:
        The PNG path, or None when no model has a thread sweep.
    """
    models = [model for model in result.get("models", []) if model.get("threads_sweep")]
    if not models:
        return None
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for model in models:
        threads = [row["threads"] for row in model["threads_sweep"]]
        p50 = [row["invoke"]["p50_ms"] for row in model["threads_sweep"]]
        p95 = [row["invoke"]["p95_ms"] for row in model["threads_sweep"]]
        line, = axes.plot(threads, p50, marker="o", label=f"{model['name']} p50")
        axes.plot(threads, p95, linestyle="--", color=line.get_color(), alpha=0.6, label=f"{model['name']} p95")

    axes.set_xlabel("interpreter threads")
    axes.set_ylabel("invoke() latency (ms)")
    axes.set_xticks(sorted({row["threads"] for model in models for row in model["threads_sweep"]}))
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    axes.set_title(f"Latency against threads\n{_machine_line(result)}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_recall(result: dict[str, Any], path: Path) -> Path | None:
    """Plot recall@10 against query time p50: one panel per gallery size, one line per n_trees.

    Exact search is the star at recall 1.0. Returns the PNG path, or None without a gallery.
    """
    sizes = ((result.get("gallery") or {}).get("sizes")) or []
    if not sizes:
        return None
    plt = _pyplot()
    from matplotlib import ticker

    figure, panels = plt.subplots(1, len(sizes), figsize=(4.2 * len(sizes), 4.2), squeeze=False)
    for axes, size in zip(panels[0], sizes):
        for index in size["indexes"]:
            times = [row["latency"]["p50_ms"] for row in index["sweep"]]
            recalls = [row["recall_at_10"] for row in index["sweep"]]
            axes.plot(times, recalls, marker="o", label=f"Annoy, {index['n_trees']} trees")
            labelled = None
            for row, time_ms, recall in zip(index["sweep"], times, recalls):
                # Skip labels that would overlap the previous one on the log axis.
                if labelled is not None and abs(math.log10(time_ms / labelled[0])) < 0.06 \
                        and abs(recall - labelled[1]) < 0.02:
                    continue
                axes.annotate(str(row["search_k"]), (time_ms, recall), fontsize=6,
                              textcoords="offset points", xytext=(3, -8))
                labelled = (time_ms, recall)
        if "exact" in size:
            axes.plot([size["exact"]["latency"]["p50_ms"]], [1.0], marker="*", markersize=12,
                      linestyle="none", color="black", label="exact (numpy)")
        axes.set_xscale("log")
        axes.xaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
        axes.xaxis.set_minor_formatter(ticker.NullFormatter())
        axes.set_xlabel("query time p50 (ms, log scale)")
        axes.set_ylabel("recall@10")
        axes.set_ylim(min(0.5, axes.get_ylim()[0]), 1.02)
        axes.axhline(0.95, color="grey", linestyle=":", linewidth=1)
        axes.grid(alpha=0.3, which="both")
        axes.set_title(f"{size['items']:,} items", fontsize=10)
        axes.legend(fontsize=7, loc="lower right")

    figure.suptitle(f"Recall against query time (labels: search_k)\n{_machine_line(result)}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _machine_line(result: dict[str, Any]) -> str:
    machine = result.get("machine", {})
    profile = machine.get("profile", {}).get("name")
    return f"{machine.get('cpu_model')}, {machine.get('cpus_usable')} CPUs, profile {profile}"


def write_plots(result: dict[str, Any], stem: Path) -> list[Path]:
    """Write every plot next to `stem` (``STEM-latency.png``, ``STEM-recall.png``).

    Returns:
        The PNG files written; empty when matplotlib is not installed, which is logged.
    """
    try:
        _pyplot()
    except ImportError:
        logger.warning("matplotlib is not installed, so no plots were drawn; pip install matplotlib")
        return []
    written = [plot_latency_threads(result, stem.with_name(stem.name + "-latency.png")),
               plot_recall(result, stem.with_name(stem.name + "-recall.png"))]
    return [path for path in written if path is not None]
