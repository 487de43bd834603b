"""Hostile and unusual files: each embeds or is reported in one line, and batches finish."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import hostile_corpus
from edgeembed import ImageError, cosine_similarity, preprocess
from conftest import DEFAULT_EMBEDDING_DIM


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, photos):
    folder = tmp_path_factory.mktemp("hostile")
    return folder, hostile_corpus.make_corpus(folder, photos["astronaut"])


def test_every_file_embeds_or_is_reported(embedder, corpus):
    folder, expected = corpus
    paths = sorted(folder / name for name in expected)
    results = {r.path.name: r for r in embedder.embed_files(paths)}

    assert set(results) == set(expected)
    for name, embeds in expected.items():
        result = results[name]
        assert (result.vector is not None) == embeds, f"{name}: {result.error}"
        if not embeds:
            assert result.error and "\n" not in result.error, name


@pytest.mark.parametrize("name, reason", [
    ("zero_bytes.jpg", "not a recognised image format"),
    ("html_named.jpg", "not a recognised image format"),
    ("truncated.jpg", "cannot decode image"),
    ("bomb.png", "decompression bomb"),
    ("loop_a.jpg", "Too many levels of symbolic links"),
])
def test_failure_reasons_are_specific(embedder, corpus, name, reason):
    folder, _ = corpus
    result = next(embedder.embed_files([folder / name]))
    assert reason in result.error


def test_exif_orientations_embed_like_upright(embedder, corpus, photos):
    folder, _ = corpus
    upright = embedder.embed(folder / "exif_1.jpg")
    for orientation in range(2, 9):
        turned = embedder.embed(folder / f"exif_{orientation}.jpg")
        assert cosine_similarity(upright, turned) > 0.99, f"orientation {orientation}"


def test_sixteen_bit_png_embeds_like_its_8_bit_copy(embedder, corpus, photos):
    folder, _ = corpus
    small = photos["astronaut"].resize((320, 320)).convert("L")
    assert cosine_similarity(embedder.embed(folder / "sixteen_bit.png"), embedder.embed(small)) > 0.98


def test_fifo_is_rejected_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    import os

    os.mkfifo(fifo)
    with pytest.raises(ImageError, match="not a regular file"):
        preprocess.load_image(fifo)


def test_cli_batch_completes_and_counts(corpus):
    folder, expected = corpus
    out = folder.parent / "hostile_vectors.npy"
    result = subprocess.run([sys.executable, "-m", "edgeembed", "embed", str(folder), "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    failing = sum(not embeds for embeds in expected.values())
    assert result.returncode == 1
    assert f"embedded {len(expected) - failing} of {len(expected)} images, {failing} skipped" in result.stderr
    assert result.stderr.count("WARNING: skipped ") == failing
    assert np.load(out).shape == (len(expected) - failing, DEFAULT_EMBEDDING_DIM)
    ids = out.with_suffix(".ids.txt").read_bytes().splitlines()
    assert folder.as_posix().encode() + b"/caf\xe9_latin1.jpg" in ids


def _seed_files(photo: Image.Image) -> list[bytes]:
    small = photo.resize((48, 32))
    files = []
    for fmt in ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF"):
        buffer = io.BytesIO()
        small.save(buffer, fmt)
        files.append(buffer.getvalue())
    return files


@pytest.fixture(scope="module")
def seeds(photos):
    return _seed_files(photos["coffee"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_decoder_fuzz_raises_only_image_error(seeds, data):
    seed = data.draw(st.sampled_from(seeds))
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(seed) - 1), st.integers(0, 255)), max_size=8))
    cut = data.draw(st.integers(0, len(seed)))
    mutated = bytearray(seed[:cut])
    for position, value in flips:
        if position < len(mutated):
            mutated[position] = value

    try:
        image = preprocess.load_image(bytes(mutated))
    except ImageError as error:
        assert error.reason
        return
    assert image.mode == "RGB"
    assert image.width > 0
