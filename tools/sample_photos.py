"""Write scikit-image's bundled photos as a sample gallery plus edited query copies.

    python tools/sample_photos.py samples

creates ``samples/gallery/*.jpg`` (19 real photos) and ``samples/queries/*.jpg``
(one edited copy of some of them, named after the edit), so that
``edgeembed index build`` and ``edgeembed search`` have real input on a fresh machine.
The edit functions are also used by the retrieval tests.
"""

from __future__ import annotations

import argparse
import io
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

# scikit-image photos that ship inside its wheel (no download), one per scene.
# "cat" is the same photo as "chelsea", and the right stereo_motorcycle view nearly
# duplicates the left, so both are left out.
PHOTO_NAMES = (
    "astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins", "grass",
    "gravel", "hubble_deep_field", "immunohistochemistry", "microaneurysms", "moon", "page",
    "retina", "rocket", "stereo_motorcycle", "text",
)


def load_skimage_photo(name: str) -> Image.Image:
    """Return one of scikit-image's bundled photos as an RGB PIL image."""
    from skimage import data

    array = getattr(data, name)()
    if isinstance(array, tuple):  # stereo_motorcycle returns (left, right, disparity)
        array = array[0]
    return Image.fromarray(np.asarray(array, dtype=np.uint8)).convert("RGB")


def crop_area(image: Image.Image, rng: random.Random, fraction: float = 0.8) -> Image.Image:
    """Crop a random window holding `fraction` of the area, with the image's aspect ratio."""
    width, height = image.size
    side = fraction ** 0.5
    crop_width, crop_height = round(width * side), round(height * side)
    left = rng.randint(0, width - crop_width)
    top = rng.randint(0, height - crop_height)
    return image.crop((left, top, left + crop_width, top + crop_height))


def rotate(image: Image.Image, degrees: float = 10.0) -> Image.Image:
    """Rotate about the centre, keeping the size; the corners fill with black."""
    return image.rotate(degrees, resample=Image.Resampling.BILINEAR)


def jpeg(image: Image.Image, quality: int = 30) -> Image.Image:
    """Re-encode as JPEG at `quality` and decode again."""
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def brighten(image: Image.Image, factor: float = 1.3) -> Image.Image:
    """Scale brightness by `factor` (1.3 is +30 %)."""
    return ImageEnhance.Brightness(image).enhance(factor)


def flip(image: Image.Image) -> Image.Image:
    """Mirror left to right."""
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def downscale(image: Image.Image, factor: int = 4) -> Image.Image:
    """Shrink each side by `factor` (4 gives a quarter of the width and height)."""
    width, height = image.size
    return image.resize((max(1, width // factor), max(1, height // factor)), Image.Resampling.BILINEAR)


def edits(seed: int = 0) -> dict:
    """Return the named near-duplicate edits, each a function of one image."""
    rng = random.Random(seed)
    return {
        "crop80": lambda image: crop_area(image, rng),
        "rotate10": rotate,
        "jpeg30": jpeg,
        "bright130": brighten,
        "flip": flip,
        "quarter": downscale,
    }


def write_samples(out: Path) -> tuple[int, int]:
    """Write the gallery photos and one edited query for every third photo.

    Returns:
        The number of gallery photos and of queries written.
    """
    gallery, queries = out / "gallery", out / "queries"
    gallery.mkdir(parents=True, exist_ok=True)
    queries.mkdir(parents=True, exist_ok=True)
    named_edits = list(edits().items())

    query_count = 0
    for number, name in enumerate(PHOTO_NAMES):
        photo = load_skimage_photo(name)
        photo.save(gallery / f"{name}.jpg", quality=92)
        if number % 3 == 0:
            edit_name, edit = named_edits[query_count % len(named_edits)]
            edit(photo).save(queries / f"{name}_{edit_name}.jpg", quality=92)
            query_count += 1
    return len(PHOTO_NAMES), query_count


def main() -> None:
    """Parse the output folder and write the samples."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to create, with gallery/ and queries/ inside")
    args = parser.parse_args()
    photos, queries = write_samples(args.out)
    print(f"wrote {photos} photos to {args.out / 'gallery'} and {queries} queries to {args.out / 'queries'}")


if __name__ == "__main__":
    main()
