"""A frozen TensorFlow graph as a feature extractor that `edgeembed.toolchain.convert` accepts.

Keras models (`edgeembed.toolchain.mobilenet`, `edgeembed.toolchain.from_keras`) and
TensorFlow 1 frozen graphs (`edgeembed.toolchain.frozen_graph`) all end up as a
`tf.function` without variables that maps a (1, height, width, 3) float32 image to its
features. `FrozenFeatures` wraps such a function with a fixed input signature and a
(1, D) output, and `GraphSource` records where it came from and how to preprocess for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import tensorflow as tf

from edgeembed.model import PreprocessConfig

# Graph operations whose name scopes `FrozenFeatures.layer_names` lists.
CONVOLUTION_OPS = ("Conv2D", "DepthwiseConv2dNative")


@dataclass(frozen=True)
class ExtractorSpec:
    """The part of a backbone description that the converter reads.

    Attributes:
        name: Backbone name, used in log lines.
    """

    name: str


class FrozenFeatures(tf.Module):
    """A feature function without variables, behind a fixed (1, height, width, 3) float32 input.

    Args:
        function: A concrete function (or any TensorFlow callable) whose first
            output contains the features of one image. Its variables, if any, must
            already be frozen into constants.
        name: Backbone name for log lines and messages.
        input_size: Input (height, width).
    """

    def __init__(self, function: Callable, name: str, input_size: tuple[int, int]) -> None:
        super().__init__(name=None)
        self.function = function
        self.spec = ExtractorSpec(name)
        self.input_size = input_size

        height, width = input_size
        self._call = tf.function(
            self._features,
            input_signature=[tf.TensorSpec((1, height, width, 3), tf.float32, name="image")],
            autograph=False,
        )
        self.embedding_dim = int(self._call.get_concrete_function().structured_outputs.shape[-1])

    def _features(self, image: tf.Tensor) -> tf.Tensor:
        outputs = self.function(image)
        if isinstance(outputs, (list, tuple)):
            outputs = outputs[0]
        elif isinstance(outputs, dict):
            outputs = next(iter(outputs.values()))
        return tf.reshape(outputs, [1, -1], name="embedding")

    def __call__(self, image: tf.Tensor | np.ndarray) -> tf.Tensor:
        """Compute the (1, D) features of one float32 image of shape (1, height, width, 3)."""
        return self._call(tf.convert_to_tensor(image, tf.float32))

    def concrete_function(self) -> Callable:
        """Return the traced function that `tf.lite.TFLiteConverter` converts."""
        return self._call.get_concrete_function()

    def layer_names(self) -> list[str]:
        """List the name scopes of the graph's convolutions in graph order.

        A scope is the operation name without its last part, for example
        ``MobilenetV1/MobilenetV1/Conv2d_0``. The converted tensors keep these names, which is
        how `edgeembed.toolchain.convert` finds the layers to keep in float32.
        """
        graph = getattr(self.function, "graph", None)
        if graph is None:
            return []

        names: list[str] = []
        for operation in graph.get_operations():
            scope = operation.name.rpartition("/")[0]
            if operation.type in CONVOLUTION_OPS and scope and scope not in names:
                names.append(scope)
        return names

    def features_batch(self, images: np.ndarray) -> np.ndarray:
        """Compute the features (N, D) of float32 images (N, height, width, 3), one at a time."""
        return np.concatenate([self(image[None]).numpy() for image in images], axis=0)


@dataclass
class GraphSource:
    """A float feature extractor ready for conversion, with its preprocessing and origin.

    Attributes:
        features: The extractor.
        preprocess: The preprocessing its input expects.
        backbone: Backbone name for the metadata, e.g. ``"mobilenet_v2"``.
        weights_description: Where the weights came from, without local paths.
        weights_sha256: SHA-256 of the weights or model file, None for random weights.
        pooling: How the features were pooled (``"avg"``), or None when the layer
            chosen by the user already gives a vector.
        details: Further provenance, e.g. ``{"alpha": 0.35}`` or the graph's tensor names.
    """

    features: FrozenFeatures
    preprocess: PreprocessConfig
    backbone: str
    weights_description: str
    weights_sha256: str | None
    pooling: str | None = "avg"
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Normalization:
    """Per-channel normalisation of the float input, ``(pixel / 255 - mean) / std``.

    Attributes:
        mean: Mean subtracted from pixel / 255, per RGB channel.
        std: Divisor of the result, per RGB channel.
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def preprocess(self, input_size: tuple[int, int]) -> PreprocessConfig:
        """Return the preprocessing for this normalisation: centre crop keeping the whole shorter side."""
        return PreprocessConfig(
            input_size=tuple(input_size),
            mean=tuple(self.mean),
            std=tuple(self.std),
            resize="crop",
            crop_fraction=1.0,
        )


# RGB scaled to [-1, 1]: Keras MobileNetV2, TF-slim MobileNet v1, EfficientNet-Lite.
SIGNED_UNIT_RANGE = Normalization(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

# Raw pixel values 0..255 as floats: models that rescale inside the graph, such as
# Keras MobileNetV3 with its default include_preprocessing=True.
PIXEL_RANGE = Normalization(mean=(0.0, 0.0, 0.0), std=(1 / 255, 1 / 255, 1 / 255))
