"""EfficientNet-Lite0..4 layer plan, shared by the TensorFlow model and the weight port.

EfficientNet-Lite is EfficientNet-B0 without squeeze-and-excitation, with ReLU6 in
place of swish, and with the stem (32 filters) and head (1280 filters) kept at their
base width at every scale. The first and last block stages keep their base repeat
count too. These rules and the coefficients below follow the TensorFlow reference
``efficientnet/lite/efficientnet_lite_builder.py`` as ported by the
``efficientnet-lite-pytorch`` package 0.1.0 (``fix_head_stem=True``), so the layer
names and shapes here match that package's state dicts.

This module needs no TensorFlow or PyTorch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

STEM_FILTERS = 32
HEAD_FILTERS = 1280
BATCH_NORM_EPSILON = 1e-3
DEPTH_DIVISOR = 8


@dataclass(frozen=True)
class BackboneSpec:
    """Scaling of one EfficientNet-Lite variant.

    Attributes:
        name: Backbone name as the toolchain spells it, e.g. ``"efficientnet_lite0"``.
        width: Width coefficient that multiplies the block filter counts.
        depth: Depth coefficient that multiplies the block repeat counts.
        image_size: Native input height and width in pixels.
    """

    name: str
    width: float
    depth: float
    image_size: int


@dataclass(frozen=True)
class BlockSpec:
    """One inverted-residual (MBConv) block after scaling.

    Attributes:
        index: Position in the network, as in the state-dict keys ``_blocks.{index}``.
        kernel_size: Depthwise kernel height and width.
        stride: Depthwise stride.
        expand_ratio: Expansion factor of the 1x1 expand convolution (1 means no expansion).
        input_filters: Channels entering the block.
        output_filters: Channels leaving the block.
    """

    index: int
    kernel_size: int
    stride: int
    expand_ratio: int
    input_filters: int
    output_filters: int

    @property
    def expanded_filters(self) -> int:
        """Channels of the depthwise convolution."""
        return self.input_filters * self.expand_ratio

    @property
    def has_residual(self) -> bool:
        """True when the block adds its input to its output."""
        return self.stride == 1 and self.input_filters == self.output_filters


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec("efficientnet_lite0", width=1.0, depth=1.0, image_size=224),
        BackboneSpec("efficientnet_lite1", width=1.0, depth=1.1, image_size=240),
        BackboneSpec("efficientnet_lite2", width=1.1, depth=1.2, image_size=260),
        BackboneSpec("efficientnet_lite3", width=1.2, depth=1.4, image_size=280),
        BackboneSpec("efficientnet_lite4", width=1.4, depth=1.8, image_size=300),
    )
}

# Base stages of EfficientNet-B0/Lite0:
# (repeats, kernel_size, stride, expand_ratio, input_filters, output_filters).
_BASE_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


def get_backbone(name: str) -> BackboneSpec:
    """Look up a backbone by name.

    Raises:
        ValueError: If the name is not one of `BACKBONES`.
    """
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(
            f"unknown backbone {name!r}; supported backbones: {', '.join(BACKBONES)}"
        ) from None


def round_filters(filters: int, width: float) -> int:
    """Scale a filter count by the width coefficient, rounded to a multiple of 8.

    The result never drops more than 10% below the exact product.
    """
    scaled = filters * width
    rounded = max(DEPTH_DIVISOR, int(scaled + DEPTH_DIVISOR / 2) // DEPTH_DIVISOR * DEPTH_DIVISOR)
    if rounded < 0.9 * scaled:
        rounded += DEPTH_DIVISOR
    return int(rounded)


def round_repeats(repeats: int, depth: float) -> int:
    """Scale a stage's repeat count by the depth coefficient, rounding up."""
    return int(math.ceil(repeats * depth))


def block_specs(spec: BackboneSpec) -> list[BlockSpec]:
    """List every MBConv block of a backbone in network order.

    Args:
        spec: The backbone scaling.

    Returns:
        One `BlockSpec` per block. Only the first block of a stage has the stage's
        stride and input width, and the others repeat it with stride 1.
    """
    blocks: list[BlockSpec] = []
    last_stage = len(_BASE_STAGES) - 1

    for stage, (repeats, kernel, stride, expand, in_filters, out_filters) in enumerate(_BASE_STAGES):
        input_filters = round_filters(in_filters, spec.width)
        output_filters = round_filters(out_filters, spec.width)

        # Lite keeps the first and last stages at their base depth, and the first
        # stage reads the unscaled 32-filter stem.
        if stage in (0, last_stage):
            stage_repeats = repeats
        else:
            stage_repeats = round_repeats(repeats, spec.depth)
        if stage == 0:
            input_filters = STEM_FILTERS

        for repeat in range(stage_repeats):
            blocks.append(BlockSpec(
                index=len(blocks),
                kernel_size=kernel,
                stride=stride if repeat == 0 else 1,
                expand_ratio=expand,
                input_filters=input_filters if repeat == 0 else output_filters,
                output_filters=output_filters,
            ))

    return blocks


def feature_widths(spec: BackboneSpec) -> dict[str, int]:
    """Return the channel count of every layer that pooling can read, in network order.

    Args:
        spec: The backbone scaling.

    Returns:
        ``stem``, then for each block ``block<i>_expand`` (absent when the block does
        not expand), ``block<i>_depthwise`` and ``block<i>`` (the block output), then
        ``head``, each mapped to its number of channels.
    """
    widths = {"stem": STEM_FILTERS}
    for block in block_specs(spec):
        if block.expand_ratio != 1:
            widths[f"block{block.index}_expand"] = block.expanded_filters
        widths[f"block{block.index}_depthwise"] = block.expanded_filters
        widths[f"block{block.index}"] = block.output_filters
    widths["head"] = HEAD_FILTERS
    return widths


def state_dict_shapes(spec: BackboneSpec) -> dict[str, tuple[int, ...]]:
    """List the PyTorch state-dict keys and shapes the feature extractor needs.

    The keys follow ``efficientnet_lite_pytorch.EfficientNet``. Classifier keys
    (``_fc.*``) and ``num_batches_tracked`` are not needed and not listed.

    Returns:
        A mapping from key to the tensor shape, convolution kernels in PyTorch
        (out, in / groups, height, width) order.
    """
    shapes: dict[str, tuple[int, ...]] = {}

    def add_batch_norm(prefix: str, channels: int) -> None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{name}"] = (channels,)

    shapes["_conv_stem.weight"] = (STEM_FILTERS, 3, 3, 3)
    add_batch_norm("_bn0", STEM_FILTERS)

    for block in block_specs(spec):
        prefix = f"_blocks.{block.index}"
        expanded = block.expanded_filters
        if block.expand_ratio != 1:
            shapes[f"{prefix}._expand_conv.weight"] = (expanded, block.input_filters, 1, 1)
            add_batch_norm(f"{prefix}._bn0", expanded)
        shapes[f"{prefix}._depthwise_conv.weight"] = (expanded, 1, block.kernel_size, block.kernel_size)
        add_batch_norm(f"{prefix}._bn1", expanded)
        shapes[f"{prefix}._project_conv.weight"] = (block.output_filters, expanded, 1, 1)
        add_batch_norm(f"{prefix}._bn2", block.output_filters)

    last_filters = block_specs(spec)[-1].output_filters
    shapes["_conv_head.weight"] = (HEAD_FILTERS, last_filters, 1, 1)
    add_batch_norm("_bn1", HEAD_FILTERS)
    return shapes
