"""Check a gallery folder's files against its manifest, and count what it holds."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from edgeembed import segments, storage
from edgeembed.gallery import MANIFEST, SCHEMA
from edgeembed.storage import GalleryError

logger = logging.getLogger(__name__)


@dataclass
class VerifyResult:
    """The outcome of `verify`.

    Attributes:
        problems: One line per inconsistency; the gallery is sound when empty.
        leftovers: Files of older generations or killed writes that the manifest does
            not use. They are harmless, and the next change deletes them.
        fix: How to repair the damaged files, or None when no file is damaged.
    """

    problems: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)
    fix: str | None = None

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems


def _check_files(folder: Path, manifest: dict, result: VerifyResult) -> set[str]:
    """Record damaged files and how to repair them, and return their names."""
    damaged = segments.damaged_files(folder, manifest)
    result.problems += [f"{folder / name}: {problem}" for name, problem in damaged.items()]
    if not damaged:
        return set()

    if set(damaged) <= segments.index_files(manifest):
        result.fix = (f"only the Annoy index is damaged, so `{segments.compact_command(folder)}` "
                      "can rebuild it from the stored vectors")
    else:
        result.fix = f"a vector or item file is damaged, so {segments.REBUILD_FROM_IMAGES}"
    return set(damaged)


def _check_segments(folder: Path, manifest: dict, result: VerifyResult, load_index: bool) -> None:
    try:
        _, base_items, _ = segments.load_base(folder, manifest, load_index)
        _, added_items = segments.load_added(folder, manifest)
    except (GalleryError, FileNotFoundError) as error:
        result.problems.append(str(error))
        return

    base_ids = [item.get("id") for item in base_items]
    added_ids = [item.get("id") for item in added_items]
    if len(set(base_ids)) != len(base_ids):
        result.problems.append(f"{folder}: the base segment repeats item ids")
    if len(set(added_ids)) != len(added_ids):
        result.problems.append(f"{folder}: the added segment repeats item ids")

    removed = set(manifest["removed"])
    unknown = sorted(removed - set(base_ids))
    if unknown:
        result.problems.append(f"{folder}: removed ids not in the base segment: {unknown[:5]}")
    live_twice = sorted(set(added_ids) & (set(base_ids) - removed))
    if live_twice:
        result.problems.append(f"{folder}: ids live in both segments: {live_twice[:5]}")


def verify(directory: str | Path) -> VerifyResult:
    """Check that every file a gallery's manifest names is present, intact and consistent.

    Sizes and SHA-256 are compared with the manifest before Annoy maps any file. Then
    the item counts and ids are cross-checked, and the index's item count when the
    index files are intact.

    Args:
        directory: The gallery folder.

    Returns:
        The problems and leftover files found.
    """
    folder = Path(directory)
    result = VerifyResult()
    try:
        manifest = storage.read_manifest(folder / MANIFEST, SCHEMA)
    except GalleryError as error:
        result.problems.append(str(error))
        return result

    damaged = _check_files(folder, manifest, result)
    if damaged <= segments.index_files(manifest):
        # Items and ids can still be cross-checked when only the index is damaged.
        _check_segments(folder, manifest, result, load_index=not damaged)
    result.leftovers = [path.name for path in segments.leftover_files(folder, manifest)]
    return result


def stats(directory: str | Path) -> dict:
    """Count a gallery's items and disk use from its manifest.

    Returns:
        A dict with the integer fields ``items`` (stored, removed ones included),
        ``live``, ``removed``, ``base_items``, ``added_items``, ``dim``, ``n_trees``,
        ``generation`` and ``disk_bytes``, plus ``model_fingerprint`` and ``model_path``.

    Raises:
        GalleryError: If the manifest is missing or invalid.
    """
    folder = Path(directory)
    manifest = storage.read_manifest(folder / MANIFEST, SCHEMA)
    base, added = int(manifest["base"]["items"]), int(manifest["added"]["items"])
    removed = len(manifest["removed"])
    disk = sum(path.stat().st_size for path in folder.iterdir() if path.is_file())
    return {
        "items": base + added,
        "live": base + added - removed,
        "removed": removed,
        "base_items": base,
        "added_items": added,
        "dim": int(manifest["dim"]),
        "n_trees": int(manifest["n_trees"]),
        "generation": int(manifest["generation"]),
        "disk_bytes": disk,
        "model_fingerprint": manifest["model"]["fingerprint"],
        "model_path": manifest["model"].get("path"),
        "updated": manifest.get("updated"),
    }


def format_stats(values: dict) -> str:
    """Render `stats` output as aligned lines for a terminal."""
    return "\n".join(f"{key:18} {value}" for key, value in values.items())


def format_verify(folder: Path, result: VerifyResult) -> str:
    """Render a `VerifyResult` as lines for a terminal."""
    count = len(result.problems)
    lines = [f"{folder}: {'ok' if result.ok else f'{count} problem' + ('s' if count > 1 else '')}"]
    lines += [f"  problem: {problem}" for problem in result.problems]
    if result.fix:
        lines.append(f"  fix: {result.fix}")
    lines += [f"  leftover (harmless): {name}" for name in result.leftovers]
    return "\n".join(lines)


def to_json(values: dict) -> str:
    """Serialise stats as one JSON line."""
    return json.dumps(values, ensure_ascii=False)
