"""Turn an image (path, bytes, PIL image or array) into a model's input tensor.

The steps are: decode (at reduced size for JPEGs much larger than the input), apply the
EXIF orientation, convert any pixel mode to 8-bit RGB, resize and crop as the model's
`PreprocessConfig` says, reorder channels, and finally map pixels to the input dtype.
"""

from __future__ import annotations

import io
import math
import os
import stat
import struct
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from edgeembed.model import PreprocessConfig

ImageInput = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}

# Alpha is composited onto white, the usual background of product and catalogue photos.
_BACKGROUND = (255, 255, 255)

# Pillow first shrinks by an integer factor while the image is over this many times the
# target size, then resamples. 3.0 is visually equal to a plain resize and much faster.
_REDUCING_GAP = 3.0


class ImageError(ValueError):
    """Raised when an input cannot be decoded or converted to an RGB image.

    Attributes:
        source: The path, or a short description of the in-memory input.
        reason: One line saying what went wrong.
    """

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


def describe_source(source: ImageInput) -> str:
    """Return a short name for an input, for messages and result ids."""
    if isinstance(source, (str, os.PathLike)):
        return os.fsdecode(source)
    if isinstance(source, bytes):
        return f"<{len(source)} bytes>"
    if isinstance(source, Image.Image):
        return f"<PIL image {source.mode} {source.size[0]}x{source.size[1]}>"
    if isinstance(source, np.ndarray):
        return f"<array {source.dtype} {'x'.join(map(str, source.shape))}>"
    return f"<{type(source).__name__}>"


def draft_size(config: PreprocessConfig) -> tuple[int, int]:
    """Return the smallest decoded size that still covers the model input after cropping.

    JPEG decoders can decode at 1/2, 1/4 or 1/8 scale; asking for this size lets
    them skip most of the work for photos much larger than the model input.
    """
    side = math.ceil(max(config.input_size) / config.crop_fraction)
    return side, side


def _open(source: ImageInput, config: PreprocessConfig | None) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, np.ndarray):
        return _from_array(source)

    if isinstance(source, bytes):
        stream: io.BytesIO | str = io.BytesIO(source)
    elif isinstance(source, (str, os.PathLike)):
        stream = os.fspath(source)
        _check_regular_file(stream)
    else:
        raise TypeError(f"unsupported image input {type(source).__name__}; "
                        "pass a path, bytes, a PIL image or a uint8 array")

    image = Image.open(stream)
    if config is not None and image.format == "JPEG":
        image.draft(image.mode, draft_size(config))
    image.load()
    return image


def _check_regular_file(path: str) -> None:
    """Reject folders, FIFOs and devices before opening, because reading a FIFO can block forever."""
    mode = os.stat(path).st_mode
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(path)
    if not stat.S_ISREG(mode):
        raise ImageError(path, "not a regular file (a FIFO, socket or device)")


def _from_array(array: np.ndarray) -> Image.Image:
    if array.dtype == np.uint16:
        array = (array.astype(np.uint32) // 257).astype(np.uint8)
    if array.dtype != np.uint8:
        raise ImageError(describe_source(array), "arrays must be uint8 (or uint16) RGB, RGBA or grayscale")

    if array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4)):
        return Image.fromarray(np.ascontiguousarray(array))
    raise ImageError(describe_source(array), "arrays must have shape HxW, HxWx3 or HxWx4")


def _sixteen_bit_to_rgb(image: Image.Image) -> Image.Image:
    """Scale a 16- or 32-bit integer grayscale image to 8 bits instead of clipping at 255."""
    values = np.asarray(image, dtype=np.int64)
    full_scale = 65535 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255
    scaled = np.clip(values, 0, full_scale) * 255 // full_scale
    return Image.fromarray(scaled.astype(np.uint8), "L").convert("RGB")


def _float_to_rgb(image: Image.Image) -> Image.Image:
    values = np.asarray(image, dtype=np.float32)
    if values.max(initial=0.0) <= 1.0:
        values = values * 255.0
    return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), "L").convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB.

    Transparent pixels are composited onto white. 16-bit grayscale is scaled down
    to 8 bits. Palette, 1-bit, CMYK, YCbCr and LAB images use Pillow's conversions.

    Args:
        image: A decoded image in any mode.

    Returns:
        An RGB image, possibly the same object.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I"):
        return _sixteen_bit_to_rgb(image)
    if mode == "F":
        return _float_to_rgb(image)

    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode == "P" and "transparency" in image.info
    )
    if not has_alpha:
        return image.convert("RGB")

    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, _BACKGROUND + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def load_image(source: ImageInput, config: PreprocessConfig | None = None) -> Image.Image:
    """Decode an image, apply its EXIF orientation and convert it to RGB.

    Animated images give their first frame.

    Args:
        source: A file path, encoded bytes, a PIL image, or a uint8 array (HxW, HxWx3
            RGB or HxWx4 RGBA; uint16 arrays are scaled down to 8 bits).
        config: When given, JPEGs are decoded at the smallest scale that still covers
            this config's input size.

    Returns:
        An RGB PIL image.

    Raises:
        ImageError: If the input cannot be read or decoded; the message names it.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = _open(source, config)
            image = ImageOps.exif_transpose(image) or image
            return to_rgb(image)
    except ImageError:
        raise
    except Exception as error:  # noqa: BLE001 - named once here, re-raised as ImageError below
        return _raise_image_error(describe_source(source), error)


def _raise_image_error(name: str, error: Exception) -> Image.Image:
    """Re-raise a decoding failure as an ImageError with a one-line reason."""
    try:
        raise error
    except FileNotFoundError:
        raise ImageError(name, "file not found") from None
    except IsADirectoryError:
        raise ImageError(name, "is a directory, not an image") from None
    except PermissionError:
        raise ImageError(name, "permission denied") from None
    except UnidentifiedImageError:
        raise ImageError(name, "not a recognised image format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageError(name, f"rejected as a possible decompression bomb ({error})") from None
    except OSError as error:
        if error.errno is not None:  # the file system failed, not the decoder
            raise ImageError(name, f"cannot read file ({error.strerror})") from None
        raise ImageError(name, f"cannot decode image ({error})") from None
    except (SyntaxError, ValueError, EOFError, struct.error) as error:
        # Pillow reports truncated and corrupt data with these types too.
        raise ImageError(name, f"cannot decode image ({error})") from None


def crop_box(size: tuple[int, int], config: PreprocessConfig) -> tuple[float, float, float, float]:
    """Return the region of an image of `size` (width, height) that becomes the input.

    Args:
        size: Source width and height.
        config: The model's preprocessing.

    Returns:
        (left, upper, right, lower) in source pixels, as Pillow's ``box`` argument.
    """
    width, height = size
    if config.resize == "squash":
        return 0.0, 0.0, float(width), float(height)

    target_height, target_width = config.input_size
    scale = max(target_height / (height * config.crop_fraction), target_width / (width * config.crop_fraction))
    box_width = target_width / scale
    box_height = target_height / scale
    # Clamp, because rounding can put an edge a hair outside the image and Pillow rejects that.
    left = max(0.0, (width - box_width) / 2.0)
    upper = max(0.0, (height - box_height) / 2.0)
    return left, upper, min(float(width), left + box_width), min(float(height), upper + box_height)


def prepare_pixels(image: Image.Image, config: PreprocessConfig) -> np.ndarray:
    """Resize and crop an RGB image to the input size and order its channels.

    Args:
        image: An RGB image, as `load_image` returns.
        config: The model's preprocessing.

    Returns:
        A uint8 array of shape (height, width, 3) in the model's colour order.
    """
    height, width = config.input_size
    resized = image.resize(
        (width, height),
        _RESAMPLE[config.interpolation],
        box=crop_box(image.size, config),
        reducing_gap=_REDUCING_GAP,
    )
    pixels = np.asarray(resized, dtype=np.uint8)
    if config.color_order == "BGR":
        pixels = pixels[:, :, ::-1]
    return pixels


def to_float(pixels: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """Normalise uint8 pixels to the float input ``(pixel / 255 - mean) / std``.

    Args:
        pixels: A uint8 array (..., 3) as `prepare_pixels` returns.
        config: The model's preprocessing.

    Returns:
        A float32 array of the same shape.
    """
    mean = np.asarray(config.mean, dtype=np.float32)
    std = np.asarray(config.std, dtype=np.float32)
    return (pixels.astype(np.float32) / 255.0 - mean) / std


def quantization_table(config: PreprocessConfig, dtype: np.dtype, scale: float, zero_point: int) -> np.ndarray:
    """Build a per-channel lookup table from a uint8 pixel to the quantised input value.

    Quantising through a (3, 256) table costs one gather per pixel, whatever the
    normalisation, and gives the same values as normalising and then quantising.

    Args:
        config: The model's preprocessing.
        dtype: The input dtype, uint8 or int8.
        scale: The input quantisation scale.
        zero_point: The input quantisation zero point.

    Returns:
        An array of shape (3, 256) and the input dtype.
    """
    levels = np.arange(256, dtype=np.float32).reshape(1, 256).repeat(3, axis=0)
    normalised = to_float(levels.T, config).T
    limits = np.iinfo(dtype)
    quantised = np.floor(normalised / scale + zero_point + 0.5)
    return np.clip(quantised, limits.min, limits.max).astype(dtype)


def apply_table(pixels: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Map (H, W, 3) uint8 pixels through a (3, 256) table from `quantization_table`."""
    if (table[0] == table[1]).all() and (table[0] == table[2]).all():
        return table[0][pixels]  # one flat gather is faster than the per-channel one
    channels = np.arange(3).reshape(1, 1, 3)
    return table[channels, pixels]


def list_images(paths: list[str | Path], extensions: frozenset[str] | None = None) -> list[Path]:
    """Expand files and folders into a sorted list of files, recursing into folders.

    Folders contribute files whose suffix is in `extensions` (default: common image
    suffixes). Files named directly are always kept, so the decoder can report them.
    Symbolic-link loops are not followed twice.

    Args:
        paths: Files and folders.
        extensions: Lower-case suffixes with the dot.

    Returns:
        The files, folders expanded in sorted order, in the order given.
    """
    suffixes = extensions or IMAGE_EXTENSIONS
    found: list[Path] = []
    for path in map(Path, paths):
        if not path.is_dir():
            found.append(path)
            continue

        seen: set[str] = set()
        for root, dirs, files in os.walk(path, followlinks=True):
            real = os.path.realpath(root)
            if real in seen:
                dirs[:] = []
                continue
            seen.add(real)
            dirs.sort()
            found.extend(Path(root, name) for name in sorted(files)
                         if Path(name).suffix.lower() in suffixes)
    return found


IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm",
})
