"""Atomic, durable file writes and checked reads for gallery folders.

A file is written under a temporary name, flushed and fsynced, then renamed, so a
reader never sees half a file. Reads check sizes against the manifest before any
file is memory-mapped, because Annoy crashes the process on a short or mismatched file.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np


class GalleryError(RuntimeError):
    """Raised when a gallery folder is missing, inconsistent or used with another model."""


def staging_dir(target: Path) -> Path:
    """Create an empty temporary folder beside `target`, on the same file system."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


def remove_tree(folder: Path) -> None:
    """Delete a folder and everything in it, ignoring a folder that is already gone."""
    shutil.rmtree(folder, ignore_errors=True)


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (new and renamed files) to disk."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_file(path: Path) -> None:
    """Flush a file written by other code (such as Annoy's save) to disk."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def replace_dir(staging: Path, target: Path) -> None:
    """Move a finished staging folder to `target`, replacing any folder there.

    The old folder is renamed aside first and deleted only after the new one is in
    place, so a crash between the two renames leaves the old folder under
    ``.NAME.old-PID`` rather than losing it.
    """
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(target, old)
    os.rename(staging, target)
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_bytes_atomic(path: Path, write) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def write_bytes(path: Path, data: bytes) -> None:
    """Write bytes atomically and durably."""
    _write_bytes_atomic(path, lambda handle: handle.write(data))


def write_text(path: Path, text: str) -> None:
    """Write a UTF-8 text file atomically and durably."""
    _write_bytes_atomic(path, lambda handle: handle.write(text.encode("utf-8")))


def write_npy(path: Path, array: np.ndarray) -> None:
    """Write a numpy array as .npy atomically and durably (never pickled)."""
    _write_bytes_atomic(path, lambda handle: np.save(handle, array, allow_pickle=False))


def sha256_file(path: Path) -> str:
    """Return the SHA-256 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_file(path: Path) -> dict:
    """Return the size in bytes and SHA-256 of a file, as recorded in the manifest."""
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def write_manifest(path: Path, manifest: dict) -> None:
    """Switch a gallery to a new manifest with one atomic rename, then flush the folder.

    Every file the manifest names must already be written and fsynced.
    """
    write_text(path, json.dumps(manifest, indent=2))
    fsync_dir(path.parent)


class WriterLock:
    """An exclusive, non-blocking lock on a gallery folder for one writing process.

    It is an ``flock`` on the folder's ``.lock`` file, so the operating system
    releases it when the process exits, including after SIGKILL, and a killed writer
    never blocks the next one.
    """

    def __init__(self, folder: Path) -> None:
        """Prepare a lock for `folder`; `acquire` takes it."""
        self.path = folder / ".lock"
        self._descriptor: int | None = None

    def acquire(self) -> None:
        """Take the lock.

        Raises:
            GalleryError: If another process holds it.
        """
        descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(descriptor)
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise GalleryError(f"{self.path.parent} is being changed by another process; "
                                   "wait for it to finish and try again") from None
            raise
        self._descriptor = descriptor

    def release(self) -> None:
        """Release the lock if held."""
        if self._descriptor is not None:
            fcntl.flock(self._descriptor, fcntl.LOCK_UN)
            os.close(self._descriptor)
            self._descriptor = None

    def __enter__(self) -> WriterLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def read_manifest(path: Path, schema: str) -> dict:
    """Read and check a gallery manifest.

    Raises:
        GalleryError: If the file is missing, not JSON, or not of `schema`.
    """
    if not path.is_file():
        raise GalleryError(f"{path.parent} is not a gallery: {path.name} not found")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise GalleryError(f"{path} is corrupted: {error}") from error

    if not isinstance(manifest, dict) or manifest.get("schema") != schema:
        raise GalleryError(f"{path} is not a gallery manifest of schema {schema!r}")
    for key in ("generation", "dim", "n_trees", "model", "base", "added", "removed", "files"):
        if key not in manifest:
            raise GalleryError(f"{path} is missing the field {key!r}")
    return manifest


def check_size(path: Path, expected: int | None, fix: str) -> None:
    """Check that a file exists and has the size the manifest recorded.

    Args:
        path: The file.
        expected: Its size in bytes from the manifest; None skips the size check.
        fix: What the user should do, appended to the error message.

    Raises:
        GalleryError: If the file is missing or its size differs.
    """
    if not path.is_file():
        raise GalleryError(f"{path} not found; {fix}")
    actual = path.stat().st_size
    if expected is not None and actual != expected:
        raise GalleryError(f"{path} has {actual} bytes, the manifest records {expected} "
                           f"(the file is truncated or replaced); {fix}")


def read_npy(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """Memory-map a float32 .npy file and check its shape.

    Raises:
        GalleryError: If the file is not a float32 array of `shape`.
    """
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as error:
        raise GalleryError(f"{path} is not a readable .npy file: {error}") from error

    if array.shape != shape or array.dtype != np.float32:
        raise GalleryError(f"{path} contains {array.dtype} {array.shape}, expected float32 {shape}")
    return array
