"""Near-duplicate retrieval with the shipped model on real photos."""

from __future__ import annotations

import numpy as np
import pytest
import sample_photos

from edgeembed.gallery import Gallery


@pytest.fixture(scope="module")
def photo_gallery(embedder, photos):
    names = sorted(photos)
    vectors = embedder.embed_batch([photos[name] for name in names])
    gallery = Gallery.build(vectors, names, model_fingerprint=embedder.fingerprint, embedder=embedder)
    return names, gallery


@pytest.fixture(scope="module")
def edited_queries(embedder, photos):
    """(photo name, edit name, embedding) for every photo and every edit."""
    queries = []
    for edit_name, edit in sample_photos.edits(seed=7).items():
        for name in sorted(photos):
            queries.append((name, edit_name, embedder.embed(edit(photos[name]))))
    return queries


def test_gallery_has_enough_real_photos(photo_gallery):
    names, _ = photo_gallery
    assert len(names) >= 19


def test_near_duplicate_recall_at_1(photo_gallery, edited_queries):
    _, gallery = photo_gallery
    misses = [(name, edit) for name, edit, vector in edited_queries
              if gallery.search(vector, k=1)[0].id != name]
    recall = 1 - len(misses) / len(edited_queries)
    assert recall >= 0.95, f"recall@1 {recall:.3f}, misses: {misses}"


def test_every_edit_kind_is_mostly_found(photo_gallery, edited_queries):
    _, gallery = photo_gallery
    for edit_name in sample_photos.edits():
        rows = [(name, vector) for name, edit, vector in edited_queries if edit == edit_name]
        hits = sum(gallery.search(vector, k=1)[0].id == name for name, vector in rows)
        assert hits / len(rows) >= 0.85, f"{edit_name}: {hits} of {len(rows)}"


def test_annoy_top1_agrees_with_exact(photo_gallery, edited_queries):
    _, gallery = photo_gallery
    agree = [gallery.search(v, k=1)[0].id == gallery.search_exact(v, k=1)[0].id
             for _, _, v in edited_queries]
    assert np.mean(agree) >= 0.95
