"""The Embedder: image in, unit-length float32 embedding out.

    >>> from edgeembed import Embedder
    >>> embedder = Embedder()                      # the shipped int8 EfficientNet-Lite0
    >>> vector = embedder.embed("photo.jpg")       # shape (1280,), norm 1
"""

from __future__ import annotations

import collections
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from edgeembed import backends, preprocess
from edgeembed.model import (
    ModelError,
    ModelMetadata,
    PreprocessConfig,
    default_model_path,
    fingerprint,
    infer_preprocess,
    read_metadata,
    read_model_bytes,
)
from edgeembed.preprocess import ImageError, ImageInput

logger = logging.getLogger(__name__)


@dataclass
class EmbedderOptions:
    """Options for creating an `Embedder`.

    Attributes:
        model_path: A ``.tflite`` embedder; None selects the model shipped with the package.
        num_threads: Interpreter CPU threads; None lets the backend choose.
        backend: ``"litert"``, ``"tflite-runtime"`` or ``"tensorflow"``; None reads
            ``EDGEEMBED_BACKEND`` and otherwise takes the first importable one.
        preprocess: Preprocessing that replaces the model's own. Needed for float
            models without edgeembed metadata; optional otherwise.
        l2_normalize: Scale every embedding to unit length (the cosine metric needs it).
        decode_threads: Threads that decode and resize images ahead of inference in
            `Embedder.embed_files`.
    """

    model_path: str | Path | None = None
    num_threads: int | None = None
    backend: str | None = None
    preprocess: PreprocessConfig | None = None
    l2_normalize: bool = True
    decode_threads: int = 2


@dataclass(frozen=True)
class TensorInfo:
    """Shape, dtype and quantisation of a model input or output.

    Attributes:
        name: The tensor name in the model.
        shape: The tensor shape.
        dtype: The numpy dtype name, such as ``"uint8"`` or ``"float32"``.
        scale: The quantisation scale; 0.0 for float tensors.
        zero_point: The quantisation zero point.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    scale: float
    zero_point: int

    @classmethod
    def from_details(cls, details: dict) -> TensorInfo:
        """Build from an entry of the interpreter's input or output details."""
        scale, zero_point = details.get("quantization", (0.0, 0))
        return cls(
            name=details["name"],
            shape=tuple(int(d) for d in details["shape"]),
            dtype=np.dtype(details["dtype"]).name,
            scale=float(scale),
            zero_point=int(zero_point),
        )


@dataclass(frozen=True)
class FileEmbedding:
    """The result of embedding one file in a batch.

    Attributes:
        path: The file.
        vector: The embedding, or None when the file failed.
        error: One line saying why the file failed, or None.
    """

    path: Path
    vector: np.ndarray | None
    error: str | None = None


def cosine_similarity(u: np.ndarray, v: np.ndarray) -> float:
    """Return the cosine similarity of two vectors.

    Raises:
        ValueError: If the shapes differ or a vector has zero length.
    """
    u = np.asarray(u, dtype=np.float64).ravel()
    v = np.asarray(v, dtype=np.float64).ravel()
    if u.shape != v.shape:
        raise ValueError(f"vectors have different sizes: {u.shape[0]} and {v.shape[0]}")

    norms = np.linalg.norm(u) * np.linalg.norm(v)
    if norms == 0:
        raise ValueError("cosine similarity is undefined for a zero vector")
    return float(np.dot(u, v) / norms)


class Embedder:
    """Computes embeddings with a TFLite model and its own preprocessing.

    One Embedder owns one interpreter. Calls from several threads are serialised.
    """

    def __init__(self, model_path: str | Path | None = None, *, num_threads: int | None = None,
                 backend: str | None = None, preprocess: PreprocessConfig | None = None,
                 l2_normalize: bool = True, decode_threads: int = 2) -> None:
        """Load a model; see `EmbedderOptions` for the arguments.

        Raises:
            ModelError: If the model is missing, not a TFLite model, has invalid
                metadata, or is a float model without metadata or preprocess options.
            BackendError: If no TFLite interpreter is installed.
        """
        path = Path(model_path) if model_path is not None else default_model_path()
        data = read_model_bytes(path)
        self.model_path = path
        self.fingerprint = fingerprint(data)
        self.size_bytes = len(data)
        self.l2_normalize = l2_normalize
        self.decode_threads = max(1, decode_threads)

        try:
            self.backend, self._interpreter = backends.create_interpreter(str(path), num_threads, backend)
        except ValueError as error:
            raise ModelError(f"the interpreter rejected {path}: {error}") from error
        self.num_threads = num_threads

        input_details = self._interpreter.get_input_details()
        output_details = self._interpreter.get_output_details()
        if len(input_details) != 1 or len(output_details) != 1:
            raise ModelError(f"{path} has {len(input_details)} inputs and {len(output_details)} "
                             "outputs; an embedder needs exactly one of each")
        self.input = TensorInfo.from_details(input_details[0])
        self.output = TensorInfo.from_details(output_details[0])
        self._input_index = input_details[0]["index"]
        self._output_index = output_details[0]["index"]

        self.metadata = self._resolve_metadata(data, path, preprocess)
        self._check_input_shape()
        if self._ends_in_softmax():
            logger.warning("%s looks like an image classifier: its %d outputs come from a SOFTMAX, and class "
                           "scores are poor embeddings. Cut the classification head off with 'edgeembed "
                           "convert --from-tflite %s --out EMBEDDER.tflite'", path, self.embedding_dim, path)
        self._identity_input = False
        self._table = self._build_table()
        self._lock = threading.Lock()
        logger.info("loaded %s (%s input, %d-d output, preprocessing from %s)", path,
                    self.input.dtype, self.embedding_dim, self.metadata.preprocess_source)

    @classmethod
    def create_from_model_path(cls, model_path: str | Path) -> Embedder:
        """Create an Embedder with default options for a model file.

        Raises:
            ModelError: If the model cannot be loaded as an embedder.
            BackendError: If no TFLite interpreter is installed.
        """
        return cls(model_path)

    @classmethod
    def create_from_options(cls, options: EmbedderOptions) -> Embedder:
        """Create an Embedder from `EmbedderOptions`.

        Raises:
            ModelError: If the model cannot be loaded as an embedder.
            BackendError: If no TFLite interpreter is installed.
        """
        return cls(options.model_path, num_threads=options.num_threads, backend=options.backend,
                   preprocess=options.preprocess, l2_normalize=options.l2_normalize,
                   decode_threads=options.decode_threads)

    def _resolve_metadata(self, data: bytes, path: Path, override: PreprocessConfig | None) -> ModelMetadata:
        stored = read_metadata(data, path)
        if override is not None:
            base = stored or ModelMetadata(preprocess=override)
            return ModelMetadata(override, "options", base.embedding_dim, base.pooling,
                                 base.l2_normalized, base.provenance)
        if stored is not None:
            return stored

        try:
            inferred = infer_preprocess(self.input.shape, self.input.dtype,
                                        self.input.scale, self.input.zero_point)
        except ModelError as error:
            raise ModelError(f"{path}: {error}") from error
        logger.info("%s has no edgeembed metadata; inferred mean %.3f std %.3f from its input "
                    "quantisation", path, inferred.mean[0], inferred.std[0])
        return ModelMetadata(preprocess=inferred, preprocess_source="inferred")

    def _ends_in_softmax(self) -> bool:
        """Return True when the output tensor is a SOFTMAX result, through any (de)quantisation."""
        producers = {int(tensor): op for op in self._interpreter._get_ops_details()
                     if op["op_name"] != "DELEGATE" for tensor in op["outputs"]}
        tensor = self._output_index
        while tensor in producers:
            op = producers[tensor]
            if op["op_name"] == "SOFTMAX":
                return True
            if op["op_name"] not in ("QUANTIZE", "DEQUANTIZE", "RESHAPE") or len(op["inputs"]) == 0:
                return False
            tensor = int(op["inputs"][0])
        return False

    def _check_input_shape(self) -> None:
        shape = self.input.shape
        expected = self.preprocess.input_size
        if len(shape) != 4 or shape[3] != 3 or tuple(shape[1:3]) != tuple(expected):
            raise ModelError(f"{self.model_path}: input shape {shape} does not match the "
                             f"preprocessing input size {expected} with 3 channels")

    def _build_table(self) -> np.ndarray | None:
        """Return the pixel-to-input lookup table, or None when inputs need no mapping.

        None means a float input (normalised instead) or an integer input whose table
        maps every pixel to itself, as for uint8 inputs covering [-1, 1] with zero
        point 127, where the gather would only cost time.
        """
        if self.input.dtype not in ("uint8", "int8"):
            return None
        if self.input.scale <= 0:
            raise ModelError(f"{self.model_path}: integer input without quantisation parameters")

        table = preprocess.quantization_table(self.preprocess, np.dtype(self.input.dtype),
                                              self.input.scale, self.input.zero_point)
        self._identity_input = self.input.dtype == "uint8" and bool(
            np.array_equal(table, np.broadcast_to(np.arange(256), table.shape)))
        return None if self._identity_input else table

    @property
    def preprocess(self) -> PreprocessConfig:
        """The preprocessing applied to every image."""
        return self.metadata.preprocess

    @property
    def embedding_dim(self) -> int:
        """The length of every embedding."""
        return int(np.prod(self.output.shape[1:]))

    def ops(self) -> dict[str, int]:
        """Count the model's operators by name, for example ``{"CONV_2D": 33}``."""
        counts: collections.Counter[str] = collections.Counter()
        for op in self._interpreter._get_ops_details():
            if op["op_name"] != "DELEGATE":  # XNNPACK adds one node that wraps the others
                counts[op["op_name"]] += 1
        return dict(sorted(counts.items()))

    def prepare(self, image: ImageInput) -> np.ndarray:
        """Decode and preprocess one image to uint8 pixels of the input size.

        Raises:
            ImageError: If the image cannot be decoded.
        """
        rgb = preprocess.load_image(image, self.preprocess)
        return preprocess.prepare_pixels(rgb, self.preprocess)

    def input_tensor(self, pixels: np.ndarray) -> np.ndarray:
        """Convert prepared uint8 pixels into the model's input tensor (batch of one)."""
        if self._identity_input:
            values = pixels
        elif self._table is not None:
            values = preprocess.apply_table(pixels, self._table)
        else:
            values = preprocess.to_float(pixels, self.preprocess).astype(self.input.dtype)
        return values[np.newaxis]

    def invoke(self, tensor: np.ndarray) -> np.ndarray:
        """Run the model on a prepared input tensor and return the raw output vector."""
        with self._lock:
            self._interpreter.set_tensor(self._input_index, tensor)
            self._interpreter.invoke()
            return self._interpreter.get_tensor(self._output_index).reshape(-1).copy()

    def postprocess(self, raw: np.ndarray) -> np.ndarray:
        """Dequantise a raw output vector and, when enabled, scale it to unit length."""
        vector = raw.astype(np.float32)
        if self.output.dtype in ("uint8", "int8", "int16") and self.output.scale > 0:
            vector = (vector - self.output.zero_point) * self.output.scale

        if self.l2_normalize:
            norm = float(np.linalg.norm(vector))
            if norm > 0:
                vector = vector / norm
        return vector.astype(np.float32)

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Embed uint8 pixels already resized to the input size by `prepare`."""
        return self.postprocess(self.invoke(self.input_tensor(pixels)))

    def embed(self, image: ImageInput) -> np.ndarray:
        """Embed one image.

        Args:
            image: A path, encoded bytes, a PIL image or an RGB uint8 array.

        Returns:
            A float32 vector of length `embedding_dim`, unit length unless
            ``l2_normalize`` is off.

        Raises:
            ImageError: If the image cannot be decoded; the message names it.
        """
        return self.embed_pixels(self.prepare(image))

    def embed_batch(self, images: Sequence[ImageInput]) -> np.ndarray:
        """Embed several images.

        Returns:
            A float32 array of shape (len(images), embedding_dim).

        Raises:
            ImageError: At the first image that cannot be decoded. Use `embed_files`
                to go on past bad files.
        """
        vectors = np.empty((len(images), self.embedding_dim), dtype=np.float32)
        for row, image in enumerate(images):
            vectors[row] = self.embed(image)
        return vectors

    def _prepare_or_error(self, path: Path) -> np.ndarray | ImageError:
        try:
            return self.prepare(path)
        except ImageError as error:
            return error

    def embed_files(self, paths: Iterable[str | Path]) -> Iterator[FileEmbedding]:
        """Embed files in order, decoding ahead in threads while the model runs.

        A file that cannot be decoded yields a `FileEmbedding` with its error, and the
        batch goes on.

        Args:
            paths: Image files.

        Yields:
            One `FileEmbedding` per path, in the order given.
        """
        window = 2 * self.decode_threads
        pending: collections.deque[tuple[Path, Future]] = collections.deque()
        with ThreadPoolExecutor(self.decode_threads, thread_name_prefix="edgeembed-decode") as pool:
            for path in map(Path, paths):
                pending.append((path, pool.submit(self._prepare_or_error, path)))
                if len(pending) >= window:
                    yield self._finish(*pending.popleft())
            while pending:
                yield self._finish(*pending.popleft())

    def _finish(self, path: Path, future: Future) -> FileEmbedding:
        prepared = future.result()
        if isinstance(prepared, ImageError):
            return FileEmbedding(path, None, prepared.reason)
        return FileEmbedding(path, self.embed_pixels(prepared))

    def close(self) -> None:
        """Release the interpreter."""
        self._interpreter = None

    def __enter__(self) -> Embedder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
