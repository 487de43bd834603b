"""Choose calibration and evaluation photos and turn them into model inputs.

Inputs go through the runtime's own preprocessing (`edgeembed.preprocess`), so the
quantisation ranges and the fidelity numbers are measured on exactly the tensors the
device will feed the model.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
from tqdm import tqdm

from edgeembed.model import PreprocessConfig
from edgeembed.preprocess import ImageError, list_images, load_image, prepare_pixels, to_float

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageSet:
    """An ordered list of photos and a record of where they came from.

    Attributes:
        paths: The image files, in the order they are used.
        root: Folder that `names` are relative to.
        description: What the photos are and how they were chosen, for the model card.
    """

    paths: tuple[Path, ...]
    root: Path
    description: str

    @property
    def names(self) -> list[str]:
        """File names relative to `root`, with forward slashes."""
        return [_relative_name(path, self.root) for path in self.paths]

    def names_sha256(self) -> str:
        """Return the SHA-256 of the sorted relative names joined by newlines."""
        return hashlib.sha256("\n".join(sorted(self.names)).encode("utf-8")).hexdigest()

    def provenance(self) -> dict[str, object]:
        """Return the record stored in the model metadata and the report."""
        return {
            "n_images": len(self.paths),
            "description": self.description,
            "names_sha256": self.names_sha256(),
        }


def _relative_name(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.name


def spread_sample(paths: list[Path], count: int) -> list[Path]:
    """Pick `count` paths spread evenly over a sorted list, keeping their order.

    Evenly spaced picks cover every subfolder of a dataset, where the first `count`
    sorted files would cover only the first few classes.
    """
    if count >= len(paths):
        return list(paths)
    indices = np.linspace(0, len(paths) - 1, count).round().astype(int)
    return [paths[i] for i in indices]


def folder_images(folder: str | Path, max_images: int | None = None, purpose: str = "calibration") -> ImageSet:
    """List the photos under a folder (recursively, sorted) and cap their number.

    Args:
        folder: The folder to search.
        max_images: Keep at most this many, spread evenly over the sorted list.
        purpose: Word used in messages, e.g. ``"calibration"``.

    Returns:
        The chosen photos.

    Raises:
        FileNotFoundError: If the folder does not exist or contains no images.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{purpose} folder {folder} not found; pass a folder of photos")

    found = sorted(list_images([folder]))
    if not found:
        raise FileNotFoundError(f"{purpose} folder {folder} contains no images (.jpg, .png, .bmp, ...)")

    chosen = found if max_images is None else spread_sample(found, max_images)
    selection = "all used" if len(chosen) == len(found) else f"{len(chosen)} spread evenly over the sorted list"
    description = f"{folder.name}/: {len(found)} images found, {selection}"
    return ImageSet(paths=tuple(chosen), root=folder, description=description)


def load_pixels(paths: Iterable[Path], config: PreprocessConfig, label: str) -> tuple[np.ndarray, list[Path]]:
    """Decode and resize photos with the runtime preprocessing, skipping unreadable ones.

    Args:
        paths: Image files.
        config: The model's preprocessing.
        label: Progress-bar label, e.g. ``"calibration"``.

    Returns:
        A uint8 array (N, height, width, 3) and the N paths that decoded.

    Raises:
        ValueError: If no image could be decoded.
    """
    pixels: list[np.ndarray] = []
    loaded: list[Path] = []
    paths = list(paths)

    for path in tqdm(paths, desc=f"Loading {label} images", unit="image", leave=False, disable=None):
        try:
            image = load_image(path, config)
        except ImageError as error:
            logger.warning("Skipping %s image: %s", label, error)
            continue
        pixels.append(prepare_pixels(image, config))
        loaded.append(path)

    if not pixels:
        raise ValueError(f"none of the {len(paths)} {label} images could be decoded")
    return np.stack(pixels), loaded


def float_inputs(pixels: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """Normalise uint8 pixels (N, H, W, 3) to the float model input, as the runtime does."""
    return to_float(pixels, config).astype(np.float32)
