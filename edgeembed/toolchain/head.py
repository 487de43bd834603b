"""Train a linear projection head with a metric-learning loss on frozen float features.

The photos of a labelled folder (one sub-folder per class, as for ``edgeembed eval``)
are embedded with the float feature extractor and split per class into training and
held-out photos. A linear map ``features -> D`` is then trained on the training photos
with a triplet, contrastive or supervised contrastive (SupCon) loss on unit-length
outputs. Batches hold `HeadTrainingOptions.images_per_class` photos of each of
`HeadTrainingOptions.classes_per_batch` classes, so every batch has positives and
negatives to mine. Training stops when the mAP of the held-out photos (queries)
against the training photos (gallery) has not improved for
`HeadTrainingOptions.patience` epochs, and the best epoch's weights are kept.

The result is a kernel and a bias that `edgeembed.toolchain.projection.ProjectedFeatures`
folds into the graph before quantisation. Training uses PyTorch on the CPU.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeembed.evaluate import EvaluationResult, evaluate, list_labelled_images
from edgeembed.model import PreprocessConfig
from edgeembed.toolchain.images import ImageSet, float_inputs, load_pixels
from edgeembed.toolchain.metric_learning import LOSSES, metric_loss, pk_batches

logger = logging.getLogger(__name__)

# Photos are decoded and embedded in chunks of this many, to bound memory.
_CHUNK = 64

# An epoch has at least this many batches, so that small training sets do not spend
# most of their time on the held-out evaluation after every epoch.
_MIN_BATCHES_PER_EPOCH = 10


@dataclass(frozen=True)
class HeadTrainingOptions:
    """How to train the projection head.

    Attributes:
        dim: Output dimension D of the projection.
        loss: ``"triplet"`` (batch-hard triplets), ``"contrastive"`` (pairs, with only
            the negatives inside the margin counted) or ``"supcon"`` (supervised
            contrastive, whose softmax weights the hardest negatives most).
        held_out_fraction: Share of each class's photos held out for early stopping
            and for the before-and-after report. A class keeps at least one photo for
            training, and has photos held out only when it has two or more.
        max_epochs: Upper bound on training epochs.
        patience: Epochs without a better held-out mAP before training stops.
        learning_rate: Adam learning rate.
        weight_decay: Adam weight decay.
        classes_per_batch: Classes drawn for each batch.
        images_per_class: Photos drawn per class and batch, with repeats when a class has fewer.
        margin: In cosine similarity: the triplet loss wants each anchor's hardest
            positive this much more similar than its hardest negative, and the
            contrastive loss pushes negatives below this similarity.
        temperature: Softmax temperature of the SupCon loss.
        seed: Seed of the split, the initial weights and the batch order.
    """

    dim: int
    loss: str = "supcon"
    held_out_fraction: float = 0.2
    max_epochs: int = 200
    patience: int = 20
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    classes_per_batch: int = 16
    images_per_class: int = 4
    margin: float = 0.2
    temperature: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise ValueError(f"invalid head dimension {self.dim}; it must be a positive integer")
        if self.loss not in LOSSES:
            raise ValueError(f"invalid loss {self.loss!r}; use one of {', '.join(LOSSES)}")
        if not 0.0 < self.held_out_fraction < 1.0:
            raise ValueError(f"invalid held-out fraction {self.held_out_fraction}; it must be in (0, 1)")
        if self.classes_per_batch < 2 or self.images_per_class < 2:
            raise ValueError("a batch needs at least 2 classes and 2 photos per class to mine pairs")


@dataclass(frozen=True)
class HeadRequest:
    """A head to train during a model build.

    Attributes:
        labelled_dir: Folder with one sub-folder of photos per class.
        options: Training options.
    """

    labelled_dir: Path
    options: HeadTrainingOptions


@dataclass
class LabelledFeatures:
    """Float features of labelled photos.

    Attributes:
        features: Float32 array (N, C).
        labels: Class index of each row, shape (N,).
        class_names: Class sub-folder name of each class index.
        photos: The photos that decoded, with a description for the provenance.
    """

    features: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    photos: ImageSet


@dataclass(frozen=True)
class TrainedProjection:
    """A trained linear head ``features @ kernel + bias``.

    It has the attributes that `edgeembed.toolchain.projection.ProjectedFeatures` reads
    from a projection (`dim`, `kernel`, `bias`, `record`).

    Attributes:
        kernel: MatMul weights (C, D), float32, with the feature standardisation folded in.
        bias: Bias (D,), float32.
        training: Provenance: loss, options, training set and held-out results.
    """

    kernel: np.ndarray
    bias: np.ndarray
    training: dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        """Output dimension D."""
        return int(self.kernel.shape[1])

    def apply(self, features: np.ndarray) -> np.ndarray:
        """Project features (N, C) to (N, D) in float64."""
        return features.astype(np.float64) @ self.kernel.astype(np.float64) + self.bias

    def record(self) -> dict[str, Any]:
        """Return the provenance entry stored in the model metadata."""
        return {"method": "trained", "input_dim": int(self.kernel.shape[0]), "dim": self.dim, **self.training}


@dataclass
class HeadTrainingResult:
    """A trained head and how it changed retrieval on the held-out photos.

    Attributes:
        projection: The head.
        before: Held-out photos as queries against the training photos, base features.
        after: The same with the head applied.
        best_epoch: Epoch whose weights were kept (1-based).
        epochs_run: Epochs trained before stopping.
        seconds: Time spent training, without the embedding of the photos.
    """

    projection: TrainedProjection
    before: EvaluationResult
    after: EvaluationResult
    best_epoch: int
    epochs_run: int
    seconds: float


def embed_labelled_photos(extractor: Any, folder: Path, config: PreprocessConfig) -> LabelledFeatures:
    """Embed the photos of a labelled folder with a float extractor, skipping unreadable ones.

    Args:
        extractor: A model with ``features_batch(float_inputs) -> (N, C)``.
        folder: One sub-folder of photos per class.
        config: The preprocessing of the extractor.

    Returns:
        The features, class indices and photos.

    Raises:
        edgeembed.evaluate.LabelledFolderError: If the folder layout is wrong.
        ValueError: If no photo of the folder could be decoded.
    """
    items = list_labelled_images(folder)
    class_names = sorted({label for _, label in items})
    index = {name: number for number, name in enumerate(class_names)}

    features, labels, loaded = [], [], []
    for start in range(0, len(items), _CHUNK):
        chunk = dict(items[start:start + _CHUNK])
        try:
            pixels, paths = load_pixels(list(chunk), config, "head training")
        except ValueError as error:
            # load_pixels has logged each photo it skipped.
            logger.warning("%s", error)
            continue
        features.append(extractor.features_batch(float_inputs(pixels, config)))
        labels += [index[chunk[path]] for path in paths]
        loaded += paths
    if not loaded:
        raise ValueError(f"none of the {len(items)} photos in {folder} could be decoded")

    description = f"{Path(folder).name}/: {len(loaded)} photos in {len(class_names)} class folders"
    return LabelledFeatures(np.concatenate(features).astype(np.float32), np.array(labels),
                            class_names, ImageSet(tuple(loaded), Path(folder), description))


def split_held_out(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split row indices per class into training and held-out rows.

    Each class holds out ``round(fraction * count)`` photos, at least one when it has
    two or more, and always keeps at least one for training.

    Returns:
        Sorted training and held-out row indices.
    """
    rng = np.random.default_rng(seed)
    train, held_out = [], []
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        count = 0 if len(rows) < 2 else min(len(rows) - 1, max(1, round(fraction * len(rows))))
        held_out += rows[:count].tolist()
        train += rows[count:].tolist()
    return np.array(sorted(train)), np.array(sorted(held_out))


def _initial_kernel(standardised: np.ndarray, dim: int, rng: np.random.Generator) -> np.ndarray:
    """Return (C, D) starting weights: the principal axes of the training features, as many as
    the photos give, then random orthonormal columns."""
    kernel, _ = np.linalg.qr(rng.normal(size=(standardised.shape[1], dim)))

    _, _, axes = np.linalg.svd(standardised - standardised.mean(axis=0), full_matrices=False)
    usable = min(dim, len(standardised) - 1)
    kernel[:, :usable] = axes[:usable].T
    return kernel.astype(np.float32)


def _held_out_result(projected_train: np.ndarray, train_labels: np.ndarray, projected_held_out: np.ndarray,
                     held_out_labels: np.ndarray) -> EvaluationResult:
    return evaluate(projected_held_out, held_out_labels.tolist(),
                    gallery_vectors=projected_train, gallery_labels=train_labels.tolist())


def fit_projection(features: np.ndarray, labels: np.ndarray, train: np.ndarray, held_out: np.ndarray,
                   options: HeadTrainingOptions) -> tuple[TrainedProjection, HeadTrainingResult]:
    """Train the projection on the training rows, stopping early on the held-out rows.

    Args:
        features: Float features (N, C) of every photo.
        labels: Class index of each row.
        train: Training row indices.
        held_out: Held-out row indices (at least one class must have rows on both sides).
        options: Training options.

    Returns:
        The projection, and the training result with the held-out metrics.
    """
    import torch

    if options.dim > features.shape[1]:
        raise ValueError(f"--dim {options.dim} is larger than the {features.shape[1]} pooled features; "
                         f"pass at most {features.shape[1]}")

    started = time.perf_counter()
    torch.manual_seed(options.seed)
    rng = np.random.default_rng(options.seed)

    # Standardising each feature makes one learning rate suit every backbone and layer.
    # The floor keeps near-constant features (dead channels) from getting huge weights,
    # which an int8 fully connected layer could not represent.
    mean = features[train].mean(axis=0)
    std = features[train].std(axis=0)
    std = np.maximum(std, 0.1 * max(float(np.median(std)), 1e-12))
    standardised = ((features - mean) / std).astype(np.float32)

    kernel = torch.nn.Parameter(torch.from_numpy(_initial_kernel(standardised[train], options.dim, rng)))
    bias = torch.nn.Parameter(torch.zeros(options.dim))
    optimizer = torch.optim.Adam([kernel, bias], lr=options.learning_rate, weight_decay=options.weight_decay)
    inputs = torch.from_numpy(standardised)
    targets = torch.from_numpy(labels.astype(np.int64))

    def project() -> np.ndarray:
        with torch.no_grad():
            return (inputs @ kernel + bias).numpy()

    before = _held_out_result(features[train], labels[train], features[held_out], labels[held_out])
    best_map, best_epoch, best_weights = -1.0, 0, None
    epoch = 0
    for epoch in range(1, options.max_epochs + 1):
        for rows in pk_batches(labels[train], options.classes_per_batch, options.images_per_class, _MIN_BATCHES_PER_EPOCH, rng):
            batch = torch.from_numpy(train[rows])
            outputs = torch.nn.functional.normalize(inputs[batch] @ kernel + bias, dim=1)
            loss = metric_loss(options.loss, outputs, targets[batch], options.margin, options.temperature)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        projected = project()
        evaluation = _held_out_result(projected[train], labels[train], projected[held_out], labels[held_out])
        score = evaluation.mean_average_precision
        # Ties go to the later epoch: the held-out mAP often saturates near 1 while the
        # embedding still improves for photos that were never seen.
        if score >= best_map:
            best_map, best_epoch = score, epoch
            best_weights = (kernel.detach().clone().numpy(), bias.detach().clone().numpy())
        elif epoch - best_epoch >= options.patience:
            break
    if epoch == options.max_epochs and epoch - best_epoch < options.patience:
        logger.info("Head training reached the cap of %d epochs; the held-out mAP matched its best (%.3f) at "
                    "epoch %d, within the last %d epochs", epoch, best_map, best_epoch, options.patience)
    else:
        logger.info("Head training stopped after %d epochs; epoch %d had the best held-out mAP %.3f",
                    epoch, best_epoch, best_map)

    # Fold the standardisation into the kernel and bias: ((x - mean) / std) @ W + b.
    trained_kernel, trained_bias = best_weights
    folded_kernel = (trained_kernel / std[:, None]).astype(np.float32)
    folded_bias = (trained_bias - (mean / std) @ trained_kernel).astype(np.float32)
    projection = TrainedProjection(folded_kernel, folded_bias)

    projected = projection.apply(features)
    after = _held_out_result(projected[train], labels[train], projected[held_out], labels[held_out])
    result = HeadTrainingResult(projection, before, after, best_epoch, epoch, time.perf_counter() - started)
    return projection, result


def train_head(extractor: Any, request: HeadRequest, config: PreprocessConfig) -> HeadTrainingResult:
    """Embed a labelled folder with a frozen float extractor and train a projection head on it.

    Args:
        extractor: A model with ``features_batch(float_inputs) -> (N, C)``.
        request: The labelled folder and the training options.
        config: The preprocessing of the extractor.

    Returns:
        The trained head, with its provenance record filled in, and the held-out metrics.

    Raises:
        edgeembed.evaluate.LabelledFolderError: If the folder layout is wrong.
        ValueError: If fewer than two classes have two or more photos, so nothing can
            be held out or mined.
    """
    options = request.options
    data = embed_labelled_photos(extractor, request.labelled_dir, config)
    train, held_out = split_held_out(data.labels, options.held_out_fraction, options.seed)
    if len(np.unique(data.labels[held_out])) < 2:
        raise ValueError(
            f"{request.labelled_dir} needs at least two classes with two or more photos each to train a head"
        )

    projection, result = fit_projection(data.features, data.labels, train, held_out, options)
    training = {
        "loss": options.loss,
        "options": {key: value for key, value in vars(options).items() if key not in ("dim", "loss")},
        "training_set": {**data.photos.provenance(), "n_classes": len(data.class_names)},
        "held_out": {
            "n_images": int(len(held_out)),
            "protocol": "held-out photos as queries, training photos as gallery",
            "before": _metrics(result.before),
            "after": _metrics(result.after),
        },
        "best_epoch": result.best_epoch,
    }
    result.projection = TrainedProjection(projection.kernel, projection.bias, training)
    logger.info("Head on %d photos: held-out mAP %.3f -> %.3f, recall@1 %.3f -> %.3f",
                len(train), result.before.mean_average_precision, result.after.mean_average_precision,
                result.before.recall_at_1, result.after.recall_at_1)
    if result.after.mean_average_precision < result.before.mean_average_precision:
        logger.warning("The trained head retrieves the held-out photos worse than the features without it "
                       "(mAP %.3f -> %.3f); more photos per class or another --loss may help",
                       result.before.mean_average_precision, result.after.mean_average_precision)
    return result


def _metrics(result: EvaluationResult) -> dict[str, float]:
    return {"recall@1": round(result.recall_at_1, 4), "recall@5": round(result.recall_at_5, 4),
            "mAP": round(result.mean_average_precision, 4)}


def attach_trained_head(extractor: Any, request: HeadRequest, config: PreprocessConfig, l2_normalize: bool = False):
    """Train a head for a float extractor and return the extractor with the head in its graph.

    Args:
        extractor: The float feature extractor, e.g.
            `edgeembed.toolchain.efficientnet_lite.EfficientNetLiteFeatures`.
        request: The labelled folder and the training options.
        config: The preprocessing of the extractor.
        l2_normalize: Also L2-normalise the head's output inside the graph.

    Returns:
        An `edgeembed.toolchain.projection.ProjectedFeatures` whose ``record()`` contains
        the training provenance and the held-out results.

    Raises:
        edgeembed.evaluate.LabelledFolderError: If the folder layout is wrong.
        ValueError: If the folder has too few usable classes or photos.
    """
    from edgeembed.toolchain.projection import ProjectedFeatures

    result = train_head(extractor, request, config)
    return ProjectedFeatures(extractor, result.projection, l2_normalize)
