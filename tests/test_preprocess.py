"""Decoding, mode conversion, resizing and input quantisation on real photos."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from edgeembed import preprocess
from edgeembed.model import PreprocessConfig
from edgeembed.preprocess import ImageError

CONFIG = PreprocessConfig(input_size=(224, 224))


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def test_inputs_of_every_kind_agree(photos, tmp_path):
    photo = photos["coffee"]
    path = tmp_path / "coffee.png"
    photo.save(path)
    expected = preprocess.prepare_pixels(photo, CONFIG)

    for source in (path, str(path), path.read_bytes(), photo, np.asarray(photo)):
        pixels = preprocess.prepare_pixels(preprocess.load_image(source, CONFIG), CONFIG)
        assert pixels.shape == (224, 224, 3)
        assert pixels.dtype == np.uint8
        assert np.array_equal(pixels, expected), preprocess.describe_source(source)


def test_grayscale_alpha_palette_cmyk_convert_to_rgb(photos):
    photo = photos["astronaut"]
    gray = photo.convert("L")
    cases = {
        "L": gray,
        "LA": gray.convert("LA"),
        "P": photo.convert("P"),
        "RGBA": photo.convert("RGBA"),
        "CMYK": photo.convert("CMYK"),
        "1": photo.convert("1"),
    }
    for mode, image in cases.items():
        rgb = preprocess.load_image(_encode(image, "TIFF" if mode == "CMYK" else "PNG"))
        assert rgb.mode == "RGB", mode
        assert rgb.size == photo.size, mode


def test_transparent_pixels_become_white():
    image = Image.new("RGBA", (8, 8), (10, 20, 30, 0))
    rgb = preprocess.load_image(_encode(image, "PNG"))
    assert rgb.getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_values_scale_instead_of_clipping():
    ramp = np.linspace(0, 65535, 256, dtype=np.uint16).reshape(16, 16)
    image = Image.fromarray(ramp)
    rgb = np.asarray(preprocess.load_image(_encode(image, "PNG")))
    assert rgb[0, 0, 0] == 0
    assert rgb[-1, -1, 0] == 255
    # A clipped image would be 255 everywhere above 255/65535 of full scale.
    assert 120 <= rgb[8, 0, 0] <= 135


def test_sixteen_bit_array_scales_down():
    array = np.full((4, 4, 3), 32896, dtype=np.uint16)
    rgb = np.asarray(preprocess.load_image(array))
    assert rgb[0, 0, 0] == 128


def test_exif_orientation_is_applied(photos):
    photo = photos["rocket"]
    upright = preprocess.prepare_pixels(photo, CONFIG).astype(np.int16)
    # Orientation 6 means the stored pixels must be rotated 90 degrees clockwise.
    stored = photo.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encode(stored, "JPEG", quality=95, exif=exif.tobytes())

    loaded = preprocess.load_image(data, CONFIG)
    assert loaded.size == photo.size
    pixels = preprocess.prepare_pixels(loaded, CONFIG).astype(np.int16)
    assert np.abs(pixels - upright).mean() < 6


def test_jpeg_draft_decodes_large_photos_smaller(photos):
    big = photos["retina"].resize((2800, 2800))
    data = _encode(big, "JPEG", quality=90)
    image = Image.open(io.BytesIO(data))
    image.draft(image.mode, preprocess.draft_size(CONFIG))
    assert image.size == (350, 350)
    loaded = preprocess.load_image(data, CONFIG)
    assert min(loaded.size) >= 224


def test_animated_gif_gives_first_frame():
    frames = [Image.new("RGB", (16, 16), color) for color in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    rgb = preprocess.load_image(buffer.getvalue())
    red, _, blue = rgb.getpixel((8, 8))
    assert red > 200
    assert blue < 50


@pytest.mark.parametrize("data, reason", [
    (b"", "not a recognised image format"),
    (b"<html><body>not an image</body></html>", "not a recognised image format"),
])
def test_invalid_bytes_raise_image_error(data, reason):
    with pytest.raises(ImageError, match=reason):
        preprocess.load_image(data)


def test_truncated_jpeg_raises_image_error(photos):
    data = _encode(photos["coffee"], "JPEG")
    with pytest.raises(ImageError, match="cannot decode"):
        preprocess.load_image(data[: len(data) // 3])


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.jpg"
    with pytest.raises(ImageError, match="nope.jpg: file not found"):
        preprocess.load_image(missing)


def test_crop_box_keeps_centre_and_aspect():
    box = preprocess.crop_box((400, 200), CONFIG)
    assert box == pytest.approx((100.0, 0.0, 300.0, 200.0))
    squash = PreprocessConfig(input_size=(224, 224), resize="squash")
    assert preprocess.crop_box((400, 200), squash) == (0.0, 0.0, 400.0, 200.0)
    cropped = PreprocessConfig(input_size=(224, 224), crop_fraction=0.5)
    assert preprocess.crop_box((200, 200), cropped) == pytest.approx((50.0, 50.0, 150.0, 150.0))


def test_bgr_order_reverses_channels(photos):
    bgr = PreprocessConfig(input_size=(224, 224), color_order="BGR")
    rgb_pixels = preprocess.prepare_pixels(photos["coffee"], CONFIG)
    bgr_pixels = preprocess.prepare_pixels(photos["coffee"], bgr)
    assert np.array_equal(rgb_pixels[:, :, ::-1], bgr_pixels)


def test_quantization_table_matches_normalise_then_quantise():
    config = PreprocessConfig(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    scale, zero_point = 0.0186, -14
    table = preprocess.quantization_table(config, np.dtype(np.int8), scale, zero_point)
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)

    direct = np.floor(preprocess.to_float(pixels, config) / scale + zero_point + 0.5)
    direct = np.clip(direct, -128, 127).astype(np.int8)
    assert np.array_equal(preprocess.apply_table(pixels, table), direct)


def test_minus_one_to_one_uint8_table_is_identity():
    table = preprocess.quantization_table(PreprocessConfig(), np.dtype(np.uint8), 1 / 127.5, 127)
    assert np.array_equal(table[0], np.arange(256))


def test_list_images_recurses_and_survives_symlink_loops(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "a" / "one.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "a" / "b" / "two.jpg")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "a" / "b" / "loop").symlink_to(tmp_path / "a")

    found = preprocess.list_images([tmp_path])
    names = [p.name for p in found]
    assert names.count("one.png") == 1
    assert names.count("two.jpg") == 1
    assert "notes.txt" not in names


def test_crop_box_stays_inside_odd_sizes():
    for size in [(451, 300), (641, 427), (1, 1), (20000, 20), (999, 1001), (3, 7)]:
        left, upper, right, lower = preprocess.crop_box(size, CONFIG)
        assert left >= 0, size
        assert upper >= 0, size
        assert right <= size[0], size
        assert lower <= size[1], size
