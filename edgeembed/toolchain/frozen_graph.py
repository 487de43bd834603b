"""MobileNet v1 from a TensorFlow 1 frozen graph (``.pb``), cut at its pooled features.

A frozen graph is a ``GraphDef`` whose weights are constants. This module imports it
into a TensorFlow 2 function and prunes it between the image input and the pooled
feature tensor. Unless the caller names them, the input is the only 4-D, 3-channel
``Placeholder`` and the pooled tensor is the last global ``AvgPool`` or ``Mean`` with
a 1x1 output. Everything after the pooled tensor, such as the ImageNet logits or a
retrained classifier, is dropped.

The ImageNet MobileNet v1 checkpoints of TF-slim expect RGB scaled to [-1, 1].
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import tensorflow as tf
from google.protobuf.message import DecodeError

from edgeembed.toolchain.extractor import SIGNED_UNIT_RANGE, FrozenFeatures, GraphSource, Normalization
from edgeembed.toolchain.weights import WeightsError, sha256_file

logger = logging.getLogger(__name__)

GLOBAL_POOLING_OPS = ("AvgPool", "Mean")


@dataclass(frozen=True)
class GraphBackbone:
    """A backbone that comes as a frozen graph.

    Attributes:
        name: Backbone name as the command spells it.
        alpha: The only width multiplier supported.
        image_size: Input side in pixels, fixed by the graph's pooling window.
        normalization: The float input the graph expects.
    """

    name: str
    alpha: float
    image_size: int
    normalization: Normalization


GRAPH_BACKBONES = {"mobilenet_v1": GraphBackbone("mobilenet_v1", 1.0, 224, SIGNED_UNIT_RANGE)}


def read_graph_def(path: str | Path) -> tf.compat.v1.GraphDef:
    """Read a binary ``GraphDef`` file.

    Raises:
        WeightsError: If the file is missing or is not a binary GraphDef.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"frozen graph {path} not found; pass a TensorFlow 1 frozen graph (.pb) as --weights")

    graph_def = tf.compat.v1.GraphDef()
    try:
        graph_def.ParseFromString(path.read_bytes())
    except DecodeError as error:
        raise WeightsError(f"cannot read {path} as a frozen TensorFlow graph (binary GraphDef): {error}") from error
    if not graph_def.node:
        raise WeightsError(f"{path} contains no graph nodes; pass a frozen TensorFlow graph (.pb)")
    return graph_def


def _tensor_name(name: str) -> str:
    return name if ":" in name else f"{name}:0"


def find_input_tensor(graph: tf.Graph) -> str:
    """Return the name of the graph's image input: the only 4-D float Placeholder with 3 channels.

    Raises:
        ValueError: If there is no such placeholder, or more than one.
    """
    candidates = []
    for operation in graph.get_operations():
        if operation.type != "Placeholder":
            continue
        output = operation.outputs[0]
        if output.dtype == tf.float32 and output.shape.rank == 4 and output.shape[3] == 3:
            candidates.append(output.name)

    if len(candidates) != 1:
        found = ", ".join(candidates) or "none"
        raise ValueError(f"expected one 4-D float image placeholder with 3 channels, found {found}; "
                         "pass --input-tensor NAME")
    return candidates[0]


def _is_global_pooling(tensor: tf.Tensor) -> bool:
    shape = tensor.shape
    if shape.rank == 4:
        return shape[1] == 1 and shape[2] == 1
    return shape.rank == 2


def find_pooled_tensor(graph: tf.Graph) -> str:
    """Return the name of the last global pooling output: AvgPool or Mean with a 1x1 (or 2-D) result.

    Imported graph operations are in topological order, so the last such operation
    is the one that feeds the classification head.

    Raises:
        ValueError: If the graph has no global pooling.
    """
    pooled = [operation.outputs[0].name for operation in graph.get_operations()
              if operation.type in GLOBAL_POOLING_OPS and _is_global_pooling(operation.outputs[0])]
    if not pooled:
        raise ValueError("no global pooling (AvgPool or Mean with a 1x1 output) in the graph; "
                         "pass --output-tensor NAME")
    return pooled[-1]


def _graph_tensor(graph: tf.Graph, name: str, option: str) -> tf.Tensor:
    try:
        return graph.get_tensor_by_name(_tensor_name(name))
    except (KeyError, ValueError) as error:
        raise ValueError(f"the graph has no tensor {name!r}; check {option}") from error


def load_frozen_graph(path: str | Path, backbone: str = "mobilenet_v1", input_tensor: str | None = None,
                      output_tensor: str | None = None, normalization: Normalization | None = None,
                      input_size: int | None = None) -> GraphSource:
    """Import a frozen graph and prune it to an image-to-pooled-features function.

    Args:
        path: The ``.pb`` file.
        backbone: One of `GRAPH_BACKBONES`.
        input_tensor: Name of the image input; None finds it.
        output_tensor: Name of the pooled features; None finds it.
        normalization: The graph's input normalisation; None uses the backbone's.
        input_size: Requested input side; it must match the graph's.

    Returns:
        The frozen extractor and its provenance.

    Raises:
        WeightsError: If the file is not a frozen graph.
        ValueError: If a tensor is not found or the input size does not fit the graph.
    """
    spec = GRAPH_BACKBONES[backbone]
    path = Path(path)
    graph_def = read_graph_def(path)
    wrapped = tf.compat.v1.wrap_function(lambda: tf.compat.v1.import_graph_def(graph_def, name=""), [])
    graph = wrapped.graph

    input_name = _tensor_name(input_tensor) if input_tensor else find_input_tensor(graph)
    output_name = _tensor_name(output_tensor) if output_tensor else find_pooled_tensor(graph)
    image = _graph_tensor(graph, input_name, "--input-tensor")
    pooled = _graph_tensor(graph, output_name, "--output-tensor")
    logger.info("Cutting %s from %s to %s %s", path.name, input_name, output_name, tuple(pooled.shape))

    size = spec.image_size
    fixed = tuple(image.shape[1:3]) if image.shape.rank == 4 else (None, None)
    if input_size is not None and input_size != size:
        raise ValueError(f"{backbone} takes {size}x{size} inputs only; drop --input-size")
    if None not in fixed and fixed != (size, size):
        raise ValueError(f"the graph's input {input_name} is {fixed[0]}x{fixed[1]}, but {backbone} is {size}x{size}")

    function = wrapped.prune(feeds=image, fetches=pooled)
    return GraphSource(
        features=FrozenFeatures(function, backbone, (size, size)),
        preprocess=(normalization or spec.normalization).preprocess((size, size)),
        backbone=backbone,
        weights_description=path.name,
        weights_sha256=sha256_file(path),
        pooling="avg" if pooled.op.type in GLOBAL_POOLING_OPS else None,
        details={"alpha": spec.alpha, "input_size": size, "input_tensor": input_name, "output_tensor": output_name},
    )
