"""The ``edgeembed`` command line: info, embed, index build, search and convert.

Exit codes: 0 when everything succeeded, 1 when an operation failed or any input
was skipped, 2 for invalid arguments.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from edgeembed import __version__, storage
from edgeembed.backends import BackendError
from edgeembed.model import ModelError
from edgeembed.preprocess import ImageError, list_images
from edgeembed.storage import GalleryError

logger = logging.getLogger("edgeembed")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _add_common(parser: argparse.ArgumentParser, model: bool = True) -> None:
    if model:
        parser.add_argument("--model", metavar="MODEL",
                            help="TFLite embedder to use (default: the shipped int8 EfficientNet-Lite0)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="interpreter CPU threads (default: the backend's choice)")
    parser.add_argument("--backend", choices=("litert", "tflite-runtime", "tensorflow"),
                        help="TFLite interpreter package to use (default: EDGEEMBED_BACKEND, then "
                             "the first one installed)")
    parser.add_argument("-v", "--verbose", action="store_true", help="print debug logs")


def _progress(total: int, description: str):
    """Return a tqdm bar on a terminal; tqdm disables itself when stderr is not a TTY."""
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit="img", disable=None, file=sys.stderr)


def _load_embedder(args: argparse.Namespace, model: str | None = None):
    from edgeembed.embedder import Embedder

    return Embedder(model or args.model, num_threads=args.threads, backend=args.backend)


def _report_failures(failures: list[tuple[Path, str]], total: int, done: str) -> int:
    ok = total - len(failures)
    print(f"{done} {ok} of {total} images, {len(failures)} skipped", file=sys.stderr)
    return EXIT_FAILED if failures else EXIT_OK


def cmd_info(args: argparse.Namespace) -> int:
    """Print a model's tensors, preprocessing, provenance and op counts."""
    from edgeembed.backends import backend_version

    embedder = _load_embedder(args, args.model_path or args.model)
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

    paths = list_images(args.inputs)
    embedder = _load_embedder(args)
    vectors, kept, failures = [], [], []
    with _progress(len(paths), "embedding") as bar:
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
    storage.write_text(ids_path, "".join(f"{path}\n" for path in kept))
    print(f"wrote {out} ({len(kept)} x {embedder.embedding_dim}) and {ids_path}", file=sys.stderr)
    return _report_failures(failures, len(paths), "embedded")


def cmd_index_build(args: argparse.Namespace) -> int:
    """Embed every image under a folder and save a gallery."""
    from edgeembed.gallery import Gallery

    root = Path(args.image_dir)
    if not root.is_dir():
        logger.error("%s is not a folder; index build takes a folder of images", root)
        return EXIT_FAILED
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        logger.error("%s already exists; pass --overwrite to replace it", out)
        return EXIT_FAILED

    paths = list_images([root])
    ids = [path.relative_to(root).as_posix() for path in paths]
    embedder = _load_embedder(args)
    with _progress(len(paths), "indexing") as bar:
        gallery, failures = Gallery.from_images(paths, embedder, ids=ids, n_trees=args.trees,
                                                progress=lambda _: bar.update())
    gallery.save(out, overwrite=args.overwrite)
    print(f"gallery {out}: {len(gallery)} items, {gallery.dim} dimensions, {args.trees} trees",
          file=sys.stderr)
    return _report_failures(failures, len(paths), "indexed")


def _gallery_model(args: argparse.Namespace) -> str | None:
    """Return --model, else the model recorded in the gallery when that file still exists."""
    if args.model:
        return args.model
    manifest = storage.read_manifest(Path(args.gallery) / "manifest.json", "edgeembed.gallery/1")
    recorded = manifest["model"].get("path")
    return recorded if recorded and Path(recorded).is_file() else None


def _print_matches(query: str, matches: list) -> None:
    print(f"query: {query}")
    print(f"  {'rank':>4}  {'score':>6}  {'id':40}  path")
    for rank, match in enumerate(matches, 1):
        print(f"  {rank:>4}  {match.score:6.3f}  {match.id:40}  {match.path or '-'}")


def cmd_search(args: argparse.Namespace) -> int:
    """Search a gallery with query images."""
    from edgeembed.gallery import Gallery

    embedder = _load_embedder(args, _gallery_model(args))
    gallery = Gallery.open(args.gallery, embedder)
    queries = list_images(args.queries)
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
        return _report_failures(failures, len(queries), "searched")
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
    _add_common(info)
    info.set_defaults(run=cmd_info)

    embed = commands.add_parser("embed", help="embed images into a .npy file")
    embed.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="images or folders (recursive)")
    embed.add_argument("--out", required=True, metavar="FILE.npy",
                       help="output vectors; FILE.ids.txt beside it lists one image path per row")
    _add_common(embed)
    embed.set_defaults(run=cmd_embed)

    index = commands.add_parser("index", help="build and manage galleries")
    index_commands = index.add_subparsers(dest="index_command", required=True, metavar="ACTION")
    build = index_commands.add_parser("build", help="index every image under a folder")
    build.add_argument("image_dir", metavar="IMAGE_DIR", help="folder of images, searched recursively")
    build.add_argument("--out", required=True, metavar="GALLERY_DIR", help="gallery folder to write")
    build.add_argument("--trees", type=int, default=10, metavar="N",
                       help="Annoy trees; more trees give better recall and a larger index (default: 10)")
    build.add_argument("--overwrite", action="store_true", help="replace an existing gallery folder")
    _add_common(build)
    build.set_defaults(run=cmd_index_build)

    search = commands.add_parser("search", help="find the gallery items most similar to query images")
    search.add_argument("gallery", metavar="GALLERY_DIR")
    search.add_argument("queries", nargs="+", metavar="QUERY_IMAGE", help="images or folders")
    search.add_argument("-k", type=int, default=5, help="matches per query (default: 5)")
    search.add_argument("--search-k", type=int, default=-1, metavar="N",
                        help="Annoy nodes to inspect per query; -1 means trees x k (default: -1)")
    search.add_argument("--exact", action="store_true", help="search all stored vectors instead of Annoy")
    search.add_argument("--json", action="store_true",
                        help='print one JSON object per query: {"query", "matches": [{"id", "path", "score"}]}')
    _add_common(search, model=True)
    search.set_defaults(run=cmd_search)

    _add_convert(commands)
    return parser


def _add_convert(commands) -> None:
    convert = commands.add_parser("convert", help="build an int8 TFLite embedder (needs edgeembed[toolchain])")
    try:
        from edgeembed.toolchain import command
    except ImportError:  # a checkout without the toolchain package
        return
    command.configure_parser(convert)
    convert.add_argument("-v", "--verbose", action="store_true", help="print debug logs")
    convert.set_defaults(run=command.run)


def main(argv: list[str] | None = None) -> int:
    """Run the command line and return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s: %(message)s")
    try:
        return args.run(args)
    except (ModelError, BackendError, GalleryError, ImageError) as error:
        logger.error("%s", error)
        return EXIT_FAILED
    except KeyboardInterrupt:
        logger.error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
