"""The files of a gallery's two segments, named by generation.

The *base* segment is the Annoy index with its vectors and items. The *added*
segment holds items added since the last compaction, searched exactly. Every change
writes new files under a new generation number and never rewrites a file that a
manifest names, so a reader that opened an older generation keeps valid files.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
from pathlib import Path

import numpy as np
from annoy import AnnoyIndex

from edgeembed import storage
from edgeembed.storage import GalleryError

logger = logging.getLogger(__name__)

ANNOY_SEED = 42

# The vectors are the only copy of the embeddings, so damaged vector or item files
# cannot be repaired from the folder. The index is derived from the vectors.
REBUILD_FROM_IMAGES = "the gallery must be rebuilt from the images with `edgeembed index build`"

# Files that a gallery writes, so that leftovers of a killed writer can be recognised.
_GENERATED = re.compile(r"^(index-\d+(-\d+)?\.ann|vectors-\d+\.npy|items-\d+\.json|added-\d+\.npy|"
                        r"added-items-\d+\.json)(\.tmp)?$|^manifest\.json\.tmp$")


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
        index.add_item(item, vector.tolist())  # a list is about twice as fast as an array here
    index.build(n_trees)
    return index


class ShardedIndex:
    """One or more Annoy indexes over consecutive ranges of the base rows.

    A base segment too large for one index (or one machine's build memory) is split
    into shards. A search asks every shard and the caller merges the rows by score.
    """

    def __init__(self, parts: list[tuple[int, AnnoyIndex]]) -> None:
        """Wrap (first base row, index) pairs; use `build` or `load` instead."""
        self.parts = parts

    @classmethod
    def build(cls, vectors: np.ndarray, n_trees: int, shards: int = 1) -> ShardedIndex:
        """Build `shards` indexes over near-equal consecutive row ranges of `vectors`.

        Raises:
            GalleryError: If `shards` is below 1 or above the number of rows.
        """
        if not 1 <= shards <= max(1, len(vectors)):
            raise GalleryError(f"invalid shards {shards}: use 1 to {len(vectors)} for {len(vectors)} items")
        bounds = np.linspace(0, len(vectors), shards + 1).round().astype(int)
        return cls([(int(start), build_annoy(vectors[start:end], n_trees))
                    for start, end in zip(bounds[:-1], bounds[1:])])

    @property
    def shard_count(self) -> int:
        """The number of Annoy indexes."""
        return len(self.parts)

    def nearest(self, vector: np.ndarray, n: int, search_k: int = -1) -> list[int]:
        """Return up to `n` nearest base rows from each shard, unsorted across shards."""
        rows: list[int] = []
        for start, index in self.parts:
            wanted = min(n, index.get_n_items())
            rows += [start + item for item in index.get_nns_by_vector(vector, wanted, search_k=search_k)]
        return rows

    def save(self, folder: Path, generation: int) -> list[dict]:
        """Write each shard to ``index-GENERATION[-S].ann`` and return the manifest entries."""
        entries = []
        for number, (start, index) in enumerate(self.parts):
            suffix = f"-{number}" if len(self.parts) > 1 else ""
            name = f"index-{generation:06d}{suffix}.ann"
            temporary = folder / (name + ".tmp")
            index.save(str(temporary))
            storage.fsync_file(temporary)
            temporary.replace(folder / name)
            entries.append({"file": name, "start": start, "items": index.get_n_items()})
        return entries

    @classmethod
    def load(cls, folder: Path, manifest: dict) -> ShardedIndex:
        """Memory-map the shards a manifest names, after checking their sizes and ranges.

        Raises:
            GalleryError: If a shard is missing, has the wrong size, or its items
                disagree with the manifest.
        """
        dim, total = int(manifest["dim"]), int(manifest["base"]["items"])
        fix = rebuild_index_advice(folder)
        parts, expected_start = [], 0
        for entry in manifest["base"]["shards"]:
            # NOTE: only the size is checked, because hashing every shard on each open
            # reads the whole index. `damaged_files` finds a changed shard of the same size.
            path = _checked(folder, manifest, entry["file"], fix)
            if entry["start"] != expected_start:
                raise GalleryError(f"{path} starts at row {entry['start']}, expected {expected_start}")
            index = AnnoyIndex(dim, "angular")
            if not index.load(str(path), prefault=False):
                raise GalleryError(f"Annoy could not load {path}; {fix}")
            if index.get_n_items() != entry["items"]:
                raise GalleryError(f"{path} has {index.get_n_items()} items, the manifest records "
                                   f"{entry['items']}; {fix}")
            parts.append((expected_start, index))
            expected_start += entry["items"]

        if expected_start != total:
            raise GalleryError(f"{folder}: the index shards cover {expected_start} of {total} base items")
        return cls(parts)


def _write_items(path: Path, items: list[dict]) -> None:
    # ASCII escapes keep file names that are not valid UTF-8 (surrogate escapes) intact.
    storage.write_text(path, json.dumps(items))


def write_base(folder: Path, generation: int, vectors: np.ndarray, items: list[dict],
               n_trees: int, index: ShardedIndex | None = None,
               shards: int = 1) -> tuple[dict, dict, ShardedIndex | None]:
    """Write the base segment: Annoy shards, vectors and items.

    A given `index` must hold `vectors`; otherwise `shards` new indexes are built.

    Returns:
        The manifest's ``base`` section, the new files' descriptions, and the index
        (None for an empty segment).
    """
    if not items:
        return {"items": 0, "shards": [], "vectors": None, "items_file": None}, {}, None

    index = index or ShardedIndex.build(vectors, n_trees, shards)
    names = {"vectors": f"vectors-{generation:06d}.npy", "items_file": f"items-{generation:06d}.json"}
    shard_entries = index.save(folder, generation)
    storage.write_npy(folder / names["vectors"], vectors)
    _write_items(folder / names["items_file"], items)

    files = [entry["file"] for entry in shard_entries] + list(names.values())
    described = {name: storage.describe_file(folder / name) for name in files}
    return {"items": len(items), "shards": shard_entries, **names}, described, index


def write_added(folder: Path, generation: int, vectors: np.ndarray, items: list[dict]) -> tuple[dict, dict]:
    """Write the added segment's vectors and items.

    Returns:
        The manifest's ``added`` section and the new files' descriptions.
    """
    if not items:
        return {"items": 0, "vectors": None, "items_file": None}, {}

    names = {"vectors": f"added-{generation:06d}.npy", "items_file": f"added-items-{generation:06d}.json"}
    storage.write_npy(folder / names["vectors"], vectors)
    _write_items(folder / names["items_file"], items)
    files = {name: storage.describe_file(folder / name) for name in names.values()}
    return {"items": len(items), **names}, files


def _read_items(folder: Path, manifest: dict, name: str, count: int) -> list[dict]:
    path = _checked(folder, manifest, name, REBUILD_FROM_IMAGES)
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise GalleryError(f"{path} is corrupted ({error}); {REBUILD_FROM_IMAGES}") from error
    if not isinstance(items, list) or len(items) != count:
        raise GalleryError(f"{path} does not list the {count} items the manifest records; "
                           f"{REBUILD_FROM_IMAGES}")
    return items


def _read_vectors(folder: Path, manifest: dict, name: str, shape: tuple[int, int]) -> np.ndarray:
    path = _checked(folder, manifest, name, REBUILD_FROM_IMAGES)
    try:
        return storage.read_npy(path, shape)
    except GalleryError as error:
        raise GalleryError(f"{error}; {REBUILD_FROM_IMAGES}") from error


def _checked(folder: Path, manifest: dict, name: str, fix: str) -> Path:
    path = folder / name
    storage.check_size(path, manifest["files"].get(name, {}).get("bytes"), fix)
    return path


def load_base(folder: Path, manifest: dict,
              load_index: bool = True) -> tuple[np.ndarray, list[dict], ShardedIndex | None]:
    """Open the base segment, checking sizes before Annoy memory-maps its files.

    Args:
        folder: The gallery folder.
        manifest: The manifest that names the files.
        load_index: False skips the Annoy index files, which are neither checked nor mapped.

    Returns:
        The memory-mapped vectors, the items, and the index (None for an empty
        segment or when `load_index` is False).

    Raises:
        GalleryError: If a file is missing, has the wrong size or disagrees with the manifest.
        FileNotFoundError: If a file vanished after the checks (a writer replaced it).
    """
    section, dim = manifest["base"], int(manifest["dim"])
    count = int(section["items"])
    if count == 0:
        return np.zeros((0, dim), dtype=np.float32), [], None

    vectors = _read_vectors(folder, manifest, section["vectors"], (count, dim))
    items = _read_items(folder, manifest, section["items_file"], count)
    return vectors, items, ShardedIndex.load(folder, manifest) if load_index else None


def load_added(folder: Path, manifest: dict) -> tuple[np.ndarray, list[dict]]:
    """Read the added segment into memory.

    Raises:
        GalleryError: If a file is missing, has the wrong size or disagrees with the manifest.
    """
    section, dim = manifest["added"], int(manifest["dim"])
    count = int(section["items"])
    if count == 0:
        return np.zeros((0, dim), dtype=np.float32), []

    vectors = _read_vectors(folder, manifest, section["vectors"], (count, dim))
    items = _read_items(folder, manifest, section["items_file"], count)
    return np.array(vectors), items


def referenced_files(manifest: dict) -> set[str]:
    """Return the file names a manifest uses."""
    return set(manifest["files"])


def index_files(manifest: dict) -> set[str]:
    """Return the names of the Annoy index files, one per shard, that a manifest uses."""
    return {entry["file"] for entry in manifest["base"]["shards"]}


def damaged_files(folder: Path, manifest: dict) -> dict[str, str]:
    """Compare every file a manifest names with its recorded size and SHA-256.

    Returns:
        The problem of each damaged file by name (missing, another size, or another
        SHA-256); empty when every file matches.
    """
    damaged = {}
    for name, recorded in sorted(manifest["files"].items()):
        path = folder / name
        if not path.is_file():
            damaged[name] = "missing"
            continue
        size = path.stat().st_size
        if size != recorded.get("bytes"):
            damaged[name] = f"{size} bytes, the manifest records {recorded.get('bytes')}"
        elif storage.sha256_file(path) != recorded.get("sha256"):
            damaged[name] = "SHA-256 differs from the manifest (the content changed)"
    return damaged


def compact_command(folder: Path) -> str:
    """Return the shell command that compacts `folder`, which also rebuilds a damaged index."""
    return f"edgeembed index compact {shlex.quote(str(folder))}"


def rebuild_index_advice(folder: Path) -> str:
    """Return the advice that error messages give for a damaged index file."""
    return f"run `{compact_command(folder)}` to rebuild the index from the stored vectors"


def leftover_files(folder: Path, manifest: dict) -> list[Path]:
    """List generated files that the manifest does not use: older generations and temporaries."""
    keep = referenced_files(manifest)
    return sorted(path for path in folder.iterdir()
                  if _GENERATED.match(path.name) and path.name not in keep)


def remove_leftovers(folder: Path, manifest: dict) -> None:
    """Delete files of older generations. Readers that mapped them keep their mappings."""
    for path in leftover_files(folder, manifest):
        logger.debug("removing %s, which the current manifest does not use", path)
        path.unlink(missing_ok=True)
