"""Match camera frames against a gallery while the camera runs: the API behind ``edgeembed camera``.

    >>> from edgeembed import Embedder
    >>> from edgeembed.gallery import Gallery
    >>> from edgeembed.camera import CameraOptions, run_camera
    >>> embedder = Embedder()
    >>> gallery = Gallery.open("gallery/", embedder)
    >>> for event in run_camera(gallery, embedder, CameraOptions(source="0")):
    ...     print(event.to_dict())

Frames are processed as in MediaPipe's LIVE_STREAM running mode. A capture thread
keeps only the newest frame, so when the model, or the code that consumes the events,
is slower than the camera, frames are dropped and counted instead of queued, and
latency stays bounded. In this mode capture does not wait for the consumer. With
``realtime=False`` a video file is read frame by frame instead: capture waits until
the loop has taken each frame, and every frame is processed.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from edgeembed.camera_capture import CaptureThread, Frame, FrameSlot
from edgeembed.camera_events import (
    CameraEvent,
    CameraSummary,
    FrameEvent,
    LatencyWindow,
    MatchTracker,
    ReconnectEvent,
    StartEvent,
    StopEvent,
    derive_threshold,
)
from edgeembed.camera_sources import AnnotatedVideoWriter, CameraError, FrameSource, SourceError, open_source
from edgeembed.embedder import Embedder
from edgeembed.gallery import Gallery
from edgeembed.items import Match

logger = logging.getLogger(__name__)

__all__ = [
    "CameraError", "CameraEvent", "CameraLoop", "CameraOptions", "CameraSummary", "SourceError",
    "derive_threshold", "run_camera",
]

# Annoy candidates per frame; the best of them is the frame's match.
SEARCH_CANDIDATES = 5

# Seconds the loop waits for a frame before it checks for stop requests and notices.
_POLL_S = 0.1

# Seconds to wait for the capture thread after a stop; a stream read can block this
# long (the FFmpeg read timeout) before it returns.
_JOIN_TIMEOUT_S = 12.0


@dataclass
class CameraOptions:
    """Options for `CameraLoop`.

    Attributes:
        source: ``"picamera2"``, a V4L2 device index such as ``0``, a stream URL
            (``rtsp://``, ``http://``) or a video file.
        roi: Region of each frame to embed, as (x, y, width, height) in pixels;
            None embeds the whole frame.
        center_crop: Fraction in (0, 1] of the width and of the height kept around
            the centre of the frame (of the roi, when one is set).
        every: Embed a frame only when at least this many frames were read since the
            last embedded frame. 1 embeds every frame that the model can keep up with.
        threshold: Minimum cosine score for a match. None derives it from the gallery
            with `derive_threshold`.
        min_frames: Consecutive embedded frames in which the same id must pass the
            threshold before its match is reported, and in which it must fail
            before the match is lost.
        cooldown_s: Seconds, on the source's clock, after an id is reported during
            which it is not reported again, unless another id is reported in between.
        realtime: Deliver a video file at its own frame rate, as a camera would,
            so that frames the model cannot keep up with are dropped. False
            processes every frame of a file as fast as possible.
        camera_size: (width, height) requested from a camera; None keeps its default.
        exact: Search all gallery vectors instead of the Annoy index.
        search_k: Annoy nodes inspected per search; -1 means trees x candidates.
        max_reconnects: Attempts to reopen a live source that failed before the run
            ends; None retries forever.
        reconnect_delay_s: Seconds before the first attempt; the wait doubles with
            each further attempt.
        max_reconnect_delay_s: Upper limit of that wait.
        annotated_path: Video file (.mp4 or .avi) to write with the current match
            and score drawn on each frame the loop took.
        report_frames: Also yield a `FrameEvent` for every embedded frame.
    """

    source: str | int = 0
    roi: tuple[int, int, int, int] | None = None
    center_crop: float | None = None
    every: int = 1
    threshold: float | None = None
    min_frames: int = 3
    cooldown_s: float = 10.0
    realtime: bool = True
    camera_size: tuple[int, int] | None = None
    exact: bool = False
    search_k: int = -1
    max_reconnects: int | None = None
    reconnect_delay_s: float = 0.5
    max_reconnect_delay_s: float = 30.0
    annotated_path: str | Path | None = None
    report_frames: bool = False

    def __post_init__(self) -> None:
        """Raise ValueError naming the first invalid option."""
        if self.roi is not None and (len(self.roi) != 4 or min(self.roi[2:]) < 1 or min(self.roi[:2]) < 0):
            raise ValueError(f"invalid roi {self.roi}: give x,y,width,height with x, y >= 0 and sizes >= 1")
        if self.center_crop is not None and not 0.0 < self.center_crop <= 1.0:
            raise ValueError(f"invalid center_crop {self.center_crop}: it must be in (0, 1]")
        if self.threshold is not None and not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"invalid threshold {self.threshold}: cosine scores lie in [-1, 1]")
        for name in ("every", "min_frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"invalid {name} {getattr(self, name)}: use 1 or more")
        if self.cooldown_s < 0 or self.reconnect_delay_s < 0 or self.max_reconnect_delay_s < 0:
            raise ValueError("cooldown and reconnect delays must not be negative")
        if self.max_reconnects is not None and self.max_reconnects < 0:
            raise ValueError(f"invalid max_reconnects {self.max_reconnects}: use 0 or more, or None")


def parse_roi(text: str) -> tuple[int, int, int, int]:
    """Parse ``"x,y,w,h"`` into four integers.

    Raises:
        ValueError: If the text is not four comma-separated integers.
    """
    parts = [part.strip() for part in text.split(",")]
    if len(parts) != 4 or not all(part.isdigit() for part in parts):
        raise ValueError(f"invalid roi {text!r}: use x,y,width,height in pixels, for example 100,50,320,240")
    x, y, width, height = (int(part) for part in parts)
    return x, y, width, height


def embed_region(width: int, height: int, roi: tuple[int, int, int, int] | None,
                 center_crop: float | None) -> tuple[int, int, int, int]:
    """Return the (x, y, width, height) part of a frame that is embedded.

    Raises:
        ValueError: If the roi extends past the frame.
    """
    x, y, box_width, box_height = roi or (0, 0, width, height)
    if x + box_width > width or y + box_height > height:
        raise ValueError(f"roi {x},{y},{box_width},{box_height} extends past the {width}x{height} "
                         "frame; choose a region inside the frame")
    if center_crop is not None:
        cropped_width = max(1, round(box_width * center_crop))
        cropped_height = max(1, round(box_height * center_crop))
        x += (box_width - cropped_width) // 2
        y += (box_height - cropped_height) // 2
        box_width, box_height = cropped_width, cropped_height
    return x, y, box_width, box_height


def _now() -> datetime:
    return datetime.now(timezone.utc)


class CameraLoop:
    """Reads frames, embeds them, searches the gallery and yields `CameraEvent` objects.

    Iterate over `events` (or the loop itself). Call `stop` from a signal handler or
    another thread to end the run. The loop then yields a lost event for an active
    match and a final `StopEvent` with the `CameraSummary`.
    """

    def __init__(self, gallery: Gallery, embedder: Embedder, options: CameraOptions | None = None,
                 source: FrameSource | None = None) -> None:
        """Prepare a run; nothing is opened until iteration starts.

        Args:
            gallery: The gallery to search.
            embedder: The model that built the gallery. Anything with ``prepare``,
                ``embed_pixels`` and the model's ``fingerprint`` works.
            options: Run options; None uses the defaults.
            source: A frame source; None opens ``options.source``.

        Raises:
            GalleryError: If the embedder is not the model that built the gallery.
            CameraError: If no threshold is set and the gallery is too small to derive one.
            ValueError: If ``options.source`` names an invalid picamera2 camera.
        """
        self.options = options or CameraOptions()
        gallery.attach(embedder)
        self.gallery = gallery
        self.embedder = embedder
        self.source = source or open_source(self.options.source, self.options.camera_size)
        if self.options.threshold is not None:
            self.threshold, self.neighbour_level = self.options.threshold, None
        else:
            self.threshold, self.neighbour_level = derive_threshold(gallery)
            logger.info("threshold %.3f derived from the gallery (nearest-neighbour scores, 90th "
                        "percentile %.3f)", self.threshold, self.neighbour_level)
        # The summary of the latest run, set when its events end, also early.
        self.summary: CameraSummary | None = None
        self._stop_requested = threading.Event()

    def stop(self) -> None:
        """Ask the loop to finish after the frame in progress; safe from signal handlers."""
        self._stop_requested.set()

    @property
    def stopping(self) -> bool:
        """Whether `stop` was called."""
        return self._stop_requested.is_set()

    def __iter__(self) -> Iterator[CameraEvent]:
        return self.events()

    def events(self) -> Iterator[CameraEvent]:
        """Open the source and yield events until the source ends, fails or `stop` is called.

        Raises:
            SourceError: If the source cannot be opened.
            CameraError: If OpenCV is missing or the annotated video cannot be written.
            ValueError: If the roi extends past the frames.
        """
        options = self.options
        writer = None
        if options.annotated_path is not None:
            # NOTE: cameras that report no frame rate are written at an assumed 30 fps.
            writer = AnnotatedVideoWriter(options.annotated_path, fps=30.0)
        self.source.open()
        if writer is not None and self.source.fps:
            writer.fps = self.source.fps

        slot = FrameSlot(keep_latest=options.realtime or self.source.live)
        capture = CaptureThread(self.source, slot, pace=options.realtime,
                                reconnect_delay_s=options.reconnect_delay_s,
                                max_reconnect_delay_s=options.max_reconnect_delay_s,
                                max_reconnects=options.max_reconnects)
        run = _Run(MatchTracker(self.threshold, options.min_frames, options.cooldown_s), writer)
        capture.start()
        try:
            yield self._start_event()
            yield from self._process(capture, slot, run)
        finally:
            capture.stop()
            capture.join(_JOIN_TIMEOUT_S)
            if capture.is_alive():
                logger.warning("the capture thread is still blocked reading %s; leaving it", self.source.name)
            if slot.take(0.0) is not None:
                slot.dropped += 1
            if writer is not None:
                writer.close()
            self.summary = run.summary(capture.frames_read, slot.dropped)

        reason = "stopped" if self._stop_requested.is_set() else "end of file"
        if capture.error is not None:
            reason = f"source failed: {capture.error}"
        last_frame = max(0, capture.frames_read - 1)
        yield from run.tracker.finish(last_frame, _now())
        yield StopEvent(_now(), last_frame, reason, self.summary)

    def _start_event(self) -> StartEvent:
        options = self.options
        return StartEvent(_now(), 0, self.source.name, self.source.fps, len(self.gallery),
                          round(self.threshold, 4),
                          "options" if self.neighbour_level is None else "gallery",
                          options.min_frames, options.cooldown_s,
                          options.realtime or self.source.live)

    def _process(self, capture: CaptureThread, slot: FrameSlot, run: _Run) -> Iterator[CameraEvent]:
        while not self._stop_requested.is_set():
            yield from self._notices(capture, run)
            finished = slot.closed
            frame = slot.take(_POLL_S)
            if frame is None:
                if finished:
                    break
                continue

            if run.last_embedded is not None and frame.index - run.last_embedded < self.options.every:
                run.skipped += 1
                run.annotate(frame)
                continue

            best, latency_ms = self._match(frame, run)
            yield from run.tracker.update(frame.index, frame.timestamp, best, latency_ms, _now())
            if self.options.report_frames:
                behind = max(0, capture.frames_read - 1 - frame.index)
                yield FrameEvent(_now(), frame.index, best.id if best else None,
                                 best.path if best else None, best.score if best else None,
                                 round(latency_ms, 2), behind)
            run.annotate(frame)
        yield from self._notices(capture, run)

    def _notices(self, capture: CaptureThread, run: _Run) -> Iterator[ReconnectEvent]:
        while not capture.notices.empty():
            notice = capture.notices.get()
            run.reconnects += 1
            yield ReconnectEvent(_now(), max(0, notice.frames_read - 1), notice.attempt,
                                 notice.delay_s, notice.error)

    def _match(self, frame: Frame, run: _Run) -> tuple[Match | None, float]:
        height, width = frame.pixels.shape[:2]
        if run.frame_size != (width, height):
            run.box = embed_region(width, height, self.options.roi, self.options.center_crop)
            run.frame_size = (width, height)
        x, y, box_width, box_height = run.box
        region = frame.pixels[y:y + box_height, x:x + box_width]

        vector = self.embedder.embed_pixels(self.embedder.prepare(region))
        if self.options.exact:
            matches = self.gallery.search_exact(vector, 1)
        else:
            matches = self.gallery.search(vector, SEARCH_CANDIDATES, search_k=self.options.search_k)
        latency_ms = (time.monotonic() - frame.captured) * 1000.0

        run.embedded += 1
        run.last_embedded = frame.index
        run.latencies.add(latency_ms)
        run.best = matches[0] if matches else None
        return run.best, latency_ms


class _Run:
    """Counters and state of one iteration of `CameraLoop.events`."""

    def __init__(self, tracker: MatchTracker, writer: AnnotatedVideoWriter | None) -> None:
        self.tracker = tracker
        self.writer = writer
        self.started = time.monotonic()
        self.embedded = 0
        self.skipped = 0
        self.reconnects = 0
        self.last_embedded: int | None = None
        self.last_written: int | None = None
        self.frame_size: tuple[int, int] | None = None
        self.box: tuple[int, int, int, int] | None = None
        self.best: Match | None = None
        self.latencies = LatencyWindow()

    def annotate(self, frame: Frame) -> None:
        """Write the frame to the annotated video, repeated over frames the loop dropped."""
        if self.writer is None:
            return
        active = self.tracker.active
        if active is not None:
            label, matched = f"{active.id}  {self.tracker.active_score:.3f}", True
        elif self.best is not None:
            label, matched = f"no match (best {self.best.id} {self.best.score:.3f})", False
        else:
            label, matched = "no match", False
        repeat = 1 if self.last_written is None else frame.index - self.last_written
        self.writer.write(frame.pixels, label, matched, self.box, repeat)
        self.last_written = frame.index

    def summary(self, frames_read: int, dropped: int) -> CameraSummary:
        """Build the summary of the run so far."""
        duration = max(time.monotonic() - self.started, 1e-9)
        p50, p95, p99 = self.latencies.percentiles((50, 95, 99))
        return CameraSummary(frames_read, self.embedded, dropped, self.skipped, self.tracker.matches,
                             self.reconnects, round(duration, 3), round(frames_read / duration, 2),
                             round(self.embedded / duration, 2), p50, p95, p99)


def run_camera(gallery: Gallery, embedder: Embedder, options: CameraOptions | None = None,
               source: FrameSource | None = None) -> Iterator[CameraEvent]:
    """Yield the events of a camera run; see `CameraLoop` for the arguments and errors."""
    return CameraLoop(gallery, embedder, options, source).events()
