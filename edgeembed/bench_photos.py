"""The photos a benchmark runs on, all made from real photos the user points to.

One reference photo (the largest in the folder, or one named) is centre-cropped to 4:3
and saved in three forms:

- ``small``: 640x480 JPEG (0.31 MP), like a web image or a camera preview;
- ``phone``: 4032x3024 JPEG (12.2 MP), made by upscaling the reference with Lanczos.
  An upscaled photo has less fine detail than a real 12 MP photo, so its JPEG is
  smaller and its entropy decoding somewhat faster. The pixel count, which drives the
  full-size decode and resize that `Embedder.embed` avoids, is that of a phone photo;
- ``array``: the small photo decoded to a 480x640x3 uint8 array, like a camera frame.

The benchmark adds ``input``: the array already at the model's input size, which
isolates the Embedder's own overhead around ``invoke()``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from edgeembed.preprocess import ImageError, list_images, load_image

logger = logging.getLogger(__name__)

SMALL_SIZE = (640, 480)
PHONE_SIZE = (4032, 3024)
JPEG_QUALITY = 90


class PhotoError(ValueError):
    """Raised when the photo folder is missing, empty or has no decodable photo."""


@dataclass
class PhotoSet:
    """The benchmark's photos.

    Attributes:
        reference: The real photo the others are made from.
        small: 640x480 JPEG file.
        phone: 12 MP JPEG file upscaled from the reference.
        array: The small photo decoded, (480, 640, 3) uint8.
        folder: Real photo files for throughput, spread evenly over the folder.
        all_photos: Every photo file found, for the gallery's real embeddings.
    """

    reference: Path
    small: Path
    phone: Path
    array: np.ndarray
    folder: list[Path]
    all_photos: list[Path]

    def describe(self) -> dict:
        """Return sizes and paths as a JSON-ready dict."""
        def file_record(path: Path) -> dict:
            with Image.open(path) as image:
                width, height = image.size
            return {"path": str(path), "width": width, "height": height,
                    "megapixels": round(width * height / 1e6, 2), "bytes": path.stat().st_size}

        height, width = self.array.shape[:2]
        return {
            "reference": file_record(self.reference),
            "small": file_record(self.small),
            "phone": file_record(self.phone),
            "array": {"width": width, "height": height, "megapixels": round(width * height / 1e6, 2),
                      "dtype": str(self.array.dtype)},
            "folder_images": len(self.folder),
            "photos_found": len(self.all_photos),
        }


def _pixel_count(path: Path) -> int:
    try:
        with Image.open(path) as image:
            return image.size[0] * image.size[1]
    except (OSError, ValueError):
        return 0


def crop_to_aspect(image: Image.Image, width: int, height: int) -> Image.Image:
    """Centre-crop an image to the aspect ratio width:height."""
    source_width, source_height = image.size
    target = width / height
    if source_width / source_height > target:
        new_width = round(source_height * target)
        left = (source_width - new_width) // 2
        return image.crop((left, 0, left + new_width, source_height))
    new_height = round(source_width / target)
    upper = (source_height - new_height) // 2
    return image.crop((0, upper, source_width, upper + new_height))


def spread(items: list[Path], count: int) -> list[Path]:
    """Pick `count` items evenly spaced over a list, in order (all when it is shorter)."""
    if count >= len(items):
        return list(items)
    positions = np.linspace(0, len(items) - 1, count).round().astype(int)
    return [items[i] for i in positions]


def make_photo_set(photos: Path, workdir: Path, folder_images: int,
                   reference: Path | None = None) -> PhotoSet:
    """Find real photos and write the small and phone JPEGs into `workdir`.

    Args:
        photos: A folder of real photos, searched recursively.
        workdir: Where small.jpg and phone.jpg are written.
        folder_images: How many photos the throughput folder gets.
        reference: The photo to make small and phone from; None takes the largest.

    Raises:
        PhotoError: If the folder is missing or contains no decodable photo.
    """
    if not Path(photos).is_dir():
        raise PhotoError(f"photo folder {photos} not found; pass --photos DIR with real photos")
    found = list_images([photos])
    if not found:
        raise PhotoError(f"{photos} has no image files; pass --photos DIR with real photos")
    if reference is None:
        reference = max(found, key=_pixel_count)

    try:
        image = load_image(reference)
    except ImageError as error:
        raise PhotoError(f"reference photo {error}") from error
    logger.info("reference photo %s (%dx%d)", reference, *image.size)

    workdir.mkdir(parents=True, exist_ok=True)
    small, phone = workdir / "small.jpg", workdir / "phone.jpg"
    cropped = crop_to_aspect(image, *SMALL_SIZE)
    cropped.resize(SMALL_SIZE, Image.Resampling.LANCZOS).save(small, quality=JPEG_QUALITY)
    cropped.resize(PHONE_SIZE, Image.Resampling.LANCZOS).save(phone, quality=JPEG_QUALITY)
    array = np.asarray(load_image(small), dtype=np.uint8).copy()

    return PhotoSet(reference=Path(reference), small=small, phone=phone, array=array,
                    folder=spread(found, folder_images), all_photos=found)


def input_array(frame: np.ndarray, input_size: tuple[int, int]) -> np.ndarray:
    """Resize a frame to a model's (height, width) input size, as a uint8 array."""
    height, width = input_size
    resized = Image.fromarray(frame).resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.uint8).copy()
