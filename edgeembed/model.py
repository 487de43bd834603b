"""Model metadata: the preprocessing and provenance that travel inside a ``.tflite`` file.

The toolchain writes one JSON document into the model's metadata under the name
``edgeembed`` (see `METADATA_NAME`). The runtime reads it back, so no caller has to
guess the input size, colour order, crop or normalisation. A model without that entry
(a foreign model) gets its preprocessing from explicit options or from
`infer_preprocess`, and `ModelMetadata.preprocess_source` records which.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from edgeembed._flatbuffer import FlatbufferError, read_metadata_buffers

METADATA_NAME = "edgeembed"
SCHEMA = "edgeembed.model/1"
DEFAULT_MODEL_NAME = "efficientnet_lite0_int8.tflite"

RESIZE_MODES = ("crop", "squash")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")


class ModelError(ValueError):
    """Raised when a model file is missing, unreadable or carries invalid metadata."""


@dataclass(frozen=True)
class PreprocessConfig:
    """How an image becomes the model's input tensor.

    Attributes:
        input_size: Input height and width in pixels.
        color_order: Channel order the model expects, ``"RGB"`` or ``"BGR"``.
        resize: ``"crop"`` resizes the shorter side to ``size / crop_fraction`` and
            takes the centre, keeping the aspect ratio. ``"squash"`` resizes straight
            to the input size and distorts the aspect ratio.
        crop_fraction: Fraction of the resized shorter side kept by ``"crop"``, in
            (0, 1]. 1.0 keeps the whole shorter side, 0.875 is the usual ImageNet
            evaluation crop.
        interpolation: Resampling filter: nearest, bilinear, bicubic or lanczos.
        mean: Per-channel mean subtracted from pixel values scaled to [0, 1].
        std: Per-channel standard deviation that divides the result, so the
            float input is ``(pixel / 255 - mean) / std``.
    """

    input_size: tuple[int, int] = (224, 224)
    color_order: str = "RGB"
    resize: str = "crop"
    crop_fraction: float = 1.0
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        height, width = self.input_size
        if height < 1 or width < 1:
            raise ModelError(f"invalid input_size {self.input_size}: both sides must be positive")
        if self.color_order not in ("RGB", "BGR"):
            raise ModelError(f"invalid color_order {self.color_order!r}: use 'RGB' or 'BGR'")
        if self.resize not in RESIZE_MODES:
            raise ModelError(f"invalid resize {self.resize!r}: use one of {', '.join(RESIZE_MODES)}")
        if not 0.0 < self.crop_fraction <= 1.0:
            raise ModelError(f"invalid crop_fraction {self.crop_fraction}: it must be in (0, 1]")
        if self.interpolation not in INTERPOLATIONS:
            raise ModelError(
                f"invalid interpolation {self.interpolation!r}: use one of {', '.join(INTERPOLATIONS)}"
            )
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ModelError(f"invalid mean {self.mean} or std {self.std}: give 3 values, std above 0")

    def to_dict(self) -> dict[str, Any]:
        """Return the config as JSON-ready values."""
        return {key: list(value) if isinstance(value, tuple) else value
                for key, value in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PreprocessConfig:
        """Build a config from `to_dict` output, rejecting unknown keys.

        Raises:
            ModelError: If a key is unknown or a value is invalid.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ModelError(f"unknown preprocess keys {sorted(unknown)}; known keys: {sorted(known)}")

        converted = dict(values)
        for key in ("input_size", "mean", "std"):
            if key in converted:
                converted[key] = tuple(converted[key])
        return cls(**converted)


@dataclass(frozen=True)
class ModelMetadata:
    """What the runtime knows about a model beyond its tensors.

    Attributes:
        preprocess: The preprocessing to apply before invoke.
        preprocess_source: ``"metadata"`` when read from the model file, ``"options"``
            when the caller gave it, ``"inferred"`` when derived from the input
            quantisation of a model without metadata.
        embedding_dim: Length of the output vector, or None when unknown.
        pooling: Pooling that produced the embedding (``"avg"``, ``"gem"``, ...), if known.
        l2_normalized: True when the graph already normalises its output.
        provenance: Free-form record of how the model was built: backbone, weight
            source and SHA-256, quantisation, calibration images, converter versions.
    """

    preprocess: PreprocessConfig
    preprocess_source: str = "metadata"
    embedding_dim: int | None = None
    pooling: str | None = None
    l2_normalized: bool = False
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        """Serialise the metadata as the JSON document stored in the model file."""
        document = {
            "schema": SCHEMA,
            "preprocess": self.preprocess.to_dict(),
            "embedding": {
                "dim": self.embedding_dim,
                "pooling": self.pooling,
                "l2_normalized": self.l2_normalized,
            },
            "provenance": self.provenance,
        }
        return json.dumps(document, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> ModelMetadata:
        """Parse the JSON document written by `to_json`.

        Raises:
            ModelError: If the document is not valid JSON or not of this schema.
        """
        try:
            document = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ModelError(f"the {METADATA_NAME!r} metadata is not valid JSON: {error}") from error

        if not isinstance(document, dict) or document.get("schema") != SCHEMA:
            raise ModelError(f"the {METADATA_NAME!r} metadata is not of schema {SCHEMA!r}")

        embedding = document.get("embedding") or {}
        return cls(
            preprocess=PreprocessConfig.from_dict(document.get("preprocess") or {}),
            preprocess_source="metadata",
            embedding_dim=embedding.get("dim"),
            pooling=embedding.get("pooling"),
            l2_normalized=bool(embedding.get("l2_normalized", False)),
            provenance=document.get("provenance") or {},
        )


def default_model_path() -> Path:
    """Return the path of the int8 EfficientNet-Lite0 embedder installed with the package.

    An installed package has the models as ``edgeembed._models``. A source checkout
    imported without installing has them in the ``models`` folder beside ``edgeembed``.

    Raises:
        ModelError: If the model file is in neither place.
    """
    try:
        path = Path(str(resources.files("edgeembed._models").joinpath(DEFAULT_MODEL_NAME)))
    except ModuleNotFoundError:
        path = Path(__file__).resolve().parent.parent / "models" / DEFAULT_MODEL_NAME

    if not path.is_file():
        raise ModelError(
            f"the default model {path} is missing; reinstall edgeembed or pass a model path"
        )
    return path


def read_model_bytes(path: str | Path) -> bytes:
    """Read a model file and check that it is a TFLite flatbuffer.

    Raises:
        ModelError: If the file is missing, unreadable or not a TFLite model.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise ModelError(f"cannot read model {path}: {error.strerror or error}") from error

    if len(data) < 8 or data[4:8] != b"TFL3":
        raise ModelError(f"{path} is not a TFLite model (no TFL3 identifier); pass a .tflite file")
    return data


def fingerprint(data: bytes) -> str:
    """Return the SHA-256 hex digest of a model file, used to pair galleries with models."""
    return hashlib.sha256(data).hexdigest()


def read_metadata(data: bytes, path: str | Path = "<model>") -> ModelMetadata | None:
    """Read the edgeembed metadata stored in a model, or None when it has none.

    Args:
        data: The model file's bytes.
        path: The file name used in error messages.

    Raises:
        ModelError: If the flatbuffer is corrupted or the metadata is invalid.
    """
    try:
        buffers = read_metadata_buffers(data)
    except FlatbufferError as error:
        raise ModelError(f"{path}: {error}") from error

    if METADATA_NAME not in buffers:
        return None

    try:
        return ModelMetadata.from_json(buffers[METADATA_NAME])
    except ModelError as error:
        raise ModelError(f"{path}: {error}") from error


def infer_preprocess(input_shape: tuple[int, ...], dtype: str, scale: float, zero_point: int) -> PreprocessConfig:
    """Derive preprocessing for a model without metadata from its input quantisation.

    Quantised image models conventionally take pixel values directly: the uint8 input
    is the 0..255 pixel and an int8 input is the pixel minus 128. The input's scale and
    zero point then say which float range the pixels stand for, for example [-1, 1]
    when scale is 1/127.5 and the zero point is 128. The crop keeps the whole shorter side.

    Args:
        input_shape: The input tensor shape, NHWC.
        dtype: The input dtype name: ``"uint8"``, ``"int8"`` or a float type.
        scale: The input quantisation scale (0 for float inputs).
        zero_point: The input quantisation zero point.

    Returns:
        The inferred config.

    Raises:
        ModelError: For float inputs, whose range cannot be inferred.
    """
    if len(input_shape) != 4 or input_shape[3] != 3:
        raise ModelError(f"expected an NHWC input with 3 channels, got shape {tuple(input_shape)}")

    if dtype not in ("uint8", "int8") or scale <= 0:
        raise ModelError(
            f"the model has a {dtype} input and no edgeembed metadata, so its normalisation "
            "cannot be inferred; pass preprocess options (mean and std)"
        )

    pixel_offset = 0 if dtype == "uint8" else 128
    std = 1.0 / (255.0 * scale)
    mean = (pixel_offset + zero_point) / 255.0
    return PreprocessConfig(
        input_size=(int(input_shape[1]), int(input_shape[2])),
        mean=(mean, mean, mean),
        std=(std, std, std),
    )
