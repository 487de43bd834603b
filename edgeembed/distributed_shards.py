"""The inputs and the staging folder of a distributed gallery build.

A build lists its input files once, in a fixed order, and numbers them as rows. Ray
tasks read them with `read_chunk`, which reports an unreadable file with the reason
that the single-process build gives. The rows are cut into shards of consecutive
rows, and each finished shard is written to the staging folder as two files named by
its row range:

- ``shard-START-END.npy``: float32 vectors of rows START to END-1 (zeros for files that failed),
- ``shard-START-END.json``: the id, path and error of each of those rows.

The JSON file is written last, so a shard whose JSON file exists is complete.
``plan.json`` records the source, the model fingerprint, the shard size and a digest of
the file list. A resumed build reuses shards only when the source, the model and the
file list are unchanged, and it keeps the earlier shard size, so the rows it skips are
exactly the rows that the earlier run finished.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from edgeembed import storage
from edgeembed.preprocess import IMAGE_EXTENSIONS, ImageError, load_image

logger = logging.getLogger(__name__)

PLAN_FILE = "plan.json"
_SHARD_NAME = re.compile(r"^shard-(\d{9})-(\d{9})\.json$")


class DistributedBuildError(RuntimeError):
    """Raised when a distributed build cannot start, resume or finish; the message names the next step."""


@dataclass(frozen=True)
class SourceFiles:
    """The input files of a build, in the order their rows are numbered.

    Attributes:
        source: The folder or URI given on the command line.
        paths: One local path or URI per file, as the gallery records it.
        ids: One item id per file: its path relative to `source`, with forward slashes.
    """

    source: str
    paths: list[str]
    ids: list[str]

    def __len__(self) -> int:
        return len(self.paths)

    def digest(self) -> str:
        """Return the SHA-256 of the ids and paths in row order, to recognise the same file list."""
        hasher = hashlib.sha256()
        for item_id, path in zip(self.ids, self.paths):
            hasher.update(f"{item_id}\0{path}\n".encode("utf-8", "surrogateescape"))
        return hasher.hexdigest()


def is_uri(source: str) -> bool:
    """Return True for a URI with a scheme (``s3://``, ``gs://``, ``file://``), False for a local path."""
    return "://" in source


def _walk_order(relative: str) -> tuple:
    """Sort key that orders files as `list_images` walks a folder: a folder's files, then its subfolders."""
    *folders, name = relative.split("/")
    return tuple((1, folder) for folder in folders) + ((0, name),)


def list_uri(source: str) -> SourceFiles:
    """List the image files under a URI that pyarrow's file systems can open.

    Files are kept when their suffix is an image suffix that `list_images` accepts,
    and they are ordered the way `list_images` orders a local folder.

    Raises:
        DistributedBuildError: If the URI cannot be opened or listed.
    """
    from pyarrow import fs

    try:
        filesystem, root = fs.FileSystem.from_uri(source)
        infos = filesystem.get_file_info(fs.FileSelector(root, recursive=True))
    except (OSError, ValueError) as error:
        raise DistributedBuildError(f"cannot list {source}: {error}") from error

    prefix = root.rstrip("/") + "/"
    relatives = [info.path[len(prefix):] for info in infos
                 if info.type == fs.FileType.File and Path(info.path).suffix.lower() in IMAGE_EXTENSIONS]
    relatives.sort(key=_walk_order)
    base = source.rstrip("/") + "/"
    return SourceFiles(source, [base + relative for relative in relatives], relatives)


def read_file_bytes(path: str, source: str, root: str | None = None) -> bytes:
    """Read one input file, from a local path or a URI under `source`.

    Args:
        path: A local path or a URI that starts with `source`.
        source: The folder or URI of the build.
        root: For a URI source, the path of `source` inside its pyarrow file system.

    Raises:
        ImageError: If the file cannot be read, with the reason that the
            single-process build gives for a local file.
    """
    if root is not None:
        return _read_uri(path, source, root)

    try:
        if stat.S_ISREG(os.stat(path).st_mode):
            with open(path, "rb") as handle:
                return handle.read()
    except OSError:
        pass
    # Opening the path again raises the ImageError of the single-process build for the
    # same cause (not found, a folder, a FIFO, permission denied) without reading a FIFO.
    load_image(path)
    raise ImageError(path, "cannot read file (it changed while it was read)")


def _read_uri(uri: str, source: str, root: str) -> bytes:
    from pyarrow import fs

    filesystem, _ = _uri_filesystem(source)
    try:
        with filesystem.open_input_stream(root.rstrip("/") + "/" + uri[len(source.rstrip("/")) + 1:]) as stream:
            return stream.readall()
    except FileNotFoundError:
        raise ImageError(uri, "file not found") from None
    except PermissionError:
        raise ImageError(uri, "permission denied") from None
    except (OSError, fs.ArrowException) as error:
        raise ImageError(uri, f"cannot read file ({error})") from None


_FILESYSTEMS: dict[str, tuple] = {}


def _uri_filesystem(source: str) -> tuple:
    """Return pyarrow's (file system, root path) for a URI, created once per process."""
    if source not in _FILESYSTEMS:
        from pyarrow import fs

        _FILESYSTEMS[source] = fs.FileSystem.from_uri(source)
    return _FILESYSTEMS[source]


def read_chunk(chunk: dict, source: str) -> list[dict]:
    """Read the files of one chunk into rows of ``row``, ``data`` and ``error`` (a Ray Data flat_map).

    Args:
        chunk: ``{"start": first row, "paths": [file path as bytes, ...]}``.
        source: The folder or URI of the build.

    Returns:
        One row per file. A file that cannot be read has empty ``data`` and its reason
        in ``error``; the others have an empty ``error``.
    """
    root = _uri_filesystem(source)[1] if is_uri(source) else None
    rows = []
    for offset, encoded in enumerate(chunk["paths"]):
        path = os.fsdecode(encoded)
        try:
            data, error = read_file_bytes(path, source, root), ""
        except ImageError as failure:
            data, error = b"", failure.reason
        rows.append({"row": int(chunk["start"]) + offset, "data": data, "error": error})
    return rows


@dataclass(frozen=True)
class StagingPlan:
    """Inputs and settings that a staging folder was computed from.

    Attributes:
        source: The folder or URI of the images.
        model_fingerprint: SHA-256 of the model that computes the vectors.
        rows: The number of input files.
        shard_rows: Rows per shard; the last shard may be shorter.
        files_sha256: `SourceFiles.digest` of the input list.
    """

    source: str
    model_fingerprint: str
    rows: int
    shard_rows: int
    files_sha256: str

    def shard_ranges(self) -> list[tuple[int, int]]:
        """Return the (start, end) row range of every shard, in order."""
        return [(start, min(start + self.shard_rows, self.rows)) for start in range(0, self.rows, self.shard_rows)]

    def differences(self, other: StagingPlan) -> list[str]:
        """Name the fields whose values differ from `other`."""
        ours, theirs = asdict(self), asdict(other)
        return [name for name in ours if ours[name] != theirs[name]]


def staging_folder(out: Path) -> Path:
    """Return the staging folder of a gallery: ``GALLERY_DIR.staging`` beside it."""
    return out.with_name(out.name + ".staging")


def shard_stem(start: int, end: int) -> str:
    """Return the file name stem of the shard of rows START to END-1."""
    return f"shard-{start:09d}-{end:09d}"


class ShardStore:
    """Shard files of one build in its staging folder.

    Create one with `open`; write finished shards with `write` and read them all back
    with `merge`.
    """

    def __init__(self, folder: Path, plan: StagingPlan, files: SourceFiles) -> None:
        """Wrap an existing staging folder; use `open` instead."""
        self.folder = folder
        self.plan = plan
        self.files = files

    @classmethod
    def open(cls, folder: Path, plan: StagingPlan, files: SourceFiles, resume: bool) -> ShardStore:
        """Create the staging folder, or reopen it to resume an earlier run.

        A resumed run keeps the shard size of the earlier run, so that its shard names
        still match.

        Args:
            folder: The staging folder.
            plan: The plan of this run.
            files: The input files the plan was made from.
            resume: Reuse the shards of an earlier run with the same inputs and model.

        Raises:
            DistributedBuildError: If the folder contains shards and `resume` is False, or
                `resume` is True and the earlier run had other inputs or another model.
        """
        plan_path = folder / PLAN_FILE
        if plan_path.is_file():
            earlier = cls._read_plan(plan_path)
            finished = len(cls(folder, earlier, files).finished_ranges())
            if finished and not resume:
                raise DistributedBuildError(
                    f"{folder} contains {finished} shards of an earlier build; pass --resume to "
                    "reuse them, or delete the folder to start over")
            changed = [name for name in earlier.differences(plan) if name != "shard_rows"]
            if finished and changed:
                raise DistributedBuildError(
                    f"cannot resume from {folder}: the earlier build differs in {', '.join(changed)}; "
                    "build with the same images and model, or delete the folder to start over")
            if finished:
                logger.info("resuming from %d shards in %s", finished, folder)
                return cls(folder, earlier, files)

        folder.mkdir(parents=True, exist_ok=True)
        storage.write_text(plan_path, json.dumps(asdict(plan), indent=2))
        return cls(folder, plan, files)

    @staticmethod
    def _read_plan(path: Path) -> StagingPlan:
        try:
            return StagingPlan(**json.loads(path.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as error:
            raise DistributedBuildError(f"{path} is corrupted ({error}); delete {path.parent} "
                                        "to start over") from error

    def finished_ranges(self) -> list[tuple[int, int]]:
        """Return the row ranges whose shard files are both written, in row order."""
        ranges = []
        for path in self.folder.glob("shard-*.json"):
            match = _SHARD_NAME.match(path.name)
            if match and path.with_suffix(".npy").is_file():
                ranges.append((int(match.group(1)), int(match.group(2))))
        return sorted(ranges)

    def pending_ranges(self) -> list[tuple[int, int]]:
        """Return the row ranges of the plan that have no finished shard yet."""
        finished = set(self.finished_ranges())
        return [shard for shard in self.plan.shard_ranges() if shard not in finished]

    def write(self, start: int, vectors: np.ndarray, errors: Sequence[str]) -> Path:
        """Write the shard of rows START to START+len(vectors)-1.

        Args:
            start: The first row.
            vectors: Float32 array of shape (rows, D); rows of failed files are ignored.
            errors: One reason per row; an empty string for a file that was embedded.

        Returns:
            The shard's JSON file.
        """
        end = start + len(vectors)
        stem = shard_stem(start, end)
        table = [{"row": row, "id": self.files.ids[row], "path": self.files.paths[row], "error": error or None}
                 for row, error in zip(range(start, end), errors)]

        storage.write_npy(self.folder / f"{stem}.npy", np.asarray(vectors, dtype=np.float32))
        # ASCII escapes keep file names that are not valid UTF-8 (surrogate escapes) intact.
        storage.write_text(self.folder / f"{stem}.json", json.dumps(table))
        logger.debug("wrote shard %s (%d rows)", stem, end - start)
        return self.folder / f"{stem}.json"

    def _read_table(self, start: int, end: int) -> list[dict]:
        path = self.folder / f"{shard_stem(start, end)}.json"
        try:
            table = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
            raise DistributedBuildError(f"shard {path} is unreadable ({error}); delete it and its .npy file, "
                                        "then run again with --resume") from error

        if [entry["id"] for entry in table] != self.files.ids[start:end]:
            raise DistributedBuildError(f"shard {path} lists other images than rows {start} to {end - 1}; "
                                        f"delete {self.folder} to start over")
        return table

    def _read_vectors(self, start: int, end: int, dim: int) -> np.ndarray:
        path = self.folder / f"{shard_stem(start, end)}.npy"
        try:
            return storage.read_npy(path, (end - start, dim))
        except storage.GalleryError as error:
            raise DistributedBuildError(f"shard {path} is unreadable ({error}); delete it and its .json "
                                        "file, then run again with --resume") from error

    def merge(self, dim: int) -> tuple[np.ndarray, list[int], list[tuple[str, str]]]:
        """Read every shard of the plan, in row order.

        Args:
            dim: The vector size.

        Returns:
            The vectors of the embedded files, their rows, and (path, reason) for each
            file that failed.

        Raises:
            DistributedBuildError: If a shard is missing, unreadable or lists other files.
        """
        missing = self.pending_ranges()
        if missing:
            raise DistributedBuildError(f"{len(missing)} shards are missing in {self.folder}, the first "
                                        f"for rows {missing[0][0]} to {missing[0][1] - 1}; run again with --resume")

        tables = {shard: self._read_table(*shard) for shard in self.plan.shard_ranges()}
        kept = [start + offset for (start, _), table in tables.items()
                for offset, entry in enumerate(table) if entry["error"] is None]
        failures = [(entry["path"], entry["error"]) for table in tables.values()
                    for entry in table if entry["error"] is not None]

        # One array, filled shard by shard, so the driver holds the vectors once.
        merged = np.empty((len(kept), dim), dtype=np.float32)
        filled = 0
        for (start, end), table in tables.items():
            good = [offset for offset, entry in enumerate(table) if entry["error"] is None]
            merged[filled:filled + len(good)] = self._read_vectors(start, end, dim)[good]
            filled += len(good)
        return merged, kept, failures

    def remove(self) -> None:
        """Delete the staging folder and its shards."""
        storage.remove_tree(self.folder)


class ShardCollector:
    """Gathers embedded rows, which arrive in any order, and writes each shard once all its rows are in.

    A row that arrives twice (Ray retries a task whose worker died) overwrites its first copy.
    """

    def __init__(self, store: ShardStore, ranges: Sequence[tuple[int, int]], dim: int) -> None:
        """Collect the shards of `ranges`, vectors of size `dim`, into `store`."""
        self.store = store
        self.dim = dim
        self.shards_written = 0
        self._ends = {start: end for start, end in ranges}
        self._vectors: dict[int, np.ndarray] = {}
        self._errors: dict[int, list[str]] = {}
        self._filled: dict[int, np.ndarray] = {}

    def add(self, rows: Sequence[int], vectors: np.ndarray, errors: Sequence[str]) -> None:
        """Store embedded rows and write every shard that they complete.

        Args:
            rows: Row numbers.
            vectors: One vector per row (ignored for failed rows).
            errors: One reason per row; an empty string for a file that was embedded.
        """
        completed = set()
        for row, vector, error in zip(map(int, rows), vectors, errors):
            start = row - row % self.store.plan.shard_rows
            if start not in self._vectors:
                size = self._ends[start] - start
                self._vectors[start] = np.zeros((size, self.dim), np.float32)
                self._errors[start] = [""] * size
                self._filled[start] = np.zeros(size, dtype=bool)
            self._vectors[start][row - start] = vector
            self._errors[start][row - start] = str(error)
            self._filled[start][row - start] = True
            completed.add(start)

        for start in sorted(completed):
            if self._filled[start].all():
                self.store.write(start, self._vectors.pop(start), self._errors.pop(start))
                del self._filled[start]
                self.shards_written += 1
