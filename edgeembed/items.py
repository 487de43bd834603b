"""Gallery items: the records stored per image, and the matches returned for them."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from edgeembed.embedder import Embedder
from edgeembed.storage import GalleryError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Match:
    """One search result.

    Attributes:
        id: The item id (by default the image path relative to the indexed folder).
        path: The source image path recorded when the item was added, or None.
        score: Cosine similarity between query and item, in [-1, 1].
        item: The row of the item in its segment (the Annoy item for the base).
        segment: ``"base"`` for the Annoy index, ``"added"`` for items added since.
        label: The item's label, or None.
        metadata: Free-form values stored with the item.
    """

    id: str
    path: str | None
    score: float
    item: int
    segment: str = "base"
    label: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Return the JSON object that ``edgeembed search --json`` prints for the match."""
        record: dict[str, Any] = {"id": self.id, "path": self.path, "score": round(self.score, 6)}
        if self.label is not None:
            record["label"] = self.label
        if self.metadata:
            record["metadata"] = self.metadata
        return record


def make_items(ids: Sequence[str], paths: Sequence[str | None] | None = None,
               labels: Sequence[str | None] | None = None,
               metadata: Sequence[dict | None] | None = None) -> list[dict]:
    """Combine per-item columns into the item records stored in a gallery.

    Raises:
        GalleryError: If a column's length differs from the number of ids.
    """
    count = len(ids)
    columns = {"paths": paths, "labels": labels, "metadata": metadata}
    for name, column in columns.items():
        if column is not None and len(column) != count:
            raise GalleryError(f"got {len(column)} {name} for {count} ids")

    items = []
    for row, item_id in enumerate(ids):
        record: dict[str, Any] = {"id": str(item_id), "path": paths[row] if paths else None}
        if labels is not None and labels[row] is not None:
            record["label"] = labels[row]
        if metadata is not None and metadata[row]:
            record["metadata"] = metadata[row]
        items.append(record)
    return items


def unit_rows(vectors: np.ndarray, dim: int | None = None) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or (dim is not None and vectors.shape[1] != dim):
        raise GalleryError(f"expected vectors of shape (N, {dim or 'D'}), got {vectors.shape}")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return vectors / norms


Failures = list[tuple[Path, str]]


def embed_items(images: Sequence[str | Path], embedder: Embedder, ids: Sequence[str] | None = None,
                labels: Sequence[str | None] | None = None,
                progress: Callable[[Path], None] | None = None) -> tuple[np.ndarray, list[dict], Failures]:
    """Embed image files into item records, skipping files that fail.

    Returns:
        The vectors of the files that decoded, their item records, and a list of
        (path, reason) for the files that failed.
    """
    ids = [str(i) for i in ids] if ids is not None else [str(path) for path in images]
    labels = list(labels) if labels is not None else [None] * len(ids)
    vectors, items, failures = [], [], []
    for row, result in enumerate(embedder.embed_files(images)):
        if progress is not None:
            progress(result.path)
        if result.vector is None:
            logger.warning("skipped %s: %s", result.path, result.error)
            failures.append((result.path, result.error or "unknown error"))
            continue
        vectors.append(result.vector)
        items.extend(make_items([ids[row]], [str(result.path)], [labels[row]]))

    stacked = np.stack(vectors) if vectors else np.zeros((0, embedder.embedding_dim), np.float32)
    return stacked, items, failures
