"""Write a corpus of hostile and unusual image files for the decoder tests.

    python tests/hostile_corpus.py OUT_DIR

Every file is made from one real photo. `make_corpus` returns, for each file name,
whether it must embed (True) or be reported as failed (False).
"""

from __future__ import annotations

import io
import os
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# Pillow's transpose that undoes each EXIF orientation (2..8), and its inverse, which
# turns an upright photo into the pixels a camera stores with that orientation.
EXIF_UNDO = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90,
}
EXIF_STORE = {**EXIF_UNDO, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def exif_jpeg(upright: Image.Image, orientation: int) -> bytes:
    """Encode `upright` as a JPEG whose pixels are stored turned, with an EXIF orientation tag."""
    stored = upright.transpose(EXIF_STORE[orientation]) if orientation != 1 else upright
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encode(stored, "JPEG", quality=92, exif=exif.tobytes())


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def decompression_bomb() -> bytes:
    """A 100-byte PNG that declares 100000 x 100000 pixels."""
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _png_chunk(b"IEND", b""))


def _animated(photo: Image.Image, fmt: str) -> bytes:
    frames = [photo, photo.transpose(Image.Transpose.FLIP_TOP_BOTTOM)]
    return _encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100)


def make_corpus(out: Path, photo: Image.Image) -> dict[str, bool]:
    """Write the corpus into `out` and return whether each file must embed.

    Args:
        out: An empty or new folder.
        photo: A real RGB photo to derive the files from.

    Returns:
        File name to True (must embed) or False (must be reported).
    """
    out.mkdir(parents=True, exist_ok=True)
    small = photo.resize((320, round(320 * photo.height / photo.width)))
    jpeg, png = _encode(small, "JPEG", quality=90), _encode(small, "PNG")
    wide16 = (np.asarray(small.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    transparent = small.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    transparent.info["transparency"] = 0

    files: dict[str, tuple[bytes, bool]] = {
        "zero_bytes.jpg": (b"", False),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], False),
        "truncated.png": (png[: len(png) // 2], False),
        "html_named.jpg": (b"<!DOCTYPE html><html><body>404</body></html>", False),
        "text_named.png": (b"just some text\n" * 20, False),
        "bomb.png": (decompression_bomb(), False),
        "gray_alpha.png": (_encode(small.convert("LA"), "PNG"), True),
        "sixteen_bit.png": (_encode(Image.fromarray(wide16), "PNG"), True),
        "one_bit.png": (_encode(small.convert("1"), "PNG"), True),
        "cmyk.jpg": (_encode(small.convert("CMYK"), "JPEG", quality=90), True),
        "palette_transparent.png": (_encode(transparent, "PNG", transparency=0), True),
        "animated.gif": (_animated(small, "GIF"), True),
        "animated.webp": (_animated(small, "WEBP"), True),
        "one_pixel.png": (_encode(small.resize((1, 1)), "PNG"), True),
        "wide_20000x20.png": (_encode(small.resize((20000, 20)), "PNG"), True),
    }
    for orientation in range(1, 9):
        files[f"exif_{orientation}.jpg"] = (exif_jpeg(small, orientation), True)
    files["caf\udce9_latin1.jpg"] = (jpeg, True)  # the byte 0xE9 alone is not valid UTF-8

    expected = {}
    for name, (data, embeds) in files.items():
        (out / name).write_bytes(data)
        expected[name] = embeds

    os.symlink("loop_b.jpg", out / "loop_a.jpg")
    os.symlink("loop_a.jpg", out / "loop_b.jpg")
    expected["loop_a.jpg"] = expected["loop_b.jpg"] = False

    unreadable = out / "unreadable.jpg"
    unreadable.write_bytes(jpeg)
    unreadable.chmod(0)
    # The superuser reads files whatever their permissions say.
    expected["unreadable.jpg"] = os.geteuid() == 0
    return expected


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import sample_photos

    corpus = make_corpus(Path(sys.argv[1]), sample_photos.load_skimage_photo("astronaut"))
    print(f"wrote {len(corpus)} files to {sys.argv[1]}")
