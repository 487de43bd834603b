"""Markdown reports of benchmark results: one run in full, or several runs side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from edgeembed.bench_machine import read_json_document
from edgeembed.bench_run import RESULT_SCHEMA
from edgeembed.bench_targets import comparison_at

PROFILE_CAVEAT = ("A device profile limits CPUs, threads and memory on this machine; it does not "
                  "reproduce an ARM core's speed, memory bandwidth or caches, so times measured under "
                  "a profile are not the board's times. Run the suite on the board for those.")


class ResultError(ValueError):
    """Raised when a file is not a benchmark result."""


def load_result(path: str | Path) -> dict[str, Any]:
    """Read one result JSON file.

    Raises:
        ResultError: If the file is missing, not JSON, or has another schema.
    """
    path = Path(path)
    return read_json_document(path, RESULT_SCHEMA, ResultError, f"result file {path} not found")


def table(header: list[str], rows: Iterable[list[Any]]) -> str:
    """Render a Markdown table; None cells print as a dash and pipes are escaped."""
    def cell(value: Any) -> str:
        return "-" if value is None else str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
    return "\n".join(lines)


def _ms(stats: dict | None, key: str = "p50_ms") -> str | None:
    return None if not stats else f"{stats[key]:.2f}"


def _mb(count: int | None) -> str | None:
    return None if count is None else f"{count / 1e6:.2f}"


def run_label(result: dict[str, Any]) -> str:
    """Name a run by its profile, CPU and date, for table headers and file names."""
    machine = result.get("machine", {})
    profile = machine.get("profile", {}).get("name", "?")
    recorded = machine.get("recorded", "?")[:16].replace("T", " ")
    return f"{profile} on {machine.get('board') or machine.get('cpu_model', '?')}, {recorded} UTC"


def machine_section(result: dict[str, Any]) -> str:
    """Render the machine, profile and load as a two-column table."""
    machine = result.get("machine", {})
    applied = machine.get("applied", {})
    profile = machine.get("profile", {})
    model = (result.get("models") or [{}])[0]
    rows = [
        ["CPU", f"{machine.get('cpu_model')} ({machine.get('architecture')})"],
        ["board", machine.get("board")],
        ["CPUs", f"{machine.get('cpus_usable')} usable of {machine.get('cpu_count')}"],
        ["memory", f"{machine.get('memory_total_mb')} MB total, RLIMIT_DATA {machine.get('rlimit_data_mb') or 'unlimited'}"],
        ["OS", f"{machine.get('os')}, kernel {machine.get('kernel')}"],
        ["Python", machine.get("python")],
        ["interpreter", f"{model.get('backend')} {model.get('backend_version')}" if model else None],
        ["packages", ", ".join(f"{k} {v}" for k, v in machine.get("packages", {}).items())],
        ["profile", f"{profile.get('name')}: {profile.get('description')}"],
        ["applied", f"CPUs {applied.get('cpus')}, {applied.get('threads')} threads, memory limit "
                    + (f"{applied['memory_limit_mb']} MiB" if applied.get("memory_limit_mb") else "none")],
        ["interpreter threads", result.get("threads")],
        ["load average", f"{machine.get('load_average')} at start, {machine.get('load_average_after')} at end"],
        ["duration", f"{result.get('duration_s')} s"],
    ]
    rows += [["profile note", note] for note in applied.get("notes", [])]
    return table(["", ""], rows)


def targets_section(result: dict[str, Any]) -> str:
    """Render the targets as a table with met, missed or not measured."""
    rows = []
    for target in result.get("targets", []):
        verdict = {True: "met", False: "**missed**", None: "not measured"}[target["met"]]
        rows.append([target["description"], target["threshold"], target["value"], verdict,
                     target["gap"], target["detail"]])
    return table(["target", "limit", "measured", "verdict", "gap", "computed from"], rows)


def models_section(result: dict[str, Any]) -> str:
    """Render one row per model: size, load, cold start, memory, floor and overhead."""
    rows = []
    for model in result.get("models", []):
        cold = model.get("cold_start") or {}
        memory = model.get("memory") or {}
        input_embed = (model.get("overhead") or {}).get("embed_input")
        floor = model.get("floor")
        overhead = (f"{input_embed['p50_ms'] / floor['p50_ms']:.2f}x" if input_embed and floor else None)
        rows.append([model["name"], model["quantization"], _mb(model["size_bytes"]),
                     f"{model['load_s'] * 1000:.0f}", cold.get("load_s") and f"{cold['load_s'] * 1000:.0f}",
                     cold.get("total_s") and f"{cold['total_s']:.2f}", memory.get("peak_rss_mb"), _ms(floor), _ms(floor, "p99_ms"),
                     _ms(input_embed), overhead])
    return table(["model", "quantization", "file MB", "load ms (in run)", "load ms (fresh process)",
                  "cold start s", "peak RSS MB", "invoke p50 ms", "invoke p99 ms", "embed(input array) p50 ms",
                  "Embedder overhead"], rows)


def latency_section(result: dict[str, Any]) -> str:
    """Render the stage breakdown per model and photo."""
    rows = []
    for model in result.get("models", []):
        for case, stages in (model.get("latency") or {}).items():
            embed = stages["embed"]
            rows.append([model["name"], case, _ms(stages["decode"]), _ms(stages["preprocess"]),
                         _ms(stages["invoke"]), _ms(stages["postprocess"]), _ms(embed), _ms(embed, "p95_ms"),
                         _ms(embed, "p99_ms"), embed["runs"]])
    return table(["model", "photo", "decode", "preprocess", "invoke", "postprocess", "embed p50", "embed p95",
                  "embed p99", "runs"], rows)


def threads_section(result: dict[str, Any]) -> str:
    """Render invoke() latency against interpreter threads, per model."""
    rows = []
    for model in result.get("models", []):
        for row in model.get("threads_sweep") or []:
            invoke = row["invoke"]
            rows.append([model["name"], row["threads"], _ms(invoke), _ms(invoke, "p95_ms"), _ms(invoke, "p99_ms")])
    return table(["model", "threads", "invoke p50 ms", "invoke p95 ms", "invoke p99 ms"], rows)


def throughput_section(result: dict[str, Any]) -> str:
    """Render folder throughput per thread count and mode, as a ratio to one sequential thread."""
    rows = []
    for model in result.get("models", []):
        single = next((row["images_per_s"] for row in model.get("throughput") or []
                       if row["threads"] == 1 and row["mode"] == "sequential"), None)
        for row in model.get("throughput") or []:
            ratio = f"{row['images_per_s'] / single:.2f}x" if single else None
            rows.append([model["name"], row["threads"], row["mode"], row["decode_threads"], row["images"],
                         row["failed"], row["images_per_s"], ratio])
    return table(["model", "interpreter threads", "mode", "decode threads", "images", "failed", "images/s",
                  "vs 1 thread sequential"], rows)


def comparison_section(result: dict[str, Any]) -> str:
    """Render every model and peer as a ratio to the first model's invoke and embed."""
    models = result.get("models", [])
    comparison = comparison_at(result)
    if not models:
        return "No model was measured."
    first = models[0]
    timed_models = comparison.get("models") or {}
    base_invoke = timed_models.get(first["name"]) or first.get("floor")
    base_embed = ((first.get("latency") or {}).get("small") or {}).get("embed")

    def ratio(stats: dict | None, base: dict | None) -> str | None:
        return f"{stats['p50_ms'] / base['p50_ms']:.2f}x" if stats and base else None

    rows = []
    for model in models:
        invoke = timed_models.get(model["name"]) or model.get("floor")
        small = ((model.get("latency") or {}).get("small") or {}).get("embed")
        rows.append([f"TFLite {model['name']} ({model['quantization']})", _ms(invoke), ratio(invoke, base_invoke),
                     _ms(small), ratio(small, base_embed), None])
    naive = first.get("naive") or {}
    if naive:
        rows.append([f"naive full-size PIL decode, 12 MP ({first['name']})", None, None,
                     _ms(naive["naive_phone"]), None,
                     f"{ratio(naive['naive_phone'], naive['embed_phone'])} the time of embed(phone.jpg) "
                     f"({_ms(naive['embed_phone'])} ms)"])
    for peer in result.get("peers", []):
        if "skipped" in peer:
            rows.append([peer["name"], None, None, None, None, f"skipped: {peer['skipped']}"])
            continue
        forward, small = peer.get("forward"), peer["embed_small"]
        rows.append([f"{peer['name']}: {peer['runtime']}", _ms(forward), ratio(forward, base_invoke), _ms(small),
                     ratio(small, base_embed), f"cosine to {first['name']}: {peer.get('cosine_to_first_model')}"])
    note = (f"Invoke and forward columns come from one interleaved measurement at {result.get('threads')} "
            "threads (alternating blocks of 10 runs), so load from other processes falls on all runtimes alike."
            if comparison else "Each model's invoke comes from its own floor measurement.")
    main = table(["runtime", "invoke/forward p50 ms", f"vs {first['name']} invoke", "embed(small) p50 ms",
                  f"vs {first['name']} embed(small)", "note"], rows)
    return "\n\n".join([note, main, threads_comparison(result)])


def threads_comparison(result: dict[str, Any]) -> str:
    """Render each runtime's invoke/forward p50 at every compared thread count, with its ratio to the first model."""
    comparisons = result.get("comparison") or []
    models = result.get("models") or []
    if not comparisons or not models:
        return ""
    first = models[0]["name"]
    names = [("models", name) for name in comparisons[0]["models"]]
    names += [("peers", name) for name in comparisons[0]["peers"]]
    rows = []
    for group, name in names:
        row = [name if group == "models" else f"{name} (peer)"]
        for comparison in comparisons:
            stats, base = comparison[group].get(name), comparison["models"].get(first)
            for key in ("p50_ms", "cpu_p50_ms"):
                known = stats and base and stats.get(key) and base.get(key)
                row.append(f"{stats[key]:.2f} ({stats[key] / base[key]:.2f}x)" if known else None)
        rows.append(row)
    header = ["runtime"]
    for comparison in comparisons:
        header += [f"{comparison['threads']} thread(s): wall p50 ms (vs {first})",
                   f"{comparison['threads']} thread(s): CPU p50 ms (vs {first})"]
    return ("Wall-clock and process CPU time per call; CPU time is little affected by other processes "
            "waiting for the same cores.\n\n" + table(header, rows))


def gallery_section(result: dict[str, Any]) -> str:
    """Render the gallery sweep: exact search, then every Annoy setting per size."""
    gallery = result.get("gallery")
    if not gallery:
        return "The gallery benchmark did not run."
    distribution = gallery["distribution"]
    intro = (f"{gallery['real_embeddings']} real embeddings plus samples from a {distribution['method']} "
             f"(rank {distribution['rank']}, {distribution['explained_variance']:.0%} of the variance in the "
             f"components); {gallery['queries']} queries: {gallery['query_source']}; recall@{gallery['k']}.")
    builds, sweeps = [], []
    for size in gallery["sizes"]:
        exact = size.get("exact", {}).get("latency")
        sweeps.append([size["items"], "exact (numpy)", None, _ms(exact), _ms(exact, "p99_ms"), 1.0, "1.00x"])
        for index in size["indexes"]:
            memory = index.get("memory") or {}
            opened = (memory.get("checkpoints") or {}).get("gallery_opened", {})
            builds.append([size["items"], index["n_trees"], index["build_s"], index["save_s"],
                           _mb(index["index_bytes"]), _mb(index["gallery_bytes"]), opened.get("rss_mb"),
                           memory.get("peak_rss_mb"), memory.get("rss_anon_mb"), memory.get("rss_file_mb")])
            for row in index["sweep"]:
                speedup = exact["p50_ms"] / row["latency"]["p50_ms"] if exact else None
                sweeps.append([size["items"], f"annoy, {row['n_trees']} trees", row["search_k"],
                               _ms(row["latency"]), _ms(row["latency"], "p99_ms"), row["recall_at_10"],
                               f"{speedup:.2f}x" if speedup else None])
    build_table = table(["items", "n_trees", "build s", "save s", "index MB", "gallery folder MB",
                         "RSS after open MB", "peak RSS MB", "anon MB at end", "file-backed MB at end"], builds)
    sweep_table = table(["items", "search", "search_k", "p50 ms", "p99 ms", "recall@10", "speed vs exact"], sweeps)
    return "\n\n".join([intro, build_table, sweep_table])


def errors_section(result: dict[str, Any]) -> str:
    """Render the failed stages as a table, or a line stating that none failed."""
    errors = result.get("errors", [])
    if not errors:
        return "No stage failed."
    return table(["stage", "error"], [[error["stage"], error["error"]] for error in errors])


def render_markdown(result: dict[str, Any], plots: list[str] | None = None) -> str:
    """Render one run as a Markdown page."""
    sections = [
        f"# edgeembed bench: {run_label(result)}",
        PROFILE_CAVEAT,
        "## Machine\n\n" + machine_section(result),
        "## Targets\n\n" + targets_section(result),
        "## Models\n\n" + models_section(result),
        "## Latency by stage (ms)\n\n" + latency_section(result),
        "## Latency against threads\n\n" + threads_section(result),
        "## Throughput on a folder\n\n" + throughput_section(result),
        "## Ratios against the first model\n\n" + comparison_section(result),
        "## Gallery\n\n" + gallery_section(result),
        "## Errors\n\n" + errors_section(result),
    ]
    if plots:
        sections.append("## Plots\n\n" + "\n".join(f"![{Path(p).stem}]({Path(p).name})" for p in plots))
    return "\n\n".join(sections) + "\n"


def _headline(result: dict[str, Any]) -> dict[str, Any]:
    """Extract the numbers that `merge_markdown` compares across runs."""
    machine = result.get("machine", {})
    values: dict[str, Any] = {
        "CPU": machine.get("board") or machine.get("cpu_model"),
        "profile": machine.get("profile", {}).get("name"),
        "CPUs usable": machine.get("cpus_usable"),
        "interpreter threads": result.get("threads"),
        "load average at start": (machine.get("load_average") or [None])[0],
    }
    for model in result.get("models", []):
        name = model["name"]
        latency = model.get("latency") or {}
        values[f"{name}: invoke p50 ms"] = _ms(model.get("floor"))
        for case in ("small", "phone", "array"):
            values[f"{name}: embed({case}) p50 ms"] = _ms((latency.get(case) or {}).get("embed"))
        cold = (model.get("cold_start") or {}).get("total_s")
        values[f"{name}: cold start s"] = None if cold is None else f"{cold:.2f}"
        values[f"{name}: peak RSS MB"] = (model.get("memory") or {}).get("peak_rss_mb")
        best = max((row["images_per_s"] for row in model.get("throughput") or []), default=None)
        values[f"{name}: best images/s"] = best
    for size in (result.get("gallery") or {}).get("sizes", []):
        values[f"gallery {size['items']}: exact p50 ms"] = _ms(size.get("exact", {}).get("latency"))
        bests = [index["best"] for index in size["indexes"] if index.get("best")]
        if bests:
            best = min(bests, key=lambda row: row["latency"]["p50_ms"])
            values[f"gallery {size['items']}: Annoy best"] = (
                f"recall {best['recall_at_10']:.3f}, {best['latency']['p50_ms']:.2f} ms "
                f"({best['n_trees']} trees, search_k {best['search_k']})")
    for target in result.get("targets", []):
        verdict = {True: "met", False: "missed", None: "-"}[target["met"]]
        values[f"target {target['id']}"] = f"{target['value']} ({verdict})" if target["value"] else verdict
    return values


def merge_markdown(results: list[dict[str, Any]]) -> str:
    """Tabulate several runs side by side: one row per number, one column per run."""
    headlines = [_headline(result) for result in results]
    keys: list[str] = []
    for headline in headlines:
        keys += [key for key in headline if key not in keys]
    header = [""] + [run_label(result) for result in results]
    rows = [[key] + [headline.get(key) for headline in headlines] for key in keys]
    return table(header, rows) + "\n\n" + PROFILE_CAVEAT + "\n"
