"""Gallery build, save, open and search, and its error cases."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgeembed.gallery import MANIFEST, Gallery
from edgeembed.storage import GalleryError


def _random_unit(count: int, dim: int, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(count, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.fixture()
def vector_gallery(tmp_path):
    vectors = _random_unit(200, 32)
    gallery = Gallery.build(vectors, [f"item-{i}" for i in range(200)], model_fingerprint="f" * 64)
    gallery.save(tmp_path / "gallery")
    return vectors, tmp_path / "gallery"


def test_saved_gallery_reopens_with_same_results(vector_gallery):
    vectors, folder = vector_gallery
    reopened = Gallery.open(folder)
    assert len(reopened) == 200
    assert reopened.dim == 32
    matches = reopened.search(vectors[17], k=3)
    assert matches[0].id == "item-17"
    assert matches[0].score == pytest.approx(1.0, abs=1e-5)
    assert matches[0].path is None
    assert [m.score for m in matches] == sorted((m.score for m in matches), reverse=True)


def test_scores_are_cosine_similarities(vector_gallery):
    vectors, folder = vector_gallery
    gallery = Gallery.open(folder)
    query = vectors[3] + 0.5 * vectors[4]
    unit = query / np.linalg.norm(query)
    for match in gallery.search(query, k=5):
        assert match.score == pytest.approx(float(vectors[match.item] @ unit), abs=1e-5)


def test_annoy_agrees_with_exact_search_on_vectors(vector_gallery):
    vectors, folder = vector_gallery
    gallery = Gallery.open(folder)
    queries = vectors + np.random.default_rng(1).normal(scale=0.05, size=vectors.shape).astype(np.float32)
    agree = sum(gallery.search(q, k=1, search_k=2000)[0].id == gallery.search_exact(q, k=1)[0].id
                for q in queries)
    assert agree / len(queries) >= 0.95


def _manifest(folder):
    return json.loads((folder / MANIFEST).read_text())


def test_manifest_records_model_and_files(vector_gallery):
    _, folder = vector_gallery
    manifest = _manifest(folder)
    index = manifest["base"]["shards"][0]["file"]
    assert manifest["model"]["fingerprint"] == "f" * 64
    assert manifest["dim"] == 32
    assert manifest["base"]["items"] == 200
    assert manifest["files"][index]["bytes"] == (folder / index).stat().st_size
    assert len(manifest["files"][manifest["base"]["vectors"]]["sha256"]) == 64


def test_vectors_are_not_pickled(vector_gallery):
    _, folder = vector_gallery
    loaded = np.load(folder / _manifest(folder)["base"]["vectors"], allow_pickle=False)
    assert loaded.dtype == np.float32
    assert loaded.shape == (200, 32)


def test_existing_folder_is_not_overwritten(vector_gallery):
    vectors, folder = vector_gallery
    other = Gallery.build(vectors[:10], [str(i) for i in range(10)], model_fingerprint="0" * 64)
    with pytest.raises(GalleryError, match="already exists"):
        other.save(folder)
    assert len(Gallery.open(folder)) == 200

    other.save(folder, overwrite=True)
    assert len(Gallery.open(folder)) == 10
    assert not list(folder.parent.glob(".gallery.*"))


def test_truncated_index_is_reported_not_crashed(vector_gallery):
    _, folder = vector_gallery
    index = folder / _manifest(folder)["base"]["shards"][0]["file"]
    index.write_bytes(index.read_bytes()[:1000])
    with pytest.raises(GalleryError, match=f"{index.name} has 1000 bytes"):
        Gallery.open(folder)


def test_missing_manifest_says_not_a_gallery(tmp_path):
    with pytest.raises(GalleryError, match="not a gallery"):
        Gallery.open(tmp_path)


def test_corrupted_manifest_names_the_file(vector_gallery):
    _, folder = vector_gallery
    (folder / MANIFEST).write_text("{broken")
    with pytest.raises(GalleryError, match="manifest.json is corrupted"):
        Gallery.open(folder)


def test_wrong_vector_size_is_rejected(vector_gallery):
    _, folder = vector_gallery
    with pytest.raises(GalleryError, match="query vector has 16 values"):
        Gallery.open(folder).search(np.ones(16, dtype=np.float32))


def test_build_rejects_repeated_ids():
    with pytest.raises(GalleryError, match="repeated: \\['a'\\]"):
        Gallery.build(_random_unit(3, 8), ["a", "b", "a"], model_fingerprint="0" * 64)


def test_image_gallery_with_other_model_fails(embedder, photo_dir, tmp_path, shared_assets):
    from edgeembed import Embedder

    paths = sorted(photo_dir.glob("*.jpg"))[:4]
    gallery, failures = Gallery.from_images(paths, embedder)
    assert failures == []
    gallery.save(tmp_path / "g")

    other = Embedder(shared_assets / "models" / "mobilenet_v1_1.0_224_quant_embedding_extractor.tflite")
    with pytest.raises(GalleryError, match="search with the same model or rebuild"):
        Gallery.open(tmp_path / "g", other)


def test_image_gallery_finds_its_own_photos(embedder, photo_dir, tmp_path):
    paths = sorted(photo_dir.glob("*.jpg"))
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    gallery, failures = Gallery.from_images(paths + [bad], embedder)
    assert failures == [(bad, "not a recognised image format")]
    assert len(gallery) == len(paths)

    gallery.save(tmp_path / "g")
    reopened = Gallery.open(tmp_path / "g", embedder)
    top = reopened.search(paths[5], k=1)[0]
    assert top.path == str(paths[5])
    assert top.score == pytest.approx(1.0, abs=1e-4)


def test_image_query_without_embedder_is_explained(vector_gallery, photos):
    _, folder = vector_gallery
    with pytest.raises(GalleryError, match="need an embedder"):
        Gallery.open(folder).search(photos["coffee"])


def test_sharded_index_matches_single_index(tmp_path):
    vectors = _random_unit(300, 24, seed=5)
    ids = [f"v{i}" for i in range(300)]
    single = Gallery.build(vectors, ids, model_fingerprint="0" * 64, n_trees=20)
    sharded = Gallery.build(vectors, ids, model_fingerprint="0" * 64, n_trees=20, shards=3)
    sharded.save(tmp_path / "sharded")
    reopened = Gallery.open(tmp_path / "sharded")

    manifest = _manifest(tmp_path / "sharded")
    assert [entry["items"] for entry in manifest["base"]["shards"]] == [100, 100, 100]
    assert reopened.shards == 3
    queries = _random_unit(40, 24, seed=6)
    for query in queries:
        exact = [m.id for m in single.search_exact(query, k=5)]
        assert [m.id for m in reopened.search(query, k=5, search_k=10_000)] == exact
        assert [m.id for m in single.search(query, k=5, search_k=10_000)] == exact


def test_compaction_keeps_the_shard_count(tmp_path):
    vectors = _random_unit(60, 8, seed=8)
    Gallery.build(vectors, [str(i) for i in range(60)], model_fingerprint="0" * 64,
                  shards=2).save(tmp_path / "g")
    gallery = Gallery.open(tmp_path / "g")
    gallery.remove(["0", "1"])
    gallery.compact()
    assert len(_manifest(tmp_path / "g")["base"]["shards"]) == 2
    assert Gallery.open(tmp_path / "g").search(vectors[5], k=1)[0].id == "5"


def test_too_many_shards_is_rejected():
    with pytest.raises(GalleryError, match="invalid shards 5"):
        Gallery.build(_random_unit(3, 8), ["a", "b", "c"], model_fingerprint="0" * 64, shards=5)
