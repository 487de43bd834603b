"""Convert a TensorFlow feature extractor to a TFLite model, quantised or not.

Modes:

- ``int8``: full-integer post-training quantisation. Weights are int8 per output
  channel, activations int8 with ranges calibrated on real photos, the input uint8 or
  int8, and the output the dequantised float32 embedding (or int8). Named layers
  can stay in float32 (`ConvertOptions.float_layers`).
- ``dynamic``: int8 weights, float activations (dynamic-range quantisation).
- ``float16``: float16 weights, float computation.
- ``float32``: no quantisation, the float reference on device.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import tensorflow as tf

from edgeembed.toolchain.efficientnet_lite import EfficientNetLiteFeatures

logger = logging.getLogger(__name__)

QUANTIZATIONS = ("int8", "float16", "dynamic", "float32")
INPUT_TYPES = ("uint8", "int8")
OUTPUT_TYPES = ("float32", "int8")

# Below this many calibration photos, conversion logs a warning. The threshold is a
# rule of thumb for stable activation ranges, not a measured limit.
MIN_CALIBRATION_IMAGES = 100
DEFAULT_CALIB_MAX = 300

_TF_TYPES = {"uint8": tf.uint8, "int8": tf.int8, "float32": tf.float32}


@dataclass(frozen=True)
class ConvertOptions:
    """How to convert and quantise.

    Attributes:
        quantization: One of `QUANTIZATIONS`.
        input_type: Input dtype of an ``int8`` model, ``"uint8"`` or ``"int8"``.
            Other modes keep a float32 input.
        output_type: Output dtype of an ``int8`` model. ``"float32"`` appends a
            dequantise op and ``"int8"`` leaves dequantisation to the caller.
        calib_max: Most calibration images used.
        float_layers: Convolutions of an ``int8`` model that stay in float32, by
            their `EfficientNetLiteFeatures.layer_names` name (e.g. ``"stem"``,
            ``"block0_depthwise"``). Quantise and dequantise ops surround them.
    """

    quantization: str = "int8"
    input_type: str = "uint8"
    output_type: str = "float32"
    calib_max: int = DEFAULT_CALIB_MAX
    float_layers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"invalid quantization {self.quantization!r}; use one of {', '.join(QUANTIZATIONS)}")
        if self.input_type not in INPUT_TYPES:
            raise ValueError(f"invalid input type {self.input_type!r}; use one of {', '.join(INPUT_TYPES)}")
        if self.output_type not in OUTPUT_TYPES:
            raise ValueError(f"invalid output type {self.output_type!r}; use one of {', '.join(OUTPUT_TYPES)}")
        if self.calib_max < 1:
            raise ValueError(f"invalid calib_max {self.calib_max}; it must be at least 1")

    def effective_input_type(self) -> str:
        """Return the model's input dtype name after conversion."""
        return self.input_type if self.quantization == "int8" else "float32"

    def effective_output_type(self) -> str:
        """Return the model's output dtype name after conversion."""
        return self.output_type if self.quantization == "int8" else "float32"


def converter_versions() -> dict[str, str]:
    """Return the versions of the libraries that shape the converted model."""
    import importlib.metadata

    versions = {"tensorflow": tf.__version__}
    for package in ("torch", "ai-edge-litert", "numpy", "pillow"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def check_calibration_count(count: int) -> None:
    """Warn when too few calibration images were given for stable activation ranges."""
    if count < MIN_CALIBRATION_IMAGES:
        logger.warning(
            "Only %d calibration images; %d or more give stabler int8 activation ranges",
            count, MIN_CALIBRATION_IMAGES,
        )


def _representative_dataset(calibration: np.ndarray):
    def generate() -> Iterator[list[np.ndarray]]:
        for image in calibration:
            yield [image[None].astype(np.float32)]

    return generate


def _make_converter(model: EfficientNetLiteFeatures) -> tf.lite.TFLiteConverter:
    return tf.lite.TFLiteConverter.from_concrete_functions([model.concrete_function()], model)


def _configure_int8(converter, options: ConvertOptions, calibration: np.ndarray) -> None:
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = _representative_dataset(calibration)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = _TF_TYPES[options.input_type]
    converter.inference_output_type = _TF_TYPES[options.output_type]


def _check_float_layers(model: EfficientNetLiteFeatures, layers: tuple[str, ...]) -> None:
    known = model.layer_names()
    unknown = [layer for layer in layers if layer not in known]
    if unknown:
        blocks = sum(name.endswith("_depthwise") for name in known)
        raise ValueError(
            f"unknown float layers {unknown}; valid names are stem, head, pooling (the ops after the "
            f"last convolution) and block<i>_expand, block<i>_depthwise, block<i>_project for blocks 0 "
            f"to {blocks - 1} (block0 has no expand)"
        )


def _layer_output_tensors(calibrated: bytes, layers: tuple[str, ...]) -> list[str]:
    """Find the output tensor names of the ops that belong to the named layers.

    Converted tensor names join the fused TensorFlow op names with ``;``, and every
    op of a layer is in its name scope (``stem/Conv2D``), so a layer's ops are the
    ones with a name part starting with ``{layer}/``.
    """
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=calibrated)
    tensors = {detail["index"]: detail["name"] for detail in interpreter.get_tensor_details()}
    outputs = [tensors[index] for op in interpreter._get_ops_details() for index in op["outputs"]]

    selected = []
    for layer in layers:
        matches = [name for name in outputs if any(part.startswith(f"{layer}/") for part in name.split(";"))]
        if not matches:
            raise RuntimeError(f"no converted op belongs to layer {layer!r}; the op naming may have changed")
        selected += matches
    return selected


def _quantize_with_float_layers(converter, options: ConvertOptions) -> bytes:
    """Calibrate, then quantise every op except those of ``options.float_layers``."""
    from tensorflow.lite.python import convert as lite_convert

    # The public converter cannot exclude ops from quantisation. Calibrating only
    # and calling the MLIR quantiser with a denylist is what TensorFlow's own
    # QuantizationDebugger does for selective quantisation (TF 2.21).
    converter._experimental_calibrate_only = True
    calibrated = converter.convert()

    nodes = _layer_output_tensors(calibrated, options.float_layers)
    logger.info("Keeping %s in float32 (%d tensors)", ", ".join(options.float_layers), len(nodes))
    return lite_convert.mlir_quantize(
        calibrated,
        input_data_type=_TF_TYPES[options.input_type],
        output_data_type=_TF_TYPES[options.output_type],
        denylisted_nodes=nodes,
    )


def convert(model: EfficientNetLiteFeatures, options: ConvertOptions, calibration: np.ndarray | None = None) -> bytes:
    """Convert a feature extractor to a TFLite flatbuffer.

    Args:
        model: The TensorFlow model with a fixed (1, H, W, 3) input.
        options: Quantisation mode and input and output types.
        calibration: Float32 inputs (N, H, W, 3) in the model's input range.
            Required for ``int8``, ignored otherwise. Only the first
            ``options.calib_max`` images are used.

    Returns:
        The ``.tflite`` bytes, without edgeembed metadata.

    Raises:
        ValueError: If ``int8`` is requested without calibration images, the
            calibration images do not match the model's input size, or a float
            layer name is unknown.
    """
    converter = _make_converter(model)

    if options.quantization == "int8":
        _check_float_layers(model, options.float_layers)
        calibration = _check_calibration(model, calibration, options.calib_max)
        _configure_int8(converter, options, calibration)
    elif options.quantization == "dynamic":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    elif options.quantization == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]

    logger.info("Converting %s to TFLite (%s)", model.spec.name, options.quantization)
    if options.quantization == "int8" and options.float_layers:
        model_bytes = _quantize_with_float_layers(converter, options)
    else:
        model_bytes = converter.convert()

    logger.info("Converted model: %.2f MB", len(model_bytes) / 1e6)
    return model_bytes


def _check_calibration(model: EfficientNetLiteFeatures, calibration: np.ndarray | None, calib_max: int) -> np.ndarray:
    if calibration is None or len(calibration) == 0:
        raise ValueError("int8 quantisation needs calibration images; pass a folder of photos")

    expected = (*model.input_size, 3)
    if tuple(calibration.shape[1:]) != expected:
        raise ValueError(
            f"calibration images have shape {tuple(calibration.shape[1:])}, but the model input is {expected}"
        )

    calibration = calibration[:calib_max]
    check_calibration_count(len(calibration))
    logger.info("Calibrating activation ranges on %d images", len(calibration))
    return calibration
