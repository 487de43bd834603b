"""Cold start and resident memory, each measured in a fresh Python process.

The parent calls `cold_start` or `memory_footprint`; they run this module as

    python -c BOOTSTRAP cold MODEL IMAGE --threads N
    python -c BOOTSTRAP memory MODEL IMAGE... [--gallery DIR --queries Q.npy]

and the child prints one JSON object. The child is started through `BOOTSTRAP`, which
reads the clock before anything of edgeembed is imported, so the cold start separates
Python's own start from the cost of importing edgeembed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROBE_TIMEOUT_S = 900

# Runs `main` with the time at which the child's Python was up, before importing edgeembed.
BOOTSTRAP = ("import time; started = time.time(); import sys; "
             "from edgeembed.bench_probe import main; sys.exit(main(sys.argv[1:], started))")


class ProbeError(RuntimeError):
    """Raised when a probe process fails; the message ends with its last error lines."""


def read_memory() -> dict[str, float]:
    """Return this process's resident memory in MiB: current, peak, anonymous and file-backed.

    Reads ``/proc/self/status`` on Linux; elsewhere only the peak from
    ``getrusage`` is known.
    """
    fields = {"VmRSS": "rss_mb", "VmHWM": "peak_rss_mb", "RssAnon": "rss_anon_mb", "RssFile": "rss_file_mb"}
    try:
        lines = Path("/proc/self/status").read_text(encoding="utf-8").splitlines()
    except OSError:
        import resource

        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {"peak_rss_mb": round(peak_kb / 1024, 1)}

    memory = {}
    for line in lines:
        key = line.split(":")[0]
        if key in fields:
            memory[fields[key]] = round(int(line.split()[1]) / 1024, 1)
    return memory


def _probe_cold(args: argparse.Namespace, started: float) -> dict:
    imported = time.time()
    from edgeembed.embedder import Embedder

    embedder = Embedder(args.model, num_threads=args.threads, backend=args.backend)
    loaded = time.time()
    embedder.embed(args.images[0])
    embedded = time.time()
    return {"child_started": started, "imported": imported, "loaded": loaded, "embedded": embedded}


def _probe_memory(args: argparse.Namespace) -> dict:
    checkpoints = {"start": read_memory()}
    from edgeembed.embedder import Embedder

    embedder = Embedder(args.model, num_threads=args.threads, backend=args.backend)
    checkpoints["model_loaded"] = read_memory()
    for image in args.images:
        embedder.embed(image)
    checkpoints["images_embedded"] = read_memory()
    if args.gallery is None:
        return {"checkpoints": checkpoints, **read_memory()}

    import numpy as np

    from edgeembed.gallery import Gallery

    gallery = Gallery.open(args.gallery, embedder)
    checkpoints["gallery_opened"] = read_memory()
    gallery.search(args.images[0], 10, search_k=args.search_k)
    for vector in np.load(args.queries):
        gallery.search(vector, 10, search_k=args.search_k)
    checkpoints["gallery_searched"] = read_memory()
    return {"checkpoints": checkpoints, "gallery_items": len(gallery), "search_k": args.search_k,
            **read_memory()}


def main(argv: list[str] | None = None, started: float | None = None) -> int:
    """Run one probe and print its JSON result.

    Args:
        argv: The probe's arguments; None reads ``sys.argv``.
        started: When the child's Python was up, before edgeembed was imported.
    """
    started = time.time() if started is None else started
    parser = argparse.ArgumentParser(prog="python -m edgeembed.bench_probe")
    parser.add_argument("probe", choices=("cold", "memory"))
    parser.add_argument("model")
    parser.add_argument("images", nargs="+")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--backend", default=None)
    parser.add_argument("--gallery", default=None)
    parser.add_argument("--queries", default=None, help="a .npy file of query vectors")
    parser.add_argument("--search-k", type=int, default=-1)
    args = parser.parse_args(argv)

    result = _probe_cold(args, started) if args.probe == "cold" else _probe_memory(args)
    print(json.dumps(result))
    return 0


def _run_child(arguments: list[str]) -> dict:
    command = [sys.executable, "-c", BOOTSTRAP, *arguments]
    spawned = time.time()
    completed = subprocess.run(command, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
    if completed.returncode != 0 or not completed.stdout.strip():
        tail = " | ".join(completed.stderr.strip().splitlines()[-3:])
        raise ProbeError(f"probe {arguments[0]} exited with {completed.returncode}: {tail}")
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    result["spawned"] = spawned
    return result


def _options(threads: int | None, backend: str | None) -> list[str]:
    options = []
    if threads is not None:
        options += ["--threads", str(threads)]
    if backend is not None:
        options += ["--backend", backend]
    return options


def cold_start(model: str | Path, image: str | Path, threads: int | None, backend: str | None,
               repeats: int = 3) -> dict:
    """Time process start to first embedding in `repeats` fresh processes.

    The files are in the page cache after the first run, so this is a warm-disk cold
    start: a fresh interpreter, imports and model load, not a cold disk.

    Returns:
        Medians in seconds: ``interpreter_start_s`` (spawn until Python is up),
        ``import_s`` (``import edgeembed``), ``load_s`` (`Embedder` construction,
        including the interpreter backend's import), ``first_embed_s`` and ``total_s``
        (spawn to first embedding), plus each run's total.

    Raises:
        ProbeError: If a probe process fails.
    """
    runs = [_run_child(["cold", str(model), str(image), *_options(threads, backend)]) for _ in range(repeats)]
    phases = {
        "interpreter_start_s": [r["child_started"] - r["spawned"] for r in runs],
        "import_s": [r["imported"] - r["child_started"] for r in runs],
        "load_s": [r["loaded"] - r["imported"] for r in runs],
        "first_embed_s": [r["embedded"] - r["loaded"] for r in runs],
        "total_s": [r["embedded"] - r["spawned"] for r in runs],
    }
    result = {name: round(statistics.median(values), 4) for name, values in phases.items()}
    result["repeats"] = repeats
    result["total_runs_s"] = [round(value, 4) for value in phases["total_s"]]
    return result


def memory_footprint(model: str | Path, images: list[str | Path], threads: int | None,
                     backend: str | None, gallery: str | Path | None = None,
                     queries: str | Path | None = None, search_k: int = -1) -> dict:
    """Measure resident memory of a fresh process that loads a model and embeds `images`.

    With `gallery` and `queries` (a .npy of query vectors) the process also opens the
    gallery, memory-mapped, and searches it once per query and once with an image.
    Memory-mapped pages that searches touch count as file-backed resident memory
    (``rss_file_mb``); the kernel can drop them under pressure, unlike ``rss_anon_mb``.

    Returns:
        Memory in MiB at each checkpoint and at the end, including the peak.

    Raises:
        ProbeError: If the probe process fails.
    """
    arguments = ["memory", str(model), *map(str, images), *_options(threads, backend)]
    if gallery is not None:
        arguments += ["--gallery", str(gallery), "--queries", str(queries), "--search-k", str(search_k)]
    result = _run_child(arguments)
    result.pop("spawned", None)
    return result


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
