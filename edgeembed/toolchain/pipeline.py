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
from edgeembed.toolchain.architecture import HEAD_FILTERS, get_backbone
from edgeembed.toolchain.convert import ConvertOptions, convert, converter_versions
from edgeembed.toolchain.efficientnet_lite import EfficientNetLiteFeatures
from edgeembed.toolchain.fidelity import FidelityReport, TFLiteEmbedder, evaluate
from edgeembed.toolchain.images import ImageSet, float_inputs, load_pixels, spread_sample
from edgeembed.toolchain.metadata import embed_metadata
from edgeembed.toolchain.parity import ParityResult, check_parity
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
    """

    backbone: str
    weights: str
    out: Path
    options: ConvertOptions = field(default_factory=ConvertOptions)
    calibration: ImageSet | None = None
    evaluation: ImageSet | None = None
    input_size: int | None = None
    latency_threads: int = 1


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


def _provenance(request: BuildRequest, weights, calibration: ImageSet | None) -> dict[str, Any]:
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


def _load_calibration(request: BuildRequest, config: PreprocessConfig) -> tuple[np.ndarray | None, ImageSet | None]:
    """Decode the calibration photos, capped at ``calib_max``; (None, None) unless int8."""
    if request.options.quantization != "int8":
        return None, None
    if request.calibration is None:
        raise ValueError("int8 quantisation needs calibration photos; pass --calib IMAGE_DIR")

    chosen = spread_sample(list(request.calibration.paths), request.options.calib_max)
    pixels, loaded = load_pixels(chosen, config, "calibration")
    used = ImageSet(tuple(loaded), request.calibration.root, request.calibration.description)
    return pixels, used


def _measure(model, weights, request: BuildRequest, config: PreprocessConfig, model_bytes: bytes,
             calibration_pixels: np.ndarray | None) -> tuple[ParityResult | None, FidelityReport | None]:
    fidelity = None
    parity_pixels = calibration_pixels
    if request.evaluation is not None:
        evaluation_pixels, _ = load_pixels(request.evaluation.paths, config, "evaluation")
        embedder = TFLiteEmbedder(model_bytes, config, num_threads=request.latency_threads)
        fidelity = evaluate(lambda x: model(x).numpy(), embedder, evaluation_pixels)
        fidelity.extra["evaluation"] = request.evaluation.provenance()
        parity_pixels = evaluation_pixels

    parity = None
    if parity_pixels is not None:
        parity = check_parity(model, weights.state_dict, float_inputs(parity_pixels[:PARITY_IMAGES], config))
    return parity, fidelity


def build_model(request: BuildRequest) -> BuildResult:
    """Build, quantise, annotate and optionally evaluate one embedder.

    Args:
        request: The backbone, weights, photos and options.

    Returns:
        The written model and its measurements.

    Raises:
        ValueError: For an unknown backbone, missing calibration photos or unusable images.
        edgeembed.toolchain.weights.WeightsError: If the weights cannot be loaded.
    """
    started = time.perf_counter()
    spec = get_backbone(request.backbone)
    weights = load_weights(spec, request.weights)

    input_size = request.input_size or spec.image_size
    config = default_preprocess(input_size)
    model = EfficientNetLiteFeatures(spec, fold_weights(weights.state_dict, spec), (input_size, input_size))

    calibration_pixels, calibration = _load_calibration(request, config)
    calibration_inputs = None if calibration_pixels is None else float_inputs(calibration_pixels, config)
    model_bytes = convert(model, request.options, calibration_inputs)

    metadata = ModelMetadata(
        preprocess=config,
        embedding_dim=HEAD_FILTERS,
        pooling="avg",
        provenance=_provenance(request, weights, calibration),
    )
    model_bytes = embed_metadata(model_bytes, metadata)

    request.out.parent.mkdir(parents=True, exist_ok=True)
    request.out.write_bytes(model_bytes)
    logger.info("Wrote %s (%d bytes)", request.out, len(model_bytes))

    parity, fidelity = _measure(model, weights, request, config, model_bytes, calibration_pixels)
    return BuildResult(
        model_path=request.out,
        size_bytes=len(model_bytes),
        metadata=metadata,
        parity=parity,
        fidelity=fidelity,
        seconds=time.perf_counter() - started,
    )
