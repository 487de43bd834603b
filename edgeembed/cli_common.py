"""Options, progress bars and exit codes shared by the command-line modules."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

logger = logging.getLogger("edgeembed")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def positive_int(text: str) -> int:
    """Parse an argparse value that must be a whole number of 1 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid whole number {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid value {value}: use 1 or more")
    return value


def search_k(text: str) -> int:
    """Parse Annoy's search_k: -1 for its default, otherwise 1 or more."""
    if text.strip() == "-1":
        return -1
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"invalid search_k {text!r}: use -1 or a number of 1 or more") from None


def add_common_options(parser: argparse.ArgumentParser, model: bool = True) -> None:
    """Add --model (unless `model` is False), --threads, --backend and -v to a subcommand."""
    if model:
        parser.add_argument("--model", metavar="MODEL",
                            help="TFLite embedder to use (default: the shipped int8 EfficientNet-Lite0)")
    parser.add_argument("--threads", type=positive_int, default=None, metavar="N",
                        help="interpreter CPU threads (default: the backend's choice)")
    parser.add_argument("--backend", choices=("litert", "tflite-runtime", "tensorflow"),
                        help="TFLite interpreter package to use (default: EDGEEMBED_BACKEND, then "
                             "the first one installed)")
    parser.add_argument("-v", "--verbose", action="store_true", help="print debug logs")


def progress_bar(total: int, description: str):
    """Return a tqdm bar on stderr; tqdm disables itself when stderr is not a terminal."""
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit="img", disable=None, file=sys.stderr)


def load_embedder(args: argparse.Namespace, model: str | None = None):
    """Create the Embedder that --model, --threads and --backend ask for."""
    from edgeembed.embedder import Embedder

    return Embedder(model or args.model, num_threads=args.threads, backend=args.backend)


def gallery_model(args: argparse.Namespace) -> str | None:
    """Return --model, else the model that built the gallery when that file still exists.

    None means the shipped default model.
    """
    if args.model:
        return args.model

    from edgeembed import storage
    from edgeembed.gallery import MANIFEST, SCHEMA

    manifest = storage.read_manifest(Path(args.gallery) / MANIFEST, SCHEMA)
    recorded = manifest["model"].get("path")
    return recorded if recorded and Path(recorded).is_file() else None


def find_images(inputs: list[str]) -> list[Path]:
    """List the image files under the inputs, logging an error when there are none."""
    from edgeembed.preprocess import IMAGE_EXTENSIONS, list_images

    paths = list_images(inputs)
    if not paths:
        suffixes = ", ".join(sorted(IMAGE_EXTENSIONS))
        logger.error("no image files (%s) found in %s", suffixes, ", ".join(map(str, inputs)))
    return paths


def report_failures(failures: list[tuple[Path, str]], total: int, done: str) -> int:
    """Print the closing count of a batch and return its exit code (1 when any input failed)."""
    ok = total - len(failures)
    print(f"{done} {ok} of {total} images, {len(failures)} skipped", file=sys.stderr)
    return EXIT_FAILED if failures else EXIT_OK
