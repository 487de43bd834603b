"""``edgeembed bench``: measure models and galleries, write JSON, Markdown and PNG plots.

    edgeembed bench --photos DIR [--model M ...] [--profile pi4] [--runs 100]
    edgeembed bench --merge a.json b.json      # compare runs from several machines

The measuring happens in a child process (`edgeembed.bench_run`) that applies the
device profile; this process only prepares the settings and writes the reports.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from edgeembed.cli_common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, positive_int

logger = logging.getLogger(__name__)


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid list {text!r}; use comma-separated integers") from None


def _size_list(text: str) -> list[int]:
    values = _int_list(text)
    if any(value < 1 for value in values):
        raise argparse.ArgumentTypeError(f"invalid list {text!r}; every value must be 1 or more")
    return values


def _name_list(choices: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        names = [part.strip() for part in text.split(",") if part.strip() and part.strip() != "none"]
        unknown = [name for name in names if name not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)}; use any of {', '.join(choices)} or none")
        return names
    return parse


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``bench`` options to `parser`."""
    from edgeembed.bench_peers import PEERS
    from edgeembed.bench_run import STAGES
    from edgeembed.cli import _add_common

    parser.description = ("Measure cold start, latency by stage, threads, throughput, memory and gallery "
                          "search for each model, with the machine recorded, and write JSON, Markdown and PNG.")
    parser.add_argument("--model", action="append", metavar="MODEL",
                        help="TFLite embedder to measure; repeat for several (default: the shipped model). "
                             "The first one is compared with the peers and used for the gallery")
    _add_common(parser, model=False)
    for action in parser._actions:
        if action.dest == "threads":
            action.help = "interpreter CPU threads (default: the profile's, or one per usable CPU)"
    parser.add_argument("--photos", metavar="DIR",
                        help="folder of real photos (searched recursively); required unless --merge")
    parser.add_argument("--reference-photo", metavar="FILE",
                        help="photo to make the 0.3 MP and 12 MP JPEGs from (default: the largest in --photos)")
    parser.add_argument("--runs", type=positive_int, default=100, metavar="N",
                        help="timed runs per latency figure (default: 100)")
    parser.add_argument("--warmup", type=int, default=10, metavar="N",
                        help="untimed runs before each latency figure (default: 10)")
    parser.add_argument("--profile", default="host", metavar="NAME",
                        help="device profile that limits CPUs, threads and memory (default: host)")
    parser.add_argument("--profiles", metavar="FILE",
                        help="profiles file (default: the profiles.json installed with edgeembed)")
    parser.add_argument("--gallery-sizes", type=_size_list, default=[1000, 10000, 100000], metavar="LIST",
                        help="gallery item counts (default: 1000,10000,100000; empty skips the gallery)")
    parser.add_argument("--n-trees", type=_size_list, default=[10, 50], metavar="LIST",
                        help="Annoy tree counts to build per gallery (default: 10,50)")
    parser.add_argument("--search-k", type=_int_list, default=[-1, 2000, 5000, 10000, 20000, 30000], metavar="LIST",
                        help="Annoy search_k values per index; -1 is n_trees x k. Write --search-k=-1,2000 "
                             "so that the leading minus is not read as an option (default: -1,2000,5000,10000,20000,30000)")
    parser.add_argument("--queries", type=positive_int, default=100, metavar="N",
                        help="queries per gallery (default: 100)")
    parser.add_argument("--real-images", type=positive_int, default=800, metavar="N",
                        help="photos to embed for the gallery's real embeddings (default: 800)")
    parser.add_argument("--folder-images", type=positive_int, default=48, metavar="N",
                        help="photos in the throughput folder (default: 48)")
    parser.add_argument("--cold-runs", type=positive_int, default=3, metavar="N",
                        help="fresh processes for the cold start (default: 3)")
    parser.add_argument("--peers", type=_name_list(PEERS), default=list(PEERS), metavar="LIST",
                        help="peer runtimes: pytorch,onnxruntime or none (default: both, where installed)")
    parser.add_argument("--skip", type=_name_list(STAGES), default=[], metavar="LIST",
                        help=f"stages to leave out: {','.join(STAGES)}")
    parser.add_argument("--out", default="bench-results", metavar="DIR",
                        help="folder for the JSON, Markdown and PNG files (default: bench-results)")
    parser.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    parser.add_argument("--merge", nargs="+", metavar="RESULT.json",
                        help="print a Markdown table comparing result files instead of measuring")


def run_merge(paths: list[str]) -> int:
    """Print the merged table of several result files."""
    from edgeembed.bench_report import ResultError, load_result, merge_markdown

    try:
        results = [load_result(path) for path in paths]
    except ResultError as error:
        logger.error("%s", error)
        return EXIT_FAILED
    print(merge_markdown(results), end="")
    return EXIT_OK


def _settings(args: argparse.Namespace, profile) -> dict:
    from edgeembed.bench_run import BenchSettings

    settings = BenchSettings(
        models=args.model or [None], photos=str(Path(args.photos).resolve()), profile=asdict(profile),
        runs=args.runs, warmup=max(0, args.warmup), threads=args.threads, backend=args.backend,
        gallery_sizes=args.gallery_sizes, n_trees=args.n_trees, search_k=args.search_k, queries=args.queries,
        real_images=args.real_images, folder_images=args.folder_images, cold_runs=args.cold_runs,
        peers=args.peers, skip=args.skip,
        reference_photo=str(Path(args.reference_photo).resolve()) if args.reference_photo else None,
        verbose=args.verbose)
    settings.models = [str(Path(model).resolve()) if model else None for model in settings.models]
    return asdict(settings)


def write_reports(result_path: Path, plots: bool) -> tuple[dict, list[Path]]:
    """Add the target verdicts to a result file and write its Markdown and PNG files.

    Returns:
        The result document and the files written besides the JSON.
    """
    from edgeembed import storage
    from edgeembed.bench_plots import write_plots
    from edgeembed.bench_report import load_result, render_markdown
    from edgeembed.bench_targets import evaluate_targets, targets_as_dicts

    result = load_result(result_path)
    result["targets"] = targets_as_dicts(evaluate_targets(result))
    storage.write_text(result_path, json.dumps(result, indent=1))

    stem = result_path.with_suffix("")
    pictures = write_plots(result, stem) if plots else []
    markdown = result_path.with_suffix(".md")
    storage.write_text(markdown, render_markdown(result, [str(p) for p in pictures]))
    return result, [markdown, *pictures]


def run(args: argparse.Namespace) -> int:
    """Run ``edgeembed bench``: measure in a child process, then write the reports."""
    from edgeembed.bench_machine import ProfileError, find_profile

    if args.merge:
        return run_merge(args.merge)
    if not args.photos:
        logger.error("--photos DIR is required: the benchmark runs on real photos you provide")
        return EXIT_USAGE
    if not Path(args.photos).is_dir():
        logger.error("photo folder %s not found; pass --photos DIR with real photos", args.photos)
        return EXIT_USAGE
    for model in args.model or []:
        if not Path(model).is_file():
            logger.error("model %s not found; pass an existing .tflite file to --model", model)
            return EXIT_USAGE
    try:
        profile = find_profile(args.profile, args.profiles)
    except ProfileError as error:
        logger.error("%s", error)
        return EXIT_USAGE

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    result_path = out / f"bench-{stamp}-{profile.name}.json"
    with tempfile.TemporaryDirectory(prefix="edgeembed-bench-") as scratch:
        settings_path = Path(scratch) / "settings.json"
        settings_path.write_text(json.dumps(_settings(args, profile)), encoding="utf-8")
        command = [sys.executable, "-m", "edgeembed.bench_run", str(settings_path), str(result_path)]
        logger.info("running %s", " ".join(command))
        completed = subprocess.run(command)

    if not result_path.is_file():
        logger.error("the benchmark process exited with %d before writing %s", completed.returncode, result_path)
        return EXIT_FAILED
    result, written = write_reports(result_path, plots=not args.no_plots)

    for target in result["targets"]:
        verdict = {True: "met", False: "MISSED", None: "not measured"}[target["met"]]
        print(f"{verdict:12} {target['description']}: {target['value'] or '-'} (limit {target['threshold']})"
              + (f"; {target['gap']}" if target["gap"] else ""))
    for path in [result_path, *written]:
        print(f"wrote {path}")
    if completed.returncode != 0:
        logger.error("the benchmark process exited with %d; the report holds what it measured",
                     completed.returncode)
        return EXIT_FAILED
    if result["errors"]:
        logger.error("%d stage(s) failed; see the Errors section of %s", len(result["errors"]), written[0])
        return EXIT_FAILED
    return EXIT_OK
