"""The ``edgeembed`` command line: info, embed, index build, search and convert.

Exit codes: 0 when everything succeeded, 1 when an operation failed or any input
was skipped, 2 for invalid arguments.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path

import numpy as np

from edgeembed import __version__, cli_index, storage
from edgeembed.backends import BackendError
from edgeembed.cli_common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    add_common_options,
    find_images,
    gallery_model,
    load_embedder,
    logger,
    positive_int,
    progress_bar,
    report_failures,
    search_k,
)
from edgeembed.model import ModelError
from edgeembed.preprocess import ImageError
from edgeembed.storage import GalleryError

# Other command modules call this name to add the shared options.
_add_common = add_common_options


def cmd_info(args: argparse.Namespace) -> int:
    """Print a model's tensors, preprocessing, provenance and op counts."""
    from edgeembed.backends import backend_version

    if args.model_path and args.model and args.model_path != args.model:
        logger.error("give the model once, as MODEL or --model, not both (%s and %s)", args.model_path, args.model)
        return EXIT_USAGE
    embedder = load_embedder(args, args.model_path or args.model)
    meta = embedder.metadata
    info = {
        "model": str(embedder.model_path),
        "size_bytes": embedder.size_bytes,
        "sha256": embedder.fingerprint,
        "backend": f"{embedder.backend.name} {backend_version(embedder.backend)}",
        "input": vars(embedder.input),
        "output": vars(embedder.output),
        "embedding_dim": embedder.embedding_dim,
        "preprocess": meta.preprocess.to_dict(),
        "preprocess_source": meta.preprocess_source,
        "pooling": meta.pooling,
        "provenance": meta.provenance,
        "ops": embedder.ops(),
    }
    if args.json:
        print(json.dumps(info, indent=2, default=list))
        return EXIT_OK

    for key in ("model", "size_bytes", "sha256", "backend", "embedding_dim", "pooling"):
        print(f"{key:18} {info[key]}")
    for key in ("input", "output"):
        tensor = info[key]
        print(f"{key:18} {tensor['name']} {list(tensor['shape'])} {tensor['dtype']} "
              f"scale={tensor['scale']:.6g} zero_point={tensor['zero_point']}")
    print(f"{'preprocess':18} from {meta.preprocess_source}: "
          + ", ".join(f"{k}={v}" for k, v in info["preprocess"].items()))
    for key, value in meta.provenance.items():
        print(f"{'provenance':18} {key}: {json.dumps(value) if not isinstance(value, str) else value}")
    ops = ", ".join(f"{name} x{count}" for name, count in info["ops"].items())
    print(f"{'ops':18} {sum(info['ops'].values())} in all: {ops}")
    return EXIT_OK


def cmd_embed(args: argparse.Namespace) -> int:
    """Embed images and write FILE.npy plus FILE.ids.txt."""
    out = Path(args.out)
    if out.suffix != ".npy":
        logger.error("--out must end in .npy, got %s", out)
        return EXIT_USAGE
    ids_path = out.with_suffix(".ids.txt")

    paths = find_images(args.inputs)
    if not paths:
        return EXIT_FAILED
    embedder = load_embedder(args)
    vectors, kept, failures = [], [], []
    with progress_bar(len(paths), "embedding") as bar:
        for result in embedder.embed_files(paths):
            bar.update()
            if result.vector is None:
                logger.warning("skipped %s: %s", result.path, result.error)
                failures.append((result.path, result.error))
                continue
            vectors.append(result.vector)
            kept.append(str(result.path))

    if not vectors:
        logger.error("no image could be embedded; nothing written")
        return EXIT_FAILED
    out.parent.mkdir(parents=True, exist_ok=True)
    storage.write_npy(out, np.stack(vectors))
    ids_text = "".join(f"{path}\n" for path in kept)
    # surrogateescape writes file names that are not valid UTF-8 back as their original bytes.
    storage.write_bytes(ids_path, ids_text.encode("utf-8", "surrogateescape"))
    print(f"wrote {out} ({len(kept)} x {embedder.embedding_dim}) and {ids_path}", file=sys.stderr)
    return report_failures(failures, len(paths), "embedded")


def _print_matches(query: str, matches: list) -> None:
    print(f"query: {query}")
    print(f"  {'rank':>4}  {'score':>6}  {'id':40}  path")
    for rank, match in enumerate(matches, 1):
        print(f"  {rank:>4}  {match.score:6.3f}  {match.id:40}  {match.path or '-'}")


def cmd_search(args: argparse.Namespace) -> int:
    """Search a gallery with query images."""
    from edgeembed.gallery import Gallery

    embedder = load_embedder(args, gallery_model(args))
    gallery = Gallery.open(args.gallery, embedder)
    queries = find_images(args.queries)
    if not queries:
        return EXIT_FAILED
    failures = []
    for query in queries:
        try:
            if args.exact:
                matches = gallery.search_exact(query, args.k)
            else:
                matches = gallery.search(query, args.k, search_k=args.search_k)
        except ImageError as error:
            logger.warning("skipped %s: %s", query, error.reason)
            failures.append((query, error.reason))
            continue

        if args.json:
            record = {"query": str(query), "matches": [m.to_dict() for m in matches]}
            print(json.dumps(record, ensure_ascii=False), flush=True)
        else:
            _print_matches(str(query), matches)
    if failures or len(queries) > 1:
        return report_failures(failures, len(queries), "searched")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser for every subcommand."""
    parser = argparse.ArgumentParser(prog="edgeembed", description=(
        "Embed images with int8 TFLite models and search them with Annoy."))
    parser.add_argument("--version", action="version", version=f"edgeembed {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = commands.add_parser("info", help="show a model's tensors, preprocessing and provenance")
    info.add_argument("model_path", nargs="?", metavar="MODEL", help="the model (default: shipped model)")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    add_common_options(info)
    info.set_defaults(run=cmd_info)

    embed = commands.add_parser("embed", help="embed images into a .npy file")
    embed.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="images or folders (recursive)")
    embed.add_argument("--out", required=True, metavar="FILE.npy",
                       help="output vectors; FILE.ids.txt beside it lists one image path per row")
    add_common_options(embed)
    embed.set_defaults(run=cmd_embed)

    index = commands.add_parser("index", help="build and change galleries")
    cli_index.configure_parser(index)

    search = commands.add_parser("search", help="find the gallery items most similar to query images")
    search.add_argument("gallery", metavar="GALLERY_DIR", help="gallery folder written by index build")
    search.add_argument("queries", nargs="+", metavar="QUERY_IMAGE", help="images or folders")
    search.add_argument("-k", type=positive_int, default=5, help="matches per query (default: 5)")
    search.add_argument("--search-k", type=search_k, default=-1, metavar="N",
                        help="Annoy nodes to inspect per query; -1 means trees x k (default: -1)")
    search.add_argument("--exact", action="store_true", help="search all stored vectors instead of Annoy")
    search.add_argument("--json", action="store_true",
                        help='print one JSON object per query: {"query", "matches": [{"id", "path", "score"}]}')
    add_common_options(search)
    search.set_defaults(run=cmd_search)

    for name, module, description in FEATURE_COMMANDS:
        _add_feature(commands, name, module, description)
    return parser


# Commands whose code lives in their own module. Each module defines
# configure_parser(parser) and run(args) -> int, and imports nothing heavy
# (TensorFlow, PyTorch, OpenCV, Ray) at module level, so that building the parser stays cheap.
FEATURE_COMMANDS = (
    ("convert", "edgeembed.toolchain.command",
     "build a TFLite embedder from a backbone (needs edgeembed[toolchain])"),
    ("camera", "edgeembed.camera_command", "match live camera frames against a gallery"),
    ("bench", "edgeembed.bench_command", "measure latency, throughput, memory and retrieval"),
    ("eval", "edgeembed.evaluate_command", "measure retrieval quality on a labelled folder"),
)


def _add_feature(commands, name: str, module_name: str, description: str) -> None:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        missing = error.name or ""
        if module_name != missing and not module_name.startswith(missing + "."):
            raise
        return  # this checkout does not have that command yet

    parser = commands.add_parser(name, help=description)
    module.configure_parser(parser)
    if not any("--verbose" in action.option_strings for action in parser._actions):
        parser.add_argument("-v", "--verbose", action="store_true", help="print debug logs")
    parser.set_defaults(run=module.run)


def main(argv: list[str] | None = None) -> int:
    """Run the command line and return its exit code."""
    # File names that are not valid UTF-8 reach Python as surrogate escapes; print them
    # as backslash escapes rather than fail.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s: %(message)s")
    try:
        return args.run(args)
    except (ModelError, BackendError, GalleryError, ImageError, cli_index.LabelsError) as error:
        logger.error("%s", error)
        return EXIT_FAILED
    except KeyboardInterrupt:
        logger.error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
