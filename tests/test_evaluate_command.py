"""``edgeembed eval`` through a subprocess on real photos, and the Python API on flowers17."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

import sample_photos  # tools/, put on sys.path by conftest

# Each class is one scikit-image photo and edited copies of it. The "moon" class has a
# single image, so its query has nothing to find and is excluded.
CLASSES = ("astronaut", "chelsea", "coffee", "rocket")
SINGLE = "moon"
V1_EXTRACTOR = "models/mobilenet_v1_1.0_224_quant_embedding_extractor.tflite"


def run_eval(*arguments: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "edgeembed", "eval", *arguments]
    return subprocess.run(command, check=False, capture_output=True, text=True, timeout=300)


def write_views(folder: Path, name: str, views: tuple[str, ...]) -> None:
    """Save the named views of one scikit-image photo into folder/name/."""
    photo = sample_photos.load_skimage_photo(name)
    rng = random.Random(name)
    edited = {
        "original": photo,
        "flip": sample_photos.flip(photo),
        "crop": sample_photos.crop_area(photo, rng, fraction=0.6),
    }
    (folder / name).mkdir(parents=True, exist_ok=True)
    for view in views:
        edited[view].save(folder / name / f"{view}.jpg", quality=90)


@pytest.fixture(scope="module")
def labelled_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("labelled")
    for name in CLASSES:
        write_views(folder, name, ("original", "flip", "crop"))
    write_views(folder, SINGLE, ("original",))
    return folder


@pytest.fixture(scope="module")
def clean_run(labelled_dir) -> subprocess.CompletedProcess:
    return run_eval(str(labelled_dir), "--json", "--threads", "2")


@pytest.fixture(scope="module")
def report(clean_run) -> dict:
    return json.loads(clean_run.stdout)


def test_cli_exit_code(clean_run):
    assert clean_run.returncode == 0, clean_run.stderr


def test_cli_json_keys(report):
    for key in ("recall@1", "recall@5", "mAP", "per_class", "n_images", "n_classes"):
        assert key in report


def test_cli_counts(report):
    assert report["n_images"] == 13
    assert report["n_classes"] == 5
    assert report["n_queries"] == 12
    assert report["n_skipped"] == 0


def test_cli_excludes_single_image(report):
    assert report["excluded_classes"] == [SINGLE]
    assert SINGLE not in report["per_class"]


def test_cli_finds_edited_copies(report):
    # Flips and crops of four unrelated photos: every nearest neighbour is the same photo.
    assert report["recall@1"] == 1.0
    assert report["recall@5"] == 1.0
    assert report["mAP"] == 1.0
    assert report["confusions"] == []


def test_cli_per_class(report):
    assert sorted(report["per_class"]) == sorted(CLASSES)
    assert report["per_class"]["coffee"] == {"recall@1": 1.0, "mAP": 1.0, "n_queries": 3}


def test_cli_table(labelled_dir):
    done = run_eval(str(labelled_dir), "--threads", "2")
    assert done.returncode == 0, done.stderr
    assert "recall@1   1.000" in done.stdout
    assert "13 in 5 classes, 12 queries scored (leave-one-out" in done.stdout
    assert f"excluded 1 classes whose queries have a single image: {SINGLE}" in done.stdout
    assert "embedded 13 of 13 images, 0 skipped" in done.stderr


def test_cli_skips_bad_image(tmp_path):
    for name in CLASSES[:2]:
        write_views(tmp_path, name, ("original", "flip"))
    broken = tmp_path / CLASSES[0] / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not a jpeg")
    done = run_eval(str(tmp_path), "--json", "--threads", "2")
    report = json.loads(done.stdout)
    assert done.returncode == 1
    assert done.stderr.count(f"WARNING: skipped {broken}") == 1
    assert report["n_skipped"] == 1
    assert report["skipped"][0]["path"] == str(broken)
    assert report["n_images"] == 4


def test_cli_gallery_split(tmp_path):
    queries, gallery = tmp_path / "queries", tmp_path / "gallery"
    for name in CLASSES:
        write_views(queries, name, ("flip", "crop"))
        write_views(gallery, name, ("original",))
    write_views(gallery, SINGLE, ("original",))  # a distractor with no queries
    done = run_eval(str(queries), "--gallery-split", str(gallery), "--json", "--threads", "2")
    report = json.loads(done.stdout)
    assert done.returncode == 0, done.stderr
    assert report["mode"] == "gallery"
    assert report["n_queries"] == 8
    assert report["n_images"] == 13
    assert report["recall@1"] == 1.0
    assert report["excluded_classes"] == []


def test_cli_missing_folder(tmp_path):
    done = run_eval(str(tmp_path / "missing"))
    assert done.returncode == 1
    assert "is not a folder" in done.stderr


def test_flowers17_subset(shared_assets, tmp_path):
    from edgeembed import Embedder
    from edgeembed.evaluate import embed_labelled_folder, evaluate

    for number in range(1, 6):
        (tmp_path / f"c{number}").symlink_to(shared_assets / "datasets" / "flowers17" / f"c{number}")
    embedder = Embedder(shared_assets / V1_EXTRACTOR, num_threads=2)
    data = embed_labelled_folder(tmp_path, embedder)
    result = evaluate(data.vectors, data.labels)

    assert data.skipped == []
    assert result.n_images == 100
    assert result.n_classes == 5
    # The v1 extractor measured 0.97 recall@1 and 0.73 mAP here with LiteRT; the floors
    # leave room for other interpreter packages.
    assert result.recall_at_1 >= 0.85
    assert result.mean_average_precision >= 0.6
