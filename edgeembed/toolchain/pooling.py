"""Pool feature maps into one embedding: average, max or generalised-mean (GeM) pooling.

An embedding can come from one layer or from several. With several layers each one is
pooled, scaled to unit length, multiplied by its weight and concatenated, so every
layer contributes a fixed share of the cosine similarity whatever its width:

    >>> options = PoolingOptions("gem", p=3.0, layers=parse_layers("head,block11,block0:0.8"))

GeM pooling is ``(mean(max(x, eps) ** p)) ** (1 / p)`` over height and width. ``p = 1``
is average pooling and a large ``p`` approaches max pooling. The ops are built with
TensorFlow inside the name scope `SCOPE`, so the converter can keep them in float32
(see `edgeembed.toolchain.convert.ConvertOptions.float_layers`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

POOLINGS = ("avg", "gem", "max")
DEFAULT_GEM_P = 3.0
GEM_EPS = 1e-6

# Name scope of the pooling ops and the name that keeps them in float32 with --float-layers.
SCOPE = "pooling"

_LAYER_PATTERN = re.compile(r"^(?P<name>[a-z0-9_]+)(?::(?P<weight>[0-9.eE+-]+))?$")


@dataclass(frozen=True)
class FeatureLayer:
    """A layer whose activations go into the embedding.

    Attributes:
        name: The layer name, e.g. ``"head"``, ``"block11"`` or ``"block12_depthwise"``
            (see `edgeembed.toolchain.efficientnet_lite.EfficientNetLiteFeatures.feature_layers`).
        weight: Scale of this layer's unit-length pooled vector in a concatenation.
            With a single layer the weight is not applied.
    """

    name: str
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.weight > 0:
            raise ValueError(f"invalid weight {self.weight} for layer {self.name!r}; it must be above 0")

    def spelling(self) -> str:
        """Return the layer as `parse_layers` reads it, e.g. ``"block0:0.8"``."""
        return self.name if self.weight == 1.0 else f"{self.name}:{self.weight:g}"


@dataclass(frozen=True)
class PoolingOptions:
    """Pooling method and feature layers of an embedding.

    Attributes:
        method: ``"avg"``, ``"gem"`` or ``"max"``, applied to every layer.
        p: GeM exponent, at least 1. Only ``"gem"`` reads it.
        layers: The layers to pool, in concatenation order.
    """

    method: str = "avg"
    p: float = DEFAULT_GEM_P
    layers: tuple[FeatureLayer, ...] = field(default_factory=lambda: (FeatureLayer("head"),))

    def __post_init__(self) -> None:
        if self.method not in POOLINGS:
            raise ValueError(f"invalid pooling {self.method!r}; use one of {', '.join(POOLINGS)}")
        if not self.p >= 1.0:
            raise ValueError(f"invalid GeM exponent p={self.p}; it must be 1 or more")
        if not self.layers:
            raise ValueError("no feature layer given; pass at least one, e.g. 'head'")

        names = [layer.name for layer in self.layers]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"feature layers {repeated} are listed more than once")

    def record(self) -> dict[str, Any]:
        """Return the provenance entry: method, GeM exponent and layers with their weights."""
        record: dict[str, Any] = {"method": self.method, "layers": [layer.spelling() for layer in self.layers]}
        if self.method == "gem":
            record["p"] = self.p
        if len(self.layers) > 1:
            record["combination"] = "each layer pooled, L2-normalised, weighted, concatenated"
        return record


def parse_layers(text: str) -> tuple[FeatureLayer, ...]:
    """Parse a comma-separated layer list such as ``"head,block11,block0:0.8"``.

    Args:
        text: Layer names, each optionally followed by ``:WEIGHT``.

    Returns:
        The layers in the given order.

    Raises:
        ValueError: If an entry is empty or its weight is not a positive number.
    """
    layers = []
    for entry in text.split(","):
        entry = entry.strip()
        match = _LAYER_PATTERN.match(entry)
        if match is None:
            raise ValueError(
                f"invalid layer {entry!r} in {text!r}; write NAME or NAME:WEIGHT, e.g. 'head,block0:0.8'"
            )
        try:
            weight = float(match.group("weight") or 1.0)
        except ValueError:
            raise ValueError(f"invalid weight in layer {entry!r}; it must be a number above 0") from None
        layers.append(FeatureLayer(match.group("name"), weight))
    return tuple(layers)


def pool(features, method: str, p: float = DEFAULT_GEM_P):
    """Pool a (batch, height, width, channels) feature map over height and width.

    Args:
        features: A float32 TensorFlow tensor.
        method: ``"avg"``, ``"gem"`` or ``"max"``.
        p: GeM exponent.

    Returns:
        A (batch, channels) tensor.
    """
    import tensorflow as tf

    if method == "avg":
        return tf.reduce_mean(features, axis=[1, 2])
    if method == "max":
        return tf.reduce_max(features, axis=[1, 2])
    return generalized_mean(features, p)


def power_mean(features, p: float, eps: float = GEM_EPS):
    """Compute ``mean(max(x, eps) ** p)`` over height and width, GeM before its root.

    An integer ``p`` is computed by repeated multiplication (TFLite MUL ops, which
    have int8 kernels), a fractional one by a POW op.
    """
    import tensorflow as tf

    # A TFLite int8 MAXIMUM shares one quantisation range between its input and its
    # output. Applied straight to a linear block output, which the next block also
    # reads, it would clip that block output at 0 for the rest of the network. The
    # ReLU has a range of its own, and max(relu(x), eps) equals max(x, eps).
    clamped = tf.maximum(tf.nn.relu(features), eps)
    if float(p).is_integer():
        powered = clamped
        for _ in range(int(p) - 1):
            powered = powered * clamped
    else:
        powered = tf.pow(clamped, p)
    return tf.reduce_mean(powered, axis=[1, 2])


def generalized_mean(features, p: float, eps: float = GEM_EPS):
    """Compute GeM pooling ``(mean(max(x, eps) ** p)) ** (1 / p)`` over height and width.

    The root is a POW op, which TFLite runs in float32 only.
    """
    import tensorflow as tf

    return tf.pow(power_mean(features, p, eps), 1.0 / p)


def pool_layers(feature_maps: list, options: PoolingOptions):
    """Pool the feature maps of `options.layers` into one embedding.

    A single layer gives its pooled vector. Several layers give the concatenation of
    their pooled vectors, each scaled to unit length and multiplied by its weight.

    Args:
        feature_maps: (batch, height, width, channels) tensors, one per layer, in
            the order of `options.layers`.
        options: The pooling method and the layers.

    Returns:
        A (batch, total channels) tensor.
    """
    import tensorflow as tf

    if len(feature_maps) == 1:
        return pool(feature_maps[0], options.method, options.p)
    if options.method == "gem":
        return _concatenate_gem(feature_maps, options)

    # NOTE: the last op of the graph is the concatenation here, and edgeembed.toolchain.convert
    # cannot keep the graph's last op in float32, so an int8 model quantises the joined vector
    # on one scale. GeM avoids that (see _concatenate_gem).
    pooled = [pool(features, options.method) for features in feature_maps]
    parts = [tf.math.l2_normalize(vector, axis=-1) * layer.weight for vector, layer in zip(pooled, options.layers)]
    return tf.concat(parts, axis=-1)


def _concatenate_gem(feature_maps: list, options: PoolingOptions):
    """Concatenate unit-length, weighted GeM vectors with the root as the graph's last op.

    Scaling a power mean by ``s ** p`` scales its root by ``s``, so each layer's power
    mean is scaled by ``(weight / norm of its GeM vector) ** p`` before one shared root.
    The root is a POW op, which has no int8 kernel, so the converter leaves it in
    float32 instead of quantising the joined vector, whose parts have very different
    value ranges, on one int8 scale.
    """
    import tensorflow as tf

    scaled = []
    for features, layer in zip(feature_maps, options.layers):
        mean = power_mean(features, options.p)
        norm = tf.norm(tf.pow(mean, 1.0 / options.p), axis=-1, keepdims=True)
        scaled.append(mean * tf.pow(layer.weight / norm, options.p))
    return tf.pow(tf.concat(scaled, axis=-1), 1.0 / options.p)


def check_layers(options: PoolingOptions, widths: dict[str, int]) -> None:
    """Reject feature layers that the backbone does not have.

    Args:
        options: The requested pooling.
        widths: The backbone's poolable layers, as
            `edgeembed.toolchain.architecture.feature_widths` returns them.

    Raises:
        ValueError: Naming the unknown layers and the valid names.
    """
    unknown = [layer.name for layer in options.layers if layer.name not in widths]
    if unknown:
        blocks = sum(name.endswith("_depthwise") for name in widths)
        raise ValueError(
            f"unknown feature layers {unknown}; valid names are stem, head, block<i> (the block output) "
            f"and block<i>_expand, block<i>_depthwise (their ReLU6 activations) for blocks 0 to "
            f"{blocks - 1} (block0 has no expand)"
        )


def check_quantization(options: PoolingOptions, quantization: str, float_layers: tuple[str, ...]) -> None:
    """Reject an int8 model that would quantise the joining of several layers.

    Joining layers takes the norm of each pooled vector, a sum of up to 1280 squares,
    and int8 cannot hold it with useful precision. With ``head,block11,block0:0.8`` at
    256 pixels, flowers17 mAP fell from 0.70 (float32) to 0.40 with every op in int8.

    Raises:
        ValueError: If `options` joins several layers, `quantization` is ``"int8"``
            and `SCOPE` is not among `float_layers`.
    """
    if len(options.layers) > 1 and quantization == "int8" and SCOPE not in float_layers:
        raise ValueError(
            f"joining {len(options.layers)} layers in an int8 model needs the pooling in float32; "
            f"add '{SCOPE}' to --float-layers"
        )
