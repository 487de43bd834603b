"""Shared fixtures: real photos, the shipped model and the optional shared assets."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED_ASSETS = ROOT.parent / "shared" / "assets"

# Length of the shipped model's embedding: GeM-pooled head (1280), block11 (192) and block0 (16).
DEFAULT_EMBEDDING_DIM = 1488

sys.path.insert(0, str(ROOT / "tools"))

import sample_photos  # noqa: E402  (lives in tools/, made importable above)


def shared_assets_or_skip() -> Path:
    """Return the shared test assets folder, or skip the test when this checkout lacks it."""
    if not SHARED_ASSETS.is_dir():
        pytest.skip(f"{SHARED_ASSETS} not found: these tests need the shared photos and models")
    return SHARED_ASSETS


@pytest.fixture(scope="session")
def shared_assets() -> Path:
    return shared_assets_or_skip()


@pytest.fixture(scope="session")
def photos() -> dict[str, Image.Image]:
    """Real photos by name: scikit-image's bundled ones, plus the shared ones when present."""
    found = {name: sample_photos.load_skimage_photo(name) for name in sample_photos.PHOTO_NAMES}
    images = SHARED_ASSETS / "images"
    if images.is_dir():
        for path in sorted(images.rglob("*")):
            if path.suffix.lower() in (".bmp", ".jpg"):
                found[path.relative_to(images).as_posix()] = Image.open(path).convert("RGB")
    return found


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory, photos) -> Path:
    """A folder with the scikit-image photos saved as JPEG files."""
    folder = tmp_path_factory.mktemp("photos")
    for name in sample_photos.PHOTO_NAMES:
        photos[name].save(folder / f"{name}.jpg", quality=92)
    return folder


@pytest.fixture(scope="session")
def embedder():
    """The shipped default model."""
    from edgeembed import Embedder

    return Embedder(num_threads=2)
