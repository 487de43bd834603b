"""One benchmark run, in its own process, under a device profile's limits.

``edgeembed bench`` writes `BenchSettings` to a JSON file and starts

    python -m edgeembed.bench_run SETTINGS.json RESULT.json

That child applies the profile (CPU affinity, memory ceiling), measures stage by
stage and rewrites RESULT.json after every stage, so a run that dies (for example at
the memory ceiling) keeps what it measured. A stage that fails is recorded under
``errors`` and the run goes on.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeembed import bench, bench_gallery, bench_peers, bench_probe, storage
from edgeembed.bench_machine import AppliedLimits, DeviceProfile, apply_profile, describe_machine
from edgeembed.bench_photos import PhotoSet, input_array, make_photo_set, spread

logger = logging.getLogger(__name__)

RESULT_SCHEMA = "edgeembed.bench/1"
# Runs per runtime in the cross-runtime comparison; eager PyTorch is slow enough that 100
# runs at two thread counts would dominate the suite's time.
COMPARISON_RUNS = 30

STAGES = ("cold-start", "memory", "latency", "threads", "naive", "throughput", "peers", "gallery")


@dataclass
class BenchSettings:
    """Everything one run needs; JSON-serialisable so it can cross into the child process.

    Attributes:
        models: Model files in order; None entries mean the shipped default model.
            The first model is the one compared against peers, naive decoding and
            used for the gallery.
        photos: Folder of real photos.
        profile: The device profile, as `DeviceProfile` fields.
        runs: Timed runs per latency measurement.
        warmup: Untimed runs before each latency measurement.
        threads: Interpreter threads; None takes the profile's.
        backend: Interpreter backend name, or None.
        gallery_sizes: Gallery item counts.
        n_trees: Annoy tree counts to build per gallery size.
        search_k: Annoy ``search_k`` values to query with; -1 is Annoy's default.
        queries: Query vectors per gallery.
        real_images: Photos to embed for the gallery's real embeddings.
        folder_images: Photos in the throughput folder.
        cold_runs: Fresh processes for the cold start.
        peers: Peer runtimes to measure (see `bench_peers.PEERS`).
        skip: Stages to leave out (see `STAGES`).
        reference_photo: The photo the small and phone JPEGs are made from; None
            takes the largest in `photos`.
        verbose: Log at debug level in the child.
    """

    models: list[str | None]
    photos: str
    profile: dict[str, Any]
    runs: int = 100
    warmup: int = 10
    threads: int | None = None
    backend: str | None = None
    gallery_sizes: list[int] = field(default_factory=lambda: [1000, 10000])
    n_trees: list[int] = field(default_factory=lambda: [10, 50])
    search_k: list[int] = field(default_factory=lambda: [-1, 2000, 5000, 10000, 20000, 30000])
    queries: int = 100
    real_images: int = 800
    folder_images: int = 48
    cold_runs: int = 3
    peers: list[str] = field(default_factory=lambda: list(bench_peers.PEERS))
    skip: list[str] = field(default_factory=list)
    reference_photo: str | None = None
    verbose: bool = False


class Run:
    """The result document of one run, saved after every stage."""

    def __init__(self, settings: BenchSettings, path: Path) -> None:
        self.settings = settings
        self.path = path
        self.started = time.perf_counter()
        self.result: dict[str, Any] = {"schema": RESULT_SCHEMA, "settings": asdict(settings),
                                       "machine": {}, "photos": {}, "models": [], "peers": [],
                                       "gallery": None, "errors": [], "stage_seconds": {}}

    def save(self) -> None:
        """Write the result so far, with the elapsed time."""
        self.result["duration_s"] = round(time.perf_counter() - self.started, 1)
        storage.write_text(self.path, json.dumps(self.result, indent=1, default=_to_json))

    def stage(self, name: str, measure: Callable[[], Any]) -> Any:
        """Run one measurement; record a failure under ``errors`` and return None instead."""
        logger.info("measuring %s", name)
        start = time.perf_counter()
        try:
            value = measure()
        except Exception as error:  # noqa: BLE001  (one failed stage must not lose the others)
            logger.error("%s failed: %s: %s", name, type(error).__name__, error)
            self.result["errors"].append({"stage": name, "error": f"{type(error).__name__}: {error}"})
            value = None
        self.result["stage_seconds"][name] = round(time.perf_counter() - start, 1)
        self.save()
        return value

    def wanted(self, stage: str) -> bool:
        """Return whether a stage is not skipped."""
        return stage not in self.settings.skip


def _to_json(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def measure_latency(embedder, photos: PhotoSet, settings: BenchSettings) -> dict[str, Any]:
    """Measure stage latencies for the small and phone JPEGs, the frame and the input-size array."""
    cases = {
        "small": photos.small,
        "phone": photos.phone,
        "array": photos.array,
        "input": input_array(photos.array, embedder.preprocess.input_size),
    }
    return {name: bench.measure_stages(embedder, image, settings.runs, settings.warmup)
            for name, image in cases.items()}


def measure_overhead(embedder, path: Path, frame: np.ndarray, threads: int, settings: BenchSettings) -> dict:
    """Time raw invoke() and `Embedder.embed` on arrays in alternating blocks.

    Returns:
        Latency of ``invoke`` (the floor), ``embed_input`` (an array at the input
        size) and ``embed_array`` (the 640x480 frame).
    """
    small = input_array(frame, embedder.preprocess.input_size)
    interpreter = bench.create_floor_interpreter(path, threads, settings.backend,
                                                 embedder.input_tensor(embedder.prepare(frame)))
    return bench.time_interleaved({"invoke": interpreter.invoke,
                                   "embed_input": lambda: embedder.embed(small),
                                   "embed_array": lambda: embedder.embed(frame)}, settings.runs, settings.warmup)


def measure_model(run: Run, model: str, photos: PhotoSet, threads: int, cpus: int,
                  first: bool, source: str) -> dict[str, Any]:
    """Measure one model (a snapshot copy of `source`) stage by stage and append its record to the run."""
    from edgeembed.embedder import Embedder

    settings = run.settings
    start = time.perf_counter()
    embedder = Embedder(model, num_threads=threads, backend=settings.backend)
    load_s = time.perf_counter() - start
    entry = {**bench.describe_model(embedder, settings.backend), "threads": threads,
             "load_s": round(load_s, 4), "copy": str(embedder.model_path)}
    entry["path"] = source
    run.result["models"].append(entry)
    label = entry["name"]
    path = embedder.model_path

    if run.wanted("cold-start"):
        entry["cold_start"] = run.stage(f"{label} cold start", lambda: bench_probe.cold_start(
            path, photos.small, threads, settings.backend, settings.cold_runs))
    if run.wanted("memory"):
        entry["memory"] = run.stage(f"{label} memory", lambda: bench_probe.memory_footprint(
            path, [photos.small, photos.phone], threads, settings.backend))

    overhead = run.stage(f"{label} floor and overhead",
                         lambda: measure_overhead(embedder, path, photos.array, threads, settings))
    if overhead is not None:
        entry["floor"] = overhead["invoke"]
        entry["overhead"] = overhead
    if run.wanted("latency"):
        entry["latency"] = run.stage(f"{label} latency", lambda: measure_latency(embedder, photos, settings))
    if run.wanted("threads"):
        tensor = embedder.input_tensor(embedder.prepare(photos.array))
        entry["threads_sweep"] = run.stage(f"{label} threads", lambda: [
            {"threads": count, "invoke": bench.measure_floor(path, tensor, count, settings.backend,
                                                             settings.runs, settings.warmup)}
            for count in range(1, cpus + 1)])
    if first and run.wanted("naive"):
        entry["naive"] = run.stage(f"{label} naive decode", lambda: bench.time_interleaved(
            {"embed_phone": lambda: embedder.embed(photos.phone),
             "naive_phone": lambda: bench.naive_embed(embedder, photos.phone)}, settings.runs, settings.warmup))
    if run.wanted("throughput"):
        entry["throughput"] = run.stage(f"{label} throughput", lambda: bench.measure_throughput_rounds(
            path, photos.folder, cpus, settings.backend))

    entry["small_embedding"] = embedder.embed(photos.small)
    embedder.close()
    return entry


def _peers_reason(entry: dict[str, Any]) -> str | None:
    if entry["embedding_dim"] != 1280 or entry["input_shape"][1:3] != [224, 224]:
        return (f"the peers are EfficientNet-Lite0 (224x224 in, 1280 out); the first model "
                f"{entry['name']} is {entry['input_shape'][1:3]} in, {entry['embedding_dim']} out")
    return None


def _comparison_calls(run: Run, photos: PhotoSet, threads: int, peers: list) -> dict[str, Any]:
    from edgeembed.embedder import Embedder

    calls: dict[str, Any] = {}
    for entry in run.result["models"]:
        embedder = Embedder(entry["copy"], num_threads=threads, backend=run.settings.backend)
        tensor = embedder.input_tensor(embedder.prepare(photos.small))
        interpreter = bench.create_floor_interpreter(entry["copy"], threads, run.settings.backend, tensor)
        calls[f"model {entry['name']}"] = interpreter.invoke
    for peer, values in peers:
        calls[f"peer {peer.name}"] = lambda peer=peer, values=values: peer.forward(values)
    return calls


def measure_comparison(run: Run, photos: PhotoSet, threads: int, workdir: Path) -> list[dict[str, Any]]:
    """Time every model's invoke() and every peer's forward in alternating blocks, on the same photo.

    The comparison runs at one thread and at `threads`, for at most `COMPARISON_RUNS`
    runs each: multi-threaded runtimes that spin-wait suffer most when other processes
    share the CPU, and one thread shows the comparison without that effect. Peer
    records, or the reason a peer was skipped, go to ``run.result["peers"]``.

    Returns:
        One ``{"threads", "models": {name: latency}, "peers": {name: latency}}`` per
        thread count.
    """
    from edgeembed.model import PreprocessConfig

    settings = run.settings
    runs = min(settings.runs, COMPARISON_RUNS)
    first = run.result["models"][0]
    config = bench_peers.peer_preprocess(PreprocessConfig.from_dict(first["preprocess"]))
    values = bench_peers.peer_input(photos.small, config)
    reason = _peers_reason(first)
    names = settings.peers if reason is None and run.wanted("peers") else []
    records: dict[str, dict] = {name: {"name": name, "skipped": reason} for name in settings.peers}

    comparisons = []
    for count in sorted({1, threads}):
        peers, skipped = bench_peers.load_peers(names, count, workdir)
        records.update({record["name"]: record for record in skipped})
        timed = bench.time_interleaved(_comparison_calls(run, photos, count, [(p, values) for p in peers]),
                                       runs, settings.warmup)
        comparisons.append({"threads": count, "runs": runs,
                            "models": {key[6:]: stats for key, stats in timed.items() if key.startswith("model ")},
                            "peers": {key[5:]: stats for key, stats in timed.items() if key.startswith("peer ")}})
        if count != threads:
            continue
        for peer in peers:
            record = bench_peers.measure_peer(peer, photos.small, config, count, runs, settings.warmup,
                                              np.asarray(first["small_embedding"]))
            records[peer.name] = {**record, "forward": timed[f"peer {peer.name}"]}
    run.result["peers"] = list(records.values())
    return comparisons


def measure_galleries(run: Run, first: dict[str, Any], photos: PhotoSet, threads: int, workdir: Path) -> dict:
    """Embed real photos with the first model, fit the distribution and sweep every gallery size."""
    from edgeembed.embedder import Embedder

    settings = run.settings
    embedder = Embedder(first["copy"], num_threads=threads, backend=settings.backend)
    paths = spread(photos.all_photos, settings.real_images)
    real = np.stack([r.vector for r in embedder.embed_files(paths) if r.vector is not None])

    held_out = np.zeros(len(real), dtype=bool)
    if len(real) >= 2 * settings.queries:
        held_out[np.linspace(0, len(real) - 1, settings.queries).round().astype(int)] = True
    distribution = bench_gallery.fit_distribution(real[~held_out])
    if held_out.any():
        queries, query_source = real[held_out], "held-out real embeddings"
    else:
        queries = bench_gallery.sample_embeddings(distribution, settings.queries, seed=1)
        query_source = f"synthetic (fewer than {2 * settings.queries} real embeddings)"

    def probe(folder: Path, queries_file: Path, search_k: int) -> dict:
        try:
            return bench_probe.memory_footprint(first["copy"], [photos.small], threads, settings.backend,
                                                folder, queries_file, search_k)
        except bench_probe.ProbeError as error:
            logger.error("memory probe of %s failed: %s", folder.name, error)
            run.result["errors"].append({"stage": f"{folder.name} memory", "error": str(error)})
            return {"error": str(error)}

    gallery = {"real_embeddings": int((~held_out).sum()), "queries": len(queries),
               "query_source": query_source, "distribution": distribution.describe(int((~held_out).sum())),
               "k": bench_gallery.K, "sizes": []}
    run.result["gallery"] = gallery
    for size in settings.gallery_sizes:
        measured = run.stage(f"gallery {size}", lambda: bench_gallery.measure_gallery_size(
            size, real[~held_out], distribution, queries, settings.n_trees, settings.search_k, workdir,
            embedder.fingerprint, probe if run.wanted("memory") else None))
        if measured is not None:
            gallery["sizes"].append(measured)
    return gallery


def snapshot_models(models: list[str | None], workdir: Path) -> list[tuple[str, str]]:
    """Copy each model file into `workdir` and return (original, copy) path pairs.

    Measuring copies keeps one run consistent when a model file is rebuilt in place
    while the run goes on. The copies keep the original file names.
    """
    from edgeembed.model import default_model_path

    copies = []
    for number, model in enumerate(models):
        source = Path(model) if model else default_model_path()
        target = workdir / "models" / str(number) / source.name
        target.parent.mkdir(parents=True)
        shutil.copyfile(source, target)
        copies.append((str(source), str(target)))
    return copies


def run_benchmark(settings: BenchSettings, result_path: Path) -> dict[str, Any]:
    """Apply the profile, measure every stage and return the result document."""
    profile = DeviceProfile(**settings.profile)
    applied: AppliedLimits = apply_profile(profile)
    threads = settings.threads or applied.threads
    cpus = len(applied.cpus)
    run = Run(settings, result_path)
    run.result["machine"] = describe_machine(profile, applied)
    run.result["threads"] = threads

    workdir = Path(tempfile.mkdtemp(prefix="edgeembed-bench-"))
    try:
        photos = make_photo_set(Path(settings.photos), workdir, settings.folder_images,
                                Path(settings.reference_photo) if settings.reference_photo else None)
        run.result["photos"] = photos.describe()
        for number, (model, copy) in enumerate(snapshot_models(settings.models, workdir)):
            run.stage(f"model {Path(copy).name}", lambda: measure_model(run, copy, photos, threads, cpus,
                                                                      number == 0, model))

        first = run.result["models"][0] if run.result["models"] else None
        if first is not None:
            if (run.wanted("peers") and settings.peers) or len(run.result["models"]) > 1:
                run.result["comparison"] = run.stage("comparison", lambda: measure_comparison(
                    run, photos, threads, workdir))
            if run.wanted("gallery") and settings.gallery_sizes:
                run.stage("gallery", lambda: measure_galleries(run, first, photos, threads, workdir))
        for entry in run.result["models"]:
            entry.pop("small_embedding", None)
            entry.pop("copy", None)
        run.result["machine"]["load_average_after"] = [round(value, 2) for value in os.getloadavg()]
        run.save()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return run.result


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark described by a settings file and write the result file."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m edgeembed.bench_run SETTINGS.json RESULT.json", file=sys.stderr)
        return 2
    settings = BenchSettings(**json.loads(Path(argv[0]).read_text(encoding="utf-8")))
    logging.basicConfig(level=logging.DEBUG if settings.verbose else logging.INFO,
                        format="bench: %(message)s")
    run_benchmark(settings, Path(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
