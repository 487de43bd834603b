"""Compare the TensorFlow port with the PyTorch reference on the same inputs.

The reference is ``efficientnet_lite_pytorch.EfficientNet`` loaded with the same state
dict: its ``extract_features`` output averaged over height and width is exactly what
the TensorFlow model returns, so the two should agree up to float32 rounding.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from edgeembed.toolchain.architecture import BackboneSpec
from edgeembed.toolchain.efficientnet_lite import EfficientNetLiteFeatures

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParityResult:
    """Agreement between TensorFlow and PyTorch pooled features.

    Attributes:
        n_images: Number of images compared.
        max_abs_diff: Largest absolute difference over all images and features.
        max_abs_reference: Largest absolute reference feature, the scale for `max_abs_diff`.
        relative_diff: ``max_abs_diff / max_abs_reference``.
        cosine_min: Smallest per-image cosine between the two feature vectors.
        cosine_mean: Mean per-image cosine.
    """

    n_images: int
    max_abs_diff: float
    max_abs_reference: float
    relative_diff: float
    cosine_min: float
    cosine_mean: float

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as JSON-ready values."""
        return asdict(self)


def torch_reference(spec: BackboneSpec, state_dict: dict[str, np.ndarray], input_size: int | None = None):
    """Build the ``efficientnet_lite_pytorch`` model with a state dict, in eval mode.

    Args:
        spec: The backbone.
        state_dict: Tensors keyed as in `edgeembed.toolchain.architecture.state_dict_shapes`.
            Classifier keys may be absent.
        input_size: Input side in pixels, which fixes the reference's static padding.
            Defaults to the backbone's native size.

    Returns:
        The PyTorch ``EfficientNet`` module.

    Raises:
        ValueError: If a feature-extractor tensor is missing from the state dict.
    """
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name(
        spec.name.replace("_", "-"), image_size=input_size or spec.image_size
    )
    tensors = {key: torch.from_numpy(np.asarray(value)) for key, value in state_dict.items()}
    result = model.load_state_dict(tensors, strict=False)

    missing = [key for key in result.missing_keys if not key.startswith("_fc.")]
    if missing:
        raise ValueError(f"the state dict lacks {len(missing)} feature tensors, starting with {missing[:3]}")
    return model.eval()


def torch_features(model, images: np.ndarray) -> np.ndarray:
    """Compute the reference pooled features.

    Args:
        model: A module from `torch_reference`.
        images: Float32 array (N, height, width, 3), RGB in [-1, 1].

    Returns:
        Float32 array (N, 1280).
    """
    import torch

    with torch.no_grad():
        batch = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
        features = model.extract_features(batch)
        return features.mean(dim=(2, 3)).numpy()


def compare_features(features: np.ndarray, reference: np.ndarray) -> ParityResult:
    """Measure how far features are from reference features.

    Args:
        features: Array (N, D) under test.
        reference: Array (N, D) taken as correct.

    Returns:
        The differences and cosines.
    """
    features = features.astype(np.float64)
    reference = reference.astype(np.float64)
    norms = np.linalg.norm(features, axis=1) * np.linalg.norm(reference, axis=1)
    cosines = np.sum(features * reference, axis=1) / np.maximum(norms, 1e-12)

    max_abs_diff = float(np.max(np.abs(features - reference)))
    max_abs_reference = float(np.max(np.abs(reference)))
    return ParityResult(
        n_images=len(features),
        max_abs_diff=max_abs_diff,
        max_abs_reference=max_abs_reference,
        relative_diff=max_abs_diff / max(max_abs_reference, 1e-12),
        cosine_min=float(cosines.min()),
        cosine_mean=float(cosines.mean()),
    )


def check_parity(model: EfficientNetLiteFeatures, state_dict: dict[str, np.ndarray], images: np.ndarray) -> ParityResult:
    """Run the TensorFlow model and the PyTorch reference on the same images.

    Args:
        model: The TensorFlow feature extractor.
        state_dict: The weights the model was built from.
        images: Float32 array (N, height, width, 3), RGB in [-1, 1], at the model's input size.

    Returns:
        The comparison of TensorFlow features against the reference.
    """
    reference = torch_reference(model.spec, state_dict, input_size=model.input_size[0])
    result = compare_features(model.features_batch(images), torch_features(reference, images))
    logger.info(
        "Parity with PyTorch on %d images: max abs diff %.2e (relative %.2e), min cosine %.7f",
        result.n_images, result.max_abs_diff, result.relative_diff, result.cosine_min,
    )
    return result
