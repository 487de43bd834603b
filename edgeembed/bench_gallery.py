"""Gallery benchmark: Annoy against exact search as the gallery grows.

Galleries are built from real embeddings of the user's photos plus synthetic ones from
the same distribution. `fit_distribution` fits a Gaussian to the real embeddings with a
low-rank covariance: the top principal components keep their variances, and the
variance left over is spread evenly over all dimensions. Samples are scaled to unit
length, like real embeddings. A Gaussian keeps the mean and the main directions of
variation but not the clusters of real photos, so recall on a mostly synthetic gallery
is an estimate of recall on a real one of that size.

Queries are held-out real embeddings. Recall@k compares Annoy's k results with the
exact top k by cosine.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeembed import storage
from edgeembed.bench import summarize
from edgeembed.gallery import Gallery

logger = logging.getLogger(__name__)

K = 10
SAMPLE_CHUNK = 8192
TARGET_RECALL = 0.95


@dataclass(frozen=True)
class EmbeddingDistribution:
    """A low-rank Gaussian fitted to real embeddings.

    Attributes:
        mean: The mean embedding, (D,).
        components: Principal directions scaled by their standard deviations, (rank, D).
        residual_std: Standard deviation per dimension of the variance outside the
            components.
        explained: Fraction of the total variance the components keep.
    """

    mean: np.ndarray
    components: np.ndarray
    residual_std: float
    explained: float

    @property
    def rank(self) -> int:
        """The number of principal components kept."""
        return int(self.components.shape[0])

    def describe(self, real_count: int) -> dict[str, Any]:
        """Return the fit as a JSON-ready record."""
        return {"method": "low-rank Gaussian, unit-normalised samples", "real_embeddings": real_count,
                "rank": self.rank, "explained_variance": round(self.explained, 4),
                "residual_std": round(self.residual_std, 6)}


def fit_distribution(vectors: np.ndarray, rank: int = 128) -> EmbeddingDistribution:
    """Fit a Gaussian with a rank-`rank` covariance plus isotropic residual to rows of `vectors`.

    Raises:
        ValueError: If there are fewer than two vectors.
    """
    vectors = np.asarray(vectors, dtype=np.float64)
    count, dim = vectors.shape
    if count < 2:
        raise ValueError(f"need at least 2 real embeddings to fit a distribution, got {count}")

    mean = vectors.mean(axis=0)
    _, singular, directions = np.linalg.svd(vectors - mean, full_matrices=False)
    variances = singular ** 2 / (count - 1)
    rank = min(rank, count - 1)

    total = float(variances.sum())
    kept = float(variances[:rank].sum())
    components = directions[:rank] * np.sqrt(variances[:rank])[:, np.newaxis]
    residual_std = float(np.sqrt(max(total - kept, 0.0) / dim))
    return EmbeddingDistribution(mean.astype(np.float32), components.astype(np.float32), residual_std,
                                 kept / total if total > 0 else 1.0)


def sample_embeddings(distribution: EmbeddingDistribution, count: int, seed: int = 0) -> np.ndarray:
    """Draw `count` unit-length float32 embeddings from a fitted distribution."""
    rng = np.random.default_rng(seed)
    dim = distribution.mean.shape[0]
    samples = np.empty((count, dim), dtype=np.float32)
    for start in range(0, count, SAMPLE_CHUNK):
        rows = min(SAMPLE_CHUNK, count - start)
        latent = rng.standard_normal((rows, distribution.rank), dtype=np.float32)
        noise = rng.standard_normal((rows, dim), dtype=np.float32) * distribution.residual_std
        block = distribution.mean + latent @ distribution.components + noise
        samples[start:start + rows] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return samples


def gallery_vectors(real: np.ndarray, distribution: EmbeddingDistribution, size: int) -> np.ndarray:
    """Return `size` gallery rows: the real embeddings first, then synthetic ones."""
    kept = real[:size]
    if len(kept) == size:
        return np.ascontiguousarray(kept, dtype=np.float32)
    synthetic = sample_embeddings(distribution, size - len(kept), seed=size)
    return np.concatenate([kept.astype(np.float32), synthetic])


def exact_neighbours(vectors: np.ndarray, queries: np.ndarray, k: int = K) -> np.ndarray:
    """Return the item numbers of each query's exact top k by cosine, (Q, k), best first."""
    scores = queries @ vectors.T
    k = min(k, vectors.shape[0])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
    return np.take_along_axis(top, order, axis=1)


def recall_at_k(found: list[list[int]], truth: np.ndarray) -> float:
    """Return the mean fraction of each query's exact top k that a search found."""
    hits = [len(set(items) & set(row.tolist())) / len(row) for items, row in zip(found, truth)]
    return float(np.mean(hits))


def time_searches(search: Callable[[np.ndarray], list], queries: np.ndarray) -> tuple[dict, list[list[int]]]:
    """Run one search per query; return the latency summary and each query's item numbers."""
    search(queries[0])
    durations, found = [], []
    for query in queries:
        start = time.perf_counter()
        matches = search(query)
        durations.append(time.perf_counter() - start)
        found.append([match.item for match in matches])
    return summarize(durations), found


def _folder_bytes(folder: Path, pattern: str = "*") -> int:
    return sum(path.stat().st_size for path in folder.glob(pattern) if path.is_file())


def best_setting(sweep: list[dict], exact_p50_ms: float) -> dict[str, Any] | None:
    """Pick the fastest setting with recall@k at or above `TARGET_RECALL`, else the highest recall.

    Returns:
        The chosen sweep row with its speed-up over exact search, or None for an empty sweep.
    """
    if not sweep:
        return None
    good = [row for row in sweep if row["recall_at_10"] >= TARGET_RECALL]
    if good:
        chosen = min(good, key=lambda row: row["latency"]["p50_ms"])
    else:
        chosen = max(sweep, key=lambda row: (row["recall_at_10"], -row["latency"]["p50_ms"]))
    return {**chosen, "speedup_vs_exact": round(exact_p50_ms / chosen["latency"]["p50_ms"], 3)}


def measure_index(gallery: Gallery, folder: Path, queries: np.ndarray, truth: np.ndarray,
                  search_ks: list[int]) -> tuple[dict[str, Any], list[dict]]:
    """Build, save, reopen and sweep one Annoy index.

    Returns:
        The index record (build and save seconds, file sizes) and its sweep rows.
    """
    start = time.perf_counter()
    gallery.save(folder, overwrite=True)
    save_s = time.perf_counter() - start
    record = {"save_s": round(save_s, 3), "index_bytes": _folder_bytes(folder, "*.ann"),
              "gallery_bytes": _folder_bytes(folder)}

    opened = Gallery.open(folder)
    sweep = []
    for search_k in search_ks:
        latency, found = time_searches(lambda q: opened.search(q, K, search_k=search_k), queries)
        sweep.append({"n_trees": gallery.n_trees, "search_k": search_k, "latency": latency,
                      "recall_at_10": round(recall_at_k(found, truth), 4)})
        logger.info("%d items, %d trees, search_k %d: recall@10 %.3f, p50 %.3f ms", len(gallery),
                    gallery.n_trees, search_k, sweep[-1]["recall_at_10"], latency["p50_ms"])
    return record, sweep


def measure_gallery_size(size: int, real: np.ndarray, distribution: EmbeddingDistribution,
                         queries: np.ndarray, n_trees_list: list[int], search_ks: list[int],
                         workdir: Path, fingerprint: str,
                         memory_probe: Callable[[Path, Path, int], dict] | None = None) -> dict[str, Any]:
    """Benchmark exact search and every Annoy setting on one gallery size.

    Args:
        size: Gallery items.
        real: Real embeddings, used first.
        distribution: The fit that supplies the remaining items.
        queries: Query vectors, unit length.
        n_trees_list: Annoy tree counts to build.
        search_ks: Annoy ``search_k`` values to query with (-1 is Annoy's default).
        workdir: Where gallery folders are written and removed again.
        fingerprint: Model fingerprint recorded in the galleries.
        memory_probe: Called with (gallery folder, queries file, search_k) to measure
            a fresh process's memory with the gallery open; None skips it.

    Returns:
        Exact-search latency and, per tree count, build figures, memory and the sweep.
    """
    vectors = gallery_vectors(real, distribution, size)
    truth = exact_neighbours(vectors, queries)
    ids = [f"item-{i:07d}" for i in range(size)]
    queries_file = workdir / "queries.npy"
    storage.write_npy(queries_file, queries)
    result: dict[str, Any] = {"items": size, "dim": int(vectors.shape[1]),
                              "vectors_bytes": int(vectors.nbytes), "indexes": []}

    for n_trees in n_trees_list:
        folder = workdir / f"gallery-{size}-{n_trees}"
        start = time.perf_counter()
        gallery = Gallery.build(vectors, ids, model_fingerprint=fingerprint, n_trees=n_trees)
        build_s = time.perf_counter() - start
        record, sweep = measure_index(gallery, folder, queries, truth, search_ks)
        del gallery
        record = {"n_trees": n_trees, "build_s": round(build_s, 3), **record, "sweep": sweep}

        if "exact" not in result:
            opened = Gallery.open(folder)
            latency, found = time_searches(lambda q: opened.search_exact(q, K), queries)
            result["exact"] = {"latency": latency, "recall_at_10": round(recall_at_k(found, truth), 4)}
        record["best"] = best_setting(sweep, result["exact"]["latency"]["p50_ms"])
        if memory_probe is not None:
            search_k = record["best"]["search_k"] if record["best"] else -1
            record["memory"] = memory_probe(folder, queries_file, search_k)
        result["indexes"].append(record)
        shutil.rmtree(folder, ignore_errors=True)
    return result
