"""Build a TFLite embedder from a frozen graph: head, conversion, metadata, fidelity report.

This is `edgeembed.toolchain.pipeline.build_model` for every backbone that is not
EfficientNet-Lite: Keras MobileNetV2/V3, the user's own Keras model and TensorFlow 1
frozen graphs. They all arrive as a `edgeembed.toolchain.extractor.GraphSource`, so
there are no PyTorch weights to check parity against.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from edgeembed.model import ModelMetadata
from edgeembed.toolchain.convert import convert
from edgeembed.toolchain.extractor import GraphSource
from edgeembed.toolchain.images import float_inputs
from edgeembed.toolchain.metadata import embed_metadata
from edgeembed.toolchain.pipeline import BuildRequest, BuildResult, load_calibration, measure_fidelity, provenance_record
from edgeembed.toolchain.projection import HeadOptions, attach_head
from edgeembed.toolchain.weights import LoadedWeights

logger = logging.getLogger(__name__)


def resolve_float_layers(model, requested: tuple[str, ...], backbone: str) -> tuple[str, ...]:
    """Map each requested float layer to a convolution scope of the graph.

    Args:
        model: The extractor; its ``layer_names`` lists the scopes.
        requested: Full scopes (``MobilenetV1/MobilenetV1/Conv2d_0``) or their last
            part (``Conv2d_0``).
        backbone: Backbone name for messages.

    Returns:
        The full scopes, in the requested order.

    Raises:
        ValueError: If a name matches no scope or, by its last part, several.
    """
    scopes = model.layer_names()
    resolved = []
    for name in requested:
        matches = [scope for scope in scopes if name in (scope, scope.rpartition("/")[2])]
        if len(matches) != 1:
            valid = ", ".join(scope.rpartition("/")[2] for scope in scopes)
            problem = "is ambiguous; pass its full name" if matches else "is not a convolution"
            raise ValueError(f"float layer {name!r} {problem} of {backbone}; its convolutions are: {valid}")
        resolved.append(matches[0])
    return tuple(resolved)


def build_graph_model(source: GraphSource, request: BuildRequest, head: HeadOptions | None = None) -> BuildResult:
    """Add the head, convert, annotate and optionally evaluate one embedder.

    Args:
        source: The frozen extractor, its preprocessing and provenance.
        request: Output path, quantisation options and photos. Its ``backbone`` and
            ``weights`` fields are not read, because `source` records what was loaded.
        head: Optional PCA projection and in-graph L2 normalisation.

    Returns:
        The written model and its measurements (no PyTorch parity). Its ``seconds``
        leave out loading `source`.

    Raises:
        ValueError: For an unknown float layer, missing calibration photos, an
            impossible ``--dim`` or unusable images.
    """
    started = time.perf_counter()
    head = head or HeadOptions()
    float_layers = resolve_float_layers(source.features, request.options.float_layers, source.backbone)
    request = dataclasses.replace(request, options=dataclasses.replace(request.options, float_layers=float_layers))

    config = source.preprocess
    int8 = request.options.quantization == "int8"
    calibration_pixels, calibration = load_calibration(request, config, needed=int8 or head.dim is not None)
    calibration_inputs = None if calibration_pixels is None else float_inputs(calibration_pixels, config)

    model = attach_head(source.features, head, calibration_inputs)
    model_bytes = convert(model, request.options, calibration_inputs if int8 else None)

    weights = LoadedWeights(state_dict={}, path=None, description=source.weights_description,
                            sha256=source.weights_sha256)
    provenance = provenance_record(dataclasses.replace(request, backbone=source.backbone), weights, calibration)
    provenance["variant"] = source.details
    if head.changes_graph:
        provenance["head"] = model.record()

    metadata = ModelMetadata(
        preprocess=config,
        embedding_dim=model.embedding_dim,
        pooling=source.pooling,
        l2_normalized=head.l2_normalize,
        provenance=provenance,
    )
    model_bytes = embed_metadata(model_bytes, metadata)

    request.out.parent.mkdir(parents=True, exist_ok=True)
    request.out.write_bytes(model_bytes)
    logger.info("Wrote %s (%d bytes)", request.out, len(model_bytes))

    return BuildResult(
        model_path=request.out,
        size_bytes=len(model_bytes),
        metadata=metadata,
        parity=None,
        fidelity=measure_fidelity(model, request, config, model_bytes)[0],
        seconds=time.perf_counter() - started,
    )
