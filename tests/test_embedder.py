"""The Embedder on the shipped model and real photos."""

from __future__ import annotations

import io

import numpy as np
import pytest

from edgeembed import Embedder, EmbedderOptions, ImageError, ModelError, cosine_similarity
from conftest import DEFAULT_EMBEDDING_DIM


def test_embed_returns_unit_float32_vector(embedder, photos):
    vector = embedder.embed(photos["astronaut"])
    assert vector.dtype == np.float32
    assert vector.shape == (DEFAULT_EMBEDDING_DIM,)
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)


def test_every_input_kind_gives_the_same_embedding(embedder, photos, tmp_path):
    photo = photos["rocket"]
    path = tmp_path / "rocket.png"
    photo.save(path)
    reference = embedder.embed(photo)
    for source in (path, str(path), path.read_bytes(), np.asarray(photo)):
        assert np.allclose(embedder.embed(source), reference, atol=1e-6)


def test_embed_batch_matches_single_calls(embedder, photos):
    images = [photos[name] for name in ("coffee", "chelsea", "rocket")]
    batch = embedder.embed_batch(images)
    assert batch.shape == (3, DEFAULT_EMBEDDING_DIM)
    for row, image in enumerate(images):
        assert np.allclose(batch[row], embedder.embed(image), atol=1e-6)


def test_embed_batch_raises_on_bad_image(embedder, photos):
    with pytest.raises(ImageError):
        embedder.embed_batch([photos["coffee"], b"not an image"])


def test_embed_files_goes_on_past_bad_files(embedder, photo_dir, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"<html>not a jpeg</html>")
    paths = [photo_dir / "coffee.jpg", broken, tmp_path / "missing.png", photo_dir / "rocket.jpg"]

    results = list(embedder.embed_files(paths))
    assert [r.path for r in results] == paths
    assert results[0].vector is not None
    assert results[1].vector is None
    assert results[1].error == "not a recognised image format"
    assert results[2].error == "file not found"
    assert results[3].vector is not None


def test_similar_photos_score_higher_than_different(embedder, photos):
    chelsea = embedder.embed(photos["chelsea"])
    cropped = embedder.embed(photos["chelsea"].crop((40, 20, 420, 290)))
    rocket = embedder.embed(photos["rocket"])
    assert cosine_similarity(chelsea, cropped) > 0.8
    assert cosine_similarity(chelsea, rocket) < cosine_similarity(chelsea, cropped) - 0.3


def test_cosine_similarity_checks_shapes():
    assert cosine_similarity(np.array([1.0, 0.0]), np.array([1.0, 1.0])) == pytest.approx(2 ** -0.5)
    with pytest.raises(ValueError, match="different sizes"):
        cosine_similarity(np.ones(3), np.ones(4))
    with pytest.raises(ValueError, match="zero vector"):
        cosine_similarity(np.zeros(3), np.ones(3))


def test_create_from_options_applies_them(photos):
    options = EmbedderOptions(num_threads=1, l2_normalize=False)
    embedder = Embedder.create_from_options(options)
    raw = embedder.embed(photos["coffee"])
    assert embedder.num_threads == 1
    assert np.linalg.norm(raw) > 1.5


def test_missing_model_names_the_file(tmp_path):
    with pytest.raises(ModelError, match="nothing.tflite"):
        Embedder.create_from_model_path(tmp_path / "nothing.tflite")


def test_non_tflite_file_is_rejected(tmp_path):
    fake = tmp_path / "fake.tflite"
    fake.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelError, match="not a TFLite model"):
        Embedder(fake)


def test_info_reports_operators(embedder):
    ops = embedder.ops()
    assert ops["CONV_2D"] > 10
    assert ops["DEPTHWISE_CONV_2D"] > 10
    assert "DELEGATE" not in ops


def test_large_jpeg_embeds_like_small_copy(embedder, photos):
    photo = photos["coffee"]
    big = photo.resize((photo.width * 6, photo.height * 6))
    buffer = io.BytesIO()
    big.save(buffer, "JPEG", quality=95)
    assert cosine_similarity(embedder.embed(buffer.getvalue()), embedder.embed(photo)) > 0.97


def test_classifier_model_warns(shared_assets, caplog):
    classifier = shared_assets / "models" / "mobilenet_v2_1.0_224_quant.tflite"
    extractor = shared_assets / "models" / "mobilenet_v1_1.0_224_quant_embedding_extractor.tflite"

    Embedder(classifier)
    Embedder(extractor)

    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "looks like an image classifier" in warnings[0]
    assert f"--from-tflite {classifier}" in warnings[0]
