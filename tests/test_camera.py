"""The camera loop on real photos: match sequences, dropped frames, reconnects, channel order."""

from __future__ import annotations

import time
from datetime import datetime, timezone

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageFilter

from edgeembed.camera import CameraLoop, CameraOptions, embed_region, parse_roi
from edgeembed.camera_events import LostEvent, MatchEvent, MatchTracker, ReconnectEvent, StopEvent
from edgeembed.camera_sources import OpenCVSource, Picamera2Source, SourceError, bgr_to_rgb
from edgeembed.gallery import Gallery
from edgeembed.items import Match

cv2 = pytest.importorskip("cv2", reason="the camera tests need OpenCV: pip install 'edgeembed[camera]'")

GALLERY_PHOTOS = ("astronaut", "coffee", "rocket", "chelsea", "clock", "stereo_motorcycle")
FRAME_SIZE = (320, 240)


def letterbox(photo: Image.Image, size: tuple[int, int] = FRAME_SIZE) -> np.ndarray:
    """Fit a photo into a black frame of `size`, as RGB."""
    scale = min(size[0] / photo.width, size[1] / photo.height)
    resized = photo.resize((round(photo.width * scale), round(photo.height * scale)), Image.Resampling.BILINEAR)
    frame = Image.new("RGB", size)
    frame.paste(resized, ((size[0] - resized.width) // 2, (size[1] - resized.height) // 2))
    return np.asarray(frame)


def write_video(path, frames: list[np.ndarray], fps: float = 10.0, codec: str = "MJPG") -> None:
    """Write RGB frames to a video file with OpenCV."""
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*codec), fps, (width, height))
    assert writer.isOpened(), f"OpenCV cannot write {codec} to {path}"
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()


@pytest.fixture(scope="module")
def gallery(photos, embedder) -> Gallery:
    vectors = np.stack([embedder.embed(photos[name]) for name in GALLERY_PHOTOS])
    return Gallery.build(vectors, list(GALLERY_PHOTOS), model_fingerprint=embedder.fingerprint)


def kinds_and_ids(events) -> list[tuple[str, str]]:
    return [(event.event, event.id) for event in events if isinstance(event, (MatchEvent, LostEvent))]


# (1) A video built from real photos gives exactly the expected events.

def test_video_match_sequence(photos, embedder, gallery, tmp_path):
    def held(name, count=6, edit=None, at=None):
        frame = letterbox(photos[name])
        edited = letterbox(edit(photos[name])) if edit else frame
        return [edited if index == at else frame for index in range(count)]

    def blur(photo):
        return photo.filter(ImageFilter.GaussianBlur(4))

    def darken(photo):
        return ImageEnhance.Brightness(photo).enhance(0.3)

    spans = [
        ("astronaut", held("astronaut")),
        ("coins", held("coins")),                            # not in the gallery
        ("coffee", held("coffee", edit=blur, at=2)),
        ("camera", held("camera", edit=darken, at=1)),       # not in the gallery
        ("astronaut", held("astronaut")),                    # another id won in between
        ("black", [np.zeros((FRAME_SIZE[1], FRAME_SIZE[0], 3), np.uint8)] * 6),
        ("astronaut", held("astronaut")),                    # within the cooldown: silent
        ("rocket", held("rocket", edit=darken, at=4)),
    ]
    frames = [frame for _, span in spans for frame in span]
    video = tmp_path / "photos.avi"
    write_video(video, frames)

    options = CameraOptions(source=str(video), realtime=False, min_frames=3, cooldown_s=10.0)
    events = list(CameraLoop(gallery, embedder, options))

    assert kinds_and_ids(events) == [
        ("match", "astronaut"), ("lost", "astronaut"),
        ("match", "coffee"), ("lost", "coffee"),
        ("match", "astronaut"), ("lost", "astronaut"),
        ("match", "rocket"), ("lost", "rocket"),
    ]
    starts = np.cumsum([0] + [len(span) for _, span in spans])
    for event in events:
        if isinstance(event, MatchEvent):
            span = next(index for index, (name, _) in enumerate(spans)
                        if name == event.id and starts[index] <= event.frame < starts[index + 1])
            assert event.frame >= starts[span] + 2, f"{event.id} reported before 3 frames"
    stop = events[-1]
    assert isinstance(stop, StopEvent)
    assert stop.reason == "end of file"
    assert stop.summary.frames_read == len(frames)
    assert stop.summary.frames_embedded == len(frames)
    assert stop.summary.frames_dropped == 0


def test_every_nth_frame(photos, embedder, gallery, tmp_path):
    video = tmp_path / "coffee.avi"
    write_video(video, [letterbox(photos["coffee"])] * 10)
    options = CameraOptions(source=str(video), realtime=False, every=3, threshold=0.5, min_frames=1)
    stop = list(CameraLoop(gallery, embedder, options))[-1]

    assert stop.summary.frames_embedded == 4  # frames 0, 3, 6 and 9
    assert stop.summary.frames_skipped == 6


# (2) A slow model drops frames instead of falling behind.

class SyntheticSource:
    """A source of one photo that the capture thread delivers at `fps`, like a file."""

    live = False

    def __init__(self, frame: np.ndarray, fps: float, count: int) -> None:
        self.name = f"synthetic {fps:g} fps"
        self.fps = fps
        self.frame = frame
        self.count = count
        self.read_times: list[float] = []

    def open(self) -> None:
        self.read_times.clear()

    def read(self) -> np.ndarray | None:
        if len(self.read_times) >= self.count:
            return None
        self.read_times.append(time.monotonic())
        return self.frame

    def close(self) -> None:
        pass


class SlowEmbedder:
    """The real embedder plus a sleep per frame; records each frame's processing time."""

    def __init__(self, embedder, delay_s: float) -> None:
        self.embedder = embedder
        self.delay_s = delay_s
        self.fingerprint = embedder.fingerprint
        self.model_path = embedder.model_path
        self.service_s: list[float] = []
        self._started = 0.0

    def prepare(self, image):
        self._started = time.monotonic()
        return self.embedder.prepare(image)

    def embed_pixels(self, pixels):
        time.sleep(self.delay_s)
        vector = self.embedder.embed_pixels(pixels)
        self.service_s.append(time.monotonic() - self._started)
        return vector


def test_slow_model_latency_flat(photos, embedder, gallery):
    fps, count = 50.0, 150
    slow = SlowEmbedder(embedder, delay_s=0.1)
    source = SyntheticSource(letterbox(photos["clock"]), fps, count)
    loop = CameraLoop(gallery, slow, CameraOptions(threshold=0.5, report_frames=True), source=source)
    events = list(loop)
    frames = [event for event in events if event.event == "frame"]
    summary = events[-1].summary

    assert summary.frames_read == count
    assert summary.frames_dropped > count // 2
    assert summary.frames_read == summary.frames_embedded + summary.frames_dropped
    assert len(frames) == len(slow.service_s)
    # Without dropping, 150 frames at 50 fps into ~5 frames/s would queue up and
    # the last latency would pass 2 s. Here each frame waits at most about one
    # frame interval before its own processing starts. The last frame of the
    # source is the exception: no newer frame replaces it while it waits.
    for event, service_s in zip(frames, slow.service_s):
        if event.frame == count - 1:
            continue
        assert event.latency_ms <= (service_s + 0.1) * 1000, f"frame {event.frame} waited in a queue"
        assert event.frames_behind <= (service_s + 0.1) * fps + 1, f"frame {event.frame} fell behind"
    first, last = frames[: len(frames) // 3], frames[-len(frames) // 3:]
    assert np.median([e.latency_ms for e in last]) < 2 * np.median([e.latency_ms for e in first])


def test_slow_consumer_never_stalls_capture(photos, embedder, gallery):
    fps, count = 50.0, 100
    source = SyntheticSource(letterbox(photos["clock"]), fps, count)
    loop = CameraLoop(gallery, embedder, CameraOptions(threshold=0.5, report_frames=True), source=source)
    events = []
    for event in loop:
        events.append(event)
        time.sleep(0.3)

    reading_s = source.read_times[-1] - source.read_times[0]
    assert len(source.read_times) == count
    assert reading_s < (count / fps) * 1.5, f"capture took {reading_s:.1f} s for {count / fps:.0f} s of frames"
    assert events[-1].summary.frames_dropped > count // 2


# (3) A live source that fails mid-run reconnects with backoff.

class FlakySource:
    """A live source that fails after `good` frames, again and again, per `script`.

    `script` lists what each open after a failure does: True succeeds, False raises.
    """

    live = True
    fps = None
    name = "flaky camera"

    def __init__(self, frame: np.ndarray, good: int, script: list[bool]) -> None:
        self.frame = frame
        self.good = good
        self.script = list(script)
        self.opens = 0
        self.delivered = 0

    def open(self) -> None:
        self.opens += 1
        if self.opens > 1 and not self.script.pop(0):
            raise SourceError("flaky camera: device not ready")
        self.delivered = 0

    def read(self) -> np.ndarray | None:
        time.sleep(0.01)
        if self.delivered >= self.good:
            raise SourceError("flaky camera: read failed")
        self.delivered += 1
        return self.frame

    def close(self) -> None:
        pass


def test_flaky_source_reconnects(photos, embedder, gallery):
    # Fails after 5 frames, comes back at the 2nd attempt, fails again and never returns.
    source = FlakySource(letterbox(photos["rocket"]), good=5, script=[False, True, False, False, False])
    options = CameraOptions(threshold=0.5, min_frames=1, max_reconnects=3, reconnect_delay_s=0.01)
    events = list(CameraLoop(gallery, embedder, options, source=source))
    reconnects = [event for event in events if isinstance(event, ReconnectEvent)]
    stop = events[-1]

    assert [event.attempt for event in reconnects] == [1, 2, 1, 2, 3]
    assert [event.delay_s for event in reconnects] == [0.01, 0.02, 0.01, 0.02, 0.04]
    assert reconnects[0].error == "flaky camera: read failed"
    assert reconnects[1].error == "flaky camera: device not ready"
    assert stop.summary.frames_read == 10
    assert stop.summary.reconnects == 5
    assert stop.reason.startswith("source failed: flaky camera failed and 3 reconnect attempt(s)")


def test_missing_file_raises(embedder, gallery, tmp_path):
    loop = CameraLoop(gallery, embedder, CameraOptions(source=str(tmp_path / "none.avi"), threshold=0.5))
    with pytest.raises(SourceError, match="none.avi not found"):
        list(loop)


# (4) Every source's channel layout gives the embedding of the photo on disk.

@pytest.fixture(scope="module")
def disk_photo(photos, tmp_path_factory):
    path = tmp_path_factory.mktemp("channels") / "coffee.png"
    photos["coffee"].resize((320, 214)).save(path)
    return path


def _embed_frame(embedder, rgb: np.ndarray) -> np.ndarray:
    return embedder.embed_pixels(embedder.prepare(rgb))


def test_opencv_file_channel_order(embedder, disk_photo, tmp_path):
    expected = embedder.embed(disk_photo)
    video = tmp_path / "lossless.avi"
    write_video(video, [np.asarray(Image.open(disk_photo).convert("RGB"))], codec="FFV1")
    source = OpenCVSource(str(video))
    source.open()
    rgb = source.read()
    source.close()

    assert np.array_equal(rgb, np.asarray(Image.open(disk_photo)))
    assert np.allclose(_embed_frame(embedder, rgb), expected, atol=1e-6)


def test_bgr_frame_channel_order(embedder, disk_photo):
    expected = embedder.embed(disk_photo)
    bgr = cv2.imread(str(disk_photo))
    swapped = _embed_frame(embedder, np.ascontiguousarray(bgr))

    assert np.allclose(_embed_frame(embedder, bgr_to_rgb(bgr)), expected, atol=1e-6)
    assert float(swapped @ expected) < 0.99, "a BGR frame read as RGB must embed differently"


class FakePicamera2:
    """Stands in for picamera2.Picamera2 and delivers one photo in a format's byte order."""

    def __init__(self, rgb: np.ndarray, pixel_format: str) -> None:
        red, green, blue = rgb[:, :, 0], rgb[:, :, 1], rgb[:, :, 2]
        padding = np.full_like(red, 255)
        layouts = {  # bytes of each pixel in memory, as picamera2 documents them
            "XRGB8888": (blue, green, red, padding),
            "XBGR8888": (red, green, blue, padding),
            "RGB888": (blue, green, red),
            "BGR888": (red, green, blue),
        }
        self.array = np.stack(layouts[pixel_format], axis=2)
        self.camera_config = {"main": {"format": pixel_format}}
        self.requested = None

    def create_video_configuration(self, main):
        self.requested = main
        return {"main": main}

    def configure(self, config):
        pass

    def start(self):
        pass

    def capture_array(self, stream="main"):
        return self.array

    def stop(self):
        pass

    def close(self):
        pass


@pytest.mark.parametrize("pixel_format", ["XRGB8888", "XBGR8888", "RGB888", "BGR888"])
def test_picamera2_channel_order(embedder, disk_photo, pixel_format):
    expected = embedder.embed(disk_photo)
    camera = FakePicamera2(np.asarray(Image.open(disk_photo).convert("RGB")), pixel_format)
    source = Picamera2Source(camera=camera)
    source.open()
    rgb = source.read()
    source.close()

    assert camera.requested["format"] == "XRGB8888"
    assert np.allclose(_embed_frame(embedder, rgb), expected, atol=1e-6)


def test_picamera2_missing_explains_venv():
    try:
        import picamera2  # noqa: F401
    except ImportError:
        with pytest.raises(SourceError, match="--system-site-packages"):
            Picamera2Source().open()
    else:
        pytest.skip("picamera2 is installed; this test checks the message when it is not")


# Matching rules, regions and options, without video.

def _match(item_id: str, score: float) -> Match:
    return Match(item_id, f"{item_id}.jpg", score, 0)


def _feed(tracker: MatchTracker, sequence: list[tuple[str | None, float]], fps: float = 10.0):
    now = datetime.now(timezone.utc)
    events = []
    for frame, (item_id, score) in enumerate(sequence):
        best = _match(item_id, score) if item_id else None
        events += tracker.update(frame, frame / fps, best, 5.0, now)
    return [(event.event, event.frame, event.id) for event in events]


def test_tracker_needs_min_frames():
    tracker = MatchTracker(threshold=0.8, min_frames=3, cooldown_s=10.0)
    events = _feed(tracker, [("a", 0.9), ("a", 0.9), ("a", 0.7), ("a", 0.9), ("a", 0.9), ("a", 0.9)])
    assert events == [("match", 5, "a")]


def test_tracker_cooldown_and_other_id():
    tracker = MatchTracker(threshold=0.8, min_frames=2, cooldown_s=1.0)
    sequence = ([("a", 0.9)] * 3 + [(None, 0.0)] * 2      # a reported, then lost
                + [("a", 0.9)] * 3                         # within 1 s of its report: silent
                + [("b", 0.9)] * 3 + [("a", 0.9)] * 3      # b wins, so a counts again
                + [(None, 0.0)] * 12 + [("a", 0.9)] * 2)   # a's cooldown has passed
    assert _feed(tracker, sequence) == [
        ("match", 1, "a"), ("lost", 4, "a"),
        ("match", 9, "b"), ("lost", 12, "b"), ("match", 12, "a"), ("lost", 15, "a"),
        ("match", 27, "a"),
    ]


def test_region_roi_and_center_crop():
    assert embed_region(640, 480, None, None) == (0, 0, 640, 480)
    assert embed_region(640, 480, (100, 50, 200, 100), None) == (100, 50, 200, 100)
    assert embed_region(640, 480, None, 0.5) == (160, 120, 320, 240)
    assert embed_region(640, 480, (100, 50, 200, 100), 0.5) == (150, 75, 100, 50)
    with pytest.raises(ValueError, match="extends past the 640x480 frame"):
        embed_region(640, 480, (600, 0, 100, 100), None)


def test_options_reject_invalid_values():
    assert parse_roi("1, 2,3,4") == (1, 2, 3, 4)
    for text in ("1,2,3", "a,b,c,d", "1,2,-3,4"):
        with pytest.raises(ValueError, match="invalid roi"):
            parse_roi(text)
    for bad in ({"center_crop": 0.0}, {"every": 0}, {"min_frames": 0}, {"threshold": 1.5}):
        with pytest.raises(ValueError, match="invalid"):
            CameraOptions(**bad)
