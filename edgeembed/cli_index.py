"""``edgeembed index``: build, add, remove, compact, verify and stats."""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from edgeembed.cli_common import (
    EXIT_FAILED,
    EXIT_OK,
    add_common_options,
    load_embedder,
    logger,
    progress_bar,
    report_failures,
)
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

    root = Path(args.image_dir)
    if not root.is_dir():
        logger.error("%s is not a folder; index build takes a folder of images", root)
        return EXIT_FAILED
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        logger.error("%s already exists; pass --overwrite to replace it", out)
        return EXIT_FAILED

    paths, ids = _image_ids([args.image_dir])
    labels = _labels_for(args, paths, ids)
    embedder = load_embedder(args)
    with progress_bar(len(paths), "indexing") as bar:
        gallery, failures = Gallery.from_images(paths, embedder, ids=ids, labels=labels,
                                                n_trees=args.trees, progress=lambda _: bar.update())
    gallery.save(out, overwrite=args.overwrite)
    print(f"gallery {out}: {len(gallery)} items, {gallery.dim} dimensions, {args.trees} trees",
          file=sys.stderr)
    return report_failures(failures, len(paths), "indexed")


def _open_with_model(args: argparse.Namespace):
    """Open the gallery with --model, or with the model that built it when that file exists."""
    from edgeembed.gallery import Gallery

    gallery = Gallery.open(args.gallery)
    model = args.model or (gallery.model_path if gallery.model_path and Path(gallery.model_path).is_file()
                           else None)
    gallery.attach(load_embedder(args, model))
    return gallery


def cmd_add(args: argparse.Namespace) -> int:
    """Embed images and add them to a saved gallery."""
    gallery = _open_with_model(args)
    paths, ids = _image_ids(args.inputs)
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
    """Rebuild the Annoy index from the live items."""
    from edgeembed.gallery import Gallery

    gallery = Gallery.open(args.gallery)
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


def configure_parser(index: argparse.ArgumentParser) -> None:
    """Add the ``index`` actions to its parser."""
    actions = index.add_subparsers(dest="index_command", required=True, metavar="ACTION")

    build = actions.add_parser("build", help="index every image under a folder")
    build.add_argument("image_dir", metavar="IMAGE_DIR", help="folder of images, searched recursively")
    build.add_argument("--out", required=True, metavar="GALLERY_DIR", help="gallery folder to write")
    build.add_argument("--trees", type=int, default=10, metavar="N",
                       help="Annoy trees; more trees give better recall and a larger index (default: 10)")
    build.add_argument("--overwrite", action="store_true", help="replace an existing gallery folder")
    _add_label_options(build)
    add_common_options(build)
    build.set_defaults(run=cmd_build)

    add = actions.add_parser("add", help="add images to a gallery; they are searchable at once")
    add.add_argument("gallery", metavar="GALLERY_DIR")
    add.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR",
                     help="images or folders; an id is the path relative to the folder given, "
                          "or the file name")
    _add_label_options(add)
    add_common_options(add)
    add.set_defaults(run=cmd_add)

    remove = actions.add_parser("remove", help="remove items by id")
    remove.add_argument("gallery", metavar="GALLERY_DIR")
    remove.add_argument("ids", nargs="+", metavar="ID")
    remove.add_argument("-v", "--verbose", action="store_true", help="print debug logs")
    remove.set_defaults(run=cmd_remove)

    compact = actions.add_parser("compact", help="rebuild the Annoy index from all live items")
    compact.add_argument("gallery", metavar="GALLERY_DIR")
    compact.add_argument("--trees", type=int, default=None, metavar="N",
                         help="Annoy trees for the new index (default: keep the current number)")
    compact.add_argument("-v", "--verbose", action="store_true", help="print debug logs")
    compact.set_defaults(run=cmd_compact)

    verify = actions.add_parser("verify", help="check every file against the manifest")
    verify.add_argument("gallery", metavar="GALLERY_DIR")
    verify.add_argument("-v", "--verbose", action="store_true", help="print debug logs")
    verify.set_defaults(run=cmd_verify)

    stats = actions.add_parser("stats", help="count items and disk use")
    stats.add_argument("gallery", metavar="GALLERY_DIR")
    stats.add_argument("--json", action="store_true",
                       help="print one JSON object with the integer fields items, live and removed")
    stats.add_argument("-v", "--verbose", action="store_true", help="print debug logs")
    stats.set_defaults(run=cmd_stats)

