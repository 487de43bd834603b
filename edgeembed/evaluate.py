"""Retrieval quality of an embedder on labelled images: recall@k, mAP and confusions.

    >>> from edgeembed import Embedder
    >>> from edgeembed.evaluate import embed_labelled_folder, evaluate
    >>> data = embed_labelled_folder("flowers17", Embedder())
    >>> result = evaluate(data.vectors, data.labels)
    >>> result.recall_at_1, result.mean_average_precision

Items are ranked by cosine similarity. Without a separate gallery every image is a
query against all the others (leave-one-out). A query is a hit at k when at least one
of its k nearest items has the query's label. Average precision is taken over the full
ranking of the gallery. Queries that have no item of their own label in the gallery
cannot be scored; their classes are listed in `EvaluationResult.excluded_classes`.
"""

from __future__ import annotations

import collections
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Hashable, Sequence

import numpy as np

from edgeembed.preprocess import IMAGE_EXTENSIONS, list_images

if TYPE_CHECKING:
    from edgeembed.embedder import Embedder

logger = logging.getLogger(__name__)

LEAVE_ONE_OUT = "leave-one-out"
SEPARATE_GALLERY = "gallery"

# Queries are scored in blocks of at most this many query-item similarities. The
# temporary arrays of one block then take about 50 MB, whatever the number of images.
_BLOCK_ELEMENTS = 1_000_000


@dataclass(frozen=True)
class ClassResult:
    """Retrieval quality of the queries of one class.

    Attributes:
        recall_at_1: Fraction of the class's queries whose nearest item has their label.
        mean_average_precision: Mean average precision of the class's queries.
        n_queries: Queries of this class that were scored.
    """

    recall_at_1: float
    mean_average_precision: float
    n_queries: int


@dataclass(frozen=True)
class Confusion:
    """Two classes whose queries retrieve each other as their nearest item.

    Attributes:
        classes: The two class names, in natural order (``c2`` before ``c10``).
        count: Queries of either class whose nearest item is of the other class.
    """

    classes: tuple[str, str]
    count: int


@dataclass(frozen=True)
class EvaluationResult:
    """Retrieval metrics over all scored queries.

    Attributes:
        recall_at_1: Fraction of queries whose nearest item has their label.
        recall_at_5: Fraction of queries with their label among the 5 nearest items.
        mean_average_precision: Mean over queries of the average precision of the
            full ranking.
        per_class: Metrics of each scored class, by class name.
        n_images: Images in the evaluation: the queries, plus the gallery items when
            the gallery is separate.
        n_classes: Distinct labels among all images.
        n_queries: Queries that were scored.
        mode: ``"leave-one-out"`` or ``"gallery"`` (queries against a separate gallery).
        excluded_classes: Classes whose queries have no item of their label to find,
            such as classes with a single image in leave-one-out. Their queries count
            in neither the metrics nor `n_queries`.
        confusions: Class pairs most often retrieved for each other at rank 1,
            most frequent first.
    """

    recall_at_1: float
    recall_at_5: float
    mean_average_precision: float
    per_class: dict[str, ClassResult]
    n_images: int
    n_classes: int
    n_queries: int
    mode: str = LEAVE_ONE_OUT
    excluded_classes: list[str] = field(default_factory=list)
    confusions: list[Confusion] = field(default_factory=list)

    def to_dict(self) -> dict:
        """Return a JSON-ready dict with the keys ``recall@1``, ``recall@5``, ``mAP``,
        ``per_class``, ``n_images``, ``n_classes`` and the other attributes."""
        return {
            "recall@1": self.recall_at_1,
            "recall@5": self.recall_at_5,
            "mAP": self.mean_average_precision,
            "per_class": {
                name: {"recall@1": item.recall_at_1, "mAP": item.mean_average_precision,
                       "n_queries": item.n_queries}
                for name, item in self.per_class.items()
            },
            "n_images": self.n_images,
            "n_classes": self.n_classes,
            "n_queries": self.n_queries,
            "mode": self.mode,
            "excluded_classes": list(self.excluded_classes),
            "confusions": [{"classes": list(item.classes), "count": item.count}
                           for item in self.confusions],
        }


@dataclass
class _QueryScores:
    """Per-query results, each an array with one entry per query."""

    hit_at_1: np.ndarray
    hit_at_5: np.ndarray
    average_precision: np.ndarray
    top_label: np.ndarray
    n_positives: np.ndarray


def natural_key(name: str) -> tuple[list, str]:
    """Return a sort key that orders digit runs by value, so ``c2`` sorts before ``c10``."""
    # re.split with a capturing group puts the digit runs at the odd positions.
    parts = [int(part) if position % 2 else part
             for position, part in enumerate(re.split(r"(\d+)", name))]
    return parts, name


def _unit_rows(vectors: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(vectors, dtype=np.float32)
    if array.ndim != 2 or array.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D array (items x dimensions), "
                         f"got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or infinite values")

    norms = np.linalg.norm(array, axis=1, keepdims=True)
    return array / np.where(norms > 0, norms, 1.0)


def _score_queries(queries: np.ndarray, query_labels: np.ndarray, gallery: np.ndarray,
                   gallery_labels: np.ndarray, leave_one_out: bool) -> _QueryScores:
    """Rank the gallery for every query and score the rankings.

    In leave-one-out mode `queries` and `gallery` are the same rows and each query's
    own row is left out of its ranking.
    """
    n_queries, n_gallery = len(queries), len(gallery)
    ranked_length = n_gallery - 1 if leave_one_out else n_gallery
    block = max(1, _BLOCK_ELEMENTS // n_gallery)
    ranks = np.arange(1, ranked_length + 1, dtype=np.float64)
    scores = _QueryScores(np.zeros(n_queries, bool), np.zeros(n_queries, bool),
                          np.zeros(n_queries), np.zeros(n_queries, np.int64),
                          np.zeros(n_queries, np.int64))

    for start in range(0, n_queries, block):
        rows = slice(start, min(start + block, n_queries))
        similarity = queries[rows] @ gallery.T
        if leave_one_out:
            # -inf sorts the query's own row last, where it is cut off.
            own = np.arange(rows.start, rows.stop)
            similarity[own - rows.start, own] = -np.inf

        # NOTE: items with equal similarity keep their gallery order (stable sort), so
        # exact ties, such as duplicate images, are ranked by position, not at random.
        order = np.argsort(-similarity, axis=1, kind="stable")[:, :ranked_length]
        ranked_labels = gallery_labels[order]
        relevant = ranked_labels == query_labels[rows, np.newaxis]

        n_positives = relevant.sum(axis=1)
        precision = np.cumsum(relevant, axis=1) / ranks
        average_precision = (precision * relevant).sum(axis=1) / np.maximum(n_positives, 1)

        scores.hit_at_1[rows] = relevant[:, :1].any(axis=1)
        scores.hit_at_5[rows] = relevant[:, :5].any(axis=1)
        scores.average_precision[rows] = average_precision
        scores.top_label[rows] = ranked_labels[:, 0] if ranked_length else -1
        scores.n_positives[rows] = n_positives
    return scores


def _per_class_results(scores: _QueryScores, query_labels: np.ndarray, scored: np.ndarray,
                       names: Sequence[str]) -> dict[str, ClassResult]:
    results = {}
    for label in np.unique(query_labels[scored]).tolist():
        members = scored & (query_labels == label)
        results[names[label]] = ClassResult(
            recall_at_1=float(scores.hit_at_1[members].mean()),
            mean_average_precision=float(scores.average_precision[members].mean()),
            n_queries=int(members.sum()),
        )
    return results


def _count_confusions(query_labels: np.ndarray, top_labels: np.ndarray,
                      names: Sequence[str], limit: int) -> list[Confusion]:
    pairs: collections.Counter[tuple[str, str]] = collections.Counter()
    for query_label, top_label in zip(query_labels.tolist(), top_labels.tolist()):
        if query_label != top_label:
            first, second = sorted((names[query_label], names[top_label]), key=natural_key)
            pairs[(first, second)] += 1

    ordered = sorted(pairs.items(), key=lambda pair: (-pair[1], [natural_key(name) for name in pair[0]]))
    return [Confusion(classes, count) for classes, count in ordered[:limit]]


def evaluate(vectors: np.ndarray, labels: Sequence[Hashable], *,
             gallery_vectors: np.ndarray | None = None,
             gallery_labels: Sequence[Hashable] | None = None,
             max_confusions: int = 10) -> EvaluationResult:
    """Measure how well embeddings retrieve items of the same label.

    Without a gallery every row is a query against all other rows (leave-one-out).
    With one, the rows of `vectors` are queries against the gallery rows only.
    Similarity is the cosine, so the vectors need not be unit length.

    Args:
        vectors: Embeddings, one row per image (the queries).
        labels: The class of each row; any hashable values, reported by their
            ``str()``.
        gallery_vectors: Embeddings to search instead of the other query rows.
        gallery_labels: The class of each gallery row; required with `gallery_vectors`.
        max_confusions: Maximum number of class pairs in `EvaluationResult.confusions`.

    Returns:
        The metrics over every query whose label occurs in the gallery.

    Raises:
        ValueError: If shapes or label counts do not match, `max_confusions` is
            negative, or no query has an item of its label to find (for example,
            every class has a single image).
    """
    if max_confusions < 0:
        raise ValueError(f"max_confusions must be 0 or more, got {max_confusions}")
    queries = _unit_rows(vectors, "vectors")
    if len(labels) != len(queries):
        raise ValueError(f"got {len(labels)} labels for {len(queries)} vectors")

    leave_one_out = gallery_vectors is None
    if leave_one_out:
        gallery, all_labels = queries, list(labels)
    else:
        if gallery_labels is None:
            raise ValueError("gallery_labels is required with gallery_vectors")
        gallery = _unit_rows(gallery_vectors, "gallery_vectors")
        if len(gallery_labels) != len(gallery):
            raise ValueError(f"got {len(gallery_labels)} gallery labels for {len(gallery)} "
                             "gallery vectors")
        if gallery.shape[1] != queries.shape[1]:
            raise ValueError(f"queries have {queries.shape[1]} dimensions but the gallery has "
                             f"{gallery.shape[1]}; embed both with the same model")
        all_labels = list(labels) + list(gallery_labels)

    names = sorted({str(label) for label in all_labels}, key=natural_key)
    index = {name: number for number, name in enumerate(names)}
    query_ids = np.array([index[str(label)] for label in labels], dtype=np.int64)
    gallery_ids = query_ids if leave_one_out else np.array(
        [index[str(label)] for label in gallery_labels], dtype=np.int64)

    scores = _score_queries(queries, query_ids, gallery, gallery_ids, leave_one_out)
    scored = scores.n_positives > 0
    excluded = [names[label] for label in np.unique(query_ids[~scored]).tolist()]
    if not scored.any():
        raise ValueError("no query has another item of its label to retrieve; each class "
                         "needs at least two images (or one in the gallery)")
    if excluded:
        logger.info("excluded the queries of %d classes that have no other item of their "
                    "label: %s", len(excluded), ", ".join(excluded))

    return EvaluationResult(
        recall_at_1=float(scores.hit_at_1[scored].mean()),
        recall_at_5=float(scores.hit_at_5[scored].mean()),
        mean_average_precision=float(scores.average_precision[scored].mean()),
        per_class=_per_class_results(scores, query_ids, scored, names),
        n_images=len(all_labels),
        n_classes=len(names),
        n_queries=int(scored.sum()),
        mode=LEAVE_ONE_OUT if leave_one_out else SEPARATE_GALLERY,
        excluded_classes=excluded,
        confusions=_count_confusions(query_ids[scored], scores.top_label[scored], names,
                                     max_confusions),
    )


class LabelledFolderError(ValueError):
    """Raised when a folder does not have the class sub-folder layout or has no images."""


@dataclass
class LabelledEmbeddings:
    """Embeddings of the images of a labelled folder.

    Attributes:
        vectors: Float32 array (images x dimensions), one row per embedded image.
        labels: The class of each row: the name of its class sub-folder.
        paths: The image file of each row.
        skipped: (path, reason) for each image that could not be embedded.
    """

    vectors: np.ndarray
    labels: list[str]
    paths: list[Path]
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def list_labelled_images(root: str | Path) -> list[tuple[Path, str]]:
    """List the images of a folder with one sub-folder per class.

    Images are found recursively inside each class sub-folder and take its name as
    their label. Sub-folders whose names start with a dot are ignored, and so are
    images directly in `root`, with a warning.

    Args:
        root: The labelled folder.

    Returns:
        (path, label) pairs, sorted by label and then by path.

    Raises:
        LabelledFolderError: If `root` is not a folder, has no class sub-folders or
            has no images in them.
    """
    root = Path(root)
    if not root.is_dir():
        raise LabelledFolderError(f"{root} is not a folder; pass a folder with one "
                                  "sub-folder of images per class")

    entries = sorted(root.iterdir())
    class_folders = [path for path in entries if path.is_dir() and not path.name.startswith(".")]
    loose = [path for path in entries if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS]
    if loose:
        logger.warning("ignored %d images directly in %s (e.g. %s); only images inside class "
                       "sub-folders have a label", len(loose), root, loose[0].name)
    if not class_folders:
        raise LabelledFolderError(f"{root} has no sub-folders; put the images of each class "
                                  "in a sub-folder named after the class")

    items: list[tuple[Path, str]] = []
    for folder in class_folders:
        images = list_images([folder])
        if not images:
            logger.warning("class folder %s contains no images; the class is left out", folder)
        items.extend((path, folder.name) for path in images)
    if not items:
        raise LabelledFolderError(f"none of the {len(class_folders)} class sub-folders of "
                                  f"{root} contains images")
    return items


def embed_labelled_images(items: Sequence[tuple[Path, str]], embedder: Embedder,
                          progress: Callable[[Path], None] | None = None) -> LabelledEmbeddings:
    """Embed labelled images, going on past those that cannot be decoded.

    An image that fails is logged as a warning and recorded in
    `LabelledEmbeddings.skipped`.

    Args:
        items: (path, label) pairs, as `list_labelled_images` returns.
        embedder: The model to embed the images with.
        progress: Optional callable run with each finished path, for progress bars.

    Returns:
        The embeddings, labels and paths of the images that were embedded, in the
        order of `items`.
    """
    data = LabelledEmbeddings(np.empty((0, embedder.embedding_dim), np.float32), [], [])
    vectors = []

    results = embedder.embed_files([path for path, _ in items])
    for (_, label), result in zip(items, results):
        if progress is not None:
            progress(result.path)
        if result.vector is None:
            logger.warning("skipped %s: %s", result.path, result.error)
            data.skipped.append((result.path, result.error or "unknown error"))
            continue
        vectors.append(result.vector)
        data.labels.append(label)
        data.paths.append(result.path)

    if vectors:
        data.vectors = np.stack(vectors)
    return data


def embed_labelled_folder(root: str | Path, embedder: Embedder,
                          progress: Callable[[Path], None] | None = None) -> LabelledEmbeddings:
    """Embed every image of a folder with one sub-folder per class.

    Args:
        root: The labelled folder; see `list_labelled_images`.
        embedder: The model to embed the images with.
        progress: Optional callable run with each finished path, for progress bars.

    Returns:
        The embeddings, labels and paths of the images that were embedded; images
        that could not be decoded are in `LabelledEmbeddings.skipped`.

    Raises:
        LabelledFolderError: If the folder layout is wrong; see `list_labelled_images`.
    """
    return embed_labelled_images(list_labelled_images(root), embedder, progress)
