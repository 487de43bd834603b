"""The optional embedding head: a PCA projection to fewer dimensions and in-graph L2 normalisation.

`fit_pca` fits the projection on float embeddings of the calibration photos.
`ProjectedFeatures` puts it into the graph as a MatMul plus bias after the pooled
features, and optionally L2-normalises the result, before the model is converted, so
the projection is quantised with the rest of the network. A smaller embedding makes
the gallery smaller and its search faster.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import tensorflow as tf

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeadOptions:
    """Layers added after the pooled features.

    Attributes:
        dim: Project to this many dimensions with PCA; None keeps the pooled features.
        l2_normalize: Scale the embedding to unit length inside the graph (TFLite's
            L2_NORMALIZATION op), so the model itself returns unit vectors.
    """

    dim: int | None = None
    l2_normalize: bool = False

    def __post_init__(self) -> None:
        if self.dim is not None and self.dim < 1:
            raise ValueError(f"invalid projection dimension {self.dim}; it must be a positive integer")

    @property
    def changes_graph(self) -> bool:
        """True when the head adds ops after the pooled features."""
        return self.dim is not None or self.l2_normalize


@dataclass(frozen=True)
class Projection:
    """A PCA projection ``(x - mean) @ components.T``.

    Attributes:
        mean: Mean embedding of the fitting set, shape (C,).
        components: Principal axes, one per row, shape (D, C), orthonormal rows.
        explained_variance_ratio: Share of the fitting set's variance along each axis, shape (D,).
        n_samples: Number of embeddings the projection was fitted on.
    """

    mean: np.ndarray
    components: np.ndarray
    explained_variance_ratio: np.ndarray
    n_samples: int

    @property
    def dim(self) -> int:
        """Output dimension D."""
        return int(self.components.shape[0])

    @property
    def kernel(self) -> np.ndarray:
        """MatMul weights (C, D), float32."""
        return np.ascontiguousarray(self.components.T, dtype=np.float32)

    @property
    def bias(self) -> np.ndarray:
        """Bias (D,), float32, that subtracts the projected mean."""
        return (-self.mean @ self.components.T).astype(np.float32)

    def apply(self, embeddings: np.ndarray) -> np.ndarray:
        """Project embeddings (N, C) to (N, D) in float64."""
        return (embeddings.astype(np.float64) - self.mean) @ self.components.T

    def record(self) -> dict[str, Any]:
        """Return the provenance entry stored in the model metadata."""
        return {
            "method": "pca",
            "input_dim": int(self.components.shape[1]),
            "dim": self.dim,
            "fitted_on": f"float32 embeddings of {self.n_samples} calibration photos",
            "explained_variance": round(float(self.explained_variance_ratio.sum()), 6),
        }


def fit_pca(embeddings: np.ndarray, dim: int) -> Projection:
    """Fit a PCA projection to `dim` dimensions, in float64.

    Each axis is signed so that its largest loading is positive, which makes the result
    independent of the SVD routine's sign choice.

    Args:
        embeddings: Float embeddings (N, C).
        dim: Output dimension.

    Returns:
        The projection.

    Raises:
        ValueError: If `dim` exceeds C, or is not below N, because N centred
            embeddings span at most N - 1 directions.
    """
    count, width = embeddings.shape
    if dim > width:
        raise ValueError(f"--dim {dim} is larger than the {width} pooled features; pass at most {width}")
    if dim >= count:
        raise ValueError(
            f"--dim {dim} needs more than {dim} calibration photos, because {count} photos give "
            f"at most {count - 1} principal axes; add photos to --calib or lower --dim"
        )

    data = embeddings.astype(np.float64)
    mean = data.mean(axis=0)
    _, singular_values, axes = np.linalg.svd(data - mean, full_matrices=False)

    components = axes[:dim]
    signs = np.sign(components[np.arange(dim), np.argmax(np.abs(components), axis=1)])
    components = components * signs[:, None]

    variance = singular_values ** 2
    ratio = variance[:dim] / max(float(variance.sum()), 1e-300)
    logger.info("PCA to %d of %d dimensions keeps %.1f%% of the calibration variance",
                dim, width, 100.0 * ratio.sum())
    return Projection(mean=mean, components=components, explained_variance_ratio=ratio, n_samples=count)


class ProjectedFeatures(tf.Module):
    """A feature extractor followed by an optional projection and optional L2 normalisation.

    It offers what `edgeembed.toolchain.convert.convert` uses of the base extractor
    (``spec``, ``input_size``, ``layer_names`` and ``concrete_function``), so it
    converts the same way.

    Args:
        base: The extractor, e.g. `edgeembed.toolchain.extractor.FrozenFeatures`.
        projection: The PCA projection, or None to keep the base features.
        l2_normalize: Append an L2 normalisation.
    """

    def __init__(self, base: Any, projection: Projection | None, l2_normalize: bool) -> None:
        super().__init__(name=None)
        self.base = base
        self.spec = base.spec
        self.input_size = base.input_size
        self.projection = projection
        self.l2_normalize = l2_normalize
        self.embedding_dim = projection.dim if projection is not None else int(base.embedding_dim)

        self._kernel = None if projection is None else tf.constant(projection.kernel)
        self._bias = None if projection is None else tf.constant(projection.bias)
        height, width = self.input_size
        self._call = tf.function(
            self._embed,
            input_signature=[tf.TensorSpec((1, height, width, 3), tf.float32, name="image")],
            autograph=False,
        )

    def _embed(self, image: tf.Tensor) -> tf.Tensor:
        x = self.base(image)
        if self._kernel is not None:
            x = tf.nn.bias_add(tf.matmul(x, self._kernel), self._bias, name="projection")
        if self.l2_normalize:
            x = tf.math.l2_normalize(x, axis=-1, name="l2_normalize")
        return x

    def __call__(self, image: tf.Tensor | np.ndarray) -> tf.Tensor:
        """Compute the (1, D) embedding of one float32 image of shape (1, height, width, 3)."""
        return self._call(tf.convert_to_tensor(image, tf.float32))

    def concrete_function(self) -> Callable:
        """Return the traced function that `tf.lite.TFLiteConverter` converts."""
        return self._call.get_concrete_function()

    def layer_names(self) -> list[str]:
        """Return the base extractor's layer names."""
        return self.base.layer_names()

    def features_batch(self, images: np.ndarray) -> np.ndarray:
        """Compute the embeddings (N, D) of float32 images (N, height, width, 3), one at a time."""
        return np.concatenate([self(image[None]).numpy() for image in images], axis=0)

    def record(self) -> dict[str, Any]:
        """Return the provenance entry of the head."""
        return {
            "projection": None if self.projection is None else self.projection.record(),
            "l2_normalize": self.l2_normalize,
        }


def attach_head(base: Any, head: HeadOptions, calibration_inputs: np.ndarray | None) -> Any:
    """Return the base extractor, or the base with the requested projection and normalisation.

    Args:
        base: An extractor with ``features_batch``, ``spec``, ``input_size``,
            ``embedding_dim``, ``layer_names`` and ``concrete_function``.
        head: The requested head.
        calibration_inputs: Float inputs (N, H, W, 3) to fit the PCA on; required with ``dim``.

    Raises:
        ValueError: If a projection is requested without calibration inputs, or with
            an impossible dimension.
    """
    if not head.changes_graph:
        return base

    projection = None
    if head.dim is not None:
        if calibration_inputs is None or len(calibration_inputs) == 0:
            raise ValueError("--dim fits a PCA on calibration photos; pass --calib IMAGE_DIR")
        projection = fit_pca(base.features_batch(calibration_inputs), head.dim)
    return ProjectedFeatures(base, projection, head.l2_normalize)

