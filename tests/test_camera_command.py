"""``edgeembed camera`` in a subprocess: errors and exit codes, JSON events, signals, annotated video."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from edgeembed.gallery import Gallery
from test_camera import GALLERY_PHOTOS, letterbox, write_video

cv2 = pytest.importorskip("cv2", reason="the camera tests need OpenCV: pip install 'edgeembed[camera]'")

MATCH_KEYS = ["event", "time", "frame", "id", "path", "score", "latency_ms"]


@pytest.fixture(scope="module")
def gallery_dir(photos, embedder, tmp_path_factory):
    vectors = np.stack([embedder.embed(photos[name]) for name in GALLERY_PHOTOS])
    gallery = Gallery.build(vectors, list(GALLERY_PHOTOS), model_fingerprint=embedder.fingerprint,
                            model_path=str(embedder.model_path))
    return gallery.save(tmp_path_factory.mktemp("camera") / "gallery")


@pytest.fixture(scope="module")
def video(photos, tmp_path_factory):
    """Two gallery photos and one unknown photo, 8 frames each at 10 fps."""
    frames = [letterbox(photos[name]) for name in ("astronaut", "coins", "coffee") for _ in range(8)]
    path = tmp_path_factory.mktemp("video") / "three.avi"
    write_video(path, frames)
    return path


def camera(*arguments: str, **options) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgeembed", "camera", *map(str, arguments)],
                          capture_output=True, text=True, timeout=120, **options)


@pytest.mark.parametrize("source, message", [
    ("missing.avi", "video file missing.avi not found"),
    ("9", "camera device 9 not found: /dev/video9 does not exist"),
])
def test_bad_source_exits_1(gallery_dir, tmp_path, source, message):
    if source == "9" and os.path.exists("/dev/video9"):
        pytest.skip("this machine has a /dev/video9")
    result = camera(gallery_dir, "--source", source, cwd=tmp_path)

    assert result.returncode == 1, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_picamera2_missing_exits_1(gallery_dir):
    try:
        import picamera2  # noqa: F401
    except ImportError:
        result = camera(gallery_dir, "--source", "picamera2")
        assert result.returncode == 1
        assert "python3 -m venv --system-site-packages" in result.stderr
    else:
        pytest.skip("picamera2 is installed; this test checks the message when it is not")


@pytest.mark.parametrize("arguments, message", [
    (["--roi", "1,2,3"], "invalid roi '1,2,3'"),
    (["--center-crop", "0"], "invalid center_crop 0.0"),
    (["--every", "0"], "invalid every 0"),
])
def test_invalid_option_exits_2(gallery_dir, video, arguments, message):
    result = camera(gallery_dir, "--source", video, *arguments)

    assert result.returncode == 2, result.stderr
    assert message in result.stderr


def test_json_events(gallery_dir, video):
    result = camera(gallery_dir, "--source", video, "--no-realtime", "--json")
    records = [json.loads(line) for line in result.stdout.splitlines()]
    matches = [record for record in records if record["event"] == "match"]

    assert result.returncode == 0, result.stderr
    assert [record["event"] for record in records] == ["start", "match", "lost", "match", "lost", "stop"]
    assert [record["id"] for record in matches] == ["astronaut", "coffee"]
    assert list(matches[0]) == MATCH_KEYS
    assert records[-1]["reason"] == "end of file"
    assert records[-1]["frames_read"] == 24
    assert "frames read 24, embedded 24, dropped 0" in result.stderr


def test_readable_lines(gallery_dir, video):
    result = camera(gallery_dir, "--source", video, "--no-realtime")
    lines = result.stdout.splitlines()

    assert result.returncode == 0, result.stderr
    assert len(lines) == 6
    assert "video file" in lines[0]
    assert "threshold" in lines[0]
    assert " match " in lines[1]
    assert "astronaut  score" in lines[1]
    assert lines[-1].endswith("end of file")


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_cleanly(gallery_dir, photos, tmp_path, number):
    long_video = tmp_path / "long.avi"
    write_video(long_video, [letterbox(photos["clock"])] * 300, fps=10.0)  # 30 s in real time
    process = subprocess.Popen(
        [sys.executable, "-m", "edgeembed", "camera", str(gallery_dir), "--source", str(long_video), "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = json.loads(process.stdout.readline())
    time.sleep(1.0)
    process.send_signal(number)
    stdout, stderr = process.communicate(timeout=30)
    last = json.loads(stdout.splitlines()[-1])

    assert first["event"] == "start"
    assert process.returncode == 0, stderr
    assert last["event"] == "stop"
    assert last["reason"] == "stopped"
    assert last["frames_read"] < 300
    assert "latency p50" in stderr


def test_save_annotated_video(gallery_dir, video, tmp_path):
    out = tmp_path / "annotated.avi"
    result = camera(gallery_dir, "--source", video, "--no-realtime", "--save-annotated", out)
    capture = cv2.VideoCapture(str(out))
    frames = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    ok, frame = capture.read()
    capture.release()

    assert result.returncode == 0, result.stderr
    assert frames == 24
    assert ok
    assert frame.shape == (240, 320, 3)
    # The label bar across the top is black with light text.
    assert frame[:28].mean() < frame[28:].mean()
