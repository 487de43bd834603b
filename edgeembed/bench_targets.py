"""The performance targets, judged from one run's result document.

Each target is a ratio or a limit measured within one run, so that the machine's speed
cancels out where it can. A target whose inputs the run did not measure is reported as
not measured, with the reason, never as met.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

ANNOY_RECALL = 0.95
ANNOY_SPEEDUP = 10.0
GALLERY_TARGET_ITEMS = 100_000


@dataclass(frozen=True)
class TargetResult:
    """One target and how the run did against it.

    Attributes:
        id: A short stable name, such as ``"embed-array-overhead"``.
        description: The target in words.
        threshold: The limit, as text (``"<= 1.05x"``).
        value: The measured value, as text, or None when not measured.
        met: True or False, or None when not measured.
        gap: How far from the limit a missed target is, or why it was not measured.
        detail: What the value was computed from.
    """

    id: str
    description: str
    threshold: str
    value: str | None
    met: bool | None
    gap: str
    detail: str


def _p50(stats: dict | None) -> float | None:
    return None if not stats else stats.get("p50_ms")


def cpu_ratio(numerator: dict | None, denominator: dict | None) -> str:
    """Return "; CPU-time ratio N.NNx" for two interleaved summaries, or "" without CPU times."""
    if not numerator or not denominator or not numerator.get("cpu_p50_ms") or not denominator.get("cpu_p50_ms"):
        return ""
    return f"; CPU-time ratio {numerator['cpu_p50_ms'] / denominator['cpu_p50_ms']:.2f}x"


def _ratio_target(target_id: str, description: str, numerator: float | None, denominator: float | None,
                  limit: float, at_most: bool, detail: str, missing: str) -> TargetResult:
    threshold = f"{'<=' if at_most else '>='} {limit:g}x"
    if numerator is None or denominator is None or denominator <= 0:
        return TargetResult(target_id, description, threshold, None, None, f"not measured: {missing}", detail)

    ratio = numerator / denominator
    met = ratio <= limit if at_most else ratio >= limit
    difference = abs(ratio - limit)
    gap = "" if met else f"{difference:.{2 if difference >= 0.01 else 3}f}x {'over' if at_most else 'short'}"
    return TargetResult(target_id, description, threshold, f"{ratio:.2f}x", met, gap, detail)


def _first_with(models: list[dict], quantization: str, dim: int | None = None) -> dict | None:
    for model in models:
        if model.get("quantization") == quantization and (dim is None or model.get("embedding_dim") == dim):
            return model
    return None


def _throughput(model: dict, threads: int, mode: str) -> float | None:
    for row in model.get("throughput") or []:
        if row["threads"] == threads and row["mode"] == mode:
            return row["images_per_s"]
    return None


def _gallery_size(result: dict) -> dict | None:
    sizes = (result.get("gallery") or {}).get("sizes") or []
    exact = [size for size in sizes if size["items"] == GALLERY_TARGET_ITEMS]
    return exact[0] if exact else None


def _annoy_target(result: dict) -> TargetResult:
    description = (f"Annoy at {GALLERY_TARGET_ITEMS:,} items: recall@10 >= {ANNOY_RECALL} at "
                   f">= {ANNOY_SPEEDUP:g}x the speed of exact search")
    threshold = f"recall >= {ANNOY_RECALL}, >= {ANNOY_SPEEDUP:g}x"
    size = _gallery_size(result)
    if size is None or "exact" not in size:
        return TargetResult("annoy-100k", description, threshold, None, None,
                            f"not measured: no {GALLERY_TARGET_ITEMS:,}-item gallery in this run", "")

    exact_p50 = size["exact"]["latency"]["p50_ms"]
    rows = [row for index in size["indexes"] for row in index["sweep"]]
    scored = [(row, exact_p50 / row["latency"]["p50_ms"]) for row in rows]
    passing = [(row, speed) for row, speed in scored if row["recall_at_10"] >= ANNOY_RECALL and speed >= ANNOY_SPEEDUP]
    if passing:
        row, speed = max(passing, key=lambda pair: pair[1])
        return TargetResult("annoy-100k", description, threshold,
                            f"recall {row['recall_at_10']:.3f} at {speed:.1f}x", True, "",
                            f"n_trees {row['n_trees']}, search_k {row['search_k']}, exact p50 {exact_p50:.2f} ms")

    accurate = [(row, speed) for row, speed in scored if row["recall_at_10"] >= ANNOY_RECALL]
    fast = [(row, speed) for row, speed in scored if speed >= ANNOY_SPEEDUP]
    notes = []
    if accurate:
        row, speed = max(accurate, key=lambda pair: pair[1])
        notes.append(f"fastest with recall >= {ANNOY_RECALL}: {speed:.1f}x (n_trees {row['n_trees']}, "
                     f"search_k {row['search_k']}, recall {row['recall_at_10']:.3f})")
    if fast:
        row, speed = max(fast, key=lambda pair: pair[0]["recall_at_10"])
        notes.append(f"best recall at >= {ANNOY_SPEEDUP:g}x: {row['recall_at_10']:.3f} "
                     f"(n_trees {row['n_trees']}, search_k {row['search_k']}, {speed:.1f}x)")
    best_row, best_speed = max(scored, key=lambda pair: (pair[0]["recall_at_10"], pair[1]))
    return TargetResult("annoy-100k", description, threshold,
                        f"recall {best_row['recall_at_10']:.3f} at {best_speed:.1f}x", False,
                        "; ".join(notes) or "no setting reached either limit",
                        f"exact p50 {exact_p50:.2f} ms")


def _memory_target(result: dict) -> TargetResult:
    description = f"peak resident memory, default model + {GALLERY_TARGET_ITEMS:,}-item gallery open and searched"
    size = _gallery_size(result)
    memories = [index["memory"] for index in (size or {}).get("indexes", [])
                if "peak_rss_mb" in (index.get("memory") or {})]
    if not memories:
        return TargetResult("memory-100k", description, "< 150 MB", None, None,
                            f"not measured: no {GALLERY_TARGET_ITEMS:,}-item gallery memory probe", "")

    memory = min(memories, key=lambda m: m["peak_rss_mb"])
    peak = memory["peak_rss_mb"]
    met = peak < 150
    detail = (f"the index with the lowest peak: anonymous {memory.get('rss_anon_mb', '?')} MB + file-backed "
              f"(memory-mapped, reclaimable) {memory.get('rss_file_mb', '?')} MB at the end; "
              f"search_k {memory.get('search_k')}")
    return TargetResult("memory-100k", description, "< 150 MB", f"{peak:.0f} MB", met,
                        "" if met else f"{peak - 150:.0f} MB over", detail)


def comparison_at(result: dict, threads: int | None = None) -> dict:
    """Return the interleaved comparison at `threads` (default: the run's threads), or {}."""
    wanted = threads if threads is not None else result.get("threads")
    return next((c for c in result.get("comparison") or [] if c["threads"] == wanted), {})


def _per_threads_target(result: dict, target_id: str, description: str, limit: float,
                        numerator: tuple[str, str] | None, denominator: tuple[str, str] | None,
                        detail: str, missing: str) -> TargetResult:
    """Judge a "numerator is at least `limit` times slower" target at every compared thread count.

    The target counts as met only when it is met at each thread count, because
    multi-threaded runtimes that spin-wait can look far slower than they are when
    other processes share the cores.
    """
    threshold = f">= {limit:g}x at every thread count"
    comparisons = result.get("comparison") or []
    ratios = []
    for comparison in comparisons:
        top = (comparison.get(numerator[0]) or {}).get(numerator[1]) if numerator else None
        bottom = (comparison.get(denominator[0]) or {}).get(denominator[1]) if denominator else None
        if top and bottom:
            ratios.append((comparison["threads"], top["p50_ms"] / bottom["p50_ms"], cpu_ratio(top, bottom)))
    if not ratios:
        return TargetResult(target_id, description, threshold, None, None, f"not measured: {missing}", detail)

    value = ", ".join(f"{ratio:.2f}x at {threads} thread(s)" for threads, ratio, _ in ratios)
    worst_threads, worst, _ = min(ratios, key=lambda item: item[1])
    met = worst >= limit
    gap = "" if met else f"{limit - worst:.2f}x short at {worst_threads} thread(s)"
    cpu = "; ".join(f"{threads} thread(s){cpu[1:]}" for threads, _, cpu in ratios if cpu)
    return TargetResult(target_id, description, threshold, value, met, gap,
                        f"{detail}, timed in alternating blocks" + (f"; {cpu}" if cpu else ""))


def evaluate_targets(result: dict[str, Any]) -> list[TargetResult]:
    """Judge the run against every target; see the module docstring for the rules."""
    models = result.get("models") or []
    first = models[0] if models else {}
    overhead = first.get("overhead") or {}
    naive = first.get("naive") or {}
    targets = [
        _ratio_target("embed-array-overhead",
                      "Embedder.embed on a decoded array at the input size vs raw invoke()",
                      _p50(overhead.get("embed_input")), _p50(overhead.get("invoke")), 1.05, True,
                      "p50 embed(224x224 array) / p50 invoke() on a preloaded tensor, same threads, "
                      "timed in alternating blocks" + cpu_ratio(overhead.get("embed_input"), overhead.get("invoke")),
                      "no overhead measurement for the first model"),
        _ratio_target("phone-vs-naive",
                      "Embedder.embed on a 12 MP JPEG vs full-size PIL decode + resize + invoke",
                      _p50(naive.get("naive_phone")), _p50(naive.get("embed_phone")), 5.0, False,
                      "p50 naive / p50 embed(phone.jpg), timed in alternating blocks"
                      + cpu_ratio(naive.get("naive_phone"), naive.get("embed_phone")), "no naive measurement"),
    ]

    int8 = _first_with(models, "int8")
    dim = int8.get("embedding_dim") if int8 else None
    float32 = _first_with(models, "float32", dim)
    targets.append(_per_threads_target(
        result, "int8-vs-float32", "int8 vs float32 TFLite of the same backbone (invoke)", 2.0,
        ("models", float32["name"]) if float32 else None, ("models", int8["name"]) if int8 else None,
        f"p50 invoke {float32['name'] if float32 else 'float32'} / {int8['name'] if int8 else 'int8'}",
        "the run needs an int8 and a float32 model with the same output size"))

    pytorch = next((peer for peer in result.get("peers") or [] if peer.get("name") == "pytorch"), {})
    targets.append(_per_threads_target(
        result, "int8-vs-pytorch", "int8 TFLite invoke vs eager PyTorch float forward, same threads", 4.0,
        ("peers", "pytorch") if "forward" in pytorch else None, ("models", first.get("name")) if first else None,
        "p50 torch forward / p50 first-model invoke", pytorch.get("skipped", "no PyTorch peer")))

    targets.append(_ratio_target(
        "throughput-2-threads", "throughput with 2 threads and overlapped decode vs single-thread",
        _throughput(first, 2, "overlapped"), _throughput(first, 1, "sequential"), 1.6, False,
        "images/s with 2 interpreter threads + embed_files (2 decode threads) / "
        "1 thread, embed() in a loop; median of rounds", "needs throughput at 1 and 2 threads"))
    targets.append(_memory_target(result))
    targets.append(_annoy_target(result))
    return targets


def targets_as_dicts(targets: list[TargetResult]) -> list[dict[str, Any]]:
    """Return targets as JSON-ready dicts."""
    return [asdict(target) for target in targets]
