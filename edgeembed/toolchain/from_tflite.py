"""Cut an existing TFLite image classifier into an embedder at its pooled features.

The flatbuffer is edited with the object API of ``ai_edge_litert.schema_py_generated``.
The main subgraph's output becomes the pooled feature tensor, which is the last global
AVERAGE_POOL_2D or MEAN unless the caller names another tensor. The operators that do
not feed it (the classification head) are dropped, and so are the tensors, buffers and
operator codes that only they used. Nothing is re-quantised, so the input
quantisation and every kept value stay exactly as in the classifier. The edgeembed
metadata is then written with preprocessing inferred from the input quantisation
(`edgeembed.model.infer_preprocess`) or given by the caller.
"""

from __future__ import annotations

import collections
import datetime
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.interpreter import Interpreter

from edgeembed.model import ModelMetadata, PreprocessConfig, infer_preprocess, read_model_bytes
from edgeembed.toolchain.convert import converter_versions
from edgeembed.toolchain.extractor import Normalization
from edgeembed.toolchain.fidelity import TFLiteEmbedder, evaluate
from edgeembed.toolchain.images import ImageSet, load_pixels
from edgeembed.toolchain.metadata import embed_metadata
from edgeembed.toolchain.pipeline import BuildResult
from edgeembed.toolchain.weights import sha256_file

logger = logging.getLogger(__name__)

GLOBAL_POOLING_OPS = ("AVERAGE_POOL_2D", "MEAN")

# TFLite Support metadata describes the classifier's output (probabilities and their
# labels), which is wrong after the cut, so it is dropped.
CLASSIFIER_METADATA = (b"TFLITE_METADATA",)

_FILE_IDENTIFIER = b"TFL3"
_OP_NAMES = {code: name for name, code in vars(schema.BuiltinOperator).items() if not name.startswith("_")}


@dataclass(frozen=True)
class CutResult:
    """A classifier cut at one tensor.

    Attributes:
        model_bytes: The cut model, without edgeembed metadata.
        tensor_name: Name of the tensor that became the output.
        tensor_index: Its index in the source model's main subgraph.
        pooling_op: The operator that produces it, e.g. ``"MEAN"``.
        embedding_dim: Number of values in the tensor, batch excluded.
        removed_ops: Operator name to count, for the dropped operators.
        removed_bytes: Bytes of the buffers that only the dropped operators used.
        source_size_bytes: Size of the source model file.
    """

    model_bytes: bytes
    tensor_name: str
    tensor_index: int
    pooling_op: str
    embedding_dim: int
    removed_ops: dict[str, int]
    removed_bytes: int
    source_size_bytes: int

    def record(self) -> dict[str, Any]:
        """Return the provenance entry stored in the model metadata."""
        return {
            "tensor": self.tensor_name,
            "producer": self.pooling_op,
            "removed_ops": self.removed_ops,
            "removed_buffer_bytes": self.removed_bytes,
            "source_size_bytes": self.source_size_bytes,
        }


def _text(name: bytes | str | None) -> str:
    return name.decode("utf-8") if isinstance(name, bytes) else str(name or "")


def operator_name(model: schema.ModelT, operator: schema.OperatorT) -> str:
    """Return an operator's builtin name, e.g. ``"CONV_2D"``, or ``"CUSTOM"``."""
    code = model.operatorCodes[operator.opcodeIndex]
    # Schema version 3a keeps codes under 127 in deprecatedBuiltinCode as well.
    builtin = max(int(code.builtinCode), int(code.deprecatedBuiltinCode))
    return _OP_NAMES.get(builtin, f"BUILTIN_{builtin}")


def _is_global(shape) -> bool:
    shape = [] if shape is None else list(shape)
    if len(shape) == 4:
        return shape[1] == 1 and shape[2] == 1
    return len(shape) == 2


def find_pooled_tensor(model: schema.ModelT) -> int:
    """Return the index of the last global pooling output of the main subgraph.

    Operators are stored in execution order, so the last AVERAGE_POOL_2D or MEAN with
    a 1x1 (or 2-D) output is the one that feeds the classification head.

    Raises:
        ValueError: If there is none, listing the last operator outputs to pick from.
    """
    subgraph = model.subgraphs[0]
    pooled = []
    for operator in subgraph.operators:
        if operator_name(model, operator) not in GLOBAL_POOLING_OPS:
            continue
        output = int(operator.outputs[0])
        if _is_global(subgraph.tensors[output].shape):
            pooled.append(output)

    if not pooled:
        last = [_text(subgraph.tensors[int(op.outputs[0])].name) for op in subgraph.operators[-4:]]
        raise ValueError("no global pooling (AVERAGE_POOL_2D or MEAN with a 1x1 output) in the model; "
                         f"pass --tensor NAME, e.g. one of the last operator outputs: {last}")
    return pooled[-1]


def find_named_tensor(model: schema.ModelT, name: str) -> int:
    """Return the index of the operator output called `name` in the main subgraph.

    Converted tensor names often join several TensorFlow names with ``;``. A name
    that equals one of those parts matches when exactly one tensor has it.

    Raises:
        ValueError: If no operator output, or more than one, matches.
    """
    subgraph = model.subgraphs[0]
    outputs = [int(index) for operator in subgraph.operators for index in operator.outputs]
    names = {index: _text(subgraph.tensors[index].name) for index in outputs}

    exact = [index for index, full in names.items() if full == name]
    if exact:
        return exact[0]
    partial = [index for index, full in names.items() if name in full.split(";")]
    if len(partial) == 1:
        return partial[0]
    if partial:
        raise ValueError(f"{len(partial)} tensors have {name!r} in their name; pass the full tensor name")
    raise ValueError(f"no operator output is named {name!r}; list the tensors with "
                     "ai_edge_litert.interpreter.Interpreter(...).get_tensor_details()")


def _operators_feeding(subgraph: schema.SubGraphT, target: int) -> tuple[list, list]:
    """Split the operators into those the target depends on and the rest, keeping order."""
    needed = {target}
    feeding = []
    removed = []
    for operator in reversed(subgraph.operators):
        if needed.intersection(int(index) for index in operator.outputs):
            feeding.append(operator)
            needed.update(int(index) for index in operator.inputs if index >= 0)
        else:
            removed.append(operator)
    return feeding[::-1], removed[::-1]


def _remap(indices, mapping: dict[int, int]) -> list[int]:
    return [mapping[int(index)] if index >= 0 else -1 for index in indices]


def _compact_tensors(model: schema.ModelT, target: int) -> int:
    """Drop the main subgraph's unused tensors, renumber the rest, and return the target's new index."""
    subgraph = model.subgraphs[0]
    used = set(int(index) for index in subgraph.inputs) | {target}
    for operator in subgraph.operators:
        for group in (operator.inputs, operator.outputs, operator.intermediates):
            used.update(int(index) for index in (group if group is not None else []) if index >= 0)

    order = sorted(used)
    mapping = {old: new for new, old in enumerate(order)}
    subgraph.tensors = [subgraph.tensors[index] for index in order]
    subgraph.inputs = _remap(subgraph.inputs, mapping)
    subgraph.outputs = [mapping[target]]
    for operator in subgraph.operators:
        operator.inputs = _remap(operator.inputs, mapping)
        operator.outputs = _remap(operator.outputs, mapping)
        if operator.intermediates is not None:
            operator.intermediates = _remap(operator.intermediates, mapping)

    for signature in model.signatureDefs or []:
        if signature.subgraphIndex != 0:
            continue
        for item in signature.inputs or []:
            item.tensorIndex = mapping[int(item.tensorIndex)]
        output = schema.TensorMapT()
        output.name = "embedding"
        output.tensorIndex = mapping[target]
        signature.outputs = [output]
    return mapping[target]


def _compact_buffers(model: schema.ModelT) -> int:
    """Drop buffers no tensor or metadata entry uses, renumber the rest, and return the bytes freed.

    Buffer 0 stays first: TFLite reserves it as the empty buffer.
    """
    used = {0}
    for subgraph in model.subgraphs:
        used.update(int(tensor.buffer) for tensor in subgraph.tensors)
    used.update(int(entry.buffer) for entry in model.metadata or [])
    used.update(int(index) for index in (model.metadataBuffer if model.metadataBuffer is not None else []))

    freed = sum(len(buffer.data) for index, buffer in enumerate(model.buffers)
                if index not in used and buffer.data is not None)
    order = sorted(used)
    mapping = {old: new for new, old in enumerate(order)}
    model.buffers = [model.buffers[index] for index in order]
    for subgraph in model.subgraphs:
        for tensor in subgraph.tensors:
            tensor.buffer = mapping[int(tensor.buffer)]
    for entry in model.metadata or []:
        entry.buffer = mapping[int(entry.buffer)]
    if model.metadataBuffer is not None:
        model.metadataBuffer = [mapping[int(index)] for index in model.metadataBuffer if int(index) in mapping]
    return freed


def _compact_operator_codes(model: schema.ModelT) -> None:
    used = sorted({int(op.opcodeIndex) for subgraph in model.subgraphs for op in subgraph.operators})
    mapping = {old: new for new, old in enumerate(used)}
    model.operatorCodes = [model.operatorCodes[index] for index in used]
    for subgraph in model.subgraphs:
        for operator in subgraph.operators:
            operator.opcodeIndex = mapping[int(operator.opcodeIndex)]


def cut_classifier(model_bytes: bytes, tensor: str | None = None) -> CutResult:
    """Make one tensor of a classifier its output and drop what no longer feeds it.

    Args:
        model_bytes: The classifier's ``.tflite`` file.
        tensor: Name of the tensor to keep as output; None finds the pooled features.

    Returns:
        The cut model and a record of what was removed.

    Raises:
        ValueError: If the tensor is not found.
    """
    model = schema.ModelT.InitFromPackedBuf(bytearray(model_bytes), 0)
    target = find_named_tensor(model, tensor) if tensor else find_pooled_tensor(model)
    subgraph = model.subgraphs[0]
    target_tensor = subgraph.tensors[target]
    producer = next(operator_name(model, op) for op in subgraph.operators if target in op.outputs)

    feeding, removed = _operators_feeding(subgraph, target)
    removed_ops = dict(sorted(collections.Counter(operator_name(model, op) for op in removed).items()))
    subgraph.operators = feeding
    _compact_tensors(model, target)

    model.metadata = [entry for entry in model.metadata or [] if entry.name not in CLASSIFIER_METADATA]
    freed = _compact_buffers(model)
    _compact_operator_codes(model)

    builder = flatbuffers.Builder(len(model_bytes))
    builder.Finish(model.Pack(builder), file_identifier=_FILE_IDENTIFIER)
    result = CutResult(
        model_bytes=bytes(builder.Output()),
        tensor_name=_text(target_tensor.name),
        tensor_index=target,
        pooling_op=producer,
        embedding_dim=int(np.prod(list(target_tensor.shape)[1:])),
        removed_ops=removed_ops,
        removed_bytes=freed,
        source_size_bytes=len(model_bytes),
    )
    logger.info("Cut at %s (%s, %d values): removed %s and %d buffer bytes", result.tensor_name, producer,
                result.embedding_dim, removed_ops or "no operators", freed)
    return result


class SourceTensorReader:
    """Run the uncut classifier and read one intermediate tensor, the reference for the cut model.

    Args:
        model_bytes: The classifier.
        tensor_index: Index of the tensor in its main subgraph.
    """

    def __init__(self, model_bytes: bytes, tensor_index: int) -> None:
        # Intermediate tensors are overwritten during invoke unless the interpreter
        # preserves them, and it warns that this is meant for debugging, as here.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*experimental_preserve_all_tensors", category=UserWarning)
            self.interpreter = Interpreter(model_content=model_bytes, experimental_preserve_all_tensors=True)
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]
        self.tensor_index = tensor_index
        details = {item["index"]: item for item in self.interpreter.get_tensor_details()}
        self.scale, self.zero_point = details[tensor_index]["quantization"]

    def read(self, tensor: np.ndarray) -> np.ndarray:
        """Invoke on an input tensor of the model's input dtype and return the raw tensor values."""
        self.interpreter.set_tensor(self.input["index"], tensor)
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.tensor_index).copy()

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """Return the dequantised tensor for a float input (1, H, W, 3), quantised like the model's input."""
        dtype = np.dtype(self.input["dtype"])
        if dtype in (np.uint8, np.int8):
            scale, zero_point = self.input["quantization"]
            limits = np.iinfo(dtype)
            image = np.clip(np.floor(image / scale + zero_point + 0.5), limits.min, limits.max)
        raw = self.read(image.astype(dtype)).reshape(1, -1).astype(np.float32)
        if self.scale > 0:
            raw = (raw - self.zero_point) * self.scale
        return raw


@dataclass
class CutRequest:
    """Inputs of one classifier cut.

    Attributes:
        source: The classifier's ``.tflite`` file.
        out: Output ``.tflite`` path.
        tensor: Tensor to keep as output; None finds the pooled features.
        normalization: The classifier's input normalisation; None infers it from
            the input quantisation.
        evaluation: Photos for the report, which compares the cut model with the
            same tensor of the uncut classifier.
        latency_threads: Interpreter threads for the latency measurement.
    """

    source: Path
    out: Path
    tensor: str | None = None
    normalization: Normalization | None = None
    evaluation: ImageSet | None = None
    latency_threads: int = 1


def cut_preprocess(model_bytes: bytes, normalization: Normalization | None) -> tuple[PreprocessConfig, str]:
    """Return the cut model's preprocessing and where it came from (``"options"`` or ``"input quantisation"``).

    Raises:
        ValueError: If the input is float and no normalisation was given.
    """
    details = Interpreter(model_content=model_bytes).get_input_details()[0]
    shape = tuple(int(side) for side in details["shape"])
    if normalization is not None:
        return normalization.preprocess(shape[1:3]), "options"

    scale, zero_point = details["quantization"]
    config = infer_preprocess(shape, np.dtype(details["dtype"]).name, scale, zero_point)
    return config, "input quantisation"


def build_from_tflite(request: CutRequest) -> BuildResult:
    """Cut a classifier, write it with edgeembed metadata, and optionally report on it.

    Args:
        request: The classifier, output path, tensor, preprocessing and photos.

    Returns:
        The written model and, with evaluation photos, a report whose reference is
        the same tensor of the uncut classifier (so its cosine should be 1).

    Raises:
        edgeembed.model.ModelError: If the source is not a TFLite model, or has a
            float input and no normalisation was given.
        ValueError: If the tensor is not found.
    """
    started = time.perf_counter()
    source_bytes = read_model_bytes(request.source)
    cut = cut_classifier(source_bytes, request.tensor)
    config, preprocess_source = cut_preprocess(cut.model_bytes, request.normalization)

    embedder = TFLiteEmbedder(cut.model_bytes, config)
    provenance = {
        "backbone": f"classifier {request.source.name}, cut at its pooled features",
        "weights_source": request.source.name,
        "weights_sha256": sha256_file(request.source),
        "quantization": {"mode": "kept from the source model"},
        "input_type": embedder.input_type,
        "output_type": embedder.output_type,
        "preprocess_from": preprocess_source,
        "cut": cut.record(),
        "converter": converter_versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    pooling = "avg" if cut.pooling_op in GLOBAL_POOLING_OPS else None
    metadata = ModelMetadata(preprocess=config, embedding_dim=cut.embedding_dim, pooling=pooling,
                             provenance=provenance)
    model_bytes = embed_metadata(cut.model_bytes, metadata)

    request.out.parent.mkdir(parents=True, exist_ok=True)
    request.out.write_bytes(model_bytes)
    logger.info("Wrote %s (%d bytes, %d before the cut)", request.out, len(model_bytes), len(source_bytes))

    fidelity = None
    if request.evaluation is not None:
        pixels, _ = load_pixels(request.evaluation.paths, config, "evaluation")
        reference = SourceTensorReader(source_bytes, cut.tensor_index)
        candidate = TFLiteEmbedder(model_bytes, config, num_threads=request.latency_threads)
        fidelity = evaluate(reference, candidate, pixels)
        fidelity.extra["evaluation"] = request.evaluation.provenance()
        fidelity.extra["reference"] = f"tensor {cut.tensor_name} of the uncut {request.source.name}"
        fidelity.extra["compared"] = "uncut vs cut"

    return BuildResult(
        model_path=request.out,
        size_bytes=len(model_bytes),
        metadata=metadata,
        fidelity=fidelity,
        seconds=time.perf_counter() - started,
    )
