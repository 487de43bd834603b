"""Retrieval metrics against values computed by hand, and the labelled-folder listing."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from edgeembed.evaluate import (
    Confusion,
    LabelledFolderError,
    evaluate,
    list_labelled_images,
    natural_key,
)


def unit_vectors(degrees: list[float]) -> np.ndarray:
    """Unit vectors in the plane at the given angles, so cosine order is angle order."""
    radians = np.radians(degrees)
    return np.stack([np.cos(radians), np.sin(radians)], axis=1)


# Seven items on a half circle. Class d has a single item, so its query is excluded.
#   a1 0, a2 10, b1 30, d1 45, c1 55, b2 85, c2 120 (degrees)
# Each query's ranking by angular distance (query excluded), with the rank of the
# first item of its own class and its average precision (one positive, so AP = 1/rank):
#   a1: a2 b1 d1 c1 b2 c2   -> a2 at 1, AP 1
#   a2: a1 b1 d1 c1 b2 c2   -> a1 at 1, AP 1
#   b1: d1 a2 c1 a1 b2 c2   -> b2 at 5, AP 1/5
#   c1: d1 b1 b2 a2 a1 c2   -> c2 at 6, AP 1/6 (not within the 5 nearest)
#   b2: c1 c2 d1 b1 a2 a1   -> b1 at 4, AP 1/4
#   c2: b2 c1 d1 b1 a2 a1   -> c1 at 2, AP 1/2
ANGLES = [0, 10, 30, 45, 55, 85, 120]
LABELS = ["a", "a", "b", "d", "c", "b", "c"]


@pytest.fixture(scope="module")
def result():
    return evaluate(unit_vectors(ANGLES), LABELS)


def test_recall_at_1_by_hand(result):
    assert result.recall_at_1 == pytest.approx(2 / 6)


def test_recall_at_5_by_hand(result):
    assert result.recall_at_5 == pytest.approx(5 / 6)


def test_map_by_hand(result):
    expected = (1 + 1 + 1 / 5 + 1 / 6 + 1 / 4 + 1 / 2) / 6
    assert result.mean_average_precision == pytest.approx(expected)


def test_per_class_by_hand(result):
    assert set(result.per_class) == {"a", "b", "c"}
    assert result.per_class["a"].recall_at_1 == 1.0
    assert result.per_class["b"].recall_at_1 == 0.0
    assert result.per_class["b"].mean_average_precision == pytest.approx((1 / 5 + 1 / 4) / 2)
    assert result.per_class["c"].mean_average_precision == pytest.approx((1 / 6 + 1 / 2) / 2)
    assert result.per_class["c"].n_queries == 2


def test_single_image_class_excluded(result):
    assert result.excluded_classes == ["d"]
    assert result.n_queries == 6
    assert result.n_images == 7
    assert result.n_classes == 4


def test_confusions_by_hand(result):
    # Wrong nearest items: b1 -> d1, c1 -> d1, b2 -> c1, c2 -> b2.
    assert result.confusions == [Confusion(("b", "c"), 2), Confusion(("b", "d"), 1),
                                 Confusion(("c", "d"), 1)]


def test_to_dict_keys(result):
    report = result.to_dict()
    for key in ("recall@1", "recall@5", "mAP", "per_class", "n_images", "n_classes"):
        assert key in report
    assert report["per_class"]["a"] == {"recall@1": 1.0, "mAP": 1.0, "n_queries": 2}
    assert report["confusions"][0] == {"classes": ["b", "c"], "count": 2}


def test_average_precision_two_positives():
    # Query q at 0 degrees; ranking: p1 (5), n1 (10), n2 (20), p2 (30).
    # Positives at ranks 1 and 4: AP = (1/1 + 2/4) / 2 = 0.75.
    vectors = unit_vectors([0, 5, 10, 20, 30])
    labels = ["p", "p", "n1", "n2", "p"]
    gallery = vectors[1:]
    result = evaluate(vectors[:1], labels[:1], gallery_vectors=gallery, gallery_labels=labels[1:])
    assert result.mean_average_precision == pytest.approx(0.75)
    assert result.recall_at_1 == 1.0


def test_gallery_split_by_hand():
    # Gallery a at 0, b at 90, c at 180. Queries: a at 10 (a first), b at 60 (b first),
    # c at 100 (b, then c: AP 1/2), and e, which has no gallery item.
    gallery = unit_vectors([0, 90, 180])
    queries = unit_vectors([10, 60, 100, 45])
    result = evaluate(queries, ["a", "b", "c", "e"], gallery_vectors=gallery,
                      gallery_labels=["a", "b", "c"])
    assert result.mode == "gallery"
    assert result.recall_at_1 == pytest.approx(2 / 3)
    assert result.mean_average_precision == pytest.approx((1 + 1 + 1 / 2) / 3)
    assert result.excluded_classes == ["e"]
    assert result.n_images == 7
    assert result.n_classes == 4


def test_cosine_ignores_vector_length():
    scaled = unit_vectors(ANGLES) * np.array([[1], [3], [0.5], [2], [7], [1], [0.1]])
    assert evaluate(scaled, LABELS).to_dict() == evaluate(unit_vectors(ANGLES), LABELS).to_dict()


def naive_metrics(vectors: np.ndarray, labels: list[str]) -> tuple[float, float, float]:
    """Leave-one-out recall@1, recall@5 and mAP with one plain loop per query."""
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    hits1, hits5, precisions = [], [], []
    for query in range(len(unit)):
        others = [item for item in range(len(unit)) if item != query]
        others.sort(key=lambda item: -float(unit[query] @ unit[item]))
        relevant = [labels[item] == labels[query] for item in others]
        found, precision_sum = 0, 0.0
        for rank, is_relevant in enumerate(relevant, 1):
            if is_relevant:
                found += 1
                precision_sum += found / rank
        hits1.append(any(relevant[:1]))
        hits5.append(any(relevant[:5]))
        precisions.append(precision_sum / found)
    return float(np.mean(hits1)), float(np.mean(hits5)), float(np.mean(precisions))


def test_matches_naive_loop():
    rng = np.random.default_rng(7)
    centres = rng.normal(size=(6, 16))
    labels = [f"class{number % 6}" for number in range(60)]
    vectors = np.stack([centres[number % 6] + rng.normal(scale=1.2, size=16) for number in range(60)])
    result = evaluate(vectors, labels)
    recall1, recall5, mean_ap = naive_metrics(vectors, labels)
    assert result.recall_at_1 == pytest.approx(recall1)
    assert result.recall_at_5 == pytest.approx(recall5)
    assert result.mean_average_precision == pytest.approx(mean_ap, rel=1e-5)
    assert 0.2 < result.recall_at_1 < 1.0  # the test data is neither trivial nor random


def test_blocks_give_same_result(monkeypatch):
    from edgeembed import evaluate as module

    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(40, 8))
    labels = [str(number % 4) for number in range(40)]
    whole = evaluate(vectors, labels).to_dict()
    monkeypatch.setattr(module, "_BLOCK_ELEMENTS", 3 * 40)  # three queries per block
    assert evaluate(vectors, labels).to_dict() == whole


def test_all_single_images_rejected():
    with pytest.raises(ValueError, match="at least two images"):
        evaluate(unit_vectors([0, 40, 80]), ["a", "b", "c"])


def test_label_count_mismatch_rejected():
    with pytest.raises(ValueError, match="3 labels for 2 vectors"):
        evaluate(unit_vectors([0, 40]), ["a", "a", "b"])


def test_gallery_dimension_mismatch_rejected():
    with pytest.raises(ValueError, match="same model"):
        evaluate(unit_vectors([0, 40]), ["a", "a"], gallery_vectors=np.ones((2, 3)),
                 gallery_labels=["a", "a"])


def test_nan_rejected():
    vectors = unit_vectors([0, 40])
    vectors[1, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        evaluate(vectors, ["a", "a"])


def test_natural_order():
    assert sorted(["c10", "c2", "obj100", "obj19", "c1"], key=natural_key) == [
        "c1", "c2", "c10", "obj19", "obj100"]


def test_listing_labels_by_folder(tmp_path):
    for name in ("roses/a.jpg", "roses/deep/b.png", "tulips/c.jpg", "tulips/notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    items = list_labelled_images(tmp_path)
    assert [(path.relative_to(tmp_path).as_posix(), label) for path, label in items] == [
        ("roses/a.jpg", "roses"), ("roses/deep/b.png", "roses"), ("tulips/c.jpg", "tulips")]


def test_listing_warns_on_loose_images(tmp_path, caplog):
    (tmp_path / "roses").mkdir()
    (tmp_path / "roses" / "a.jpg").write_bytes(b"")
    (tmp_path / "stray.jpg").write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        items = list_labelled_images(tmp_path)
    assert len(items) == 1
    assert "ignored 1 images directly in" in caplog.text


def test_listing_without_class_folders(tmp_path):
    (tmp_path / "stray.jpg").write_bytes(b"")
    with pytest.raises(LabelledFolderError, match="no sub-folders"):
        list_labelled_images(tmp_path)


def test_listing_missing_folder(tmp_path):
    with pytest.raises(LabelledFolderError, match="is not a folder"):
        list_labelled_images(tmp_path / "missing")


def test_listing_empty_class_folders(tmp_path):
    (tmp_path / "roses").mkdir()
    with pytest.raises(LabelledFolderError, match="contains images"):
        list_labelled_images(tmp_path)
