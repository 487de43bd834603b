"""Measurements of one model: latency by stage, the raw-invoke floor, throughput.

Every function here runs in the benchmark's own process (see `edgeembed.bench_run`)
and returns JSON-ready dicts. Times are wall-clock (``time.perf_counter``) and reported
in milliseconds.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from edgeembed import backends, preprocess
from edgeembed.embedder import Embedder
from edgeembed.preprocess import ImageInput

logger = logging.getLogger(__name__)

STAGES = ("decode", "preprocess", "invoke", "postprocess")


def summarize(seconds: Sequence[float]) -> dict[str, float]:
    """Summarise durations in seconds as milliseconds: mean, p50, p95, p99, min, max.

    Percentiles use linear interpolation, so with 100 runs p99 lies between the two
    slowest runs.

    Raises:
        ValueError: If `seconds` is empty.
    """
    if not len(seconds):
        raise ValueError("no samples to summarise")
    values = np.asarray(seconds, dtype=np.float64) * 1000.0
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {
        "runs": int(values.size),
        "mean_ms": round(float(values.mean()), 4),
        "p50_ms": round(float(p50), 4),
        "p95_ms": round(float(p95), 4),
        "p99_ms": round(float(p99), 4),
        "min_ms": round(float(values.min()), 4),
        "max_ms": round(float(values.max()), 4),
    }


def time_calls(call: Callable[[], Any], runs: int, warmup: int) -> list[float]:
    """Run `call` `warmup` times untimed, then `runs` times, and return each duration in seconds."""
    for _ in range(warmup):
        call()

    durations = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        durations.append(time.perf_counter() - start)
    return durations


def time_interleaved(calls: dict[str, Callable[[], Any]], runs: int, warmup: int,
                     block: int = 10) -> dict[str, dict[str, float]]:
    """Time several calls in alternating blocks and summarise each.

    Each round runs every call `block` times in a row (after one untimed call that
    absorbs the switch from the previous call's thread pool), so load from other
    processes and drift over time fall on all calls alike. Use it for ratios.
    Besides wall-clock time, ``cpu_p50_ms`` records the median CPU time of the whole
    process per call (all its threads). CPU time hardly grows when other processes
    wait for the same cores, so its ratios stay meaningful on a busy machine.

    Args:
        calls: Name to call.
        runs: Timed runs per call.
        warmup: Untimed runs of each call before the first round.
        block: Timed runs per call per round.

    Returns:
        A latency summary per name.
    """
    for call in calls.values():
        for _ in range(warmup):
            call()

    samples: dict[str, list[float]] = {name: [] for name in calls}
    cpu_seconds: dict[str, list[float]] = {name: [] for name in calls}
    while len(next(iter(samples.values()))) < runs:
        count = min(block, runs - len(next(iter(samples.values()))))
        for name, call in calls.items():
            call()
            for _ in range(count):
                cpu_start, start = time.process_time(), time.perf_counter()
                call()
                samples[name].append(time.perf_counter() - start)
                cpu_seconds[name].append(time.process_time() - cpu_start)

    results = {}
    for name, values in samples.items():
        results[name] = summarize(values)
        results[name]["cpu_p50_ms"] = round(float(np.median(cpu_seconds[name])) * 1000.0, 4)
    return results


def quantization_kind(embedder: Embedder, backend: str | None = None) -> str:
    """Name a model's quantisation: int8, float16, dynamic or float32.

    The toolchain's provenance record is used when the model has one. Otherwise the
    tensor types decide: integer input means full-integer, float16 weights mean a
    float16 model, int8 weights behind a float input mean dynamic-range quantisation.
    """
    recorded = embedder.metadata.provenance.get("quantization")
    if isinstance(recorded, str) and recorded:
        return recorded
    if isinstance(recorded, dict) and recorded.get("mode"):
        return str(recorded["mode"])
    if embedder.input.dtype in ("uint8", "int8"):
        return "int8"

    _, interpreter = backends.create_interpreter(str(embedder.model_path), 1, backend)
    dtypes = {np.dtype(t["dtype"]).name for t in interpreter.get_tensor_details()}
    if "float16" in dtypes:
        return "float16"
    if "int8" in dtypes:
        return "dynamic"
    return "float32"


def describe_model(embedder: Embedder, backend: str | None = None) -> dict[str, Any]:
    """Record a model's file, size, tensors and quantisation."""
    return {
        "name": embedder.model_path.stem,
        "path": str(embedder.model_path),
        "size_bytes": embedder.size_bytes,
        "sha256": embedder.fingerprint,
        "quantization": quantization_kind(embedder, backend),
        "input_dtype": embedder.input.dtype,
        "input_shape": list(embedder.input.shape),
        "embedding_dim": embedder.embedding_dim,
        "preprocess": embedder.preprocess.to_dict(),
        "backend": embedder.backend.name,
        "backend_version": backends.backend_version(embedder.backend),
    }


def measure_stages(embedder: Embedder, image: ImageInput, runs: int, warmup: int) -> dict[str, Any]:
    """Time decode, preprocess, invoke and postprocess separately, then `Embedder.embed` whole.

    Decode is `preprocess.load_image` (with the JPEG draft size); preprocess is the
    resize, crop and quantisation up to the input tensor; invoke includes copying the
    tensor in and the output out; postprocess dequantises and normalises.

    Returns:
        Latency summaries by stage, plus ``embed`` for the end-to-end call.
    """
    config = embedder.preprocess
    samples: dict[str, list[float]] = {stage: [] for stage in STAGES}

    for run in range(warmup + runs):
        t0 = time.perf_counter()
        rgb = preprocess.load_image(image, config)
        t1 = time.perf_counter()
        tensor = embedder.input_tensor(preprocess.prepare_pixels(rgb, config))
        t2 = time.perf_counter()
        raw = embedder.invoke(tensor)
        t3 = time.perf_counter()
        embedder.postprocess(raw)
        t4 = time.perf_counter()
        if run >= warmup:
            for stage, seconds in zip(STAGES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                samples[stage].append(seconds)

    result = {stage: summarize(values) for stage, values in samples.items()}
    result["embed"] = summarize(time_calls(lambda: embedder.embed(image), runs, warmup))
    return result


def create_floor_interpreter(model_path: str | Path, threads: int, backend: str | None,
                             tensor: np.ndarray):
    """Create a bare interpreter with `tensor` already set as its input.

    Returns:
        The interpreter, ready for ``invoke()``.
    """
    _, interpreter = backends.create_interpreter(str(model_path), threads, backend)
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], tensor)
    return interpreter


def measure_floor(model_path: str | Path, tensor: np.ndarray, threads: int, backend: str | None,
                  runs: int, warmup: int) -> dict[str, float]:
    """Time raw ``Interpreter.invoke()`` on a preloaded input: the floor under `Embedder.embed`.

    Returns:
        The latency summary of ``invoke()`` alone.
    """
    interpreter = create_floor_interpreter(model_path, threads, backend, tensor)
    return summarize(time_calls(interpreter.invoke, runs, warmup))


def naive_embed(embedder: Embedder, path: Path) -> np.ndarray:
    """Embed a file the naive way: full-size PIL decode, plain resize, invoke.

    This is the baseline for `Embedder.embed` on large JPEGs: no draft decoding and no
    reducing gap, so the whole image is decoded and resampled.
    """
    height, width = embedder.preprocess.input_size
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    pixels = np.asarray(rgb.resize((width, height), Image.Resampling.BILINEAR), dtype=np.uint8)
    return embedder.postprocess(embedder.invoke(embedder.input_tensor(pixels)))


def measure_throughput(model_path: str | Path, paths: Sequence[Path], threads: int, overlapped: bool,
                       backend: str | None, decode_threads: int = 2) -> dict[str, Any]:
    """Embed a folder of files once and return images per second.

    Args:
        model_path: The model.
        paths: The image files; they are read once untimed first, so the page cache
            holds them.
        threads: Interpreter threads.
        overlapped: Use `Embedder.embed_files`, which decodes ahead in `decode_threads`
            threads while the model runs; otherwise call `Embedder.embed` in a loop.
        backend: The interpreter backend, or None.
        decode_threads: Decode threads for the overlapped mode.

    Returns:
        The settings, elapsed seconds, images per second and failed files.
    """
    embedder = Embedder(model_path, num_threads=threads, backend=backend, decode_threads=decode_threads)
    for path in paths:
        path.read_bytes()
    for path in paths[:4]:
        embedder.embed(path)

    failures = 0
    start = time.perf_counter()
    if overlapped:
        for result in embedder.embed_files(paths):
            failures += result.vector is None
    else:
        for path in paths:
            embedder.embed(path)
    elapsed = time.perf_counter() - start
    embedder.close()

    return {
        "threads": threads,
        "mode": "overlapped" if overlapped else "sequential",
        "decode_threads": decode_threads if overlapped else 0,
        "images": len(paths),
        "failed": failures,
        "seconds": round(elapsed, 4),
        "images_per_s": round(len(paths) / elapsed, 3),
    }


def measure_throughput_rounds(model_path: str | Path, paths: Sequence[Path], max_threads: int,
                              backend: str | None, rounds: int = 2) -> list[dict[str, Any]]:
    """Measure sequential and overlapped throughput at 1 to `max_threads` threads, in rounds.

    Every round runs each setting once, in the same order, so that load from other
    processes spreads over all settings. Each setting reports the median of its rounds.

    Returns:
        One record per (threads, mode), with ``images_per_s`` the median and
        ``passes`` every round's figure.
    """
    settings = [(count, overlapped) for count in range(1, max_threads + 1) for overlapped in (False, True)]
    passes: dict[tuple[int, bool], list[dict]] = {setting: [] for setting in settings}
    for _ in range(rounds):
        for count, overlapped in settings:
            passes[(count, overlapped)].append(measure_throughput(model_path, paths, count, overlapped, backend))

    records = []
    for setting, results in passes.items():
        record = dict(results[0])
        record["passes"] = [result["images_per_s"] for result in results]
        record["images_per_s"] = round(float(np.median(record["passes"])), 3)
        record["failed"] = max(result["failed"] for result in results)
        record.pop("seconds")
        records.append(record)
    return records
