"""Measure how closely a quantised TFLite embedder follows its float reference.

The quantised model is run the way the runtime runs it: uint8 pixels from
`edgeembed.preprocess.prepare_pixels` are mapped to the input dtype through
`edgeembed.preprocess.quantization_table`, and quantised outputs are dequantised
with the output scale and zero point. The report gives per-image cosine between
float and quantised embeddings, agreement of the 10 nearest neighbours in the two
spaces, the model size, its op histogram and its single-image latency.
"""

from __future__ import annotations

import collections
import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from ai_edge_litert.interpreter import Interpreter, OpResolverType
from tqdm import tqdm

from edgeembed.model import PreprocessConfig
from edgeembed.preprocess import apply_table, quantization_table, to_float

FeatureFunction = Callable[[np.ndarray], np.ndarray]

LATENCY_RUNS = 20


@dataclass
class FidelityReport:
    """Float-versus-quantised agreement and the quantised model's vital statistics.

    Attributes:
        cosine: Per-image cosine between float and quantised embeddings:
            ``mean``, ``p5`` (5th percentile) and ``min``.
        topk_agreement: Mean Jaccard index of each image's `k` nearest neighbours
            (cosine, the image itself excluded) in the float and quantised spaces;
            None with fewer than 2 images.
        k: Neighbour count of `topk_agreement`: the requested k, or one less than
            the image count when there are not more images than that.
        n_images: Evaluation images.
        size_bytes: Model file size.
        ops: Op name to count, from the interpreter.
        input_type: Input dtype name.
        output_type: Output dtype name.
        latency_ms: Median single-image invoke time.
        latency_threads: Interpreter threads used for `latency_ms`.
        machine: CPU architecture and processor the latency was measured on.
        extra: Further records, e.g. PyTorch parity or the calibration set.
    """

    cosine: dict[str, float]
    topk_agreement: float | None
    k: int
    n_images: int
    size_bytes: int
    ops: dict[str, int]
    input_type: str
    output_type: str
    latency_ms: float
    latency_threads: int
    machine: str
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Return the report as JSON-ready values."""
        return asdict(self)

    def to_json(self) -> str:
        """Serialise the report as indented JSON."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def to_markdown(self) -> str:
        """Summarise the report as a Markdown table."""
        ops = ", ".join(f"{name} {count}" for name, count in sorted(self.ops.items()))
        rows = [
            ("images evaluated", str(self.n_images)),
            ("cosine mean / p5 / min",
             f"{self.cosine['mean']:.4f} / {self.cosine['p5']:.4f} / {self.cosine['min']:.4f}"),
            (f"top-{self.k} neighbour agreement (mean Jaccard)",
             "n/a" if self.topk_agreement is None else f"{self.topk_agreement:.3f}"),
            ("size", f"{self.size_bytes:,} bytes ({self.size_bytes / 1e6:.2f} MB)"),
            ("input / output type", f"{self.input_type} / {self.output_type}"),
            ("latency (median single-image invoke)",
             f"{self.latency_ms:.1f} ms, {self.latency_threads} thread(s), {self.machine}"),
            ("ops", ops),
        ]
        lines = ["| measure | value |", "| --- | --- |"]
        lines += [f"| {name} | {value} |" for name, value in rows]
        return "\n".join(lines) + "\n"


class TFLiteEmbedder:
    """Run a TFLite embedder on uint8 pixels the way the runtime does.

    Args:
        model: Path or bytes of the ``.tflite`` file.
        config: The model's preprocessing (its normalisation gives the float input).
        num_threads: Interpreter threads.
    """

    def __init__(self, model: str | Path | bytes, config: PreprocessConfig, num_threads: int = 1) -> None:
        self.model_bytes = model if isinstance(model, bytes) else Path(model).read_bytes()
        self.config = config
        self.num_threads = num_threads
        self.interpreter = Interpreter(model_content=self.model_bytes, num_threads=num_threads)
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]

        self.table = None
        if self.input["dtype"] in (np.uint8, np.int8):
            scale, zero_point = self.input["quantization"]
            self.table = quantization_table(config, np.dtype(self.input["dtype"]), scale, zero_point)

    @property
    def input_type(self) -> str:
        """The input dtype name."""
        return np.dtype(self.input["dtype"]).name

    @property
    def output_type(self) -> str:
        """The output dtype name."""
        return np.dtype(self.output["dtype"]).name

    def _set_input(self, pixels: np.ndarray) -> None:
        if self.table is not None:
            tensor = apply_table(pixels, self.table)
        else:
            tensor = to_float(pixels, self.config)
        self.interpreter.set_tensor(self.input["index"], tensor[None].astype(self.input["dtype"]))

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        """Compute the float embedding of one (H, W, 3) uint8 image, not normalised."""
        self._set_input(pixels)
        self.interpreter.invoke()
        output = self.interpreter.get_tensor(self.output["index"]).reshape(-1).astype(np.float32)

        scale, zero_point = self.output["quantization"]
        if self.output["dtype"] != np.float32 and scale > 0:
            output = (output - zero_point) * scale
        return output

    def latency_ms(self, pixels: np.ndarray, runs: int = LATENCY_RUNS) -> float:
        """Return the median invoke time over `runs`, after one warm-up, in milliseconds."""
        self._set_input(pixels)
        self.interpreter.invoke()

        times = []
        for _ in range(runs):
            start = time.perf_counter()
            self.interpreter.invoke()
            times.append(time.perf_counter() - start)
        return float(np.median(times) * 1000.0)

    def op_histogram(self) -> dict[str, int]:
        """Count the model's ops by name, as written in the file (before any delegate)."""
        # After allocate_tensors, XNNPACK replaces the ops it runs with one DELEGATE
        # node, so a separate interpreter without default delegates lists them.
        # _get_ops_details is the only interpreter call that lists ops (ai-edge-litert 2.3).
        interpreter = Interpreter(
            model_content=self.model_bytes,
            experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        )
        counts = collections.Counter(op["op_name"] for op in interpreter._get_ops_details())
        return dict(sorted(counts.items()))


def _unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def cosine_summary(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Summarise per-row cosines between two (N, D) arrays as mean, 5th percentile and min."""
    cosines = np.sum(_unit(reference.astype(np.float64)) * _unit(candidate.astype(np.float64)), axis=1)
    return {
        "mean": float(cosines.mean()),
        "p5": float(np.percentile(cosines, 5)),
        "min": float(cosines.min()),
    }


def nearest_neighbours(embeddings: np.ndarray, k: int) -> np.ndarray:
    """Return the indices (N, k) of each row's k most cosine-similar other rows."""
    unit = _unit(embeddings.astype(np.float64))
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    return np.argsort(-similarity, axis=1, kind="stable")[:, :k]


def topk_agreement(reference: np.ndarray, candidate: np.ndarray, k: int = 10) -> float:
    """Return the mean Jaccard index of the k-NN sets of each row in the two spaces.

    Raises:
        ValueError: If there are not more than `k` rows.
    """
    if len(reference) <= k:
        raise ValueError(f"top-{k} agreement needs more than {k} images, got {len(reference)}")

    reference_sets = nearest_neighbours(reference, k)
    candidate_sets = nearest_neighbours(candidate, k)
    scores = []
    for expected, actual in zip(reference_sets, candidate_sets):
        common = len(set(expected) & set(actual))
        scores.append(common / (2 * k - common))
    return float(np.mean(scores))


def evaluate(
    reference: FeatureFunction,
    quantized: TFLiteEmbedder,
    pixels: np.ndarray,
    k: int = 10,
) -> FidelityReport:
    """Compare a quantised embedder with its float reference on evaluation photos.

    Args:
        reference: Maps float inputs (1, H, W, 3) to float features (1, D), such as the
            TensorFlow model or a float32 `TFLiteEmbedder` wrapped in a function.
        quantized: The model under test.
        pixels: Uint8 evaluation images (N, H, W, 3) from `prepare_pixels`. None of
            them should have been used for calibration.
        k: Neighbour count for the top-k agreement.

    Returns:
        The fidelity report.
    """
    float_features = []
    quantized_features = []
    for image in tqdm(pixels, desc="Evaluating fidelity", unit="image", leave=False, disable=None):
        float_input = to_float(image, quantized.config)[None].astype(np.float32)
        float_features.append(np.asarray(reference(float_input)).reshape(-1))
        quantized_features.append(quantized.embed(image))

    float_array = np.stack(float_features)
    quantized_array = np.stack(quantized_features)

    k = min(k, len(pixels) - 1)
    agreement = topk_agreement(float_array, quantized_array, k) if k >= 1 else None
    return FidelityReport(
        cosine=cosine_summary(float_array, quantized_array),
        topk_agreement=agreement,
        k=k,
        n_images=len(pixels),
        size_bytes=len(quantized.model_bytes),
        ops=quantized.op_histogram(),
        input_type=quantized.input_type,
        output_type=quantized.output_type,
        latency_ms=quantized.latency_ms(pixels[0]),
        latency_threads=quantized.num_threads,
        machine=f"{platform.machine()} {platform.processor() or ''}".strip(),
    )
