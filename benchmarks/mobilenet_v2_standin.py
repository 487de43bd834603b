"""Port an int8 TFLite MobileNetV2 classifier into Keras, as stand-in weights for ``convert mobilenet_v2``.

The Keras ImageNet weights of MobileNetV2 cannot be downloaded without internet. This
script dequantises the convolutions of a post-training-quantised TF-Slim MobileNetV2
1.0 224 classifier (per-channel int8 kernels, batch normalisation folded in) into
``keras.applications.MobileNetV2(alpha=1.0, include_top=False)``, matching layers in
network order. Each batch normalisation passes the folded bias through.

It is only a stand-in, because the kernels already lie on a per-channel int8 grid:
re-quantising them adds almost no weight error (with TensorFlow 2.21, every int8 kernel
value of the converted model equalled the source's). Fidelity measured on this file
shows the activation-quantisation loss only. Real float Keras weights add weight
rounding error as well, so their fidelity is likely somewhat lower.

The port is checked on real photos against the classifier's pooled features, which
come from int8 activations, so the cosine is close to 1 but not 1. A mean cosine below
0.95 means the layers are mapped wrongly, and the script exits with 1. Run it from the
repository root (needs the toolchain extra):

    python benchmarks/mobilenet_v2_standin.py [--source CLASSIFIER.tflite] [--out-dir /tmp/mnv2s]

It writes OUT_DIR/mnv2_standin.h5 (legacy Keras HDF5), OUT_DIR/port_validation.json and
links the calibration and evaluation photos of tools/build_default_model.py into
OUT_DIR/calib and OUT_DIR/eval. Then measure the conversion:

    edgeembed convert mobilenet_v2 --alpha 1.0 --weights OUT_DIR/mnv2_standin.h5 \\
        --calib OUT_DIR/calib --eval OUT_DIR/eval --out OUT_DIR/int8.tflite --report OUT_DIR/int8.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
from ai_edge_litert.interpreter import Interpreter, OpResolverType

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgeembed.toolchain.extractor import SIGNED_UNIT_RANGE  # noqa: E402
from edgeembed.toolchain.fidelity import cosine_summary  # noqa: E402
from edgeembed.toolchain.from_tflite import GLOBAL_POOLING_OPS, SourceTensorReader, cut_classifier  # noqa: E402
from edgeembed.toolchain.images import float_inputs, load_pixels, spread_sample  # noqa: E402
from edgeembed.toolchain.weights import FoldedConv  # noqa: E402
from tools.build_default_model import split_photos  # noqa: E402

logger = logging.getLogger("mobilenet_v2_standin")

DEFAULT_SOURCE = ROOT.parent / "shared/assets/models/tf2_mobilenet_v2_1.0_224_ptq.tflite"
INPUT_SIZE = 224
MIN_MEAN_COSINE = 0.95
CONV_OPS = {"CONV_2D": keras.layers.Conv2D, "DEPTHWISE_CONV_2D": keras.layers.DepthwiseConv2D}


@dataclass(frozen=True)
class SourceConv:
    """A folded convolution of the classifier: tensor name, TFLite op and float32 weights in Keras layout."""

    name: str
    op: str
    folded: FoldedConv


def dequantize(values: np.ndarray, parameters: dict) -> np.ndarray:
    """Dequantise a tensor with its per-tensor or per-channel scales and zero points."""
    scales = parameters["scales"]
    if len(scales) == 0:
        return values.astype(np.float32)
    shape = [1] * values.ndim
    if len(scales) > 1:
        shape[parameters["quantized_dimension"]] = len(scales)
    zero_points = parameters["zero_points"].reshape(shape)
    return ((values.astype(np.float64) - zero_points) * scales.reshape(shape)).astype(np.float32)


def read_source_convolutions(path: Path) -> list[SourceConv]:
    """Read the convolutions that feed the classifier's global pooling, in execution order.

    Raises:
        ValueError: If the model has no global pooling operator.
    """
    # Without the default XNNPACK delegate the operator list keeps the original ops.
    interpreter = Interpreter(model_path=str(path),
                              experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    interpreter.allocate_tensors()
    details = {item["index"]: item for item in interpreter.get_tensor_details()}
    # _get_ops_details is the only interpreter call that lists ops (ai-edge-litert 2.3).
    operators = interpreter._get_ops_details()

    pooling = next((op["index"] for op in operators if op["op_name"] in GLOBAL_POOLING_OPS), None)
    if pooling is None:
        raise ValueError(f"{path} has no {' or '.join(GLOBAL_POOLING_OPS)} operator; pass a MobileNetV2 classifier")

    convolutions = []
    for op in operators[:pooling]:
        if op["op_name"] not in CONV_OPS:
            continue
        _, weight, bias = op["inputs"]
        # One transpose turns TFLite's (out, h, w, in) kernel into Keras's (h, w, in, out)
        # and the depthwise (1, h, w, channels) into (h, w, channels, 1).
        kernel = dequantize(interpreter.get_tensor(weight), details[weight]["quantization_parameters"])
        convolutions.append(SourceConv(
            name=details[weight]["name"].split(";")[0],
            op=op["op_name"],
            folded=FoldedConv(kernel=np.ascontiguousarray(kernel.transpose(1, 2, 3, 0)),
                              bias=dequantize(interpreter.get_tensor(bias), details[bias]["quantization_parameters"])),
        ))
    logger.info("Read %d folded convolutions from %s", len(convolutions), path.name)
    return convolutions


def port_weights(model: keras.Model, convolutions: list[SourceConv]) -> None:
    """Set each Keras convolution to its folded kernel and the batch norm after it to pass the bias.

    Raises:
        ValueError: Naming the first layer whose count, kind or shape does not match.
    """
    layers = model.layers
    targets = [index for index, layer in enumerate(layers) if isinstance(layer, tuple(CONV_OPS.values()))]
    if len(targets) != len(convolutions):
        raise ValueError(f"Keras MobileNetV2 has {len(targets)} convolutions but the classifier has "
                         f"{len(convolutions)}; pass a MobileNetV2 1.0 classifier")

    for index, source in zip(targets, convolutions):
        layer, norm = layers[index], layers[index + 1]
        # DepthwiseConv2D subclasses Conv2D in Keras 3, so the kind is compared exactly.
        if type(layer) is not CONV_OPS[source.op]:
            raise ValueError(f"Keras layer {layer.name} is a {type(layer).__name__}, but {source.name} "
                             f"is a {source.op}")
        shapes = [tuple(weight.shape) for weight in layer.weights]
        if shapes != [source.folded.kernel.shape]:
            raise ValueError(f"Keras layer {layer.name} has weights {shapes}, but {source.name} "
                             f"has {[source.folded.kernel.shape]}")
        if not isinstance(norm, keras.layers.BatchNormalization) or norm.gamma.shape != source.folded.bias.shape:
            raise ValueError(f"Keras layer {layer.name} is not followed by a batch normalization of "
                             f"{source.folded.bias.shape[0]} channels, but by {norm.name}")

        layer.set_weights([source.folded.kernel])
        bias = source.folded.bias
        # gamma * (x - 0) / sqrt(1 - epsilon + epsilon) + bias = x + bias, up to float32 rounding.
        norm.set_weights([np.ones_like(bias), bias, np.zeros_like(bias), np.full_like(bias, 1.0 - norm.epsilon)])
    logger.info("Ported %d convolutions, %s to %s", len(targets), layers[targets[0]].name, layers[targets[-1]].name)


def validate_port(model: keras.Model, source: Path, assets: Path, count: int) -> dict[str, float]:
    """Compare the ported model's average-pooled features with the classifier's pooled tensor.

    The `count` photos are spread over the flowers17 and COIL-100 classes in `assets`.

    Returns:
        The cosine summary of `edgeembed.toolchain.fidelity.cosine_summary` and the photo count.
    """
    photos = sorted(assets.glob("datasets/flowers17/*/*.jpg")) + sorted(assets.glob("datasets/coil100/*/*.png"))
    if not photos:
        raise FileNotFoundError(f"no photos in {assets}/datasets/flowers17 or coil100; pass the assets folder")
    config = SIGNED_UNIT_RANGE.preprocess((INPUT_SIZE, INPUT_SIZE))
    pixels, _ = load_pixels(spread_sample(photos, count), config, "validation")
    images = float_inputs(pixels, config)

    keras_features = model.predict(images, batch_size=10, verbose=0).mean(axis=(1, 2))

    model_bytes = source.read_bytes()
    reader = SourceTensorReader(model_bytes, cut_classifier(model_bytes).tensor_index)
    tflite_features = np.concatenate([reader(image[None]) for image in images])

    summary = cosine_summary(tflite_features, keras_features)
    summary["photos"] = len(images)
    return summary


def link_split(assets: Path, out_dir: Path) -> None:
    """Link the default model's calibration and evaluation photos into OUT_DIR/calib and OUT_DIR/eval.

    A link is named after the photo's path below `assets`, '/' replaced by '_', so names stay unique.
    """
    for name, image_set in zip(("calib", "eval"), split_photos(assets)):
        folder = out_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        for photo in image_set.paths:
            link = folder / "_".join(photo.relative_to(assets).parts)
            if not link.is_symlink():
                link.symlink_to(photo.resolve())
        logger.info("Linked %d photos into %s", len(image_set.paths), folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE,
                        help="int8 TF-Slim MobileNetV2 1.0 224 classifier (.tflite)")
    parser.add_argument("--out-dir", type=Path, default=Path("/tmp/mnv2s"), help="output folder (default: /tmp/mnv2s)")
    parser.add_argument("--assets", type=Path, default=ROOT.parent / "shared/assets", help="shared assets folder")
    parser.add_argument("--photos", type=int, default=50, help="photos for the port validation (default: 50)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args.out_dir.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    model = keras.applications.MobileNetV2(alpha=1.0, input_shape=(INPUT_SIZE, INPUT_SIZE, 3),
                                           include_top=False, weights=None)
    try:
        port_weights(model, read_source_convolutions(args.source))
    except ValueError as error:
        logger.error("Failed to port %s: %s", args.source, error)
        return 1
    weights_path = args.out_dir / "mnv2_standin.h5"
    model.save(weights_path)
    port_seconds = time.perf_counter() - started
    logger.info("Wrote %s in %.1f s", weights_path, port_seconds)

    started = time.perf_counter()
    summary = validate_port(model, args.source, args.assets, args.photos)
    summary["seconds"] = {"port": round(port_seconds, 1), "validation": round(time.perf_counter() - started, 1)}
    (args.out_dir / "port_validation.json").write_text(json.dumps(summary, indent=2) + "\n")
    logger.info("Port validation on %d photos: cosine mean %.4f, p5 %.4f, min %.4f", summary["photos"],
                summary["mean"], summary["p5"], summary["min"])
    if summary["mean"] < MIN_MEAN_COSINE:
        logger.error("Mean cosine %.4f is below %.2f, so the layers are mapped wrongly", summary["mean"],
                     MIN_MEAN_COSINE)
        return 1

    link_split(args.assets, args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
