"""EfficientNet-Lite0..4 feature extractors in TensorFlow, for TFLite conversion.

The model is a `tf.Module` whose `__call__` is a `tf.function` with a fixed
(1, height, width, 3) float32 input signature, RGB scaled to [-1, 1]. By default it
returns the 1280 globally average-pooled features of the head convolution, without
the classifier. `edgeembed.toolchain.pooling.PoolingOptions` selects GeM or max
pooling and other layers, or several layers concatenated. Batch norms are folded into
the convolutions (see `edgeembed.toolchain.weights.fold_weights`), so the backbone
contains only convolutions with bias, ReLU6 and additions. Convolutions use TensorFlow
"SAME" padding, which pads the same rows and columns as the static same padding of
``efficientnet_lite_pytorch``.

Convert with ``tf.lite.TFLiteConverter.from_concrete_functions([model.concrete_function()], model)``.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import tensorflow as tf

from edgeembed.toolchain.architecture import BackboneSpec, block_specs, feature_widths
from edgeembed.toolchain.pooling import SCOPE, PoolingOptions, check_layers, pool_layers
from edgeembed.toolchain.weights import FoldedConv, FoldedWeights

# A feature-map tap: layer name -> activation tensor, filled during the forward pass.
Taps = dict[str, tf.Tensor]


class _Conv(tf.Module):
    """A convolution with bias, regular or depthwise, holding its weights as variables."""

    def __init__(self, weights: FoldedConv, stride: int, depthwise: bool, name: str) -> None:
        super().__init__(name=name)
        self.kernel = tf.Variable(weights.kernel, trainable=False, name="kernel")
        self.bias = tf.Variable(weights.bias, trainable=False, name="bias")
        self.strides = [1, stride, stride, 1]
        self.depthwise = depthwise

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        # The scope puts the layer name into the converted tensor names, which is
        # how `edgeembed.toolchain.convert` finds layers to keep in float.
        with self.name_scope:
            if self.depthwise:
                x = tf.nn.depthwise_conv2d(x, self.kernel, self.strides, padding="SAME")
            else:
                x = tf.nn.conv2d(x, self.kernel, self.strides, padding="SAME")
            return tf.nn.bias_add(x, self.bias)


class _Block(tf.Module):
    """One MBConv block: optional 1x1 expansion, depthwise, 1x1 projection, residual."""

    def __init__(self, expand: _Conv | None, depthwise: _Conv, project: _Conv, residual: bool, name: str) -> None:
        super().__init__()
        self.expand = expand
        self.depthwise = depthwise
        self.project = project
        self.residual = residual
        self.block_name = name

    def __call__(self, inputs: tf.Tensor, taps: Taps | None = None) -> tf.Tensor:
        taps = {} if taps is None else taps
        x = inputs
        if self.expand is not None:
            x = tf.nn.relu6(self.expand(x))
            taps[self.expand.name] = x
        x = tf.nn.relu6(self.depthwise(x))
        taps[self.depthwise.name] = x

        # The projection is linear: no activation before the residual addition.
        x = self.project(x)
        if self.residual:
            x = x + inputs
        taps[self.block_name] = x
        return x


class EfficientNetLiteFeatures(tf.Module):
    """EfficientNet-Lite backbone that returns pooled features, average-pooled head ones by default.

    Args:
        spec: The backbone scaling.
        weights: Folded weights for that backbone.
        input_size: Input (height, width). Defaults to the backbone's native size.
        pooling: Pooling method and feature layers. Defaults to average pooling of
            the head convolution (1280 features).

    Raises:
        ValueError: If a pooling layer is not one of `feature_layers`.
    """

    def __init__(self, spec: BackboneSpec, weights: FoldedWeights, input_size: tuple[int, int] | None = None,
                 pooling: PoolingOptions | None = None) -> None:
        super().__init__(name=spec.name)
        self.spec = spec
        self.input_size = input_size or (spec.image_size, spec.image_size)
        self.pooling = pooling or PoolingOptions()

        self.stem = _Conv(weights.stem, stride=2, depthwise=False, name="stem")
        self.blocks = []
        for block, folded in zip(block_specs(spec), weights.blocks, strict=True):
            expand = None
            if folded.expand is not None:
                expand = _Conv(folded.expand, 1, depthwise=False, name=f"block{block.index}_expand")
            self.blocks.append(_Block(
                expand=expand,
                depthwise=_Conv(folded.depthwise, block.stride, depthwise=True, name=f"block{block.index}_depthwise"),
                project=_Conv(folded.project, 1, depthwise=False, name=f"block{block.index}_project"),
                residual=block.has_residual,
                name=f"block{block.index}",
            ))
        self.head = _Conv(weights.head, stride=1, depthwise=False, name="head")
        self._widths = feature_widths(spec)
        check_layers(self.pooling, self._widths)

        height, width = self.input_size
        self._call = tf.function(
            self._features,
            input_signature=[tf.TensorSpec((1, height, width, 3), tf.float32, name="image")],
        )

    def feature_layers(self) -> list[str]:
        """List the layers whose activations can be pooled, in network order.

        ``stem``, ``block<i>_expand`` and ``block<i>_depthwise`` are ReLU6 activations,
        ``block<i>`` is the linear block output after the residual addition, and
        ``head`` is the ReLU6 activation of the 1x1 head convolution.
        """
        return list(self._widths)

    @property
    def embedding_dim(self) -> int:
        """Length of the output vector: the summed widths of the pooled layers."""
        return sum(self._widths[layer.name] for layer in self.pooling.layers)

    def _last_block_needed(self) -> int:
        """Index of the last block to run; ``len(blocks)`` when the head is needed."""
        last = -1
        for layer in self.pooling.layers:
            if layer.name == "head":
                return len(self.blocks)
            if layer.name.startswith("block"):
                last = max(last, int(layer.name[len("block"):].split("_")[0]))
        return last

    def _features(self, image: tf.Tensor) -> tf.Tensor:
        taps: Taps = {}
        x = tf.nn.relu6(self.stem(image))
        taps["stem"] = x

        # Layers after the last pooled one are not built, so --layer block5 yields a smaller graph.
        last = self._last_block_needed()
        for block in self.blocks[:last + 1]:
            x = block(x, taps)
        if last == len(self.blocks):
            taps["head"] = tf.nn.relu6(self.head(x))

        with tf.name_scope(SCOPE):
            embedding = pool_layers([taps[layer.name] for layer in self.pooling.layers], self.pooling)
        return tf.identity(embedding, name="embedding")

    def __call__(self, image: tf.Tensor | np.ndarray) -> tf.Tensor:
        """Compute the pooled features of one image.

        Args:
            image: Float32 array of shape (1, height, width, 3), RGB in [-1, 1].

        Returns:
            A (1, `embedding_dim`) float32 tensor.
        """
        return self._call(tf.convert_to_tensor(image, tf.float32))

    def layer_names(self) -> list[str]:
        """List the names that `ConvertOptions.float_layers` accepts, in network order.

        They are the convolutions (``stem``, ``block0_depthwise``, ..., ``head``) and
        ``pooling``, the ops after the last convolution.
        """
        names = ["stem"]
        for block in self.blocks:
            names += [conv.name for conv in (block.expand, block.depthwise, block.project) if conv is not None]
        return names + ["head", SCOPE]

    def concrete_function(self) -> Callable:
        """Return the traced function that `tf.lite.TFLiteConverter` converts."""
        return self._call.get_concrete_function()

    def features_batch(self, images: np.ndarray) -> np.ndarray:
        """Compute features for a stack of images one at a time (batch size is fixed at 1).

        Args:
            images: Float32 array (N, height, width, 3) in [-1, 1].

        Returns:
            Float32 array (N, `embedding_dim`).
        """
        return np.concatenate([self(image[None]).numpy() for image in images], axis=0)
