"""Turn a Keras model into a frozen feature extractor, at its output or at a named layer.

``edgeembed convert --from-keras MODEL.keras --layer NAME`` loads the user's own model,
takes the output of layer NAME, pools it over height and width when it is a feature
map, and freezes the weights into the graph. `freeze_keras_model` does the freezing
for the Keras-applications backbones too (`edgeembed.toolchain.mobilenet`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import keras
import tensorflow as tf
from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

from edgeembed.toolchain.extractor import SIGNED_UNIT_RANGE, FrozenFeatures, GraphSource, Normalization
from edgeembed.toolchain.weights import WeightsError, sha256_file

logger = logging.getLogger(__name__)

# Layer names listed in the error for an unknown layer, counted from the output.
LISTED_LAYERS = 12


def freeze_keras_model(model: keras.Model, input_size: tuple[int, int], name: str) -> FrozenFeatures:
    """Trace a Keras model in inference mode and freeze its weights into constants.

    The converter cannot read Keras 3 variables from a traced function (TFLite
    calibration then fails on a READ_VARIABLE op), so the weights become constants
    before conversion.

    Args:
        model: A model whose output contains the features of one image.
        input_size: Input (height, width).
        name: Backbone name for messages.

    Returns:
        The frozen extractor.
    """
    height, width = input_size
    traced = tf.function(
        lambda image: model(image, training=False),
        input_signature=[tf.TensorSpec((1, height, width, 3), tf.float32)],
        autograph=False,
    ).get_concrete_function()
    frozen = convert_variables_to_constants_v2(traced)
    return FrozenFeatures(frozen, name, input_size)


def load_keras_file(path: str | Path) -> keras.Model:
    """Load a ``.keras`` (or legacy ``.h5``) model without its training configuration.

    Raises:
        WeightsError: If the file is missing or Keras cannot load it.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"Keras model {path} not found; pass a .keras file saved with model.save()")

    try:
        return keras.models.load_model(path, compile=False)
    except (ValueError, TypeError, OSError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise WeightsError(
            f"cannot load {path} as a Keras model: {reason}. Custom layers must be registered "
            "with keras.saving.register_keras_serializable before loading"
        ) from error


def feature_model(model: keras.Model, layer: str) -> tuple[keras.Model, str | None]:
    """Build a model from the input of `model` to the output of one of its layers.

    A 4-D layer output (a feature map) is averaged over height and width, a 2-D
    output is used as it is.

    Args:
        model: The user's model, with one image input (see `model_input_size`).
        layer: Name of a top-level layer (``model.get_layer``).

    Returns:
        The feature model and the pooling applied: ``"avg"`` or None.

    Raises:
        ValueError: If the layer does not exist or its output is neither 2-D nor 4-D.
    """
    names = [item.name for item in model.layers]
    if layer not in names:
        last = ", ".join(names[-LISTED_LAYERS:])
        raise ValueError(f"the Keras model has no layer {layer!r}; its last layers are: {last}")

    output = model.get_layer(layer).output
    if len(output.shape) == 4:
        pooled = keras.layers.GlobalAveragePooling2D(name="edgeembed_avg_pool")(output)
        return keras.Model(model.inputs[0], pooled), "avg"
    if len(output.shape) == 2:
        return keras.Model(model.inputs[0], output), None
    raise ValueError(
        f"layer {layer!r} outputs shape {tuple(output.shape)}; choose a layer with a "
        "feature map (batch, height, width, channels) or a vector (batch, features)"
    )


def model_input_size(model: keras.Model, requested: int | None) -> tuple[int, int]:
    """Return the input (height, width): the model's own, or `requested` when the model leaves it open.

    Raises:
        ValueError: If the model has several inputs, no 3-channel image input, an
            open size and no `requested` size, or a fixed size other than `requested`.
    """
    if len(model.inputs) != 1:
        raise ValueError(f"the Keras model has {len(model.inputs)} inputs; an image embedder needs one")

    shape = tuple(model.inputs[0].shape)
    if len(shape) != 4 or shape[3] != 3:
        raise ValueError(f"the Keras model's input has shape {shape}; expected (batch, height, width, 3)")

    height, width = shape[1], shape[2]
    if height is None or width is None:
        if requested is None:
            raise ValueError("the Keras model accepts any image size; pass --input-size N")
        return requested, requested
    if requested is not None and (requested, requested) != (height, width):
        raise ValueError(f"the Keras model's input is {height}x{width}; drop --input-size or pass {height}")
    return int(height), int(width)


def load_keras_source(path: str | Path, layer: str, input_size: int | None = None,
                      normalization: Normalization | None = None) -> GraphSource:
    """Load the user's Keras model and freeze it as an embedder at one layer.

    Args:
        path: A ``.keras`` file.
        layer: The layer whose output becomes the embedding (pooled when it is a feature map).
        input_size: Input side for models that accept any size.
        normalization: The model's input normalisation. None assumes RGB in [-1, 1]
            and logs a warning.

    Returns:
        The frozen extractor and its provenance.

    Raises:
        WeightsError: If the file cannot be loaded.
        ValueError: For an unknown layer or an unusable input shape.
    """
    path = Path(path)
    model = load_keras_file(path)
    size = model_input_size(model, input_size)
    features, pooling = feature_model(model, layer)

    if normalization is None:
        logger.warning("No --mean/--std given for %s; assuming RGB scaled to [-1, 1] "
                       "(mean 0.5, std 0.5)", path.name)
        normalization = SIGNED_UNIT_RANGE

    logger.info("Freezing %s at layer %s (%s output)", path.name, layer, pooling or "vector")
    return GraphSource(
        features=freeze_keras_model(features, size, f"keras:{path.name}"),
        preprocess=normalization.preprocess(size),
        backbone=f"keras model {path.name}",
        weights_description=path.name,
        weights_sha256=sha256_file(path),
        pooling=pooling,
        details={"layer": layer},
    )
