"""``edgeembed camera``: match live camera frames against a gallery.

Events go to stdout, one readable line each, or one JSON object per line with
``--json``. Logs and the closing summary go to stderr. SIGINT and SIGTERM end the
run cleanly, with the summary and exit code 0. A source that cannot be opened or
fails for good exits with 1, invalid options with 2.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from edgeembed.camera_sources import parse_size
from edgeembed.cli_common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    add_common_options,
    gallery_model,
    load_embedder,
    logger,
)


def _argument_type(parse):
    """Wrap a parser that raises ValueError so that argparse reports its message."""
    def convert(text: str):
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    convert.__name__ = parse.__name__
    return convert


def _roi(text: str) -> tuple[int, int, int, int]:
    from edgeembed.camera import parse_roi

    return parse_roi(text)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the camera command's arguments to `parser`."""
    parser.description = ("Read frames from a camera, stream or video file, embed them, search the "
                          "gallery and report matches while the camera runs. Needs edgeembed[camera].")
    parser.add_argument("gallery", metavar="GALLERY_DIR", help="gallery folder from 'edgeembed index build'")
    parser.add_argument("--source", required=True, metavar="SOURCE",
                        help="V4L2 device index (0), video file, rtsp:// or http:// stream URL, or "
                             "picamera2 (picamera2:N for camera N)")

    parser.add_argument("--roi", type=_argument_type(_roi), metavar="X,Y,W,H",
                        help="embed only this region of each frame, in pixels")
    parser.add_argument("--center-crop", type=float, metavar="FRACTION",
                        help="embed only the central FRACTION (0-1] of the width and height "
                             "(of the roi, when given)")
    parser.add_argument("--every", type=int, default=1, metavar="N",
                        help="embed at most every Nth frame read (default: 1)")

    parser.add_argument("--threshold", type=float, metavar="SCORE",
                        help="minimum cosine score for a match (default: derived from the gallery's "
                             "nearest-neighbour scores, shown in the start event)")
    parser.add_argument("--min-frames", type=int, default=3, metavar="N",
                        help="consecutive embedded frames needed to report a match and to lose it "
                             "(default: 3)")
    parser.add_argument("--cooldown", type=float, default=10.0, metavar="SECONDS",
                        help="seconds before the same id is reported again, unless another id is "
                             "reported in between (default: 10)")

    parser.add_argument("--no-realtime", dest="realtime", action="store_false",
                        help="process every frame of a video file as fast as possible instead of "
                             "at its own frame rate")
    parser.add_argument("--camera-size", type=_argument_type(parse_size), metavar="WIDTHxHEIGHT",
                        help="capture size requested from a camera device or picamera2")
    parser.add_argument("--max-reconnects", type=int, metavar="N",
                        help="give up after N attempts to reopen a failed camera or stream "
                             "(default: retry forever, with waits doubling from 0.5 s to 30 s)")

    parser.add_argument("--exact", action="store_true", help="search all vectors instead of Annoy")
    parser.add_argument("--search-k", type=int, default=-1, metavar="N",
                        help="Annoy nodes to inspect per frame; -1 means trees x 5 (default: -1)")

    parser.add_argument("--save-annotated", metavar="OUT.mp4",
                        help="write the frames with the current match and score drawn on them "
                             "(.mp4 or .avi)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object per event: start, match, lost, reconnect, stop")
    add_common_options(parser)


def _options(args: argparse.Namespace):
    from edgeembed.camera import CameraOptions

    return CameraOptions(
        source=args.source, roi=args.roi, center_crop=args.center_crop, every=args.every,
        threshold=args.threshold, min_frames=args.min_frames, cooldown_s=args.cooldown,
        realtime=args.realtime, camera_size=args.camera_size, exact=args.exact,
        search_k=args.search_k, max_reconnects=args.max_reconnects,
        annotated_path=args.save_annotated)


def format_event(record: dict) -> str:
    """Return one readable line for an event's JSON object."""
    kind = record["event"]
    head = f"{record['time']}  {kind:9} frame {record['frame']:>6}"
    if kind == "start":
        fps = f"{record['fps']:.2f} fps" if record["fps"] else "unknown fps"
        return (f"{head}  {record['source']} ({fps}), {record['items']} gallery items, threshold "
                f"{record['threshold']:.3f} (from {record['threshold_source']}), min frames "
                f"{record['min_frames']}, cooldown {record['cooldown_s']:g} s")
    if kind == "match":
        return f"{head}  {record['id']}  score {record['score']:.3f}  latency {record['latency_ms']:.0f} ms"
    if kind == "lost":
        return f"{head}  {record['id']}  after {record['duration_s']:.1f} s"
    if kind == "reconnect":
        return f"{head}  attempt {record['attempt']} in {record['delay_s']:g} s: {record['error']}"
    return f"{head}  {record['reason']}"


def format_summary(summary) -> str:
    """Return the closing summary of a run as two readable lines."""
    latency = "no frame embedded"
    if summary.latency_p50_ms is not None:
        latency = (f"latency p50 {summary.latency_p50_ms:.0f} ms, p95 {summary.latency_p95_ms:.0f} ms, "
                   f"p99 {summary.latency_p99_ms:.0f} ms")
    return (f"frames read {summary.frames_read}, embedded {summary.frames_embedded}, dropped "
            f"{summary.frames_dropped}, skipped {summary.frames_skipped}; matches {summary.matches}; "
            f"reconnects {summary.reconnects}\n"
            f"{summary.duration_s:.1f} s, {summary.read_fps:.1f} frames/s read, "
            f"{summary.embed_fps:.1f} frames/s embedded; {latency}")


def _quiet_opencv() -> None:
    """Hide OpenCV's own warnings, which repeat the camera loop's errors and logs."""
    try:
        import cv2.utils.logging
    except ImportError:
        return  # the loop reports the missing OpenCV itself
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)


def _install_stop_handlers(loop) -> dict:
    """Make SIGINT and SIGTERM stop the loop; a second signal interrupts at once."""
    def handle(number, _frame):
        if loop.stopping:
            raise KeyboardInterrupt
        logger.warning("received %s; stopping after the current frame", signal.Signals(number).name)
        loop.stop()

    return {number: signal.signal(number, handle) for number in (signal.SIGINT, signal.SIGTERM)}


def run(args: argparse.Namespace) -> int:
    """Run the camera loop and print its events; return the exit code."""
    from edgeembed.camera import CameraLoop
    from edgeembed.camera_sources import CameraError
    from edgeembed.gallery import Gallery

    try:
        options = _options(args)
    except ValueError as error:
        logger.error("%s", error)
        return EXIT_USAGE
    if not args.verbose:
        _quiet_opencv()
    embedder = load_embedder(args, gallery_model(args))
    gallery = Gallery.open(args.gallery, embedder)

    try:
        loop = CameraLoop(gallery, embedder, options)
    except (CameraError, ValueError) as error:
        logger.error("%s", error)
        return EXIT_USAGE
    previous = _install_stop_handlers(loop)
    events = loop.events()
    stop_reason = None
    try:
        for event in events:
            record = event.to_dict()
            print(json.dumps(record, ensure_ascii=False) if args.json else format_event(record), flush=True)
            stop_reason = record.get("reason")
    except BrokenPipeError:
        # The reader of stdout has gone (as with `| head`), so stop without printing more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        logger.warning("stdout was closed; stopping the camera loop")
    except CameraError as error:
        logger.error("%s", error)
        return EXIT_FAILED
    except ValueError as error:
        logger.error("%s", error)
        return EXIT_USAGE
    finally:
        events.close()
        for number, handler in previous.items():
            signal.signal(number, handler)

    if loop.summary is not None:
        print(format_summary(loop.summary), file=sys.stderr)
    return EXIT_FAILED if stop_reason and stop_reason.startswith("source failed") else EXIT_OK
