"""The Gallery: embeddings of known images in an Annoy index, saved as a folder.

A gallery folder contains:

- ``index.ann``: the Annoy index (angular metric), memory-mapped when opened;
- ``vectors.npy``: the unit-length float32 embeddings, row i is Annoy item i, kept so
  that the index can be rebuilt and checked against exact search;
- ``items.json``: the id and source path of each item, in item order;
- ``manifest.json``: the model fingerprint, vector size, item count, Annoy settings
  and the size and SHA-256 of each file above. It is written last.

Search scores are cosine similarities computed from the stored vectors, not Annoy's
angular distance.
"""

from __future__ import annotations

import collections
import json
import logging
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np
from annoy import AnnoyIndex

from edgeembed import storage
from edgeembed.storage import GalleryError
from edgeembed.embedder import Embedder
from edgeembed.preprocess import ImageInput

logger = logging.getLogger(__name__)

SCHEMA = "edgeembed.gallery/1"
MANIFEST = "manifest.json"
INDEX = "index.ann"
VECTORS = "vectors.npy"
ITEMS = "items.json"

DEFAULT_TREES = 10
ANNOY_SEED = 42


@dataclass(frozen=True)
class Match:
    """One search result.

    Attributes:
        id: The item id given when the gallery was built (by default the image path
            relative to the folder that was indexed).
        path: The source image path recorded at build time, or None for vectors.
        score: Cosine similarity between query and item, in [-1, 1].
        item: The Annoy item number.
    """

    id: str
    path: str | None
    score: float
    item: int

    def to_dict(self) -> dict:
        """Return the match as the JSON object that ``edgeembed search --json`` prints."""
        return {"id": self.id, "path": self.path, "score": round(self.score, 6)}


def _normalise_rows(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return vectors / norms


def build_annoy(vectors: np.ndarray, n_trees: int, seed: int = ANNOY_SEED) -> AnnoyIndex:
    """Build an angular Annoy index whose item i is row i of `vectors`.

    Args:
        vectors: Unit-length float32 rows.
        n_trees: Number of trees; more trees give better recall and a larger file.
        seed: Annoy's random seed, so that the same vectors give the same index.

    Returns:
        The built index.
    """
    index = AnnoyIndex(vectors.shape[1], "angular")
    index.set_seed(seed)
    for item, vector in enumerate(vectors):
        index.add_item(item, vector)
    index.build(n_trees)
    return index


class Gallery:
    """Searchable embeddings of known images, with their ids and paths.

    Create one with `build` (from vectors) or `from_images`, write it with `save`,
    and load it with `open`.
    """

    def __init__(self, vectors: np.ndarray, ids: Sequence[str], paths: Sequence[str | None],
                 model_fingerprint: str, model_path: str | None, n_trees: int,
                 index: AnnoyIndex, embedder: Embedder | None = None,
                 directory: Path | None = None) -> None:
        """Assemble a gallery from its parts; use `build`, `from_images` or `open` instead."""
        self.vectors = vectors
        self.ids = list(ids)
        self.paths = list(paths)
        self.model_fingerprint = model_fingerprint
        self.model_path = model_path
        self.n_trees = n_trees
        self.embedder = embedder
        self.directory = directory
        self._index = index

    @property
    def dim(self) -> int:
        """The embedding length."""
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def build(cls, vectors: np.ndarray, ids: Sequence[str], paths: Sequence[str | None] | None = None,
              *, model_fingerprint: str, model_path: str | None = None,
              n_trees: int = DEFAULT_TREES, embedder: Embedder | None = None) -> Gallery:
        """Build an in-memory gallery from vectors and their ids.

        Args:
            vectors: Array of shape (N, D); rows are scaled to unit length.
            ids: N unique item ids.
            paths: N source paths (or None entries); defaults to all None.
            model_fingerprint: SHA-256 of the model that computed the vectors.
            model_path: Where that model was, recorded for later searches.
            n_trees: Annoy trees.
            embedder: The embedder to use for image queries.

        Raises:
            GalleryError: If sizes disagree, ids repeat, or the gallery is empty.
        """
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or len(vectors) == 0:
            raise GalleryError(f"need a non-empty (N, D) array of vectors, got shape {vectors.shape}")
        if len(ids) != len(vectors):
            raise GalleryError(f"got {len(ids)} ids for {len(vectors)} vectors")
        paths = list(paths) if paths is not None else [None] * len(ids)
        if len(paths) != len(vectors):
            raise GalleryError(f"got {len(paths)} paths for {len(vectors)} vectors")
        if len(set(ids)) != len(ids):
            repeated = sorted(i for i, n in collections.Counter(ids).items() if n > 1)[:5]
            raise GalleryError(f"item ids must be unique; repeated: {repeated}")
        if n_trees < 1:
            raise GalleryError(f"invalid n_trees {n_trees}: use 1 or more")

        unit = _normalise_rows(vectors)
        index = build_annoy(unit, n_trees)
        return cls(unit, [str(i) for i in ids], paths, model_fingerprint, model_path, n_trees,
                   index, embedder)

    @classmethod
    def from_images(cls, images: Sequence[str | Path], embedder: Embedder, *,
                    ids: Sequence[str] | None = None, n_trees: int = DEFAULT_TREES,
                    progress=None) -> tuple[Gallery, list[tuple[Path, str]]]:
        """Embed image files and build a gallery from those that decode.

        Args:
            images: Image files.
            embedder: The model to embed them with.
            ids: One id per image; defaults to the path as given.
            n_trees: Annoy trees.
            progress: Optional callable run with each finished path, for progress bars.

        Returns:
            The gallery and a list of (path, reason) for files that failed.

        Raises:
            GalleryError: If no image could be embedded.
        """
        ids = list(ids) if ids is not None else [str(path) for path in images]
        vectors, kept_ids, kept_paths, failures = [], [], [], []
        for item_id, result in zip(ids, embedder.embed_files(images)):
            if progress is not None:
                progress(result.path)
            if result.vector is None:
                logger.warning("skipped %s: %s", result.path, result.error)
                failures.append((result.path, result.error or "unknown error"))
                continue
            vectors.append(result.vector)
            kept_ids.append(item_id)
            kept_paths.append(str(result.path))

        if not vectors:
            raise GalleryError(f"none of the {len(ids)} images could be embedded")
        gallery = cls.build(np.stack(vectors), kept_ids, kept_paths,
                            model_fingerprint=embedder.fingerprint,
                            model_path=str(embedder.model_path), n_trees=n_trees, embedder=embedder)
        return gallery, failures

    def save(self, directory: str | Path, overwrite: bool = False) -> Path:
        """Write the gallery to a folder, atomically.

        The files go to a temporary sibling folder that is renamed into place, so a
        crash leaves either the old folder or the new one.

        Args:
            directory: The gallery folder to create.
            overwrite: Replace an existing folder; otherwise an existing folder is an error.

        Returns:
            The folder.

        Raises:
            GalleryError: If the folder exists and `overwrite` is False.
        """
        target = Path(directory)
        if target.exists() and not overwrite:
            raise GalleryError(f"{target} already exists; choose another folder or allow overwriting")

        staging = storage.staging_dir(target)
        try:
            self._write_files(staging)
            storage.replace_dir(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self.directory = target
        logger.info("saved %d items to %s", len(self), target)
        return target

    def _write_files(self, folder: Path) -> None:
        self._index.save(str(folder / INDEX))
        storage.write_npy(folder / VECTORS, self.vectors)
        items = [{"id": i, "path": p} for i, p in zip(self.ids, self.paths)]
        storage.write_text(folder / ITEMS, json.dumps(items, ensure_ascii=False))

        manifest = {
            "schema": SCHEMA,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "model": {"fingerprint": self.model_fingerprint, "path": self.model_path},
            "dim": self.dim,
            "metric": "angular",
            "n_trees": self.n_trees,
            "items": len(self),
            "files": {name: storage.describe_file(folder / name) for name in (INDEX, VECTORS, ITEMS)},
        }
        storage.write_text(folder / MANIFEST, json.dumps(manifest, indent=2))
        storage.fsync_dir(folder)

    @classmethod
    def open(cls, directory: str | Path, embedder: Embedder | None = None) -> Gallery:
        """Open a saved gallery; the Annoy index is memory-mapped.

        Args:
            directory: A folder written by `save`.
            embedder: The embedder for image queries. It must be the model that
                built the gallery.

        Raises:
            GalleryError: If a file is missing, has the wrong size, disagrees with the
                manifest, or the embedder is a different model.
        """
        folder = Path(directory)
        manifest = storage.read_manifest(folder / MANIFEST, SCHEMA)
        files = manifest.get("files", {})
        for name in (INDEX, VECTORS, ITEMS):
            storage.check_size(folder / name, files.get(name, {}).get("bytes"))

        dim, count = int(manifest["dim"]), int(manifest["items"])
        vectors = storage.read_npy(folder / VECTORS, (count, dim))
        items = json.loads((folder / ITEMS).read_text(encoding="utf-8"))
        if len(items) != count:
            raise GalleryError(f"{folder / ITEMS} lists {len(items)} items, the manifest {count}")

        index = AnnoyIndex(dim, "angular")
        index.load(str(folder / INDEX), prefault=False)
        if index.get_n_items() != count:
            raise GalleryError(f"{folder / INDEX} has {index.get_n_items()} items, the manifest {count}")

        model = manifest["model"]
        gallery = cls(vectors, [i["id"] for i in items], [i["path"] for i in items],
                      model["fingerprint"], model.get("path"), int(manifest["n_trees"]),
                      index, None, folder)
        if embedder is not None:
            gallery.attach(embedder)
        return gallery

    def attach(self, embedder: Embedder) -> None:
        """Set the embedder used for image queries.

        Raises:
            GalleryError: If the embedder's model is not the one that built the gallery.
        """
        if embedder.fingerprint != self.model_fingerprint:
            where = self.directory or "this gallery"
            raise GalleryError(
                f"{where} was built with model {self.model_path} (sha256 {self.model_fingerprint[:12]}), "
                f"but the query model is {embedder.model_path} (sha256 {embedder.fingerprint[:12]}); "
                "search with the same model or rebuild the gallery"
            )
        self.embedder = embedder

    def _query_vector(self, query: ImageInput | np.ndarray) -> np.ndarray:
        if isinstance(query, np.ndarray) and query.ndim == 1:
            vector = query.astype(np.float32)
        elif self.embedder is None:
            raise GalleryError("image queries need an embedder: open the gallery with embedder=...")
        else:
            vector = self.embedder.embed(query)

        if vector.shape[0] != self.dim:
            raise GalleryError(f"query vector has {vector.shape[0]} values, the gallery {self.dim}")
        norm = float(np.linalg.norm(vector))
        return vector / norm if norm > 0 else vector

    def _matches(self, items: Sequence[int], vector: np.ndarray) -> list[Match]:
        if not len(items):
            return []
        scores = self.vectors[np.asarray(items)] @ vector
        ranked = sorted(zip(items, scores.tolist()), key=lambda pair: -pair[1])
        return [Match(self.ids[i], self.paths[i], float(s), int(i)) for i, s in ranked]

    def search(self, query: ImageInput | np.ndarray, k: int = 5, search_k: int = -1) -> list[Match]:
        """Find the k items most similar to an image or a 1-D vector with Annoy.

        Args:
            query: An image (anything `Embedder.embed` accepts) or an embedding.
            k: Number of matches.
            search_k: Annoy nodes to inspect; -1 means ``n_trees * k``. Larger values
                give better recall and slower queries.

        Returns:
            Up to k matches, best first.

        Raises:
            GalleryError: For image queries without an embedder, or a wrong vector size.
            ImageError: If an image query cannot be decoded.
        """
        vector = self._query_vector(query)
        items = self._index.get_nns_by_vector(vector, k, search_k=search_k)
        return self._matches(items, vector)

    def search_exact(self, query: ImageInput | np.ndarray, k: int = 5) -> list[Match]:
        """Find the k most similar items by brute force over the stored vectors."""
        vector = self._query_vector(query)
        scores = self.vectors @ vector
        k = min(k, len(scores))
        top = np.argpartition(-scores, k - 1)[:k]
        return self._matches(top.tolist(), vector)
