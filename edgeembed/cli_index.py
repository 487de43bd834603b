"""``edgeembed index``: build, add, remove, compact, verify and stats."""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

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
)
from edgeembed.distributed_shards import is_uri
from edgeembed.preprocess import list_images


class LabelsError(ValueError):
    """Raised when a labels CSV cannot be read."""


def read_labels_csv(path: Path) -> dict[str, str]:
    """Read ``path,label`` rows (an optional header row ``path,label`` is skipped).

    Raises:
        LabelsError: If the file cannot be read or a row does not have two fields.
    """
    labels: dict[str, str] = {}
    try:
        handle = open(path, newline="", encoding="utf-8")
    except OSError as error:
        raise LabelsError(f"cannot read labels file {path}: {error.strerror}") from error
    with handle:
        for number, row in enumerate(csv.reader(handle), 1):
            if not row or (number == 1 and [cell.strip().lower() for cell in row] == ["path", "label"]):
                continue
            if len(row) != 2:
                raise LabelsError(f"{path}:{number}: expected 'path,label', got {len(row)} fields")
            labels[row[0].strip()] = row[1].strip()
    return labels


def _image_ids(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """List images under the inputs; an image's id is its path relative to the folder given."""
    paths, ids = [], []
    for given in map(Path, inputs):
        found = list_images([given])
        paths += found
        ids += [p.relative_to(given).as_posix() if given.is_dir() else p.name for p in found]
    return paths, ids


def _labels_for(args: argparse.Namespace, paths: list[Path], ids: list[str]) -> list[str | None] | None:
    if args.labels:
        table = read_labels_csv(Path(args.labels))
        return [table.get(item_id) or table.get(str(path)) or table.get(str(path.resolve()))
                for path, item_id in zip(paths, ids)]
    if args.label:
        return [args.label] * len(paths)
    return None


def cmd_build(args: argparse.Namespace) -> int:
    """Embed every image under a folder and save a gallery."""
    from edgeembed.gallery import Gallery

    problem = _engine_option_problem(args)
    if problem:
        logger.error("%s", problem)
        return EXIT_USAGE
    root = Path(args.image_dir)
    if not root.is_dir() and not (args.engine == "ray" and is_uri(args.image_dir)):
        logger.error("%s is not a folder; index build takes a folder of images", root)
        return EXIT_FAILED
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        logger.error("%s already exists; pass --overwrite to replace it", out)
        return EXIT_FAILED
    if args.engine == "ray":
        return _build_on_ray(args)

    paths, ids = _image_ids([args.image_dir])
    if not paths:
        find_images([args.image_dir])  # logs that the folder has no images
        return EXIT_FAILED
    labels = _labels_for(args, paths, ids)
    embedder = load_embedder(args)
    with progress_bar(len(paths), "indexing") as bar:
        gallery, failures = Gallery.from_images(paths, embedder, ids=ids, labels=labels, n_trees=args.trees,
                                                shards=args.shards, progress=lambda _: bar.update())
    gallery.save(out, overwrite=args.overwrite)
    print(f"gallery {out}: {len(gallery)} items, {gallery.dim} dimensions, {args.trees} trees",
          file=sys.stderr)
    return report_failures(failures, len(paths), "indexed")


_RAY_ONLY_OPTIONS = {"ray_address": "--ray-address", "workers": "--workers", "batch_size": "--batch-size",
                     "resume": "--resume"}


def _engine_option_problem(args: argparse.Namespace) -> str | None:
    """Return why the options do not fit the engine, or None."""
    if args.engine == "ray":
        return None
    given = [flag for name, flag in _RAY_ONLY_OPTIONS.items() if getattr(args, name) not in (None, False)]
    if given:
        return f"{', '.join(given)} need --engine ray"
    return None


def _build_on_ray(args: argparse.Namespace) -> int:
    """Run `index build` on Ray Data; the staging shards of a failed run stay for --resume."""
    if not args.verbose:
        # Ray Data logs every dataset start and finish at INFO on the console.
        os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")
    if not args.ray_address:
        # The local Ray instance listens on 127.0.0.1 only. Ray (2.60) reads this variable
        # when it is imported; otherwise it serves on the machine's network address.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        from edgeembed import distributed
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] not in ("ray", "pyarrow", "pandas"):
            raise
        logger.error("--engine ray needs the optional extra edgeembed[ray] (%s is not installed); "
                     "install it with: pip install 'edgeembed[ray]'", error.name)
        return EXIT_FAILED

    options = distributed.RayBuildOptions(
        out=Path(args.out), model_path=args.model, threads=args.threads, backend=args.backend,
        ray_address=args.ray_address, workers=args.workers, batch_size=args.batch_size or 64,
        resume=args.resume, overwrite=args.overwrite, n_trees=args.trees, shards=args.shards)
    try:
        if is_uri(args.image_dir):
            files = distributed.list_uri(args.image_dir)
            paths = [Path(path) for path in files.paths]
        else:
            paths, ids = _image_ids([args.image_dir])
            files = distributed.SourceFiles(args.image_dir, [str(path) for path in paths], ids)
        builder = distributed.RayGalleryBuilder.create(files, options, _labels_for(args, paths, files.ids))
        with progress_bar(builder.pending_rows, "indexing") as bar:
            result = builder.run(progress=bar.update)
    except distributed.DistributedBuildError as error:
        logger.error("%s", error)
        return EXIT_FAILED

    print(f"gallery {args.out}: {result.items} items, {builder.embedder.embedding_dim} dimensions, "
          f"{args.trees} trees, {args.shards} index shards", file=sys.stderr)
    print(f"ray: start-up {result.startup_seconds:.1f} s, first results after {result.first_result_seconds:.1f} s, "
          f"embedded {result.rows_embedded} images in {result.embed_seconds:.1f} s, reused {result.rows_reused} "
          "from earlier shards", file=sys.stderr)
    return report_failures(result.failures, len(files), "indexed")


def _open_with_model(args: argparse.Namespace):
    """Open the gallery with --model, or with the model that built it when that file exists."""
    from edgeembed.gallery import Gallery

    gallery = Gallery.open(args.gallery)
    gallery.attach(load_embedder(args, gallery_model(args)))
    return gallery


def cmd_add(args: argparse.Namespace) -> int:
    """Embed images and add them to a saved gallery."""
    gallery = _open_with_model(args)
    paths, ids = _image_ids(args.inputs)
    if not paths:
        find_images(args.inputs)  # logs that the inputs have no images
        return EXIT_FAILED
    labels = _labels_for(args, paths, ids)
    with progress_bar(len(paths), "adding") as bar:
        failures = gallery.add_images(paths, ids=ids, labels=labels, progress=lambda _: bar.update())
    print(f"gallery {args.gallery}: {len(gallery)} live items, {gallery.added_count} in the added segment",
          file=sys.stderr)
    return report_failures(failures, len(paths), "added")


def cmd_remove(args: argparse.Namespace) -> int:
    """Remove items by id."""
    from edgeembed.gallery import Gallery

    gallery = Gallery.open(args.gallery)
    missing = gallery.remove(args.ids)
    for item_id in missing:
        logger.warning("id %r is not in %s", item_id, args.gallery)
    print(f"removed {len(args.ids) - len(missing)} of {len(args.ids)} ids; "
          f"{len(gallery)} live items remain", file=sys.stderr)
    return EXIT_FAILED if missing else EXIT_OK


def cmd_compact(args: argparse.Namespace) -> int:
    """Rebuild the Annoy index from the live items, replacing a damaged or missing index."""
    from edgeembed.gallery import Gallery

    # Compaction never reads the old index, so a damaged one must not stop it.
    gallery = Gallery.open(args.gallery, load_index=False)
    gallery.compact(n_trees=args.trees)
    print(f"gallery {args.gallery}: compacted to {len(gallery)} items, {gallery.n_trees} trees",
          file=sys.stderr)
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    """Check files, sizes, checksums and consistency."""
    from edgeembed.gallery_check import format_verify, verify

    result = verify(args.gallery)
    print(format_verify(Path(args.gallery), result))
    return EXIT_OK if result.ok else EXIT_FAILED


def cmd_stats(args: argparse.Namespace) -> int:
    """Print item counts, segment sizes, model and disk use."""
    from edgeembed.gallery_check import format_stats, stats, to_json

    values = stats(args.gallery)
    print(to_json(values) if args.json else format_stats(values))
    return EXIT_OK


def _add_label_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--label", help="label stored with every image of this command")
    group.add_argument("--labels", metavar="CSV",
                       help="CSV of path,label rows; a path matches an item id or the image path")


def _add_ray_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("distributed build (needs edgeembed[ray])")
    group.add_argument("--engine", choices=("local", "ray"), default="local",
                       help="local: embed in this process; ray: embed on Ray Data, on this machine or a "
                            "cluster, and accept any IMAGE_DIR that Ray can read, such as s3://bucket/photos "
                            "(default: local)")
    group.add_argument("--ray-address", metavar="ADDRESS",
                       help="join the Ray cluster at ADDRESS, such as 10.0.0.5:6379 (default: start a local "
                            "Ray instance with every CPU of this machine)")
    group.add_argument("--workers", type=int, metavar="N",
                       help="embedding actors; each runs one interpreter with --threads threads, 1 unless "
                            "given (default: one actor per CPU of the cluster)")
    group.add_argument("--batch-size", type=int, metavar="B",
                       help="images per read task and per actor call (default: 64)")
    group.add_argument("--resume", action="store_true",
                       help="reuse the shards that a stopped build left in GALLERY_DIR.staging and embed "
                            "only the rest")


def configure_parser(index: argparse.ArgumentParser) -> None:
    """Add the ``index`` actions to its parser."""
    actions = index.add_subparsers(dest="index_command", required=True, metavar="ACTION")

    build = actions.add_parser("build", help="index every image under a folder")
    build.add_argument("image_dir", metavar="IMAGE_DIR", help="folder of images, searched recursively")
    build.add_argument("--out", required=True, metavar="GALLERY_DIR", help="gallery folder to write")
    build.add_argument("--trees", type=positive_int, default=10, metavar="N",
                       help="Annoy trees; more trees give better recall and a larger index (default: 10)")
    build.add_argument("--overwrite", action="store_true", help="replace an existing gallery folder")
    build.add_argument("--shards", type=positive_int, default=1, metavar="K",
                       help="split the index into K Annoy indexes that searches query together, for "
                            "galleries too large for one index (default: 1)")
    _add_ray_options(build)
    _add_label_options(build)
    add_common_options(build)
    build.set_defaults(run=cmd_build)

    add = actions.add_parser("add", help="add images to a gallery; they are searchable at once")
    add.add_argument("gallery", metavar="GALLERY_DIR", help="gallery folder written by index build")
    add.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR",
                     help="images or folders; an id is the path relative to the folder given, "
                          "or the file name")
    _add_label_options(add)
    add_common_options(add)
    add.set_defaults(run=cmd_add)

    remove = actions.add_parser("remove", help="remove items by id")
    remove.add_argument("gallery", metavar="GALLERY_DIR", help="gallery folder written by index build")
    remove.add_argument("ids", nargs="+", metavar="ID", help="item ids, as search prints them")
    remove.add_argument("-v", "--verbose", action="store_true", help="print debug logs")
    remove.set_defaults(run=cmd_remove)

    compact = actions.add_parser("compact", help="rebuild the Annoy index from all live items; this also "
                                                 "repairs a damaged or missing index file")
    compact.add_argument("gallery", metavar="GALLERY_DIR", help="gallery folder written by index build")
    compact.add_argument("--trees", type=positive_int, default=None, metavar="N",
                         help="Annoy trees for the new index (default: keep the current number)")
    compact.add_argument("-v", "--verbose", action="store_true", help="print debug logs")
    compact.set_defaults(run=cmd_compact)

    verify = actions.add_parser("verify", help="check every file against the manifest")
    verify.add_argument("gallery", metavar="GALLERY_DIR", help="gallery folder written by index build")
    verify.add_argument("-v", "--verbose", action="store_true", help="print debug logs")
    verify.set_defaults(run=cmd_verify)

    stats = actions.add_parser("stats", help="count items and disk use")
    stats.add_argument("gallery", metavar="GALLERY_DIR", help="gallery folder written by index build")
    stats.add_argument("--json", action="store_true",
                       help="print one JSON object with the integer fields items, live and removed")
    stats.add_argument("-v", "--verbose", action="store_true", help="print debug logs")
    stats.set_defaults(run=cmd_stats)

