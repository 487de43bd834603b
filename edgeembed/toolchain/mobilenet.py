"""MobileNetV2 and MobileNetV3 backbones from Keras applications, with their weights.

A weights source is ``imagenet`` (Keras's own ImageNet weights, downloaded once into
the Keras cache ``~/.keras/models/``), the path of such a weights file (``.h5``, for
machines without internet), or ``random`` (seeded random weights, for tests only).
The backbone is built without its classifier and with global average pooling, then
frozen (`edgeembed.toolchain.from_keras.freeze_keras_model`).

Preprocessing differs between the two families. Keras MobileNetV2 expects RGB scaled
to [-1, 1]. Keras MobileNetV3 rescales inside the model, so it takes the pixel values
0..255 as floats.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from edgeembed.toolchain.extractor import PIXEL_RANGE, SIGNED_UNIT_RANGE, GraphSource, Normalization
from edgeembed.toolchain.from_keras import freeze_keras_model
from edgeembed.toolchain.weights import IMAGENET_SOURCE, RANDOM_SEED, RANDOM_SOURCE, WeightsError, sha256_file

logger = logging.getLogger(__name__)

# Keras builds these backbones down to 32 pixels.
MIN_INPUT_SIZE = 32

# Input sizes with their own MobileNetV2 ImageNet weight files. At other sizes Keras
# loads the 224-pixel weights, as this module does.
MOBILENET_V2_WEIGHT_SIZES = (96, 128, 160, 192, 224)


@dataclass(frozen=True)
class KerasBackbone:
    """One Keras-applications backbone family.

    Attributes:
        name: Backbone name as the command spells it.
        application: Name of the constructor in ``keras.applications``.
        alphas: Width multipliers with ImageNet weights.
        image_size: Default input side in pixels.
        normalization: The float input the model expects.
        has_minimalistic: True for MobileNetV3, which has minimalistic variants
            (no squeeze-and-excitation, ReLU in place of hard-swish, 3x3 kernels).
    """

    name: str
    application: str
    alphas: tuple[float, ...]
    image_size: int
    normalization: Normalization
    has_minimalistic: bool


KERAS_BACKBONES: dict[str, KerasBackbone] = {
    spec.name: spec
    for spec in (
        KerasBackbone("mobilenet_v2", "MobileNetV2", (0.35, 0.5, 0.75, 1.0, 1.3, 1.4), 224,
                      SIGNED_UNIT_RANGE, has_minimalistic=False),
        KerasBackbone("mobilenet_v3_small", "MobileNetV3Small", (0.75, 1.0), 224,
                      PIXEL_RANGE, has_minimalistic=True),
        KerasBackbone("mobilenet_v3_large", "MobileNetV3Large", (0.75, 1.0), 224,
                      PIXEL_RANGE, has_minimalistic=True),
    )
}


@dataclass(frozen=True)
class MobileNetConfig:
    """Variant of a Keras MobileNet: width, input size and the minimalistic option.

    Attributes:
        backbone: One of `KERAS_BACKBONES`.
        alpha: Width multiplier.
        input_size: Input side in pixels; None uses the backbone's default.
        minimalistic: Build the minimalistic MobileNetV3 variant.
    """

    backbone: str
    alpha: float = 1.0
    input_size: int | None = None
    minimalistic: bool = False

    def __post_init__(self) -> None:
        if self.backbone not in KERAS_BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; Keras backbones: {', '.join(KERAS_BACKBONES)}")

        spec = self.spec
        if self.alpha not in spec.alphas:
            raise ValueError(f"invalid --alpha {self.alpha} for {self.backbone}; use one of "
                             f"{', '.join(str(alpha) for alpha in spec.alphas)}")
        if self.minimalistic and not spec.has_minimalistic:
            raise ValueError(f"--minimalistic applies to MobileNetV3 only, not to {self.backbone}")
        if self.input_size is not None and self.input_size < MIN_INPUT_SIZE:
            raise ValueError(f"invalid --input-size {self.input_size} for {self.backbone}; "
                             f"Keras needs at least {MIN_INPUT_SIZE} pixels")

    @property
    def spec(self) -> KerasBackbone:
        """The backbone family."""
        return KERAS_BACKBONES[self.backbone]

    @property
    def size(self) -> int:
        """The input side in pixels."""
        return self.input_size or self.spec.image_size

    def describe(self) -> dict[str, object]:
        """Return the variant as a provenance record."""
        record: dict[str, object] = {"alpha": self.alpha, "input_size": self.size}
        if self.spec.has_minimalistic:
            record["minimalistic"] = self.minimalistic
        return record


@dataclass(frozen=True)
class WeightFile:
    """An ImageNet weights file of Keras applications.

    Attributes:
        name: File name in the Keras cache folder ``models/``.
        origin: Download URL.
        file_hash: Expected hash (Keras checks it), or None when Keras publishes none.
    """

    name: str
    origin: str
    file_hash: str | None


def imagenet_weight_file(config: MobileNetConfig) -> WeightFile:
    """Name the Keras ImageNet weights file (no classifier) of a variant, as Keras applications do.

    Raises:
        WeightsError: If Keras publishes no ImageNet weights for this variant.
    """
    # NOTE: the URLs and hashes are module constants of Keras 3 (checked with Keras
    # 3.15). Reading them keeps the download identical to keras.applications.
    from keras.src.applications import mobilenet_v2, mobilenet_v3

    if config.backbone == "mobilenet_v2":
        rows = config.size if config.size in MOBILENET_V2_WEIGHT_SIZES else 224
        name = f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{float(config.alpha)}_{rows}_no_top.h5"
        return WeightFile(name, mobilenet_v2.BASE_WEIGHT_PATH + name, None)

    model_type = config.backbone.removeprefix("mobilenet_v3_")
    variant = f"{model_type}{'_minimalistic' if config.minimalistic else ''}_224_{float(config.alpha)}_float"
    if variant not in mobilenet_v3.WEIGHTS_HASHES:
        raise WeightsError(
            f"Keras has no ImageNet weights for {config.backbone} alpha {config.alpha}"
            f"{' minimalistic' if config.minimalistic else ''}; minimalistic variants exist for alpha 1.0 only"
        )
    name = f"weights_mobilenet_v3_{variant}_no_top_v2.h5"
    return WeightFile(name, mobilenet_v3.BASE_WEIGHT_PATH + name, mobilenet_v3.WEIGHTS_HASHES[variant][1])


def fetch_imagenet_weights(config: MobileNetConfig, cache_dir: str | Path | None = None) -> Path:
    """Return the cached ImageNet weights file of a variant, downloading it when missing.

    Args:
        config: The variant.
        cache_dir: Keras cache folder; None uses Keras's default (``$KERAS_HOME`` or ``~/.keras``).

    Raises:
        WeightsError: If the file is not cached and the download fails, naming the
            file to place in the cache or to pass with ``--weights``.
    """
    weight_file = imagenet_weight_file(config)
    try:
        path = keras.utils.get_file(weight_file.name, weight_file.origin, cache_subdir="models",
                                    file_hash=weight_file.file_hash, cache_dir=cache_dir)
    # keras.utils.get_file raises a bare Exception for URL failures and ValueError
    # for a hash mismatch (Keras 3.15).
    except Exception as error:
        raise WeightsError(
            f"cannot download the ImageNet weights {weight_file.name} ({error}). On a machine without "
            f"internet, download {weight_file.origin} elsewhere, then copy it into ~/.keras/models/ "
            f"or pass it as --weights PATH.h5"
        ) from error
    return Path(path)


def build_backbone(config: MobileNetConfig) -> keras.Model:
    """Build the backbone without classifier, with global average pooling and no weights."""
    constructor = getattr(keras.applications, config.spec.application)
    options = {"minimalistic": config.minimalistic} if config.spec.has_minimalistic else {}
    return constructor(
        input_shape=(config.size, config.size, 3),
        alpha=config.alpha,
        include_top=False,
        weights=None,
        pooling="avg",
        **options,
    )


def randomize_weights(model: keras.Model, seed: int = RANDOM_SEED) -> None:
    """Give every convolution seeded He-normal weights, leaving batch norms at identity.

    Keras's default Glorot initialisation shrinks the activations of these deep ReLU6
    networks to about 1e-10 at the output, which int8 rounds to zero, so tests could
    not compare anything. The features are meaningless either way.
    """
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if not isinstance(layer, keras.layers.Conv2D | keras.layers.DepthwiseConv2D):
            continue
        kernel = layer.weights[0]
        height, width, channels, _ = kernel.shape
        fan_in = height * width if isinstance(layer, keras.layers.DepthwiseConv2D) else height * width * channels
        kernel.assign(rng.normal(0.0, np.sqrt(2.0 / fan_in), kernel.shape).astype(np.float32))


# Layers of the with-top Keras application files that the pooled backbone does not have.
CLASSIFIER_LAYERS = frozenset({"predictions"})


def saved_layer_names(path: Path) -> list[str] | None:
    """Return the layer names of a legacy Keras HDF5 weights or model file, or None for other layouts.

    Raises:
        OSError: If the file is not a readable HDF5 file.
    """
    import h5py

    with h5py.File(path, "r") as file:
        group = file["model_weights"] if "model_weights" in file else file
        names = group.attrs.get("layer_names")
    if names is None:
        return None
    return [name.decode() if isinstance(name, bytes) else str(name) for name in names]


def load_weight_file(model: keras.Model, path: Path, config: MobileNetConfig) -> None:
    """Load a Keras weights file, with or without the classifier, into the backbone.

    A with-top file (e.g. ``..._1.0_224.h5``) also has the ``predictions`` layer; its
    layers are then loaded by name and the classifier is left out.

    Raises:
        WeightsError: If the file is missing, unreadable or made for another variant.
    """
    if not path.is_file():
        raise WeightsError(f"weights file {path} not found; pass a Keras .h5 weights file, 'imagenet' or 'random'")
    if not path.name.endswith((".h5", ".hdf5")):
        raise WeightsError(f"{path} is not a Keras weights file; {config.backbone} takes .h5 files, "
                           "'imagenet' or 'random'")
    variant = f"{config.backbone} alpha {config.alpha}{' minimalistic' if config.minimalistic else ''}"

    try:
        saved = saved_layer_names(path)
    except OSError as error:
        raise WeightsError(f"cannot read {path} as an HDF5 file: {error}") from error
    # Loading by name skips layers that the file lacks, so it is used only when the file
    # has every weighted layer of the backbone. A shape that differs still raises.
    weighted = {layer.name for layer in model.layers if layer.weights}
    with_top = saved is not None and weighted | CLASSIFIER_LAYERS <= set(saved)

    try:
        if with_top:
            model.load_weights(str(path), by_name=True)
        else:
            model.load_weights(str(path))
    except (ValueError, OSError, KeyError) as error:
        reason = " ".join(str(error).split())[:300] or type(error).__name__
        raise WeightsError(f"cannot load {path} into {variant}: {reason}; check --alpha and --minimalistic") from error
    if with_top:
        logger.info("Loaded %s without its classifier layer", path.name)


def load_mobilenet(config: MobileNetConfig, source: str, cache_dir: str | Path | None = None) -> GraphSource:
    """Build a Keras MobileNet with weights and freeze it as an embedder.

    Args:
        config: The variant.
        source: ``"imagenet"``, ``"random"`` or the path of a Keras ``.h5`` weights file.
        cache_dir: Keras cache folder for ``imagenet``; None uses Keras's default.

    Returns:
        The frozen extractor and its provenance.

    Raises:
        WeightsError: If the weights cannot be found, downloaded or loaded.
    """
    path = None
    if source == RANDOM_SOURCE:
        description = f"random (seed {RANDOM_SEED})"
    elif source == IMAGENET_SOURCE:
        path = fetch_imagenet_weights(config, cache_dir)
        description = f"imagenet: {path.name} (Keras applications {keras.__version__})"
        if config.backbone == "mobilenet_v2" and config.size not in MOBILENET_V2_WEIGHT_SIZES:
            logger.warning("No ImageNet weights were trained at %d pixels; using the 224-pixel ones", config.size)
        elif config.backbone != "mobilenet_v2" and config.size != 224:
            logger.warning("The MobileNetV3 ImageNet weights were trained at 224 pixels, not %d", config.size)
    else:
        path = Path(source)
        description = path.name

    model = build_backbone(config)
    if path is not None:
        load_weight_file(model, path, config)
    else:
        randomize_weights(model)

    logger.info("Built %s (%s), %d-d features", config.backbone, description, model.output_shape[-1])
    size = (config.size, config.size)
    return GraphSource(
        features=freeze_keras_model(model, size, config.backbone),
        preprocess=config.spec.normalization.preprocess(size),
        backbone=config.backbone,
        weights_description=description,
        weights_sha256=sha256_file(path) if path is not None else None,
        pooling="avg",
        details=config.describe(),
    )
