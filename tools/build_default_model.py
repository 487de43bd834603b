"""Rebuild the shipped int8 EfficientNet-Lite0 embedder, its report and its model card.

    python tools/build_default_model.py [ASSETS_DIR] [--models-dir models]

ASSETS_DIR (default ``../shared/assets`` from the repository root) must contain
``datasets/flowers17/c1..c17``, ``datasets/coil100/obj*`` and ``images/``. The photos
are split by a fixed rule, so the calibration and evaluation sets never overlap:

- calibration: the even-numbered photos (sorted order) of each flowers17 class, the
  first view of each COIL-100 object, the single-subject photos in ``images/`` and
  the ``images/imprinting/*_train_*`` photos;
- evaluation: the odd-numbered flowers17 photos, the second and fourth COIL-100
  views and the ``images/imprinting/*_test_*`` photos.

Writes ``efficientnet_lite0_int8.tflite``, ``efficientnet_lite0_int8.report.json`` and
``MODEL_CARD.md`` to the models folder. Unless ``--no-comparison`` is given it also
builds a fully int8 variant in a temporary folder, so the card can show what keeping
the first two convolutions in float32 gains. Needs the toolchain extra.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgeembed.preprocess import load_image, prepare_pixels  # noqa: E402
from edgeembed.toolchain.convert import ConvertOptions  # noqa: E402
from edgeembed.toolchain.images import ImageSet  # noqa: E402
from edgeembed.toolchain.model_card import write_model_card  # noqa: E402
from edgeembed.toolchain.pipeline import BuildRequest, BuildResult, build_model  # noqa: E402

logger = logging.getLogger("build_default_model")

MODEL_NAME = "efficientnet_lite0_int8"

# TensorFlow's QuantizationDebugger (TF 2.21) puts the output error of these two
# layers at about 3 quantisation steps, against under 0.6 for every other layer.
# Rounding either layer's batch-norm-folded weights to int8 alone causes 2.8 to 2.9 steps.
# Keeping both in float32 costs about 14 M of the 387 M multiply-accumulates.
FLOAT_LAYERS = ("stem", "block0_depthwise")


def _sorted_files(folder: Path, pattern: str) -> list[Path]:
    return sorted(path for path in folder.glob(pattern) if path.is_file())


def split_photos(assets: Path) -> tuple[ImageSet, ImageSet]:
    """Split the shared photos into disjoint calibration and evaluation sets.

    Raises:
        FileNotFoundError: If a dataset folder is missing.
    """
    flowers = assets / "datasets" / "flowers17"
    coil = assets / "datasets" / "coil100"
    images = assets / "images"
    for folder in (flowers, coil, images):
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} not found; pass the shared assets folder as ASSETS_DIR")

    calibration: list[Path] = []
    evaluation: list[Path] = []
    for species in sorted(flowers.iterdir(), key=lambda path: path.name):
        photos = _sorted_files(species, "*.jpg")
        calibration += photos[0::2]
        evaluation += photos[1::2]
    for item in sorted(coil.iterdir(), key=lambda path: path.name):
        views = _sorted_files(item, "*.png")
        calibration += views[0:1]
        evaluation += views[1::2]

    calibration += [path for path in _sorted_files(images, "*") if path.suffix in (".bmp", ".jpg")]
    calibration += _sorted_files(images / "imprinting", "*_train_*.bmp")
    evaluation += _sorted_files(images / "imprinting", "*_test_*.bmp")

    calibration_set = ImageSet(
        tuple(calibration), assets,
        "flowers17 even-numbered photos of each class (170), COIL-100 first view of each "
        "object (99), the 6 single-subject photos and 4 imprinting training photos of the "
        "Coral test images",
    )
    evaluation_set = ImageSet(
        tuple(evaluation), assets,
        "flowers17 odd-numbered photos of each class (170), COIL-100 second and fourth "
        "views of each object (198), 3 imprinting test photos of the Coral test images",
    )
    return calibration_set, evaluation_set


def check_runtime_agreement(result: BuildResult, evaluation: ImageSet, count: int = 8) -> float:
    """Embed a few evaluation photos with `edgeembed.Embedder` and the fidelity runner.

    Returns:
        The smallest cosine between the two, which should be 1 up to rounding,
        because both must preprocess and quantise identically.
    """
    from edgeembed import Embedder
    from edgeembed.toolchain.fidelity import TFLiteEmbedder

    config = result.metadata.preprocess
    runtime = Embedder(result.model_path, num_threads=1)
    toolchain = TFLiteEmbedder(result.model_path, config)

    cosines = []
    for path in evaluation.paths[:count]:
        expected = toolchain.embed(prepare_pixels(load_image(path, config), config))
        actual = runtime.embed(path)
        cosines.append(float(expected @ actual / np.linalg.norm(expected)))
    return min(cosines)


def interleaved_latency(models: dict[str, Path], config, pixels: np.ndarray, rounds: int = 10) -> dict[str, float]:
    """Time several models in alternating rounds, so load from other processes hits all alike.

    Returns:
        Model label to median single-image invoke time in milliseconds (1 thread).
    """
    from edgeembed.toolchain.fidelity import TFLiteEmbedder

    embedders = {label: TFLiteEmbedder(path, config) for label, path in models.items()}
    times: dict[str, list[float]] = {label: [] for label in models}
    for _ in range(rounds):
        for label, embedder in embedders.items():
            times[label].append(embedder.latency_ms(pixels, runs=5))
    return {label: float(np.median(values)) for label, values in times.items()}


def main(argv: list[str] | None = None) -> int:
    """Build the default model and its documents; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("assets", nargs="?", type=Path, default=ROOT.parent / "shared" / "assets",
                        help="shared assets folder (default: ../shared/assets from the repository root)")
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models", help="output folder")
    parser.add_argument("--no-comparison", action="store_true",
                        help="skip the fully int8 comparison build (about half the build time)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    calibration, evaluation = split_photos(args.assets)
    logger.info("Calibration: %d photos, evaluation: %d photos", len(calibration.paths), len(evaluation.paths))

    request = BuildRequest(
        backbone="efficientnet_lite0",
        weights="imagenet",
        out=args.models_dir / f"{MODEL_NAME}.tflite",
        options=ConvertOptions(quantization="int8", input_type="uint8", float_layers=FLOAT_LAYERS),
        calibration=calibration,
        evaluation=evaluation,
    )
    result = build_model(request)
    runtime_cosine = check_runtime_agreement(result, evaluation)
    logger.info("edgeembed.Embedder agrees with the fidelity runner: min cosine %.6f", runtime_cosine)

    report = result.report()
    report["runtime_agreement_min_cosine"] = runtime_cosine

    comparison = None
    if not args.no_comparison:
        with tempfile.TemporaryDirectory() as folder:
            full_int8 = replace(request, out=Path(folder) / "full_int8.tflite",
                                options=replace(request.options, float_layers=()))
            comparison = build_model(full_int8)
            pixels = prepare_pixels(load_image(evaluation.paths[0]), result.metadata.preprocess)
            report["latency_interleaved_ms"] = interleaved_latency(
                {"this_model": result.model_path, "full_int8": full_int8.out}, result.metadata.preprocess, pixels)
        report["comparison_full_int8"] = comparison.fidelity.to_dict()
    report_path = args.models_dir / f"{MODEL_NAME}.report.json"
    report_path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")

    write_model_card(args.models_dir / "MODEL_CARD.md", result, report, comparison)
    logger.info("Wrote %s, %s and MODEL_CARD.md", request.out.name, report_path.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
