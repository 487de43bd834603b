"""The Gallery: embeddings of known images, searchable with Annoy, saved as a folder.

A gallery has two segments. The base segment is an Annoy index (angular metric)
with its vectors and items. Items added later go to an added segment that is
searched exactly and merged into every result, so they are searchable at once.
Removed items are hidden from results. `Gallery.compact` rebuilds the index from all
live items, and runs by itself when the added or removed items pass
`COMPACT_MIN_ITEMS` and `COMPACT_FRACTION` of the base. Because the index is derived
from the stored vectors, compaction also replaces a damaged or missing index file.

On disk, ``manifest.json`` names the current files of both segments with their sizes
and SHA-256, the model fingerprint, the vector size, the Annoy settings and the
removed ids. Every change writes new files first and then switches the manifest with
one rename, so a crash leaves the old gallery or the new one. One writer at a time
holds an ``flock`` on the folder. Scores are cosine similarities from the stored
vectors, not Annoy's angular distance.
"""

from __future__ import annotations

import collections
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from edgeembed import segments, storage
from edgeembed.embedder import Embedder
from edgeembed.gallery_changes import GalleryChanges
from edgeembed.items import Match, embed_items, make_items, unit_rows
from edgeembed.preprocess import ImageInput
from edgeembed.storage import GalleryError

logger = logging.getLogger(__name__)

SCHEMA = "edgeembed.gallery/2"
MANIFEST = "manifest.json"
DEFAULT_TREES = 10

# Compaction starts when the added segment or the removed ids exceed both limits.
# Exact search over 1,000 added 1280-d vectors reads 5 MB per query.
COMPACT_MIN_ITEMS = 1000
COMPACT_FRACTION = 0.1

# How often `open` retries when a writer replaces the files between reading the
# manifest and opening them.
_OPEN_ATTEMPTS = 3


class Gallery(GalleryChanges):
    """Searchable embeddings of known images with their ids, paths and labels.

    Create one with `build` or `from_images`, write it with `save`, load it with
    `open`, and change a saved one with `add`, `add_images`, `remove` and `compact`.
    """

    def __init__(self, dim: int, model_fingerprint: str, model_path: str | None,
                 n_trees: int = DEFAULT_TREES, embedder: Embedder | None = None, shards: int = 1) -> None:
        """Create an empty in-memory gallery; `build`, `from_images` and `open` fill it."""
        self.dim = dim
        self.model_fingerprint = model_fingerprint
        self.model_path = model_path
        self.n_trees = n_trees
        self.shards = shards
        self.embedder = embedder
        self.directory: Path | None = None
        self.manifest: dict | None = None
        self._base_vectors = np.zeros((0, dim), dtype=np.float32)
        self._base_items: list[dict] = []
        self._index: segments.ShardedIndex | None = None
        self._added_vectors = np.zeros((0, dim), dtype=np.float32)
        self._added_items: list[dict] = []
        self._removed: set[str] = set()
        self._locations: dict[str, tuple[str, int]] = {}

    # Building and loading

    @classmethod
    def build(cls, vectors: np.ndarray, ids: Sequence[str], paths: Sequence[str | None] | None = None,
              *, model_fingerprint: str, model_path: str | None = None,
              labels: Sequence[str | None] | None = None, metadata: Sequence[dict | None] | None = None,
              n_trees: int = DEFAULT_TREES, embedder: Embedder | None = None, shards: int = 1) -> Gallery:
        """Build an in-memory gallery from vectors and their ids.

        Args:
            vectors: Array of shape (N, D); rows are scaled to unit length.
            ids: N unique item ids.
            paths: N source paths (entries may be None).
            model_fingerprint: SHA-256 of the model that computed the vectors.
            model_path: Where that model was, recorded for later searches.
            labels: N labels (entries may be None).
            metadata: N dicts of free-form JSON values.
            n_trees: Annoy trees.
            embedder: The embedder to use for image queries.
            shards: Number of Annoy indexes the base is split into. Searches ask every
                shard and merge by score; more shards cost query time but let each
                index be built and mapped separately.

        Raises:
            GalleryError: If sizes disagree, ids repeat, there are no vectors, or
                `shards` exceeds the number of vectors.
        """
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or len(vectors) == 0:
            raise GalleryError(f"need a non-empty (N, D) array of vectors, got shape {vectors.shape}")
        if len(ids) != len(vectors):
            raise GalleryError(f"got {len(ids)} ids for {len(vectors)} vectors")
        repeated = sorted(i for i, n in collections.Counter(map(str, ids)).items() if n > 1)
        if repeated:
            raise GalleryError(f"item ids must be unique; repeated: {repeated[:5]}")
        if n_trees < 1:
            raise GalleryError(f"invalid n_trees {n_trees}: use 1 or more")

        gallery = cls(vectors.shape[1], model_fingerprint, model_path, n_trees, embedder, shards)
        gallery._set_base(unit_rows(vectors), make_items(ids, paths, labels, metadata))
        gallery._index = segments.ShardedIndex.build(gallery._base_vectors, n_trees, shards)
        return gallery

    @classmethod
    def from_images(cls, images: Sequence[str | Path], embedder: Embedder, *,
                    ids: Sequence[str] | None = None, labels: Sequence[str | None] | None = None,
                    n_trees: int = DEFAULT_TREES, shards: int = 1,
                    progress: Callable[[Path], None] | None = None) -> tuple[Gallery, list[tuple[Path, str]]]:
        """Embed image files and build a gallery from those that decode.

        Args:
            images: Image files.
            embedder: The model to embed them with.
            ids: One id per image; defaults to the path as given.
            labels: One label per image, or None.
            n_trees: Annoy trees.
            shards: Number of Annoy indexes, as for `build`.
            progress: Optional callable run with each finished path, for progress bars.

        Returns:
            The gallery and a list of (path, reason) for files that failed.

        Raises:
            GalleryError: If no image could be embedded.
        """
        vectors, items, failures = embed_items(images, embedder, ids, labels, progress)
        if not items:
            raise GalleryError(f"none of the {len(images)} images could be embedded")

        gallery = cls.build(vectors, [i["id"] for i in items], [i["path"] for i in items],
                            labels=[i.get("label") for i in items],
                            model_fingerprint=embedder.fingerprint, model_path=str(embedder.model_path),
                            n_trees=n_trees, embedder=embedder, shards=min(shards, len(items)))
        return gallery, failures

    def _set_base(self, vectors: np.ndarray, items: list[dict]) -> None:
        self._base_vectors, self._base_items = vectors, items
        self._reindex()

    def _reindex(self) -> None:
        self._locations = {item["id"]: ("base", row) for row, item in enumerate(self._base_items)}
        self._locations.update({item["id"]: ("added", row) for row, item in enumerate(self._added_items)})

    @classmethod
    def open(cls, directory: str | Path, embedder: Embedder | None = None, *,
             load_index: bool = True) -> Gallery:
        """Open a saved gallery; the Annoy index and base vectors are memory-mapped.

        Args:
            directory: A folder written by `save`.
            embedder: The embedder for image queries; it must be the model that built
                the gallery.
            load_index: False opens the gallery without its Annoy index files, which
                may then be damaged or missing. `search` raises until `compact`
                rebuilds the index from the stored vectors, while `search_exact`,
                `add` and `remove` work.

        Raises:
            GalleryError: If a file is missing, has the wrong size, disagrees with the
                manifest, or the embedder is a different model.
        """
        folder = Path(directory)
        manifest = storage.read_manifest(folder / MANIFEST, SCHEMA)
        gallery = cls(int(manifest["dim"]), manifest["model"]["fingerprint"],
                      manifest["model"].get("path"), int(manifest["n_trees"]),
                      shards=max(1, len(manifest["base"]["shards"])))
        gallery.directory = folder
        gallery._load(manifest, load_index)
        if embedder is not None:
            gallery.attach(embedder)
        return gallery

    def _load(self, manifest: dict, load_index: bool = True) -> None:
        """Load the files a manifest names, re-reading it if a writer replaced them meanwhile."""
        assert self.directory is not None
        for attempt in range(_OPEN_ATTEMPTS):
            try:
                base_vectors, base_items, index = segments.load_base(self.directory, manifest, load_index)
                added_vectors, added_items = segments.load_added(self.directory, manifest)
                break
            except FileNotFoundError:
                if attempt == _OPEN_ATTEMPTS - 1:
                    raise GalleryError(f"{self.directory} kept changing while it was opened; try again")
                manifest = storage.read_manifest(self.directory / MANIFEST, SCHEMA)

        self.manifest = manifest
        self._added_vectors, self._added_items = added_vectors, added_items
        self._index = index
        self._removed = set(manifest["removed"])
        self._set_base(base_vectors, base_items)

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

    # Counting

    def __len__(self) -> int:
        """Return the number of live (not removed) items."""
        return self.item_count - len(self._removed)

    @property
    def item_count(self) -> int:
        """Items stored in both segments, removed ones included."""
        return len(self._base_items) + len(self._added_items)

    @property
    def removed_count(self) -> int:
        """Items hidden by `remove` and not yet dropped by compaction."""
        return len(self._removed)

    @property
    def added_count(self) -> int:
        """Items in the added segment, searched exactly until the next compaction."""
        return len(self._added_items)

    def __contains__(self, item_id: object) -> bool:
        location = self._locations.get(item_id)  # type: ignore[arg-type]
        return location is not None and not (location[0] == "base" and item_id in self._removed)

    def vectors(self) -> np.ndarray:
        """Return the vectors of all live items, base first (a copy)."""
        live = [row for row, item in enumerate(self._base_items) if item["id"] not in self._removed]
        return np.concatenate([self._base_vectors[live], self._added_vectors])

    # Searching

    def _query_vector(self, query: ImageInput | np.ndarray, k: int) -> np.ndarray:
        if k < 1:
            raise GalleryError(f"invalid k {k}: ask for 1 or more matches")
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

    def _match(self, segment: str, row: int, score: float) -> Match:
        item = (self._base_items if segment == "base" else self._added_items)[row]
        return Match(item["id"], item.get("path"), float(score), int(row), segment,
                     item.get("label"), item.get("metadata") or {})

    def _merge(self, candidates: list[tuple[str, int, float]], k: int) -> list[Match]:
        candidates.sort(key=lambda candidate: -candidate[2])
        return [self._match(*candidate) for candidate in candidates[:k]]

    def _added_candidates(self, vector: np.ndarray, k: int) -> list[tuple[str, int, float]]:
        if not self._added_items:
            return []
        scores = self._added_vectors @ vector
        top = np.argsort(-scores)[:k]
        return [("added", int(row), float(scores[row])) for row in top]

    def search(self, query: ImageInput | np.ndarray, k: int = 5, search_k: int = -1) -> list[Match]:
        """Find the k live items most similar to an image or a 1-D vector.

        The base segment is searched with Annoy, the added segment exactly.

        Args:
            query: An image (anything `Embedder.embed` accepts) or an embedding.
            k: Number of matches.
            search_k: Annoy nodes to inspect; -1 means ``n_trees * k``. Larger values
                give better recall and slower queries.

        Returns:
            Up to k matches, best first.

        Raises:
            GalleryError: For image queries without an embedder, a wrong vector size,
                or a gallery opened without its index.
            ImageError: If an image query cannot be decoded.
        """
        if self._index is None and self._base_items:
            raise GalleryError(f"{self.directory} was opened without its Annoy index; "
                               "use search_exact, or compact the gallery to rebuild the index")
        vector = self._query_vector(query, k)
        candidates = self._added_candidates(vector, k)
        if self._index is not None:
            # Removed items still sit in the index, so ask for enough extra neighbours.
            wanted = min(k + len(self._removed), len(self._base_items))
            rows = [row for row in self._index.nearest(vector, wanted, search_k)
                    if self._base_items[row]["id"] not in self._removed]
            if rows:
                scores = self._base_vectors[np.asarray(rows)] @ vector
                candidates += [("base", row, float(score)) for row, score in zip(rows, scores)]
        return self._merge(candidates, k)

    def search_exact(self, query: ImageInput | np.ndarray, k: int = 5) -> list[Match]:
        """Find the k most similar live items by brute force over the stored vectors."""
        vector = self._query_vector(query, k)
        candidates = self._added_candidates(vector, k)
        if self._base_items:
            scores = np.asarray(self._base_vectors @ vector)
            for row in self._removed_rows():
                scores[row] = -np.inf
            top = np.argsort(-scores)[:k]
            candidates += [("base", int(row), float(scores[row])) for row in top if np.isfinite(scores[row])]
        return self._merge(candidates, k)

    def _removed_rows(self) -> list[int]:
        if not self._removed:
            return []
        return [row for row, item in enumerate(self._base_items) if item["id"] in self._removed]

    # Saving and changing (see gallery_changes for add, remove and compact)

    def save(self, directory: str | Path, overwrite: bool = False) -> Path:
        """Write the gallery to a new folder, atomically.

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
            self.manifest = self._write_generation(staging, generation=1, base_changed=True,
                                                   reuse_index=True)
            storage.replace_dir(staging, target)
        finally:
            storage.remove_tree(staging)
        self.directory = target
        logger.info("saved %d items to %s", len(self), target)
        return target

    def _write_generation(self, folder: Path, generation: int, base_changed: bool,
                          reuse_index: bool = False) -> dict:
        """Write the segments that changed and switch the manifest to them.

        `reuse_index` saves the current Annoy index instead of building a new one; it
        must be an index of the current base vectors.
        """
        previous = self.manifest if not base_changed else None
        if base_changed:
            base, files, index = segments.write_base(folder, generation, self._base_vectors,
                                                     self._base_items, self.n_trees,
                                                     self._index if reuse_index else None,
                                                     min(self.shards, max(1, len(self._base_items))))
            self._index = index
        else:
            assert previous is not None
            base = previous["base"]
            names = [entry["file"] for entry in base["shards"]] + [base["vectors"], base["items_file"]]
            files = {name: previous["files"][name] for name in names if name}

        added, added_files = segments.write_added(folder, generation, self._added_vectors, self._added_items)
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        manifest = {
            "schema": SCHEMA,
            "generation": generation,
            "created": (previous or self.manifest or {}).get("created", now),
            "updated": now,
            "model": {"fingerprint": self.model_fingerprint, "path": self.model_path},
            "dim": self.dim,
            "metric": "angular",
            "n_trees": self.n_trees,
            "base": base,
            "added": added,
            "removed": sorted(self._removed),
            "files": {**files, **added_files},
        }
        storage.write_manifest(folder / MANIFEST, manifest)
        return manifest
