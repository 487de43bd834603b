"""Build one TFLite embedder end to end: weights, TensorFlow port, conversion, metadata, report.

`build_model` is what ``edgeembed convert`` and ``tools/build_default_model.py`` run.
"""

from __future__ import annotations

import datetime
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeembed.model import ModelMetadata, PreprocessConfig
from edgeembed.toolchain.architecture import get_backbone
from edgeembed.toolchain.convert import ConvertOptions, convert, converter_versions
from edgeembed.toolchain.efficientnet_lite import EfficientNetLiteFeatures
from edgeembed.toolchain.fidelity import FidelityReport, TFLiteEmbedder, evaluate
from edgeembed.toolchain.head import HeadRequest, attach_trained_head
from edgeembed.toolchain.images import ImageSet, float_inputs, load_pixels, spread_sample
from edgeembed.toolchain.metadata import embed_metadata
from edgeembed.toolchain.parity import ParityResult, check_parity
from edgeembed.toolchain.pooling import PoolingOptions, check_quantization
from edgeembed.toolchain.projection import HeadOptions, ProjectedFeatures, attach_head
from edgeembed.toolchain.weights import fold_weights, load_weights

logger = logging.getLogger(__name__)

# Parity with PyTorch is checked on this many evaluation (or calibration) images.
PARITY_IMAGES = 16


@dataclass
class BuildRequest:
    """Inputs of one model build.

    Attributes:
        backbone: Backbone name, e.g. ``"efficientnet_lite0"``.
        weights: A ``.pth`` path, ``"imagenet"`` or ``"random"``.
        out: Output ``.tflite`` path.
        options: Quantisation options.
        calibration: Calibration photos; required for ``int8``.
        evaluation: Photos for the fidelity report, disjoint from `calibration`.
        input_size: Input side in pixels; None uses the backbone's native size.
        latency_threads: Interpreter threads for the latency measurement.
        pooling: Pooling method and feature layers (EfficientNet-Lite only).
        head: A projection head to train on labelled photos and fold into the graph.
        projection: PCA projection (``--dim``) and in-graph L2 normalisation after the
            pooling. With `head`, only its ``l2_normalize`` is read.
    """

    backbone: str
    weights: str
    out: Path
    options: ConvertOptions = field(default_factory=ConvertOptions)
    calibration: ImageSet | None = None
    evaluation: ImageSet | None = None
    input_size: int | None = None
    latency_threads: int = 1
    pooling: PoolingOptions = field(default_factory=PoolingOptions)
    head: HeadRequest | None = None
    projection: HeadOptions = field(default_factory=HeadOptions)


@dataclass
class BuildResult:
    """Outputs of one model build.

    Attributes:
        model_path: The written ``.tflite`` file.
        size_bytes: Its size.
        metadata: The metadata stored in it.
        parity: TensorFlow-versus-PyTorch agreement, when evaluation or calibration images exist.
        fidelity: Float-versus-quantised report, when evaluation images were given.
        seconds: Wall-clock build time.
    """

    model_path: Path
    size_bytes: int
    metadata: ModelMetadata
    parity: ParityResult | None = None
    fidelity: FidelityReport | None = None
    seconds: float = 0.0

    def report(self) -> dict[str, Any]:
        """Return the JSON report: fidelity fields at the top, then parity and provenance."""
        document: dict[str, Any] = self.fidelity.to_dict() if self.fidelity else {"size_bytes": self.size_bytes}
        document["model"] = self.model_path.name
        document["parity"] = self.parity.to_dict() if self.parity else None
        document["provenance"] = self.metadata.provenance
        document["build_seconds"] = round(self.seconds, 1)
        return document


def default_preprocess(input_size: int) -> PreprocessConfig:
    """Return the preprocessing of the EfficientNet-Lite ImageNet weights at a given size.

    The weights expect RGB scaled to [-1, 1], and the crop keeps the whole shorter side.
    """
    return PreprocessConfig(
        input_size=(input_size, input_size),
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        resize="crop",
        crop_fraction=1.0,
    )


def _quantization_record(options: ConvertOptions) -> dict[str, Any]:
    weights = {"int8": "int8 per-channel", "dynamic": "int8 per-channel",
               "float16": "float16", "float32": "float32"}[options.quantization]
    activations = "int8" if options.quantization == "int8" else "float32"
    record = {"mode": options.quantization, "weights": weights, "activations": activations}
    if options.quantization == "int8" and options.float_layers:
        record["float_layers"] = list(options.float_layers)
    return record


def provenance_record(request: BuildRequest, weights, calibration: ImageSet | None) -> dict[str, Any]:
    """Return the provenance stored in the model metadata: backbone, weights, quantisation, versions.

    Args:
        request: The build request.
        weights: The loaded weights (``description`` and ``sha256`` are read).
        calibration: The calibration photos that decoded, or None.
    """
    return {
        "backbone": request.backbone,
        "weights_source": weights.description,
        "weights_sha256": weights.sha256,
        "quantization": _quantization_record(request.options),
        "input_type": request.options.effective_input_type(),
        "output_type": request.options.effective_output_type(),
        "converter": converter_versions(),
        "calibration": calibration.provenance() if calibration else None,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def load_calibration(request: BuildRequest, config: PreprocessConfig,
                     needed: bool) -> tuple[np.ndarray | None, ImageSet | None]:
    """Decode the calibration photos, capped at ``calib_max``, when int8 or a PCA head needs them.

    Args:
        request: The build request; its ``calibration`` and ``options.calib_max`` are read.
        config: The preprocessing of the model.
        needed: Whether the build needs calibration photos at all.

    Returns:
        The uint8 pixels and the photos that decoded, or (None, None) when not needed.

    Raises:
        ValueError: If they are needed and no calibration photos were given.
    """
    if not needed:
        return None, None
    if request.calibration is None:
        raise ValueError("int8 quantisation and --dim need calibration photos; pass --calib IMAGE_DIR")

    chosen = spread_sample(list(request.calibration.paths), request.options.calib_max)
    pixels, loaded = load_pixels(chosen, config, "calibration")
    return pixels, ImageSet(tuple(loaded), request.calibration.root, request.calibration.description)


def measure_fidelity(model, request: BuildRequest, config: PreprocessConfig,
                     model_bytes: bytes) -> tuple[FidelityReport | None, np.ndarray | None]:
    """Compare the float graph with the converted model on the evaluation photos, if any.

    Args:
        model: The float extractor the model was converted from.
        request: The build request; its ``evaluation`` and ``latency_threads`` are read.
        config: The preprocessing of the model.
        model_bytes: The converted model.

    Returns:
        The fidelity report and the decoded evaluation pixels, or (None, None) without
        evaluation photos.
    """
    if request.evaluation is None:
        return None, None

    pixels, _ = load_pixels(request.evaluation.paths, config, "evaluation")
    embedder = TFLiteEmbedder(model_bytes, config, num_threads=request.latency_threads)
    fidelity = evaluate(lambda image: model(image).numpy(), embedder, pixels)
    fidelity.extra["evaluation"] = request.evaluation.provenance()
    return fidelity, pixels


def _measure(model, backbone: EfficientNetLiteFeatures, weights, request: BuildRequest, config: PreprocessConfig,
             model_bytes: bytes, calibration_pixels: np.ndarray | None) -> tuple[ParityResult | None, FidelityReport | None]:
    fidelity, evaluation_pixels = measure_fidelity(model, request, config, model_bytes)
    parity_pixels = calibration_pixels if evaluation_pixels is None else evaluation_pixels

    parity = None
    if parity_pixels is not None:
        parity = check_parity(backbone, weights.state_dict, float_inputs(parity_pixels[:PARITY_IMAGES], config))
    return parity, fidelity


def build_model(request: BuildRequest) -> BuildResult:
    """Build, quantise, annotate and optionally evaluate one embedder.

    Args:
        request: The backbone, weights, photos and options.

    Returns:
        The written model and its measurements.

    Raises:
        ValueError: For an unknown backbone, missing calibration photos, unusable images,
            an unknown feature layer, several layers joined in an int8 model without
            the pooling in float32, or a head that cannot be trained.
        edgeembed.toolchain.weights.WeightsError: If the weights cannot be loaded.
    """
    started = time.perf_counter()
    check_quantization(request.pooling, request.options.quantization, request.options.float_layers)
    spec = get_backbone(request.backbone)
    weights = load_weights(spec, request.weights)

    input_size = request.input_size or spec.image_size
    config = default_preprocess(input_size)
    folded = fold_weights(weights.state_dict, spec)
    model = EfficientNetLiteFeatures(spec, folded, (input_size, input_size), request.pooling)
    # The PyTorch reference averages the head features, so parity is checked on that
    # graph. With the default pooling it is the model itself, which is then traced once.
    backbone = model
    if request.pooling != PoolingOptions():
        backbone = EfficientNetLiteFeatures(spec, folded, (input_size, input_size))

    int8 = request.options.quantization == "int8"
    pca = request.projection.dim is not None and request.head is None
    calibration_pixels, calibration = load_calibration(request, config, needed=int8 or pca)
    calibration_inputs = None if calibration_pixels is None else float_inputs(calibration_pixels, config)

    if request.head is not None:
        model = attach_trained_head(model, request.head, config, request.projection.l2_normalize)
    else:
        model = attach_head(model, request.projection, calibration_inputs)
    model_bytes = convert(model, request.options, calibration_inputs if int8 else None)

    provenance = provenance_record(request, weights, calibration)
    provenance["pooling"] = request.pooling.record()
    if isinstance(model, ProjectedFeatures):
        provenance["head"] = model.record()
    metadata = ModelMetadata(
        preprocess=config,
        embedding_dim=model.embedding_dim,
        pooling=request.pooling.method,
        l2_normalized=request.projection.l2_normalize,
        provenance=provenance,
    )
    model_bytes = embed_metadata(model_bytes, metadata)

    request.out.parent.mkdir(parents=True, exist_ok=True)
    request.out.write_bytes(model_bytes)
    logger.info("Wrote %s (%d bytes)", request.out, len(model_bytes))

    parity, fidelity = _measure(model, backbone, weights, request, config, model_bytes, calibration_pixels)
    return BuildResult(
        model_path=request.out,
        size_bytes=len(model_bytes),
        metadata=metadata,
        parity=parity,
        fidelity=fidelity,
        seconds=time.perf_counter() - started,
    )
