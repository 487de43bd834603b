"""The ``edgeembed convert`` options for sources other than EfficientNet-Lite PyTorch weights.

The sources are Keras MobileNetV2/V3 (`edgeembed.toolchain.mobilenet`), MobileNet v1
from a frozen graph (`edgeembed.toolchain.frozen_graph`), the user's own Keras model
(``--from-keras``) and an existing TFLite classifier (``--from-tflite``). The module
also adds the optional head options (``--dim``, ``--l2-normalize``). Like
`edgeembed.toolchain.command`, it imports no TensorFlow at module level, because the
runtime CLI builds every parser.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

KERAS_BACKBONES = ("mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large")
GRAPH_BACKBONES = ("mobilenet_v1",)

EFFICIENTNET = "efficientnet"
KERAS_APPLICATION = "keras application"
FROZEN_GRAPH = "frozen graph"
KERAS_FILE = "--from-keras"
TFLITE_FILE = "--from-tflite"

CONVERTED = (EFFICIENTNET, KERAS_APPLICATION, FROZEN_GRAPH, KERAS_FILE)
GRAPH_SOURCES = (KERAS_APPLICATION, FROZEN_GRAPH, KERAS_FILE)

# Options that only some sources accept: argument name -> (option, source kinds).
_OPTION_SOURCES = {
    "alpha": ("--alpha", (KERAS_APPLICATION, FROZEN_GRAPH)),
    "layer": ("--layer", (KERAS_FILE, EFFICIENTNET)),
    "tensor": ("--tensor", (TFLITE_FILE,)),
    "input_tensor": ("--input-tensor", (FROZEN_GRAPH,)),
    "output_tensor": ("--output-tensor", (FROZEN_GRAPH,)),
    "mean": ("--mean", (FROZEN_GRAPH, KERAS_FILE, TFLITE_FILE)),
    "std": ("--std", (FROZEN_GRAPH, KERAS_FILE, TFLITE_FILE)),
    "dim": ("--dim", CONVERTED),
    "l2_normalize": ("--l2-normalize", CONVERTED),
    "input_size": ("--input-size", CONVERTED),
    "calib": ("--calib", CONVERTED),
    "float_layers": ("--float-layers", CONVERTED),
}


def channel_values(text: str) -> tuple[float, float, float]:
    """Parse one number or three comma-separated numbers (R,G,B) for ``--mean`` and ``--std``."""
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: give one number or three, e.g. 0.5,0.5,0.5") from None
    if len(values) == 1:
        values = values * 3
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: give one number or three (R,G,B)")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of the other sources and of the head to the ``convert`` parser.

    ``--layer`` (the layer of a ``--from-keras`` model) is defined in
    `edgeembed.toolchain.command`, because the EfficientNet-Lite options share it.
    """
    group = parser.add_argument_group("other backbones and model files")
    group.add_argument("--alpha", type=float, metavar="A",
                       help="width multiplier: 0.35, 0.5, 0.75, 1.0, 1.3 or 1.4 for mobilenet_v2, "
                            "0.75 or 1.0 for mobilenet_v3_* (default: 1.0)")
    group.add_argument("--minimalistic", action="store_true",
                       help="build the minimalistic MobileNetV3 (no squeeze-and-excitation, ReLU, 3x3 kernels)")
    group.add_argument("--from-keras", type=Path, metavar="MODEL.keras",
                       help="convert your own Keras model, cut at --layer, instead of a BACKBONE")
    group.add_argument("--from-tflite", type=Path, metavar="CLASSIFIER.tflite",
                       help="cut an existing TFLite image classifier at its pooled features, keeping its "
                            "quantisation, instead of converting a BACKBONE")
    group.add_argument("--tensor", metavar="NAME",
                       help="with --from-tflite: the tensor that becomes the output "
                            "(default: the last global AVERAGE_POOL_2D or MEAN output)")
    group.add_argument("--input-tensor", metavar="NAME",
                       help="with mobilenet_v1: the frozen graph's image input (default: its only image placeholder)")
    group.add_argument("--output-tensor", metavar="NAME",
                       help="with mobilenet_v1: the pooled feature tensor (default: the last global AvgPool or Mean)")
    group.add_argument("--mean", type=channel_values, metavar="R,G,B",
                       help="input normalisation for model files and frozen graphs: the float input is "
                            "(pixel / 255 - mean) / std; [-1, 1] is --mean 0.5 --std 0.5, and 0..255 is "
                            "--mean 0 --std 0.00392157 (default: inferred or the backbone's)")
    group.add_argument("--std", type=channel_values, metavar="R,G,B", help="see --mean")

    head = parser.add_argument_group("embedding head (not for --from-tflite)")
    head.add_argument("--dim", type=int, metavar="D",
                      help="project the pooled features to D dimensions with a PCA fitted on the float "
                           "embeddings of the calibration photos (needs --calib and more than D photos); "
                           "with --train-head, the output dimension of the trained head")
    head.add_argument("--l2-normalize", action="store_true",
                      help="L2-normalise the embedding inside the model")


def source_kind(args: argparse.Namespace) -> str | None:
    """Return which kind of source the arguments name, or None when they name none."""
    if args.from_tflite is not None:
        return TFLITE_FILE
    if args.from_keras is not None:
        return KERAS_FILE
    if args.backbone in KERAS_BACKBONES:
        return KERAS_APPLICATION
    if args.backbone in GRAPH_BACKBONES:
        return FROZEN_GRAPH
    if args.backbone is not None:
        return EFFICIENTNET
    return None


def _source_problem(args: argparse.Namespace) -> str | None:
    model_file = args.from_keras if args.from_keras is not None else args.from_tflite
    flag = KERAS_FILE if args.from_keras is not None else TFLITE_FILE

    if args.from_keras is not None and args.from_tflite is not None:
        return "pass either --from-keras or --from-tflite, not both"
    if model_file is None and args.backbone is None:
        return "pass a BACKBONE, --from-keras MODEL.keras or --from-tflite CLASSIFIER.tflite"
    if model_file is not None and args.backbone is not None:
        return f"{flag} replaces BACKBONE; drop {args.backbone!r}"
    if model_file is not None and args.weights is not None:
        return f"--weights does not apply to {flag}, whose weights are in the model file"
    if model_file is None and args.weights is None:
        return f"{args.backbone} needs --weights SOURCE"
    return None


def argument_problem(args: argparse.Namespace) -> str | None:
    """Check that the source and the options fit together.

    Returns:
        A message naming the first option that does not fit, or None.
    """
    problem = _source_problem(args)
    if problem is not None:
        return problem

    kind = source_kind(args)
    if kind == KERAS_FILE and not args.layer:
        return "--from-keras needs --layer NAME, the layer whose output becomes the embedding"
    if kind == TFLITE_FILE and args.quant != "int8":
        return "--from-tflite keeps the classifier's own quantisation; drop --quant"
    if kind == FROZEN_GRAPH and args.weights in ("imagenet", "random"):
        return f"{args.backbone} is read from a TensorFlow 1 frozen graph; pass --weights GRAPH.pb"
    if kind == FROZEN_GRAPH and args.alpha not in (None, 1.0):
        return f"{args.backbone} comes with alpha 1.0 only; drop --alpha"
    if args.minimalistic and not (args.backbone or "").startswith("mobilenet_v3"):
        return f"--minimalistic does not apply to {args.backbone or kind}"
    if (args.mean is None) != (args.std is None):
        return "pass --mean and --std together"
    if args.dim is not None and args.dim < 1:
        return f"invalid --dim {args.dim}: it must be a positive integer"

    source = args.backbone or kind
    for name, (option, kinds) in _OPTION_SOURCES.items():
        if getattr(args, name, None) and kind not in kinds:
            return f"{option} does not apply to {source}"
    return None


def uses_graph_pipeline(args: argparse.Namespace) -> bool:
    """Return True when `edgeembed.toolchain.graph_pipeline` builds the model."""
    return source_kind(args) in GRAPH_SOURCES


def normalization(args: argparse.Namespace):
    """Return the `edgeembed.toolchain.extractor.Normalization` of ``--mean``/``--std``, or None."""
    from edgeembed.toolchain.extractor import Normalization

    if args.mean is None:
        return None
    if min(args.std) <= 0:
        raise ValueError(f"invalid --std {args.std}: every value must be above 0")
    return Normalization(mean=args.mean, std=args.std)


def load_source(args: argparse.Namespace):
    """Load the float extractor the arguments name, as a `edgeembed.toolchain.extractor.GraphSource`.

    Raises:
        edgeembed.toolchain.weights.WeightsError: If the weights or model file cannot be loaded.
        ValueError: For a variant or layer that does not exist.
    """
    if args.from_keras is not None:
        from edgeembed.toolchain.from_keras import load_keras_source

        return load_keras_source(args.from_keras, args.layer, args.input_size, normalization(args))

    if args.backbone in GRAPH_BACKBONES:
        from edgeembed.toolchain.frozen_graph import load_frozen_graph

        return load_frozen_graph(args.weights, args.backbone, args.input_tensor, args.output_tensor,
                                 normalization(args), args.input_size)

    from edgeembed.toolchain.mobilenet import MobileNetConfig, load_mobilenet

    config = MobileNetConfig(args.backbone, alpha=args.alpha or 1.0, input_size=args.input_size,
                             minimalistic=args.minimalistic)
    return load_mobilenet(config, args.weights)


def build_graph(args: argparse.Namespace, request):
    """Build a Keras, frozen-graph or ``--from-keras`` embedder for a `edgeembed.toolchain.pipeline.BuildRequest`."""
    from edgeembed.toolchain.graph_pipeline import build_graph_model
    from edgeembed.toolchain.projection import HeadOptions

    started = time.perf_counter()
    source = load_source(args)
    result = build_graph_model(source, request, HeadOptions(dim=args.dim, l2_normalize=args.l2_normalize))
    result.seconds = time.perf_counter() - started
    return result


def cut_classifier(args: argparse.Namespace):
    """Cut the ``--from-tflite`` classifier and return its `edgeembed.toolchain.pipeline.BuildResult`."""
    from edgeembed.toolchain.from_tflite import CutRequest, build_from_tflite
    from edgeembed.toolchain.images import folder_images

    evaluation = folder_images(args.eval, purpose="evaluation") if args.eval is not None else None
    request = CutRequest(source=args.from_tflite, out=args.out, tensor=args.tensor,
                         normalization=normalization(args), evaluation=evaluation)
    return build_from_tflite(request)
