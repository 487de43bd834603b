"""Measure resident memory (RSS) over a long ``edgeembed camera`` run.

    python benchmarks/camera_memory.py [--frames 10000] [--fps 30] [--no-realtime] [--model MODEL]
    python benchmarks/camera_memory.py --demo-only samples/camera

The run uses real photos: 12 of scikit-image's bundled photos form the gallery and
all 19 appear in a 640x480 MJPEG video, each held for 20 frames with one blurred and
one darkened frame per photo. The video is replayed through OpenCV until
``--frames`` frames were read, at ``--fps`` like a camera (the loop drops what the
model cannot keep up with), or every frame with ``--no-realtime``. RSS is sampled
every 500 frames; growth is counted from frame 1000, after the interpreter and
the allocators have warmed up. Linux only: RSS comes from /proc/self/status.

``--demo-only DIR`` writes ``DIR/gallery/*.jpg`` and ``DIR/photos.avi`` and exits,
for trying ``edgeembed index build`` and ``edgeembed camera`` by hand.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import sample_photos  # noqa: E402  (lives in tools/, made importable above)
from camera_threshold import letterbox  # noqa: E402  (this script's folder is on sys.path)

from edgeembed import Embedder  # noqa: E402
from edgeembed.camera import CameraLoop, CameraOptions  # noqa: E402
from edgeembed.camera_sources import OpenCVSource, import_cv2  # noqa: E402
from edgeembed.gallery import Gallery  # noqa: E402

GALLERY_PHOTOS = sample_photos.PHOTO_NAMES[:12]
FRAME_SIZE = (640, 480)
HOLD_FRAMES = 20
SAMPLE_EVERY = 500
WARM_UP_FRAMES = 1000


def rss_mb() -> float:
    """Return this process's resident set size in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("VmRSS not found in /proc/self/status")


def cpu_name() -> str:
    """Return the CPU model from /proc/cpuinfo, or the machine type."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith(("model name", "Model")):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def _frame(photo: Image.Image) -> np.ndarray:
    return np.asarray(letterbox(photo, FRAME_SIZE))


def write_demo(folder: Path, fps: float = 10.0) -> tuple[Path, Path]:
    """Write the gallery photos and the video of all photos; return both paths."""
    cv2 = import_cv2()
    gallery = folder / "gallery"
    gallery.mkdir(parents=True, exist_ok=True)
    video = folder / "photos.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), fps, FRAME_SIZE)

    for name in sample_photos.PHOTO_NAMES:
        photo = sample_photos.load_skimage_photo(name)
        if name in GALLERY_PHOTOS:
            photo.save(gallery / f"{name}.jpg", quality=92)
        plain = _frame(photo)
        blurred = _frame(photo.filter(ImageFilter.GaussianBlur(4)))
        darkened = _frame(ImageEnhance.Brightness(photo).enhance(0.4))
        for index in range(HOLD_FRAMES):
            frame = {5: blurred, 12: darkened}.get(index, plain)
            writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    return gallery, video


class ReplaySource(OpenCVSource):
    """A video file read through OpenCV again and again until `frames` frames were read."""

    def __init__(self, path: Path, frames: int, fps: float) -> None:
        super().__init__(str(path))
        self.frames = frames
        self.replay_fps = fps
        self.delivered = 0

    def open(self) -> None:
        super().open()
        self.fps = self.replay_fps

    def read(self) -> np.ndarray | None:
        if self.delivered >= self.frames:
            return None
        frame = super().read()
        if frame is None:
            self.close()
            self.open()
            frame = super().read()
        self.delivered += 1
        return frame


def main() -> None:
    """Run the benchmark and print RSS samples and the run summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=10_000, help="frames to read (default: 10000)")
    parser.add_argument("--fps", type=float, default=30.0, help="replay frame rate (default: 30)")
    parser.add_argument("--no-realtime", dest="realtime", action="store_false",
                        help="embed every frame instead of replaying at --fps")
    parser.add_argument("--model", help="TFLite embedder (default: the shipped model)")
    parser.add_argument("--threads", type=int, default=None, help="interpreter threads")
    parser.add_argument("--demo-only", type=Path, metavar="DIR", help="write the demo files to DIR and exit")
    args = parser.parse_args()

    if args.demo_only:
        gallery_dir, video = write_demo(args.demo_only)
        print(f"wrote {gallery_dir}/ ({len(GALLERY_PHOTOS)} photos) and {video}")
        return

    start_rss = rss_mb()
    embedder = Embedder(args.model, num_threads=args.threads)
    with tempfile.TemporaryDirectory() as folder:
        gallery_dir, video = write_demo(Path(folder))
        paths = sorted(gallery_dir.iterdir())
        gallery, _ = Gallery.from_images(paths, embedder, ids=[path.stem for path in paths])
        source = ReplaySource(video, args.frames, args.fps)
        options = CameraOptions(realtime=args.realtime, report_frames=True)
        loop = CameraLoop(gallery, embedder, options, source=source)

        samples: dict[int, float] = {}
        for event in loop:
            mark = event.frame // SAMPLE_EVERY * SAMPLE_EVERY
            if event.event == "frame" and mark not in samples:
                samples[mark] = rss_mb()
        samples[args.frames] = rss_mb()

    summary = loop.summary
    warm = samples.get(WARM_UP_FRAMES) or samples[min(samples, key=lambda mark: abs(mark - WARM_UP_FRAMES))]
    growth = samples[args.frames] - warm
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"model {embedder.model_path.name}")
    print("frame    RSS MiB")
    for mark in sorted(samples):
        print(f"{mark:6d}  {samples[mark]:8.1f}")
    print(f"RSS before loading the model {start_rss:.1f} MiB, at frame {WARM_UP_FRAMES} {warm:.1f} MiB, "
          f"at the end {samples[args.frames]:.1f} MiB: growth {growth:+.1f} MiB over "
          f"{args.frames - WARM_UP_FRAMES} frames")
    print(f"frames read {summary.frames_read}, embedded {summary.frames_embedded}, dropped "
          f"{summary.frames_dropped}; {summary.duration_s:.0f} s; latency p50 {summary.latency_p50_ms} ms, "
          f"p95 {summary.latency_p95_ms} ms, p99 {summary.latency_p99_ms} ms")


if __name__ == "__main__":
    main()
