"""``edgeembed eval``: retrieval quality of a model on a folder of labelled images.

    edgeembed eval LABELLED_DIR [--gallery-split GALLERY_DIR] [--model MODEL] [--json]

LABELLED_DIR contains one sub-folder per class or identity. By default every image is
a query against all the others (leave-one-out). With ``--gallery-split GALLERY_DIR``
the images of LABELLED_DIR are the queries and the images of GALLERY_DIR the gallery,
matched by class sub-folder name.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from edgeembed import cli_common
from edgeembed.evaluate import (
    LEAVE_ONE_OUT,
    EvaluationResult,
    LabelledEmbeddings,
    LabelledFolderError,
    embed_labelled_images,
    evaluate,
    list_labelled_images,
    natural_key,
)

logger = logging.getLogger(__name__)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``eval`` arguments to `parser`."""
    parser.description = (
        "Measure retrieval quality on labelled images: recall@1, recall@5, mean average "
        "precision, per-class recall@1 and the most confused class pairs. Images are "
        "ranked by cosine similarity.")
    parser.add_argument("labelled_dir", metavar="LABELLED_DIR",
                        help="folder with one sub-folder of images per class or identity")
    parser.add_argument("--gallery-split", metavar="GALLERY_DIR",
                        help="search the images of LABELLED_DIR (the queries) against the images "
                             "of GALLERY_DIR, whose class sub-folders have the same names "
                             "(default: leave-one-out within LABELLED_DIR)")
    parser.add_argument("--confusions", type=int, default=5, metavar="N",
                        help="class pairs to list as the hardest confusions (default: 5)")
    parser.add_argument("--json", action="store_true",
                        help='print one JSON object with "recall@1", "recall@5", "mAP", '
                             '"per_class", "n_images", "n_classes" and more')
    cli_common.add_common_options(parser)


def _embed_items(items: list[tuple[Path, str]], embedder, description: str) -> LabelledEmbeddings:
    with cli_common.progress_bar(len(items), description) as bar:
        return embed_labelled_images(items, embedder, progress=lambda _: bar.update())


def _warn_shared_images(queries: LabelledEmbeddings, gallery: LabelledEmbeddings) -> None:
    query_files = {path.resolve() for path in queries.paths}
    shared = [path for path in gallery.paths if path.resolve() in query_files]
    if shared:
        logger.warning("%d images (e.g. %s) are both queries and gallery items; each finds "
                       "itself at rank 1, which inflates the metrics", len(shared), shared[0])


def format_report(result: EvaluationResult, model: str, labelled_dir: str,
                  gallery_dir: str | None) -> str:
    """Format the metrics as a readable table: totals, per-class results (worst
    first) and the hardest confusions."""
    if result.mode == LEAVE_ONE_OUT:
        setup = f"leave-one-out in {labelled_dir}"
    else:
        setup = f"queries from {labelled_dir}, gallery {gallery_dir}"
    lines = [
        f"{'model':10} {model}",
        (f"{'images':10} {result.n_images} in {result.n_classes} classes, "
         f"{result.n_queries} queries scored ({setup})"),
        f"{'recall@1':10} {result.recall_at_1:.3f}",
        f"{'recall@5':10} {result.recall_at_5:.3f}",
        f"{'mAP':10} {result.mean_average_precision:.3f}",
    ]

    if result.excluded_classes:
        reason = ("have a single image" if result.mode == LEAVE_ONE_OUT
                  else "have no image in the gallery")
        lines.append(f"excluded {len(result.excluded_classes)} classes whose queries {reason}: "
                     + ", ".join(result.excluded_classes))

    width = max(len("class"), *(len(name) for name in result.per_class))
    lines += ["", f"{'class':{width}}  queries  recall@1    mAP   (worst recall@1 first)"]
    ordered = sorted(result.per_class.items(),
                     key=lambda item: (item[1].recall_at_1, item[1].mean_average_precision,
                                       natural_key(item[0])))
    for name, item in ordered:
        lines.append(f"{name:{width}}  {item.n_queries:7d}  {item.recall_at_1:8.3f}  "
                     f"{item.mean_average_precision:5.3f}")

    if result.confusions:
        lines += ["", "hardest confusions (queries of either class whose nearest image is of the other)"]
        for confusion in result.confusions:
            first, second = confusion.classes
            lines.append(f"  {first} <-> {second}  {confusion.count}")
    return "\n".join(lines)


def _to_json(result: EvaluationResult, embedder, args: argparse.Namespace,
             skipped: list[tuple[Path, str]]) -> str:
    report = result.to_dict()
    report.update({
        "model": str(embedder.model_path),
        "model_sha256": embedder.fingerprint,
        "labelled_dir": args.labelled_dir,
        "gallery_dir": args.gallery_split,
        "n_skipped": len(skipped),
        "skipped": [{"path": str(path), "error": reason} for path, reason in skipped],
    })
    return json.dumps(report, indent=2)


def run(args: argparse.Namespace) -> int:
    """Embed the labelled images, print the retrieval metrics and return the exit code."""
    if args.confusions < 0:
        logger.error("--confusions must be 0 or more, got %d", args.confusions)
        return cli_common.EXIT_USAGE

    # Both folders are listed before the model loads, so a wrong path fails at once.
    try:
        query_items = list_labelled_images(args.labelled_dir)
        gallery_items = list_labelled_images(args.gallery_split) if args.gallery_split else None
    except LabelledFolderError as error:
        logger.error("%s", error)
        return cli_common.EXIT_FAILED

    embedder = cli_common.load_embedder(args)
    queries = _embed_items(query_items, embedder, "embedding")
    gallery = _embed_items(gallery_items, embedder, "embedding gallery") if gallery_items else None
    skipped = queries.skipped + (gallery.skipped if gallery else [])
    total = len(query_items) + (len(gallery_items) if gallery_items else 0)

    for data, folder in ((queries, args.labelled_dir), (gallery, args.gallery_split)):
        if data is not None and not data.paths:
            logger.error("no image in %s could be embedded; nothing to evaluate", folder)
            cli_common.report_failures(skipped, total, "embedded")
            return cli_common.EXIT_FAILED
    if gallery is not None:
        _warn_shared_images(queries, gallery)

    try:
        result = evaluate(queries.vectors, queries.labels,
                          gallery_vectors=gallery.vectors if gallery else None,
                          gallery_labels=gallery.labels if gallery else None,
                          max_confusions=args.confusions)
    except ValueError as error:
        logger.error("cannot evaluate %s: %s", args.labelled_dir, error)
        cli_common.report_failures(skipped, total, "embedded")
        return cli_common.EXIT_FAILED

    if args.json:
        print(_to_json(result, embedder, args, skipped))
    else:
        print(format_report(result, str(embedder.model_path), args.labelled_dir, args.gallery_split))
    return cli_common.report_failures(skipped, total, "embedded")
