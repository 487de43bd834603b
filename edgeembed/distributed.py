"""Gallery builds on Ray Data: many cores or machines embed, one driver writes the gallery.

The driver lists the input files and numbers them as rows. Ray tasks read the file
bytes in chunks, and a pool of actors embeds them, each actor with one `Embedder`
loaded once from the model bytes that the driver sends. The driver collects the
vectors into shards of consecutive rows in a staging folder (see `distributed_shards`),
so that a stopped build can be resumed without recomputing finished shards. Once all
shards are written, the driver merges them and saves an ordinary gallery with
`Gallery.build`.

Vectors equal those of `Embedder.embed` on the same file on a device: the actors run
the same model, the same preprocessing and the same interpreter code on the file's
bytes. Item ids and paths are those of the single-process build.

    >>> files = SourceFiles("photos", paths, ids)
    >>> builder = RayGalleryBuilder.create(files, RayBuildOptions(out=Path("gallery")))
    >>> result = builder.run()
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import ray

from edgeembed import storage
from edgeembed.distributed_shards import (
    DistributedBuildError,
    ShardCollector,
    ShardStore,
    SourceFiles,
    StagingPlan,
    is_uri,
    list_uri,  # noqa: F401  (part of this module's API: cli_index calls distributed.list_uri)
    read_chunk,
    staging_folder,
)
from edgeembed.embedder import Embedder
from edgeembed.gallery import DEFAULT_TREES, Gallery
from edgeembed.model import ModelError, read_model_bytes
from edgeembed.preprocess import ImageError

logger = logging.getLogger(__name__)

# Rows per staging shard. A driver that stops loses at most the shards it had not finished.
DEFAULT_SHARD_ROWS = 1024

# How often the driver logs its progress at INFO, in seconds.
PROGRESS_LOG_SECONDS = 10.0


@dataclass
class RayBuildOptions:
    """Options of a gallery build on Ray.

    Attributes:
        out: The gallery folder to write. Shards go to ``OUT.staging`` beside it.
        model_path: The ``.tflite`` embedder; None selects the shipped model.
        threads: Interpreter threads per actor; None means 1, because every actor has its own CPU.
        backend: The TFLite interpreter package, as for `Embedder`.
        ray_address: Address of a running Ray cluster to join; None starts a local Ray
            instance with every CPU of this machine.
        workers: Embedding actors; None means one per CPU of the cluster.
        batch_size: Images per read task and per actor call.
        shard_rows: Images per staging shard.
        resume: Reuse the shards that an earlier run with the same inputs wrote.
        overwrite: Replace an existing gallery folder.
        n_trees: Annoy trees.
        shards: Annoy indexes the gallery is split into.
    """

    out: Path
    model_path: str | Path | None = None
    threads: int | None = None
    backend: str | None = None
    ray_address: str | None = None
    workers: int | None = None
    batch_size: int = 64
    shard_rows: int = DEFAULT_SHARD_ROWS
    resume: bool = False
    overwrite: bool = False
    n_trees: int = DEFAULT_TREES
    shards: int = 1


@dataclass
class RayBuildResult:
    """Outcome and step timings of one build.

    Attributes:
        gallery: The gallery folder.
        items: Items in the gallery.
        failures: (path, reason) of every file that could not be embedded, in row order.
        rows_embedded: Files embedded by this run.
        rows_reused: Files whose shards an earlier run had written.
        startup_seconds: Time to start or join Ray.
        first_result_seconds: Time from submitting the dataset to the first embedded
            rows, which includes starting the actors and loading the model in each.
        embed_seconds: Time from submitting the dataset to the last shard written.
        total_seconds: Time of the whole build, gallery included.
    """

    gallery: Path
    items: int
    failures: list[tuple[str, str]] = field(default_factory=list)
    rows_embedded: int = 0
    rows_reused: int = 0
    startup_seconds: float = 0.0
    first_result_seconds: float = 0.0
    embed_seconds: float = 0.0
    total_seconds: float = 0.0


@dataclass(frozen=True)
class RayResources:
    """Placement of the embedding actors on a Ray cluster.

    Attributes:
        cluster_cpus: CPUs of the whole cluster.
        workers: Embedding actors.
        actor_cpus: CPUs that each actor reserves; below 1 when there are more actors than CPUs.
    """

    cluster_cpus: float
    workers: int
    actor_cpus: float

    @classmethod
    def plan(cls, cluster_cpus: float, workers: int | None) -> RayResources:
        """Place `workers` actors (None: one per CPU) on a cluster of `cluster_cpus` CPUs.

        Read tasks reserve no CPU, so reading and embedding fit together even when
        the actors take every CPU. More actors than CPUs share them in equal integer
        fractions, so that every node with whole CPUs fits a whole number of actors.

        Raises:
            DistributedBuildError: If the cluster has no CPU.
        """
        if cluster_cpus < 1:
            raise DistributedBuildError(f"the Ray cluster has {cluster_cpus} CPUs; embedding needs at least 1")
        count = workers or int(cluster_cpus)
        per_cpu = math.ceil(count / int(cluster_cpus))
        return cls(cluster_cpus, count, 1.0 / per_cpu)


def cached_model_file(model: bytes, fingerprint: str) -> Path:
    """Write model bytes once per machine to the temporary folder and return the file.

    The file is named by its SHA-256, so actors of one build share it and a changed
    model gets a new file.
    """
    folder = Path(tempfile.gettempdir()) / "edgeembed-models"
    path = folder / f"{fingerprint}.tflite"
    if path.is_file() and path.stat().st_size == len(model):
        return path

    folder.mkdir(parents=True, exist_ok=True)
    # A name per process, so that actors starting together never write the same file.
    partial = folder / f"{fingerprint}.{os.getpid()}.partial"
    storage.write_bytes(partial, model)
    os.replace(partial, path)
    return path


class EmbedActor:
    """A Ray Data actor that embeds batches of file bytes with one `Embedder`, loaded once."""

    def __init__(self, model: bytes, fingerprint: str, threads: int | None, backend: str | None) -> None:
        """Load the model from its bytes.

        Raises:
            ModelError: If the model cannot be loaded, or its fingerprint differs from the driver's.
        """
        self.embedder = Embedder(cached_model_file(model, fingerprint), num_threads=threads, backend=backend)
        if self.embedder.fingerprint != fingerprint:
            raise ModelError(f"{self.embedder.model_path} has sha256 {self.embedder.fingerprint[:12]}, "
                             f"the driver's model {fingerprint[:12]}")

    def embed_row(self, data: bytes) -> tuple[np.ndarray | None, str]:
        """Embed one file's bytes; return (vector, "") or (None, reason)."""
        try:
            return self.embedder.embed(data), ""
        except ImageError as error:
            return None, error.reason

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Embed a batch of rows from `read_chunk`; failed rows get a zero vector and their reason."""
        vectors = np.zeros((len(batch["row"]), self.embedder.embedding_dim), dtype=np.float32)
        errors = []
        for offset, (data, error) in enumerate(zip(batch["data"], batch["error"])):
            if not error:
                vector, error = self.embed_row(bytes(data))
                if vector is not None:
                    vectors[offset] = vector
            errors.append(error)
        return {"row": batch["row"], "vector": vectors, "error": np.asarray(errors, dtype=object)}


@contextlib.contextmanager
def ray_session(address: str | None, workers: int | None) -> Iterator[RayResources]:
    """Join the Ray instance at `address`, or start a local one, and plan the actors.

    A Ray connection that this process already has is used as it is and left open.
    A local instance gets every CPU of this machine and is shut down at the end.

    Yields:
        The placement of the embedding actors.
    """
    owns_ray = not ray.is_initialized()
    if owns_ray:
        _start_ray(address)
    try:
        resources = RayResources.plan(ray.cluster_resources().get("CPU", 0.0), workers)
        logger.info("%d embedding actors on %g CPUs, %.2f CPU each", resources.workers,
                    resources.cluster_cpus, resources.actor_cpus)
        yield resources
    finally:
        if owns_ray:
            ray.shutdown()


def _start_ray(address: str | None) -> None:
    """Join the cluster at `address`, or start a local instance with every CPU of this machine.

    Raises:
        DistributedBuildError: If Ray cannot connect or start.
    """
    # Worker output (interpreter banners) and Ray's own warnings show only with debug logs.
    verbose = logger.isEnabledFor(logging.DEBUG)
    quiet = logging.WARNING if verbose else logging.ERROR
    try:
        if address:
            logger.info("joining the Ray cluster at %s", address)
            ray.init(address=address, logging_level=quiet, log_to_driver=verbose)
        else:
            # The CPUs this process may run on, which a container or taskset can limit below os.cpu_count().
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            logger.info("starting a local Ray instance with %d CPUs", cpus)
            ray.init(address="local", num_cpus=cpus, include_dashboard=False, logging_level=quiet,
                     log_to_driver=verbose)
    except (ConnectionError, RuntimeError, ValueError) as error:
        where = f"connect to the Ray cluster at {address}" if address else "start a local Ray instance"
        raise DistributedBuildError(f"cannot {where}: {error}") from error


class _ProgressLog:
    """Periodic INFO log of rows done, rows per second and the estimated time left."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.started = time.perf_counter()
        self.logged = self.started

    def update(self, rows: int) -> None:
        self.done += rows
        now = time.perf_counter()
        if now - self.logged < PROGRESS_LOG_SECONDS and self.done < self.total:
            return
        self.logged = now
        rate = self.done / max(now - self.started, 1e-9)
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        logger.info("embedded %d of %d images, %.1f images/s, about %.0f s left",
                    self.done, self.total, rate, left)


class RayGalleryBuilder:
    """One gallery build on Ray. `create` it to check the inputs and see the work left, then `run` it."""

    def __init__(self, files: SourceFiles, options: RayBuildOptions, embedder: Embedder, store: ShardStore,
                 labels: Sequence[str | None] | None) -> None:
        """Wrap the parts of a build; use `create` instead."""
        self.files = files
        self.options = options
        self.embedder = embedder
        self.store = store
        self.labels = labels

    @classmethod
    def create(cls, files: SourceFiles, options: RayBuildOptions,
               labels: Sequence[str | None] | None = None) -> RayGalleryBuilder:
        """Load the model on the driver, check the options and open the staging folder.

        Args:
            files: The input files in row order.
            options: The build options.
            labels: One label per file, or None.

        Raises:
            DistributedBuildError: If there are no files, an option is invalid, or the
                staging folder contains shards that cannot be reused.
            ModelError: If the model cannot be loaded.
            BackendError: If no TFLite interpreter is installed.
        """
        if not len(files):
            raise DistributedBuildError(f"no images found in {files.source}")
        for name in ("batch_size", "shard_rows", "workers", "threads"):
            value = getattr(options, name)
            if value is not None and value < 1:
                raise DistributedBuildError(f"invalid {name} {value}: use 1 or more")

        embedder = Embedder(options.model_path, num_threads=1, backend=options.backend)
        plan = StagingPlan(files.source, embedder.fingerprint, len(files), options.shard_rows, files.digest())
        store = ShardStore.open(staging_folder(Path(options.out)), plan, files, options.resume)
        return cls(files, options, embedder, store, labels)

    @property
    def pending_rows(self) -> int:
        """Files that this run still has to embed."""
        return sum(end - start for start, end in self.store.pending_ranges())

    @property
    def reused_rows(self) -> int:
        """Files whose shards an earlier run wrote."""
        return len(self.files) - self.pending_rows

    def run(self, progress: Callable[[int], None] | None = None,
            actor_class: type[EmbedActor] = EmbedActor) -> RayBuildResult:
        """Embed the pending files on Ray, merge all shards and save the gallery.

        Args:
            progress: Called with the number of rows after each block of results.
            actor_class: The embedding actor; a subclass may add checks or faults.

        Returns:
            What was written and how long it took. The staging folder is deleted.

        Raises:
            DistributedBuildError: If the Ray job fails; the finished shards stay for `--resume`.
            GalleryError: If no file could be embedded, or the gallery cannot be saved.
        """
        started = time.perf_counter()
        result = RayBuildResult(Path(self.options.out), 0, rows_reused=self.reused_rows)
        pending = self.store.pending_ranges()
        if pending:
            self._embed(pending, result, progress or (lambda rows: None), actor_class)
        else:
            logger.info("all %d images are in the shards of %s", len(self.files), self.store.folder)

        gallery, result.failures = self._merge()
        gallery.save(self.options.out, overwrite=self.options.overwrite)
        self.store.remove()
        result.items = len(gallery)
        result.total_seconds = time.perf_counter() - started
        return result

    def _chunks(self, pending: list[tuple[int, int]], size: int) -> list[dict]:
        """Cut the pending ranges into read chunks of `size` files; paths as bytes, absolute."""
        local = not is_uri(self.files.source)
        chunks = []
        for start, end in pending:
            for first in range(start, end, size):
                paths = self.files.paths[first:min(first + size, end)]
                chunks.append({"start": first, "paths": [os.fsencode(os.path.abspath(p) if local else p)
                                                          for p in paths]})
        return chunks

    def _dataset(self, pending: list[tuple[int, int]], resources: RayResources,
                 actor_class: type[EmbedActor]) -> ray.data.Dataset:
        context = ray.data.DataContext.get_current()
        # The caller shows its own progress. This setting stays for later datasets of this process.
        context.enable_progress_bars = False
        rows = sum(end - start for start, end in pending)
        # Smaller batches for a small build, so that every actor gets work.
        batch_size = max(1, min(self.options.batch_size, math.ceil(rows / resources.workers)))
        chunks = self._chunks(pending, batch_size)
        model = read_model_bytes(self.embedder.model_path)

        dataset = ray.data.from_items(chunks, override_num_blocks=len(chunks))
        # Reading is I/O: the read tasks reserve no CPU, so they always fit beside the actors.
        dataset = dataset.flat_map(read_chunk, fn_kwargs={"source": self.files.source}, num_cpus=0,
                                   compute=ray.data.TaskPoolStrategy(size=resources.workers))
        # Ray Data restarts an actor that dies and retries its batch, so a lost worker costs
        # one batch. NOTE: the retries are unlimited (Ray Data's default), so a file that
        # crashes the decoder process stalls the build instead of failing it.
        return dataset.map_batches(
            actor_class, batch_size=batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=resources.workers), num_cpus=resources.actor_cpus,
            fn_constructor_kwargs={"model": model, "fingerprint": self.embedder.fingerprint,
                                   "threads": self.options.threads or 1, "backend": self.options.backend})

    def _embed(self, pending: list[tuple[int, int]], result: RayBuildResult,
               progress: Callable[[int], None], actor_class: type[EmbedActor]) -> None:
        rows = sum(end - start for start, end in pending)
        logger.info("embedding %d images in %d shards (%d images reused from %s)", rows, len(pending),
                    result.rows_reused, self.store.folder)
        started = time.perf_counter()
        with ray_session(self.options.ray_address, self.options.workers) as resources:
            result.startup_seconds = time.perf_counter() - started
            collector = ShardCollector(self.store, pending, self.embedder.embedding_dim)
            log = _ProgressLog(rows)
            embedding_started = time.perf_counter()
            try:
                for batch in self._dataset(pending, resources, actor_class).iter_batches(
                        batch_size=None, batch_format="numpy"):
                    if not result.rows_embedded:
                        result.first_result_seconds = time.perf_counter() - embedding_started
                    collector.add(batch["row"], batch["vector"], batch["error"])
                    result.rows_embedded += len(batch["row"])
                    progress(len(batch["row"]))
                    log.update(len(batch["row"]))
            except ray.exceptions.RayError as error:
                done = len(self.store.finished_ranges())
                raise DistributedBuildError(
                    f"the Ray job failed: {_last_line(error)}. {done} of {len(self.store.plan.shard_ranges())} "
                    f"shards are saved in {self.store.folder}; run the same command with --resume "
                    "to embed only the rest") from error
            result.embed_seconds = time.perf_counter() - embedding_started

    def _merge(self) -> tuple[Gallery, list[tuple[str, str]]]:
        """Build the gallery from all shards and return it with the failed files."""
        # NOTE: the driver holds every vector twice while Gallery.build scales them to unit
        # length, about 10 GB for one million 1280-d items, and builds the Annoy index alone.
        vectors, kept, failures = self.store.merge(self.embedder.embedding_dim)
        for path, reason in failures:
            logger.warning("skipped %s: %s", path, reason)
        if not kept:
            raise storage.GalleryError(f"none of the {len(self.files)} images could be embedded")

        labels = [self.labels[row] for row in kept] if self.labels is not None else None
        gallery = Gallery.build(vectors, [self.files.ids[row] for row in kept],
                                [self.files.paths[row] for row in kept], labels=labels,
                                model_fingerprint=self.embedder.fingerprint,
                                model_path=str(self.embedder.model_path),
                                n_trees=self.options.n_trees, shards=self.options.shards)
        return gallery, failures


def _last_line(error: BaseException) -> str:
    """Return the last non-empty line of an error's message, which names the original exception."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
