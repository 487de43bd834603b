"""Add, remove and compact: the changes a saved gallery goes through on a device.

`Gallery` inherits these methods. Each change of a saved gallery takes the folder's
writer lock, re-reads the manifest if another process changed it since, writes the
new segment files, and switches the manifest. An in-memory gallery changes in memory
only, and `Gallery.save` writes it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from edgeembed import segments, storage
from edgeembed.items import embed_items, make_items, unit_rows
from edgeembed.storage import GalleryError

if TYPE_CHECKING:
    from edgeembed.gallery import Gallery

logger = logging.getLogger(__name__)


class GalleryChanges:
    """The methods of `Gallery` that change its items."""

    def needs_compaction(self: Gallery) -> bool:
        """Return True when the added or removed items are many enough to rebuild the index.

        Both must pass ``COMPACT_MIN_ITEMS`` items and ``COMPACT_FRACTION`` of the
        base segment.
        """
        from edgeembed.gallery import COMPACT_FRACTION, COMPACT_MIN_ITEMS

        limit = max(COMPACT_MIN_ITEMS, COMPACT_FRACTION * len(self._base_items))
        return self.added_count > limit or self.removed_count > limit

    def _refresh(self: Gallery, load_index: bool) -> None:
        """Reload from disk if another writer switched the manifest since this gallery loaded."""
        from edgeembed.gallery import MANIFEST, SCHEMA

        current = storage.read_manifest(self.directory / MANIFEST, SCHEMA)
        if self.manifest is None or current["generation"] != self.manifest["generation"]:
            logger.info("%s changed on disk; reloading generation %d", self.directory, current["generation"])
            self._load(current, load_index)

    def _change(self: Gallery, apply: Callable[[], bool], base_changed: bool = False) -> None:
        """Apply a change under the writer lock and commit it; `apply` returns False for no change."""
        if self.directory is None:
            apply()
            return

        with storage.WriterLock(self.directory):
            # A change of the base builds a new index, so it never maps the old one,
            # which may be damaged. A gallery opened without its index reloads without it.
            opened_without_index = self._index is None and bool(self._base_items)
            self._refresh(load_index=not (base_changed or opened_without_index))
            if not apply():
                return
            generation = int(self.manifest["generation"]) + 1
            self.manifest = self._write_generation(self.directory, generation, base_changed)
            segments.remove_leftovers(self.directory, self.manifest)

    def add(self: Gallery, vectors: np.ndarray, ids: Sequence[str], paths: Sequence[str | None] | None = None,
            labels: Sequence[str | None] | None = None, metadata: Sequence[dict | None] | None = None,
            auto_compact: bool = True) -> None:
        """Add items; they are searchable at once and durable when this returns.

        Args:
            vectors: Array of shape (N, dim).
            ids: N ids, none of them live in the gallery already. An id that was
                removed may be added again.
            paths: N source paths, or None.
            labels: N labels, or None.
            metadata: N dicts of free-form JSON values, or None.
            auto_compact: Compact after adding when `needs_compaction` returns True.

        Raises:
            GalleryError: If an id is already live or repeats, or sizes disagree. Also
                when the automatic compaction finds a damaged vector or item file, by
                which time the new items are saved.
        """
        unit = unit_rows(vectors, self.dim)
        items = make_items(ids, paths, labels, metadata)
        if len(items) != len(unit):
            raise GalleryError(f"got {len(items)} ids for {len(unit)} vectors")

        def apply() -> bool:
            existing = [item["id"] for item in items if item["id"] in self]
            if existing or len({item["id"] for item in items}) != len(items):
                raise GalleryError(f"ids already in the gallery or repeated: {existing[:5] or 'repeats'}; "
                                   "remove them first or choose other ids")
            self._added_vectors = np.concatenate([self._added_vectors, unit])
            self._added_items = self._added_items + items
            self._reindex()
            return bool(items)

        self._change(apply)
        logger.info("added %d items to %s", len(items), self.directory or "the gallery")
        if auto_compact and self.needs_compaction():
            self.compact()

    def add_images(self: Gallery, images: Sequence[str | Path], ids: Sequence[str] | None = None,
                   labels: Sequence[str | None] | None = None,
                   progress: Callable[[Path], None] | None = None) -> list[tuple[Path, str]]:
        """Embed image files and add those that decode and whose ids are new.

        Returns:
            (path, reason) for every file that was not added.

        Raises:
            GalleryError: If the gallery has no embedder.
        """
        if self.embedder is None:
            raise GalleryError("adding images needs an embedder: open the gallery with embedder=...")
        vectors, items, failures = embed_items(images, self.embedder, ids, labels, progress)

        fresh = [row for row, item in enumerate(items) if item["id"] not in self]
        for row in sorted(set(range(len(items))) - set(fresh)):
            path = Path(items[row]["path"])
            logger.warning("skipped %s: id %r is already in the gallery", path, items[row]["id"])
            failures.append((path, f"id {items[row]['id']!r} is already in the gallery"))
        if fresh:
            chosen = [items[row] for row in fresh]
            self.add(vectors[fresh], [i["id"] for i in chosen], [i["path"] for i in chosen],
                     [i.get("label") for i in chosen], [i.get("metadata") for i in chosen])
        return failures

    def remove(self: Gallery, ids: Sequence[str], auto_compact: bool = True) -> list[str]:
        """Remove items by id; they never appear in results again.

        Returns:
            The ids that were not in the gallery.
        """
        missing: list[str] = []

        def apply() -> bool:
            missing.clear()
            changed = False
            for item_id in map(str, ids):
                if item_id not in self:
                    missing.append(item_id)
                    continue
                segment, row = self._locations[item_id]
                if segment == "base":
                    self._removed.add(item_id)
                else:
                    self._added_vectors = np.delete(self._added_vectors, row, axis=0)
                    self._added_items = self._added_items[:row] + self._added_items[row + 1:]
                    self._reindex()
                changed = True
            return changed

        self._change(apply)
        if auto_compact and self.needs_compaction():
            self.compact()
        return missing

    def _check_before_compaction(self: Gallery) -> list[str]:
        """Check every saved file against the manifest before compaction rewrites them.

        Returns:
            The damaged index files, which compaction replaces with a new index.

        Raises:
            GalleryError: If a vector or item file is damaged, naming the file.
                Compacting would store the damage under new checksums.
        """
        damaged = segments.damaged_files(self.directory, self.manifest)
        index_files = segments.index_files(self.manifest)
        lost = [f"{self.directory / name} is damaged: {problem}" for name, problem in damaged.items()
                if name not in index_files]
        if lost:
            raise GalleryError(f"cannot compact {self.directory}, because {', and '.join(lost)}. Vectors and "
                               f"items have no other copy, so {segments.REBUILD_FROM_IMAGES}")

        for name, problem in damaged.items():
            logger.warning("%s: %s; rebuilding the Annoy index from the stored vectors",
                           self.directory / name, problem)
        return list(damaged)

    def compact(self: Gallery, n_trees: int | None = None) -> None:
        """Rebuild the Annoy index from all live items and empty the added segment.

        A saved gallery's files are checked against their SHA-256 first. Damaged or
        missing index files are rebuilt from the stored vectors, so a gallery opened
        with ``load_index=False`` can be repaired with this method.

        Args:
            n_trees: Trees for the new index; None keeps the current number.

        Raises:
            GalleryError: If `n_trees` is below 1, or a vector or item file of a saved
                gallery is damaged (the gallery must be rebuilt from its images).
        """
        if n_trees is not None and n_trees < 1:
            raise GalleryError(f"invalid n_trees {n_trees}: use 1 or more")
        rebuilt: list[str] = []

        def apply() -> bool:
            if self.directory is not None:
                rebuilt[:] = self._check_before_compaction()
            live = [row for row, item in enumerate(self._base_items) if item["id"] not in self._removed]
            vectors = np.concatenate([np.asarray(self._base_vectors[live]), self._added_vectors])
            items = [self._base_items[row] for row in live] + self._added_items
            self.n_trees = n_trees or self.n_trees
            self._added_vectors = self._added_vectors[:0]
            self._added_items = []
            self._removed = set()
            self._set_base(vectors, items)
            if self.directory is None:
                shards = min(self.shards, max(1, len(items)))
                self._index = segments.ShardedIndex.build(vectors, self.n_trees, shards) if items else None
            return True

        self._change(apply, base_changed=True)
        if rebuilt:
            logger.warning("rebuilt the Annoy index of %s from %d stored vectors; it replaces the damaged %s",
                           self.directory, len(self), ", ".join(rebuilt))
        logger.info("compacted %s to %d items", self.directory or "the gallery", len(self))
