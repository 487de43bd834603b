"""Frame sources for `edgeembed.camera`: OpenCV devices, files and streams, and picamera2.

Every source returns RGB uint8 arrays of shape (height, width, 3), whatever the
camera delivers. OpenCV decodes to BGR. picamera2 names its formats after the
DRM/libcamera convention, so "XRGB8888" arrives as B, G, R, X bytes per pixel and
"RGB888" as B, G, R. `picamera2_to_rgb` maps each format to RGB.

OpenCV comes with the ``edgeembed[camera]`` extra (``opencv-python-headless``) and
is imported only when a source or the annotated writer is created. picamera2 is a
Raspberry Pi OS package (``sudo apt install python3-picamera2``); a virtual
environment can import it only when created with ``python3 -m venv --system-site-packages``.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import Protocol

import numpy as np

logger = logging.getLogger(__name__)

# Seconds FFmpeg waits to open a stream URL or to receive the next packet.
STREAM_TIMEOUT_S = 10.0

PICAMERA2_FORMAT = "XRGB8888"
PICAMERA2_SIZE = (640, 480)

# picamera2 format name -> indices of R, G and B in each pixel's bytes. The names
# describe the pixel as a little-endian word, so the bytes are in reverse order.
_PICAMERA2_CHANNELS = {
    "XRGB8888": (2, 1, 0),
    "XBGR8888": (0, 1, 2),
    "RGB888": (2, 1, 0),
    "BGR888": (0, 1, 2),
}

_WRITER_CODECS = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".avi": "MJPG", ".mkv": "MJPG"}


class CameraError(RuntimeError):
    """Raised when the camera loop cannot run: no OpenCV, no output file, too small a gallery."""


class SourceError(CameraError):
    """Raised when a frame source cannot be opened or fails while reading."""


class FrameSource(Protocol):
    """Interface of a frame source, as the camera loop uses it.

    Attributes:
        name: A short description for messages, such as ``"camera device 0"``.
        live: True for cameras and streams, which deliver frames at their own pace
            and are reopened when they fail. False for files, which end the run.
        fps: The frame rate the source reports, or None when it reports none.
    """

    name: str
    live: bool
    fps: float | None

    def open(self) -> None:
        """Open the source; raise `SourceError` with the reason when that fails."""

    def read(self) -> np.ndarray | None:
        """Return the next RGB frame, or None at the end of a file or when a stream drops."""

    def close(self) -> None:
        """Release the source; calling it twice is harmless."""


def import_cv2():
    """Import OpenCV, or raise `CameraError` with the command that installs it."""
    try:
        import cv2
    except ImportError as error:
        raise CameraError(
            f"OpenCV is not installed ({error}); install it with: pip install 'edgeembed[camera]'"
        ) from None
    return cv2


def bgr_to_rgb(frame: np.ndarray) -> np.ndarray:
    """Convert an OpenCV frame (BGR, BGRA or grayscale uint8) to a contiguous RGB array."""
    if frame.ndim == 2:
        return np.ascontiguousarray(np.repeat(frame[:, :, np.newaxis], 3, axis=2))
    if frame.ndim == 3 and frame.shape[2] in (3, 4):
        return np.ascontiguousarray(frame[:, :, 2::-1])
    raise SourceError(f"unexpected frame shape {frame.shape}: expected HxW, HxWx3 or HxWx4")


def picamera2_to_rgb(array: np.ndarray, pixel_format: str) -> np.ndarray:
    """Convert a picamera2 ``capture_array`` result to a contiguous RGB array.

    Args:
        array: The (height, width, 3 or 4) uint8 array.
        pixel_format: The stream's format name, such as ``"XRGB8888"``.

    Raises:
        SourceError: If the format is not one of the RGB formats listed in
            ``_PICAMERA2_CHANNELS`` (YUV streams need another conversion).
    """
    channels = _PICAMERA2_CHANNELS.get(pixel_format)
    if channels is None:
        raise SourceError(f"unsupported picamera2 format {pixel_format!r}: use one of "
                          f"{', '.join(_PICAMERA2_CHANNELS)}")
    return np.ascontiguousarray(array[:, :, list(channels)])


def parse_size(text: str) -> tuple[int, int]:
    """Parse ``"WIDTHxHEIGHT"`` such as ``"640x480"``.

    Raises:
        ValueError: If the text is not two positive integers joined by ``x``.
    """
    found = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not found or min(int(found[1]), int(found[2])) < 1:
        raise ValueError(f"invalid size {text!r}: use WIDTHxHEIGHT, for example 640x480")
    return int(found[1]), int(found[2])


class OpenCVSource:
    """A V4L2 camera by index, a video file, or a stream URL read through OpenCV.

    Stream URLs (anything with ``://``) count as live: when one ends or drops, the
    camera loop reopens it.
    """

    def __init__(self, spec: str | int, size: tuple[int, int] | None = None) -> None:
        """Describe the source; nothing is opened until `open`.

        Args:
            spec: A device index (``0`` or ``"0"``), a file path or a URL.
            size: Capture width and height requested from a camera device.
        """
        text = str(spec).strip()
        self.device = int(text) if text.isdigit() else None
        self.url = text if "://" in text else None
        self.path = None if self.device is not None or self.url else Path(text)
        self.size = size
        self.live = self.path is None
        self.fps: float | None = None
        self.name = (f"camera device {self.device}" if self.device is not None
                     else self.url or f"video file {self.path}")
        self._capture = None
        self._pending: np.ndarray | None = None

    def open(self) -> None:
        """Open the device, file or URL and read its first frame.

        Raises:
            SourceError: If the device or file does not exist, the device is busy,
                the file cannot be decoded, or the stream cannot be reached.
        """
        cv2 = import_cv2()
        self._check_exists()
        self._capture = self._create_capture(cv2)
        if not self._capture.isOpened():
            self.close()
            raise SourceError(self._open_failure())

        ok, frame = self._capture.read()
        if not ok or frame is None:
            self.close()
            raise SourceError(self._open_failure(after_open=True))
        self._pending = bgr_to_rgb(frame)
        fps = float(self._capture.get(cv2.CAP_PROP_FPS) or 0.0)
        self.fps = fps if 0.0 < fps < 1000.0 else None
        logger.info("opened %s (%dx%d, %s fps)", self.name, frame.shape[1], frame.shape[0],
                    f"{self.fps:.2f}" if self.fps else "unknown")

    def _check_exists(self) -> None:
        if self.path is not None and not self.path.is_file():
            raise SourceError(f"video file {self.path} not found; pass an existing file, a "
                              "device index such as 0, a stream URL or picamera2")
        node = Path(f"/dev/video{self.device}")
        if self.device is not None and sys.platform.startswith("linux") and not node.exists():
            raise SourceError(f"camera device {self.device} not found: {node} does not exist; "
                              "check the cable, or list devices with: v4l2-ctl --list-devices")

    def _create_capture(self, cv2):
        if self.device is not None:
            backend = cv2.CAP_V4L2 if sys.platform.startswith("linux") else cv2.CAP_ANY
            capture = cv2.VideoCapture(self.device, backend)
            # Capture runs continuously, so one driver buffer is enough and adds no delay.
            capture.set(cv2.CAP_PROP_BUFFERSIZE, 1)
            if self.size:
                capture.set(cv2.CAP_PROP_FRAME_WIDTH, self.size[0])
                capture.set(cv2.CAP_PROP_FRAME_HEIGHT, self.size[1])
            return capture
        if self.url is not None:
            timeout_ms = int(STREAM_TIMEOUT_S * 1000)
            return cv2.VideoCapture(self.url, cv2.CAP_FFMPEG, [
                cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, timeout_ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, timeout_ms])
        return cv2.VideoCapture(str(self.path))

    def _open_failure(self, after_open: bool = False) -> str:
        if self.device is not None:
            return (f"camera device {self.device} (/dev/video{self.device}) could not be "
                    f"{'read' if after_open else 'opened'}: it is busy in another program or is "
                    "not a capture device; close other camera programs or choose another index")
        if self.url is not None:
            return (f"stream {self.url} could not be opened: the connection failed or no frame "
                    f"arrived within {STREAM_TIMEOUT_S:.0f} s; check the URL and that the server is running")
        return (f"video file {self.path} could not be decoded: it is empty or not a format "
                "that OpenCV's FFmpeg can read")

    def read(self) -> np.ndarray | None:
        """Return the next RGB frame, or None at the end of the file or when the stream drops."""
        if self._pending is not None:
            frame, self._pending = self._pending, None
            return frame
        if self._capture is None:
            return None

        ok, frame = self._capture.read()
        if not ok or frame is None:
            return None
        return bgr_to_rgb(frame)

    def close(self) -> None:
        """Release the OpenCV capture."""
        if self._capture is not None:
            self._capture.release()
        self._capture = None
        self._pending = None


class Picamera2Source:
    """A Raspberry Pi camera through picamera2 (libcamera), imported only when opened."""

    live = True

    def __init__(self, camera_num: int = 0, size: tuple[int, int] | None = None,
                 camera: object | None = None) -> None:
        """Describe the camera; nothing is opened until `open`.

        Args:
            camera_num: The camera number, 0 for the first camera.
            size: Main stream width and height; None selects `PICAMERA2_SIZE`.
            camera: An already created ``Picamera2`` object (or a stand-in with
                ``configure``, ``start``, ``capture_array``, ``stop`` and ``close``).
        """
        self.camera_num = camera_num
        self.size = size or PICAMERA2_SIZE
        self.name = f"picamera2 camera {camera_num}"
        self.fps: float | None = None
        self.pixel_format = PICAMERA2_FORMAT
        self._given = camera
        self._camera = None

    def open(self) -> None:
        """Open, configure and start the camera.

        Raises:
            SourceError: If picamera2 is not importable, no camera is attached, or
                the camera is in use.
        """
        camera = self._given or self._create_camera()
        try:
            config = camera.create_video_configuration(
                main={"format": PICAMERA2_FORMAT, "size": tuple(self.size)})
            camera.configure(config)
            camera.start()
        except RuntimeError as error:
            raise SourceError(f"{self.name} could not be started: {error}") from None
        self._camera = camera
        configured = getattr(camera, "camera_config", None) or {}
        self.pixel_format = configured.get("main", {}).get("format", PICAMERA2_FORMAT)
        logger.info("opened %s (%dx%d %s)", self.name, self.size[0], self.size[1], self.pixel_format)

    def _create_camera(self):
        try:
            from picamera2 import Picamera2
        except ImportError as error:
            raise SourceError(
                f"picamera2 is not importable ({error}). It is a Raspberry Pi OS package: run "
                "'sudo apt install python3-picamera2' and create the virtual environment with "
                "'python3 -m venv --system-site-packages'") from None

        cameras = Picamera2.global_camera_info()
        if self.camera_num >= len(cameras):
            raise SourceError(f"{self.name} not found: libcamera lists {len(cameras)} camera(s); "
                              "check the ribbon cable and run 'rpicam-hello --list-cameras'")
        try:
            return Picamera2(self.camera_num)
        except RuntimeError as error:
            raise SourceError(f"{self.name} could not be opened ({error}); it may be in use by "
                              "another program") from None

    def read(self) -> np.ndarray | None:
        """Wait for the next frame and return it as RGB."""
        if self._camera is None:
            return None
        try:
            array = self._camera.capture_array("main")
        except RuntimeError as error:
            raise SourceError(f"{self.name} failed while capturing: {error}") from None
        return picamera2_to_rgb(array, self.pixel_format)

    def close(self) -> None:
        """Stop and release the camera."""
        camera, self._camera = self._camera, None
        if camera is None:
            return
        try:
            camera.stop()
            camera.close()
        except RuntimeError as error:
            logger.warning("closing %s failed: %s", self.name, error)


def open_source(spec: str | int, size: tuple[int, int] | None = None) -> FrameSource:
    """Create the source that `spec` names, without opening it.

    Args:
        spec: ``"picamera2"`` (or ``"picamera2:N"`` for camera N), a device index
            such as ``0``, a stream URL such as ``rtsp://host/stream``, or a video file.
        size: Capture width and height for cameras; files and streams ignore it.

    Raises:
        ValueError: If a ``picamera2:N`` camera number is not an integer.
    """
    text = str(spec).strip()
    if text == "picamera2" or text.startswith("picamera2:"):
        number = text.partition(":")[2] or "0"
        if not number.isdigit():
            raise ValueError(f"invalid source {text!r}: use picamera2 or picamera2:N")
        return Picamera2Source(int(number), size)
    return OpenCVSource(text, size)


class AnnotatedVideoWriter:
    """Writes frames with the current match and score drawn on them, through OpenCV.

    The codec follows the file suffix: mp4v for .mp4, .m4v and .mov; MJPG for .avi and .mkv.
    """

    def __init__(self, path: str | Path, fps: float) -> None:
        """Check the output path; the file is created at the first frame.

        Raises:
            CameraError: If the suffix has no codec here or the folder does not exist.
        """
        self.path = Path(path)
        self.codec = _WRITER_CODECS.get(self.path.suffix.lower())
        if self.codec is None:
            raise CameraError(f"cannot write {self.path}: use a .mp4, .avi, .mkv, .m4v or .mov file")
        if not self.path.parent.is_dir():
            raise CameraError(f"cannot write {self.path}: folder {self.path.parent} does not exist")
        self.fps = fps
        self.frames_written = 0
        self._cv2 = import_cv2()
        self._writer = None

    def write(self, rgb: np.ndarray, label: str, matched: bool,
              box: tuple[int, int, int, int] | None = None, repeat: int = 1) -> None:
        """Draw `label` (green when `matched`) and the embedded region, then write the frame.

        Args:
            rgb: The frame as read.
            label: Text for the top-left corner.
            matched: Whether a match is active.
            box: The region that was embedded, as (x, y, width, height).
            repeat: How many times to write the frame, so that frames the loop
                dropped keep their duration in the output.
        """
        cv2 = self._cv2
        image = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        color = (60, 200, 60) if matched else (200, 200, 200)
        if box is not None:
            x, y, width, height = box
            cv2.rectangle(image, (x, y), (x + width - 1, y + height - 1), color, 2)
        cv2.rectangle(image, (0, 0), (image.shape[1], 28), (0, 0, 0), -1)
        cv2.putText(image, label, (8, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, color, 1, cv2.LINE_AA)

        if self._writer is None:
            self._open(image.shape[1], image.shape[0])
        for _ in range(max(1, repeat)):
            self._writer.write(image)
            self.frames_written += 1

    def _open(self, width: int, height: int) -> None:
        cv2 = self._cv2
        self._writer = cv2.VideoWriter(os.fspath(self.path), cv2.VideoWriter_fourcc(*self.codec),
                                       self.fps, (width, height))
        if not self._writer.isOpened():
            self._writer = None
            raise CameraError(f"cannot write {self.path}: OpenCV has no {self.codec} encoder here; "
                              "try a .avi file (MJPG)")

    def close(self) -> None:
        """Finish the file; without this an MP4 is unreadable."""
        if self._writer is not None:
            self._writer.release()
            logger.info("wrote %d frames to %s", self.frames_written, self.path)
        self._writer = None


