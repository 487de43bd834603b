"""The staging shards, the sharded index and the ``--engine`` options; none of these needs Ray."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeembed.cli_index import _image_ids
from edgeembed.distributed_shards import (
    DistributedBuildError,
    ShardCollector,
    ShardStore,
    SourceFiles,
    StagingPlan,
    staging_folder,
)
from edgeembed.gallery import Gallery
from test_cli import run_cli  # tests/ is on sys.path under pytest


@pytest.fixture()
def files() -> SourceFiles:
    names = [f"c{i // 4}/photo{i}.jpg" for i in range(10)]
    return SourceFiles("/photos", [f"/photos/{name}" for name in names], names)


def plan_for(files: SourceFiles, model: str = "a" * 64, shard_rows: int = 4) -> StagingPlan:
    return StagingPlan(files.source, model, len(files), shard_rows, files.digest())


def test_plan_shard_ranges_cover_rows(files):
    assert plan_for(files).shard_ranges() == [(0, 4), (4, 8), (8, 10)]


def test_staging_folder_beside_gallery():
    assert staging_folder(Path("/data/gallery")) == Path("/data/gallery.staging")


def test_collector_writes_shard_when_complete(files, tmp_path):
    store = ShardStore.open(tmp_path / "staging", plan_for(files), files, resume=False)
    collector = ShardCollector(store, store.pending_ranges(), dim=3)
    collector.add([9, 8], np.ones((2, 3)), ["", "cannot decode image"])
    assert store.finished_ranges() == [(8, 10)]
    collector.add([3, 1, 0], np.ones((3, 3)), ["", "", ""])
    assert store.finished_ranges() == [(8, 10)]
    collector.add([2], np.ones((1, 3)), [""])
    assert store.finished_ranges() == [(0, 4), (8, 10)]
    assert store.pending_ranges() == [(4, 8)]


def test_shard_table_names_rows(files, tmp_path):
    store = ShardStore.open(tmp_path / "staging", plan_for(files), files, resume=False)
    store.write(8, np.zeros((2, 3), np.float32), ["", "not a recognised image format"])
    table = json.loads((tmp_path / "staging" / "shard-000000008-000000010.json").read_text())
    assert table[1] == {"row": 9, "id": "c2/photo9.jpg", "path": "/photos/c2/photo9.jpg",
                        "error": "not a recognised image format"}


def test_merge_keeps_rows_in_order(files, tmp_path):
    store = ShardStore.open(tmp_path / "staging", plan_for(files), files, resume=False)
    vectors = np.arange(30, dtype=np.float32).reshape(10, 3)
    errors = [""] * 10
    errors[5] = "file not found"
    collector = ShardCollector(store, store.pending_ranges(), dim=3)
    collector.add(list(reversed(range(10))), vectors[::-1], errors[::-1])
    merged, kept, failures = store.merge(dim=3)
    assert kept == [0, 1, 2, 3, 4, 6, 7, 8, 9]
    assert np.array_equal(merged, vectors[kept])
    assert failures == [("/photos/c1/photo5.jpg", "file not found")]


def test_merge_names_missing_shard(files, tmp_path):
    store = ShardStore.open(tmp_path / "staging", plan_for(files), files, resume=False)
    store.write(0, np.zeros((4, 3), np.float32), [""] * 4)
    with pytest.raises(DistributedBuildError, match="rows 4 to 7"):
        store.merge(dim=3)


def test_reopen_without_resume_rejected(files, tmp_path):
    store = ShardStore.open(tmp_path / "staging", plan_for(files), files, resume=False)
    store.write(0, np.zeros((4, 3), np.float32), [""] * 4)
    with pytest.raises(DistributedBuildError, match="pass --resume"):
        ShardStore.open(tmp_path / "staging", plan_for(files), files, resume=False)


def test_resume_with_other_model_rejected(files, tmp_path):
    store = ShardStore.open(tmp_path / "staging", plan_for(files), files, resume=False)
    store.write(0, np.zeros((4, 3), np.float32), [""] * 4)
    with pytest.raises(DistributedBuildError, match="model_fingerprint"):
        ShardStore.open(tmp_path / "staging", plan_for(files, model="b" * 64), files, resume=True)


def test_resume_keeps_earlier_shard_size(files, tmp_path):
    store = ShardStore.open(tmp_path / "staging", plan_for(files), files, resume=False)
    store.write(4, np.zeros((4, 3), np.float32), [""] * 4)
    resumed = ShardStore.open(tmp_path / "staging", plan_for(files, shard_rows=1024), files, resume=True)
    assert resumed.plan.shard_rows == 4
    assert resumed.pending_ranges() == [(0, 4), (8, 10)]


def test_list_uri_orders_like_folder(photo_dir, tmp_path):
    pytest.importorskip("pyarrow", reason="listing URIs needs pyarrow, which edgeembed[ray] installs")
    from edgeembed.distributed_shards import list_uri

    (tmp_path / "b").mkdir()
    (tmp_path / "a.jpg").write_bytes((photo_dir / "coffee.jpg").read_bytes())
    (tmp_path / "b" / "c.png").write_bytes(b"x")
    (tmp_path / "z.jpg").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("not listed")
    files = list_uri(tmp_path.as_uri())
    assert files.ids == _image_ids([str(tmp_path)])[1]
    assert files.paths[0] == tmp_path.as_uri() + "/a.jpg"


def test_sharded_index_equals_one_index(local_vectors):
    vectors, ids = local_vectors
    one = Gallery.build(vectors, ids, model_fingerprint="f", n_trees=5)
    three = Gallery.build(vectors, ids, model_fingerprint="f", n_trees=5, shards=3)
    assert three._index.shard_count == 3
    for query in vectors:
        exact = [match.id for match in one.search_exact(query, k=5)]
        assert [match.id for match in one.search(query, k=5, search_k=100_000)] == exact
        assert [match.id for match in three.search(query, k=5, search_k=100_000)] == exact


@pytest.fixture(scope="module")
def local_vectors(photo_dir, embedder) -> tuple[np.ndarray, list[str]]:
    paths, ids = _image_ids([str(photo_dir)])
    return np.stack([embedder.embed(path) for path in paths]), ids


def test_cli_ray_options_need_ray_engine(photo_dir, tmp_path):
    result = run_cli("index", "build", photo_dir, "--out", tmp_path / "g", "--workers", "2", check_code=2)
    assert "--workers need --engine ray" in result.stderr


def test_cli_without_ray_names_extra(photo_dir, tmp_path):
    blocked = ("import sys; sys.modules['ray'] = None; from edgeembed.cli import main; "
               f"sys.exit(main(['index', 'build', {str(photo_dir)!r}, '--out', {str(tmp_path / 'g')!r}, "
               "'--engine', 'ray']))")
    result = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "pip install 'edgeembed[ray]'" in result.stderr
    assert not (tmp_path / "g").exists()
