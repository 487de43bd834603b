"""Gallery builds on Ray Data, checked against the single-process build on real photos.

One local Ray instance with 2 CPUs serves the whole module. Builds run in this
process through the Python API, or as ``edgeembed index build --engine ray`` in a
subprocess that joins the same instance with ``--ray-address``.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from edgeembed.gallery import Gallery

# The module's Ray instance listens on 127.0.0.1 only (read when Ray is imported).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ray = pytest.importorskip("ray", reason="the Ray tests need edgeembed[ray]: pip install 'edgeembed[ray]'")
pytest.importorskip("ray.data", reason="the Ray tests need Ray Data: pip install 'edgeembed[ray]'")

from edgeembed import distributed  # noqa: E402  (needs Ray, checked above)
from edgeembed.cli_index import _image_ids  # noqa: E402
from test_cli import run_cli  # noqa: E402  (tests/ is on sys.path under pytest)


@pytest.fixture(scope="module")
def ray_address():
    """Start one local Ray instance for the module and return its address."""
    context = ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield context.address_info["gcs_address"]
    ray.shutdown()


def source_files(folder: Path) -> distributed.SourceFiles:
    paths, ids = _image_ids([str(folder)])
    return distributed.SourceFiles(str(folder), [str(path) for path in paths], ids)


def build_on_ray(folder: Path, out: Path, actor_class=distributed.EmbedActor, **options):
    builder = distributed.RayGalleryBuilder.create(source_files(folder), distributed.RayBuildOptions(
        out=out, **options))
    return builder.run(actor_class=actor_class)


@pytest.fixture(scope="module")
def local_gallery(photo_dir, embedder):
    paths, ids = _image_ids([str(photo_dir)])
    gallery, failures = Gallery.from_images(paths, embedder, ids=ids)
    assert failures == []
    return gallery


@pytest.fixture(scope="module")
def ray_gallery_dir(ray_address, photo_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ray") / "gallery"
    result = run_cli("index", "build", photo_dir, "--out", out, "--engine", "ray",
                     "--ray-address", ray_address, "--batch-size", "4", "--label", "samples")
    assert "indexed 19 of 19 images, 0 skipped" in result.stderr
    return out


def test_build_vectors_equal_single_process(ray_gallery_dir, local_gallery):
    vectors = Gallery.open(ray_gallery_dir).vectors()
    assert vectors.shape == local_gallery.vectors().shape
    assert np.abs(vectors - local_gallery.vectors()).max() <= 1e-6


def test_build_ids_and_paths_equal_single_process(ray_gallery_dir, local_gallery):
    gallery = Gallery.open(ray_gallery_dir)
    assert [item["id"] for item in gallery._base_items] == [item["id"] for item in local_gallery._base_items]
    assert [item["path"] for item in gallery._base_items] == [item["path"] for item in local_gallery._base_items]


def test_build_search_equals_single_process(ray_gallery_dir, local_gallery, embedder, photo_dir):
    gallery = Gallery.open(ray_gallery_dir, embedder)
    for query in sorted(photo_dir.glob("*.jpg"))[:5]:
        ours = gallery.search(query, k=5)
        theirs = local_gallery.search(query, k=5)
        assert [match.id for match in ours] == [match.id for match in theirs]
        assert np.allclose([m.score for m in ours], [m.score for m in theirs], atol=1e-6)


def test_build_stores_labels(ray_gallery_dir):
    labels = {item.get("label") for item in Gallery.open(ray_gallery_dir)._base_items}
    assert labels == {"samples"}


def test_build_leaves_no_staging(ray_gallery_dir):
    assert not distributed.staging_folder(ray_gallery_dir).exists()


def test_build_gallery_works_with_search_and_add(ray_gallery_dir, photo_dir, tmp_path):
    gallery = tmp_path / "copy"
    shutil.copytree(ray_gallery_dir, gallery)
    found = run_cli("search", gallery, photo_dir / "coffee.jpg", "-k", "1")
    assert "coffee.jpg" in found.stdout.splitlines()[2]

    extra = tmp_path / "extra"
    extra.mkdir()
    shutil.copy(photo_dir / "moon.jpg", extra / "moon-copy.jpg")
    added = run_cli("index", "add", gallery, extra)
    assert "added 1 of 1 images, 0 skipped" in added.stderr


def write_bad_files(folder: Path) -> None:
    (folder / "truncated.jpg").write_bytes((folder / "coffee.jpg").read_bytes()[:300])
    (folder / "notes.png").write_text("not an image")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "dangling.jpg").symlink_to(folder / "missing-target.jpg")
    os.mkfifo(folder / "pipe.jpg")


def test_bad_images_reported_like_single_process(ray_address, photo_dir, tmp_path):
    folder = tmp_path / "photos"
    shutil.copytree(photo_dir, folder)
    write_bad_files(folder)
    # A good photo whose file name is not valid UTF-8.
    os.rename(os.fsencode(folder / "moon.jpg"), os.fsencode(folder) + b"/moon-\xe9.jpg")

    local = run_cli("index", "build", folder, "--out", tmp_path / "local", check_code=1)
    on_ray = run_cli("index", "build", folder, "--out", tmp_path / "ray", "--engine", "ray",
                     "--ray-address", ray_address, check_code=1)
    local_lines = [line for line in local.stderr.splitlines() if line.startswith("WARNING: skipped")]
    ray_lines = [line for line in on_ray.stderr.splitlines() if line.startswith("WARNING: skipped")]
    assert len(ray_lines) == 5
    assert sorted(ray_lines) == sorted(local_lines)
    assert "indexed 19 of 24 images, 5 skipped" in on_ray.stderr
    ids = [item["id"] for item in Gallery.open(tmp_path / "ray")._base_items]
    assert ids == [item["id"] for item in Gallery.open(tmp_path / "local")._base_items]
    assert os.fsdecode(b"moon-\xe9.jpg") in ids


def failing_actor(row: int, first_shard: Path):
    """Return an actor class that raises on the batch holding `row`, after the driver wrote `first_shard`.

    The first shard's batches were dispatched before the failing one, so waiting for
    them cannot block the pool.
    """

    class FailingActor(distributed.EmbedActor):
        def __call__(self, batch):
            if row in batch["row"]:
                deadline = time.monotonic() + 60
                while not first_shard.exists() and time.monotonic() < deadline:
                    time.sleep(0.1)
                raise RuntimeError(f"injected failure at row {row}")
            return super().__call__(batch)

    return FailingActor


def shard_times(staging: Path) -> dict[str, int]:
    return {path.name: path.stat().st_mtime_ns for path in staging.glob("shard-*")}


def test_resume_embeds_only_missing_shards(ray_address, photo_dir, tmp_path):
    out = tmp_path / "gallery"
    staging = distributed.staging_folder(out)
    with pytest.raises(distributed.DistributedBuildError, match="--resume"):
        build_on_ray(photo_dir, out, failing_actor(17, staging / "shard-000000000-000000004.json"),
                     batch_size=2, shard_rows=4)
    written = shard_times(staging)
    assert "shard-000000016-000000019.json" not in written
    assert "shard-000000000-000000004.json" in written

    refused = run_cli("index", "build", photo_dir, "--out", out, "--engine", "ray",
                      "--ray-address", ray_address, check_code=1)
    assert "pass --resume" in refused.stderr
    assert shard_times(staging) == written

    finished = len(written) // 2
    resumed = run_cli("index", "build", photo_dir, "--out", out, "--engine", "ray",
                      "--ray-address", ray_address, "--resume", "--shards", "3")
    assert f"embedded {19 - 4 * finished} images in" in resumed.stderr
    assert f"reused {4 * finished} from earlier shards" in resumed.stderr
    assert len(Gallery.open(out)) == 19
    assert len(Gallery.open(out).manifest["base"]["shards"]) == 3


def exiting_actor(row: int, marker: Path):
    """Return an actor class whose process exits on the batch holding `row`, the first time only."""

    class ExitingActor(distributed.EmbedActor):
        def __call__(self, batch):
            if row in batch["row"] and not marker.exists():
                marker.touch()
                os._exit(1)
            return super().__call__(batch)

    return ExitingActor


def test_killed_worker_retries_its_batch(ray_address, photo_dir, tmp_path, local_gallery):
    marker = tmp_path / "exited"
    result = build_on_ray(photo_dir, tmp_path / "gallery", exiting_actor(5, marker), batch_size=2)
    assert marker.exists()
    assert result.rows_embedded == 19
    assert np.abs(Gallery.open(tmp_path / "gallery").vectors() - local_gallery.vectors()).max() <= 1e-6


def test_file_uri_source_equals_folder(ray_address, photo_dir, tmp_path, local_gallery):
    files = distributed.list_uri(photo_dir.as_uri())
    assert files.ids == source_files(photo_dir).ids

    builder = distributed.RayGalleryBuilder.create(files, distributed.RayBuildOptions(out=tmp_path / "g"))
    result = builder.run()
    assert result.items == 19
    assert np.abs(Gallery.open(tmp_path / "g").vectors() - local_gallery.vectors()).max() <= 1e-6
