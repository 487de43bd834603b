"""The capture thread of `edgeembed.camera`: reads a source and hands frames to the loop.

A `FrameSlot` contains at most one frame. In real-time mode a new frame replaces the
waiting one, which counts as dropped, so a slow consumer never makes frames queue up.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from dataclasses import dataclass

import numpy as np

from edgeembed.camera_sources import FrameSource, SourceError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Frame:
    """One frame handed from the capture thread to the camera loop.

    Attributes:
        index: Frame number in this run, counting every frame read from 0.
        pixels: The RGB uint8 array, shape (height, width, 3).
        timestamp: Seconds on the source's clock: the position in a file, or the
            time since capture started for live sources.
        captured: ``time.monotonic()`` when the frame entered the `FrameSlot`, or
            with ``realtime=False`` when the loop took it, so that the wait for the
            loop to finish the previous frame does not count. Latencies are
            measured from here.
    """

    index: int
    pixels: np.ndarray
    timestamp: float
    captured: float


@dataclass(frozen=True)
class ReconnectNotice:
    """One attempt to reopen a live source, reported by the capture thread.

    Attributes:
        attempt: Attempt number since the source failed, from 1.
        delay_s: Seconds waited before this attempt.
        error: Why the source failed or the previous attempt did not succeed.
        frames_read: Frames read before the failure.
    """

    attempt: int
    delay_s: float
    error: str
    frames_read: int


class FrameSlot:
    """A one-frame hand-over between the capture thread and the camera loop.

    With ``keep_latest`` a new frame replaces one that the loop has not taken yet
    and counts it in `dropped`, so the loop always gets the newest frame and never
    falls behind. Without it, `put` waits until the loop has taken the previous
    frame, so that every frame is processed.
    """

    def __init__(self, keep_latest: bool) -> None:
        self.keep_latest = keep_latest
        self.dropped = 0
        self.closed = False
        self._frame: Frame | None = None
        self._condition = threading.Condition()

    def put(self, frame: Frame) -> bool:
        """Hand over a frame and set its `Frame.captured` time; return False if the slot was closed."""
        with self._condition:
            while not self.keep_latest and self._frame is not None and not self.closed:
                self._condition.wait()
            if self.closed:
                return False
            if self._frame is not None:
                self.dropped += 1
            self._frame = dataclasses.replace(frame, captured=time.monotonic())
            self._condition.notify_all()
            return True

    def take(self, timeout: float) -> Frame | None:
        """Return the waiting frame, or None if none arrives within `timeout` seconds."""
        with self._condition:
            if self._frame is None and not self.closed:
                self._condition.wait(timeout)
            frame, self._frame = self._frame, None
            self._condition.notify_all()
        if frame is not None and not self.keep_latest:
            frame = dataclasses.replace(frame, captured=time.monotonic())
        return frame

    def close(self) -> None:
        """Accept no more frames; a frame already waiting can still be taken."""
        with self._condition:
            self.closed = True
            self._condition.notify_all()


class CaptureThread(threading.Thread):
    """Reads an opened source into a `FrameSlot`, reopening live sources that fail.

    The thread closes the source when it ends. A file is delivered at its own frame
    rate when `pace` is set, as a camera would deliver it.

    Attributes:
        frames_read: Frames read so far.
        error: The error that ended capture, or None.
        notices: Reconnect attempts, for the loop to report as events.
    """

    def __init__(self, source: FrameSource, slot: FrameSlot, *, pace: bool,
                 reconnect_delay_s: float, max_reconnect_delay_s: float,
                 max_reconnects: int | None) -> None:
        super().__init__(name="edgeembed-capture", daemon=True)
        self.source = source
        self.slot = slot
        self.pace = pace
        self.reconnect_delay_s = reconnect_delay_s
        self.max_reconnect_delay_s = max_reconnect_delay_s
        self.max_reconnects = max_reconnects
        self.frames_read = 0
        self.error: Exception | None = None
        self.notices: queue.SimpleQueue[ReconnectNotice] = queue.SimpleQueue()
        self._stop_requested = threading.Event()

    def stop(self) -> None:
        """Ask the thread to end after the read in progress."""
        self._stop_requested.set()
        self.slot.close()

    def run(self) -> None:
        try:
            self._capture()
        except Exception as error:  # noqa: BLE001  (handed to the loop, which ends the run)
            logger.exception("capture from %s failed", self.source.name)
            self.error = error
        finally:
            self.slot.close()
            self.source.close()

    def _capture(self) -> None:
        start = time.monotonic()
        file_fps = None if self.source.live else self.source.fps
        if self.pace and not self.source.live and file_fps is None:
            logger.warning("%s reports no frame rate; reading it as fast as possible", self.source.name)

        while not self._stop_requested.is_set():
            pixels = self._next_pixels()
            if pixels is None:
                return
            if file_fps:
                timestamp = self.frames_read / file_fps
                if self.pace and self._stop_requested.wait(max(0.0, start + timestamp - time.monotonic())):
                    return
            else:
                timestamp = time.monotonic() - start
            if not self.slot.put(Frame(self.frames_read, pixels, timestamp, 0.0)):
                return
            self.frames_read += 1

    def _next_pixels(self) -> np.ndarray | None:
        try:
            pixels = self.source.read()
            reason = "the stream ended or dropped"
        except SourceError as error:
            pixels, reason = None, str(error)
        if pixels is not None or not self.source.live:
            return pixels
        return self._reconnect(reason)

    def _reconnect(self, reason: str) -> np.ndarray | None:
        """Reopen the source with exponential backoff; return its first frame or None."""
        delay = self.reconnect_delay_s
        attempt = 0
        while not self._stop_requested.is_set():
            attempt += 1
            if self.max_reconnects is not None and attempt > self.max_reconnects:
                self.error = SourceError(f"{self.source.name} failed and {self.max_reconnects} "
                                         f"reconnect attempt(s) did not bring it back: {reason}")
                return None
            logger.warning("%s: %s; reconnect attempt %d in %.1f s", self.source.name, reason, attempt, delay)
            self.notices.put(ReconnectNotice(attempt, delay, reason, self.frames_read))
            if self._stop_requested.wait(delay):
                return None

            self.source.close()
            try:
                self.source.open()
                pixels = self.source.read()
                reason = "no frame after reopening"
            except SourceError as error:
                pixels, reason = None, str(error)
            if pixels is not None:
                logger.warning("%s: reconnected at attempt %d", self.source.name, attempt)
                return pixels
            delay = min(delay * 2.0, self.max_reconnect_delay_s)
        return None
