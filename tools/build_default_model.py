"""Rebuild the shipped int8 EfficientNet-Lite0 embedder, its report and its model card.

    python tools/build_default_model.py [ASSETS_DIR] [--models-dir models] [--variants]

ASSETS_DIR (default ``../shared/assets`` from the repository root) must contain
``datasets/flowers17/c1..c17``, ``datasets/coil100/obj*`` and ``images/``. The photos
are split by a fixed rule, so the calibration and evaluation sets never overlap:

- calibration: the even-numbered photos (sorted order) of each flowers17 class, the
  first view of each COIL-100 object, the single-subject photos in ``images/`` and
  the ``images/imprinting/*_train_*`` photos;
- evaluation: the odd-numbered flowers17 photos, the second and fourth COIL-100
  views and the ``images/imprinting/*_test_*`` photos.

Writes ``efficientnet_lite0_int8.tflite``, ``efficientnet_lite0_int8.report.json`` and
``MODEL_CARD.md`` to the models folder. The model is GeM-pooled (p = 3) features of
three layers at 256 pixels, chosen by the retrieval comparison in the model card.
Retrieval is measured with ``edgeembed eval`` on flowers17 and COIL-100 (leave-one-out)
for this model, its float32 twin and the MobileNet v1 reference extractor.

Unless ``--no-comparison`` is given it also builds a variant with the stem and the
first depthwise convolution in int8, so the card can show what keeping them in
float32 gains. ``--variants`` also builds and measures the other pooling variants and
a head trained on half of each flowers17 class, which took 18 minutes on 2 cores. Without
it, those tables are copied from the previous report. Needs the toolchain extra.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgeembed.preprocess import load_image, prepare_pixels  # noqa: E402
from edgeembed.toolchain.convert import ConvertOptions  # noqa: E402
from edgeembed.toolchain.head import HeadRequest, HeadTrainingOptions  # noqa: E402
from edgeembed.toolchain.images import ImageSet  # noqa: E402
from edgeembed.toolchain.model_card import write_model_card  # noqa: E402
from edgeembed.toolchain.pipeline import BuildRequest, BuildResult, build_model  # noqa: E402
from edgeembed.toolchain.pooling import PoolingOptions, parse_layers  # noqa: E402

logger = logging.getLogger("build_default_model")

MODEL_NAME = "efficientnet_lite0_int8"

# TensorFlow's QuantizationDebugger (TF 2.21) puts the output error of these two
# layers at about 3 quantisation steps, against under 0.6 for every other layer.
# Rounding either layer's batch-norm-folded weights to int8 alone causes 2.8 to 2.9 steps.
# Keeping both in float32 costs about 14 M of the 387 M multiply-accumulates (224 px).
FLOAT_CONVOLUTIONS = ("stem", "block0_depthwise")

DATASETS = ("flowers17", "coil100")
REFERENCE_MODEL = "models/mobilenet_v1_1.0_224_quant_embedding_extractor.tflite"
HEAD_DIM = 128


@dataclass(frozen=True)
class Variant:
    """One pooling setup of the retrieval comparison.

    Attributes:
        name: Row label in the model card.
        input_size: Input side in pixels.
        pooling: Pooling method and layers.
        float_layers: Layers kept in float32 in the int8 model.
    """

    name: str
    input_size: int
    pooling: PoolingOptions
    float_layers: tuple[str, ...] = FLOAT_CONVOLUTIONS


# The shipped setup. Joining layers needs the pooling ops in float32 (see
# edgeembed.toolchain.pooling.check_quantization); they cost well under 1% of the compute.
SHIPPED = Variant("gem p=3, head + block11 + block0 (weight 0.8), 256 px", 256,
                  PoolingOptions("gem", 3.0, parse_layers("head,block11,block0:0.8")),
                  FLOAT_CONVOLUTIONS + ("pooling",))

VARIANTS = (
    Variant("avg, head, 224 px (previous default)", 224, PoolingOptions("avg")),
    Variant("max, head, 224 px", 224, PoolingOptions("max")),
    Variant("gem p=3, head, 224 px", 224, PoolingOptions("gem")),
    Variant("gem p=3, head, 256 px", 256, PoolingOptions("gem")),
    Variant("gem p=3, block15 (320 features), 256 px", 256, PoolingOptions("gem", layers=parse_layers("block15"))),
    Variant("gem p=3, head + block11 + block0 (weight 0.8), 224 px", 224, SHIPPED.pooling, SHIPPED.float_layers),
)


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



def variant_request(variant: Variant, out: Path, calibration: ImageSet | None,
                    quantization: str = "int8", evaluation: ImageSet | None = None) -> BuildRequest:
    """Return the build request of a variant, int8 or its float32 twin."""
    float_layers = variant.float_layers if quantization == "int8" else ()
    return BuildRequest(
        backbone="efficientnet_lite0",
        weights="imagenet",
        out=out,
        options=ConvertOptions(quantization=quantization, input_type="uint8", float_layers=float_layers),
        calibration=calibration if quantization == "int8" else None,
        evaluation=evaluation,
        input_size=variant.input_size,
        pooling=variant.pooling,
    )


def measure_retrieval(model: Path, folders: dict[str, Path]) -> dict[str, dict[str, float]]:
    """Run ``edgeembed eval --json`` (leave-one-out) on each labelled folder.

    Returns:
        Folder label to recall@1, recall@5 and mAP.

    Raises:
        subprocess.CalledProcessError: If ``edgeembed eval`` fails.
    """
    results = {}
    for label, folder in folders.items():
        command = [sys.executable, "-m", "edgeembed", "eval", str(folder), "--model", str(model),
                   "--json", "--threads", "2"]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        document = json.loads(output)
        results[label] = {key: document[key] for key in ("recall@1", "recall@5", "mAP")}
        logger.info("%s on %s: recall@1 %.3f, mAP %.3f", model.name, label, document["recall@1"], document["mAP"])
    return results


def measure_variant(variant: Variant, folder: Path, calibration: ImageSet, datasets: dict[str, Path]) -> dict[str, Any]:
    """Build a variant in int8 and float32 and measure both on the labelled sets."""
    int8 = build_model(variant_request(variant, folder / "int8.tflite", calibration))
    float32 = build_model(variant_request(variant, folder / "float32.tflite", None, quantization="float32"))
    return {
        "name": variant.name,
        "input_size": variant.input_size,
        "pooling": variant.pooling.record(),
        "embedding_dim": int8.metadata.embedding_dim,
        "int8": measure_retrieval(int8.model_path, datasets),
        "float32": measure_retrieval(float32.model_path, datasets),
    }


def link_flowers_halves(flowers: Path, folder: Path) -> tuple[Path, Path]:
    """Link every other photo of each flowers17 class (first, third, ... by name) into half A, the rest into half B."""
    halves = (folder / "flowers17_half_a", folder / "flowers17_half_b")
    for species in sorted(path for path in flowers.iterdir() if path.is_dir()):
        for half, start in zip(halves, (0, 1)):
            (half / species.name).mkdir(parents=True)
            for photo in _sorted_files(species, "*.jpg")[start::2]:
                (half / species.name / photo.name).symlink_to(photo.resolve())
    return halves


def measure_head(assets: Path, calibration: ImageSet, shipped: dict[str, Path], folder: Path) -> dict[str, Any]:
    """Train a head on flowers17 half A and compare retrieval on half B with and without it.

    Args:
        assets: The shared assets folder.
        calibration: Calibration photos of the int8 head model.
        shipped: ``"int8"`` and ``"float32"`` paths of the model without a head.
        folder: Scratch folder.
    """
    half_a, half_b = link_flowers_halves(assets / "datasets" / "flowers17", folder)
    head = HeadRequest(half_a, HeadTrainingOptions(dim=HEAD_DIM))
    built = {"int8": build_model(replace(variant_request(SHIPPED, folder / "head_int8.tflite", calibration), head=head)),
             "float32": build_model(replace(variant_request(SHIPPED, folder / "head_float32.tflite", None, "float32"),
                                            head=head))}
    half = {"flowers17 half B": half_b}
    return {
        "dim": HEAD_DIM,
        "training": built["int8"].metadata.provenance["head"]["projection"],
        "without_head": {mode: measure_retrieval(path, half)["flowers17 half B"] for mode, path in shipped.items()},
        "with_head": {mode: measure_retrieval(result.model_path, half)["flowers17 half B"]
                      for mode, result in built.items()},
    }


def measure_all(args: argparse.Namespace, result: BuildResult, request: BuildRequest, report: dict[str, Any]) -> dict[str, Any]:
    """Measure retrieval of the shipped model, its float32 twin, the reference and, with --variants, the rest."""
    datasets = {name: args.assets / "datasets" / name for name in DATASETS}
    previous = report.get("retrieval") or {}
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        float32 = build_model(variant_request(SHIPPED, folder / "float32.tflite", None, quantization="float32"))
        shipped = {"int8": result.model_path, "float32": float32.model_path}
        retrieval = {
            "reference": measure_retrieval(args.assets / REFERENCE_MODEL, datasets),
            "this_model": {mode: measure_retrieval(path, datasets) for mode, path in shipped.items()},
            "variants": previous.get("variants"),
            "head": previous.get("head"),
        }
        if args.variants:
            retrieval["variants"] = []
            for number, variant in enumerate(VARIANTS):
                (folder / f"variant{number}").mkdir()
                retrieval["variants"].append(measure_variant(variant, folder / f"variant{number}",
                                                             request.calibration, datasets))
            retrieval["head"] = measure_head(args.assets, request.calibration, shipped, folder)
    return retrieval


def main(argv: list[str] | None = None) -> int:
    """Build the default model and its documents; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("assets", nargs="?", type=Path, default=ROOT.parent / "shared" / "assets",
                        help="shared assets folder (default: ../shared/assets from the repository root)")
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models", help="output folder")
    parser.add_argument("--no-comparison", action="store_true",
                        help="skip the build with the stem and first depthwise convolution in int8")
    parser.add_argument("--variants", action="store_true",
                        help="also build and measure the pooling variants and a trained head (about 20 minutes on 2 cores)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    calibration, evaluation = split_photos(args.assets)
    logger.info("Calibration: %d photos, evaluation: %d photos", len(calibration.paths), len(evaluation.paths))
    report_path = args.models_dir / f"{MODEL_NAME}.report.json"
    previous = json.loads(report_path.read_text()) if report_path.is_file() else {}

    request = variant_request(SHIPPED, args.models_dir / f"{MODEL_NAME}.tflite", calibration, evaluation=evaluation)
    result = build_model(request)
    runtime_cosine = check_runtime_agreement(result, evaluation)
    logger.info("edgeembed.Embedder agrees with the fidelity runner: min cosine %.6f", runtime_cosine)

    report = result.report()
    report["runtime_agreement_min_cosine"] = runtime_cosine

    if not args.no_comparison:
        with tempfile.TemporaryDirectory() as folder:
            int8_convolutions = replace(request, out=Path(folder) / "int8_convolutions.tflite",
                                        options=replace(request.options, float_layers=("pooling",)))
            comparison = build_model(int8_convolutions)
            pixels = prepare_pixels(load_image(evaluation.paths[0]), result.metadata.preprocess)
            report["latency_interleaved_ms"] = interleaved_latency(
                {"this_model": result.model_path, "int8_convolutions": int8_convolutions.out},
                result.metadata.preprocess, pixels)
        report["comparison_int8_convolutions"] = comparison.fidelity.to_dict()

    report["retrieval"] = measure_all(args, result, request, previous)
    report_path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")

    write_model_card(args.models_dir / "MODEL_CARD.md", result, report)
    logger.info("Wrote %s, %s and MODEL_CARD.md", request.out.name, report_path.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
