"""Adding, removing and compacting saved galleries; locks, readers and corruption."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from edgeembed import gallery as gallery_module
from edgeembed.cli import main
from edgeembed.gallery import MANIFEST, Gallery
from edgeembed.gallery_check import stats, verify
from edgeembed.storage import GalleryError

DIM = 16


def _unit(count: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(count, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.fixture()
def saved(tmp_path):
    vectors = _unit(50, 0)
    Gallery.build(vectors, [f"base-{i}" for i in range(50)], model_fingerprint="a" * 64,
                  labels=["even" if i % 2 == 0 else "odd" for i in range(50)]).save(tmp_path / "g")
    return vectors, tmp_path / "g"


def _ids(matches):
    return [m.id for m in matches]


def test_added_items_are_searchable_at_once(saved):
    _, folder = saved
    gallery = Gallery.open(folder)
    new = _unit(3, 1)
    gallery.add(new, ["new-0", "new-1", "new-2"], labels=["fresh"] * 3)

    top = gallery.search(new[1], k=1)[0]
    assert top.id == "new-1"
    assert top.segment == "added"
    assert top.label == "fresh"
    reopened = Gallery.open(folder)
    assert reopened.search(new[2], k=1)[0].id == "new-2"
    assert len(reopened) == 53


def test_removed_items_never_come_back(saved):
    vectors, folder = saved
    gallery = Gallery.open(folder)
    gallery.add(_unit(2, 2), ["new-0", "new-1"])
    missing = gallery.remove(["base-7", "new-0", "nope"])

    assert missing == ["nope"]
    reopened = Gallery.open(folder)
    for search in (reopened.search, reopened.search_exact):
        assert "base-7" not in _ids(search(vectors[7], k=60))
        assert "new-0" not in _ids(search(vectors[7], k=60))
    assert len(reopened) == 50


def test_removed_id_can_be_added_again(saved):
    vectors, folder = saved
    gallery = Gallery.open(folder)
    gallery.remove(["base-3"])
    gallery.add(vectors[3:4] * -1, ["base-3"])

    top = Gallery.open(folder).search_exact(-vectors[3], k=1)[0]
    assert top.id == "base-3"
    assert top.segment == "added"
    assert _ids(Gallery.open(folder).search_exact(vectors[3], k=50)).count("base-3") == 1


def test_adding_a_live_id_is_rejected(saved):
    _, folder = saved
    with pytest.raises(GalleryError, match="already in the gallery"):
        Gallery.open(folder).add(_unit(1, 3), ["base-0"])


def test_compact_folds_added_and_drops_removed(saved):
    vectors, folder = saved
    gallery = Gallery.open(folder)
    gallery.add(_unit(4, 4), [f"new-{i}" for i in range(4)])
    gallery.remove(["base-0", "base-1"])
    gallery.compact(n_trees=3)

    counts = stats(folder)
    assert counts["items"] == 52
    assert counts["live"] == 52
    assert counts["removed"] == 0
    assert counts["added_items"] == 0
    assert verify(folder).ok
    assert verify(folder).leftovers == []
    reopened = Gallery.open(folder)
    assert reopened.n_trees == 3
    assert reopened.search(vectors[10], k=1)[0].id == "base-10"
    assert reopened.search(vectors[10], k=1)[0].label == "even"


def test_compaction_starts_by_itself(saved, monkeypatch):
    _, folder = saved
    monkeypatch.setattr(gallery_module, "COMPACT_MIN_ITEMS", 3)
    gallery = Gallery.open(folder)
    gallery.add(_unit(2, 5), ["a", "b"])
    assert stats(folder)["added_items"] == 2
    gallery.add(_unit(4, 6), ["c", "d", "e", "f"])
    assert stats(folder)["added_items"] == 0
    assert stats(folder)["base_items"] == 56


def test_stats_counts_items_live_and_removed(saved):
    _, folder = saved
    gallery = Gallery.open(folder)
    gallery.add(_unit(2, 7), ["x", "y"])
    gallery.remove(["base-4"])
    counts = stats(folder)
    assert (counts["items"], counts["live"], counts["removed"]) == (52, 51, 1)
    assert counts["dim"] == DIM
    assert counts["disk_bytes"] > 0


def test_second_writer_gets_clear_error(saved):
    _, folder = saved
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path; from edgeembed.storage import WriterLock\n"
         f"lock = WriterLock(Path({str(folder)!r})); lock.acquire(); print('locked', flush=True)\n"
         "time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(GalleryError, match="being changed by another process"):
            Gallery.open(folder).add(_unit(1, 8), ["blocked"])
    finally:
        holder.kill()
        holder.wait()

    # The lock died with its process, so the next writer goes ahead.
    Gallery.open(folder).add(_unit(1, 8), ["after-kill"])
    assert "after-kill" in Gallery.open(folder)


def test_reader_keeps_working_while_writer_compacts(saved):
    vectors, folder = saved
    reader = Gallery.open(folder)
    writer = Gallery.open(folder)
    writer.add(_unit(3, 9), ["w0", "w1", "w2"])
    writer.remove(["base-20"])
    writer.compact()

    assert verify(folder).leftovers == []
    assert reader.search(vectors[20], k=1)[0].id == "base-20"
    assert Gallery.open(folder).search(vectors[20], k=1)[0].id != "base-20"


def test_writer_reloads_changes_of_another_writer(saved):
    _, folder = saved
    first = Gallery.open(folder)
    second = Gallery.open(folder)
    first.add(_unit(1, 10), ["from-first"])
    second.add(_unit(1, 11), ["from-second"])
    reopened = Gallery.open(folder)
    assert "from-first" in reopened
    assert "from-second" in reopened


def _manifest(folder):
    return json.loads((folder / MANIFEST).read_text())


def test_truncated_vectors_file_is_named(saved):
    _, folder = saved
    path = folder / _manifest(folder)["base"]["vectors"]
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(GalleryError, match=path.name):
        Gallery.open(folder)
    result = verify(folder)
    assert not result.ok
    assert any(path.name in problem for problem in result.problems)


def test_changed_bytes_fail_the_checksum(saved):
    _, folder = saved
    path = folder / _manifest(folder)["base"]["items_file"]
    data = bytearray(path.read_bytes())
    data[10] ^= 0x01
    path.write_bytes(bytes(data))
    result = verify(folder)
    assert result.problems == [f"{path}: SHA-256 differs from the manifest (the content changed)"]


def test_missing_index_file_is_reported(saved):
    _, folder = saved
    (folder / _manifest(folder)["base"]["shards"][0]["file"]).unlink()
    assert any("missing" in problem for problem in verify(folder).problems)
    with pytest.raises(GalleryError, match="not found"):
        Gallery.open(folder)


def test_corrupted_manifest_fails_verify(saved):
    _, folder = saved
    (folder / MANIFEST).write_text('{"schema": "edgeembed.gallery/2"')
    assert "corrupted" in verify(folder).problems[0]


KILL_SCRIPT = """
import sys, numpy as np
from edgeembed.gallery import Gallery
gallery = Gallery.open(sys.argv[1])
rng = np.random.default_rng(int(sys.argv[2]))
for step in range(10_000):
    item_id = f"{sys.argv[2]}-{step}"
    gallery.add(rng.normal(size=(1, 16)).astype(np.float32), [item_id], auto_compact=False)
    print(item_id, flush=True)
    if step % 5 == 4:
        gallery.compact()
"""


def test_killed_writer_never_loses_acknowledged_items(saved):
    _, folder = saved
    rng = np.random.default_rng(123)
    acknowledged: list[str] = []
    for trial in range(50):
        process = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(folder), str(trial)],
                                   stdout=subprocess.PIPE, text=True)
        assert process.stdout.readline()  # the writer is running and has added one item
        acknowledged.append(f"{trial}-0")
        time.sleep(float(rng.uniform(0.0, 0.25)))
        process.kill()
        output, _ = process.communicate()
        acknowledged += output.split()

        result = verify(folder)
        assert result.ok, f"trial {trial}: {result.problems}"
        gallery = Gallery.open(folder)
        lost = [item_id for item_id in acknowledged if item_id not in gallery]
        assert lost == [], f"trial {trial}"


def test_compact_rejects_invalid_trees(saved):
    _, folder = saved
    with pytest.raises(GalleryError, match="invalid n_trees -5"):
        Gallery.open(folder).compact(n_trees=-5)


def test_search_rejects_k_below_one(saved):
    vectors, folder = saved
    with pytest.raises(GalleryError, match="invalid k 0"):
        Gallery.open(folder).search(vectors[0], k=0)


# Repairing a damaged index from the stored vectors

QUERIES = _unit(8, 99)


def _top_ids(search, k=5):
    # A search_k above the item count makes Annoy inspect every item, so it agrees with exact search.
    extra = {} if search.__name__ == "search_exact" else {"search_k": 100_000}
    return [_ids(search(query, k=k, **extra)) for query in QUERIES]


def _flip_byte(path, offset=-20):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _snapshot(folder):
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_truncated_index_is_rebuilt(saved, caplog):
    _, folder = saved
    before = _top_ids(Gallery.open(folder).search)
    index_file = folder / _manifest(folder)["base"]["shards"][0]["file"]
    recorded = _manifest(folder)["files"][index_file.name]["bytes"]
    index_file.write_bytes(index_file.read_bytes()[:1000])

    result = verify(folder)
    assert result.problems == [f"{index_file}: 1000 bytes, the manifest records {recorded}"]
    assert f"`edgeembed index compact {folder}` can rebuild it from the stored vectors" in result.fix
    with pytest.raises(GalleryError, match="edgeembed index compact"):
        Gallery.open(folder)

    Gallery.open(folder, load_index=False).compact()
    assert verify(folder).ok
    assert verify(folder).leftovers == []
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert any(index_file.name in message and "rebuilding" in message for message in warnings)
    assert any(message.startswith("rebuilt the Annoy index") for message in warnings)
    repaired = Gallery.open(folder)
    assert _top_ids(repaired.search) == before
    assert _top_ids(repaired.search) == _top_ids(repaired.search_exact)


def test_deleted_index_is_rebuilt_by_cli(saved, capsys):
    _, folder = saved
    before = _top_ids(Gallery.open(folder).search_exact)
    (folder / _manifest(folder)["base"]["shards"][0]["file"]).unlink()

    assert main(["index", "verify", str(folder)]) == 1
    output = capsys.readouterr().out
    assert ": missing" in output
    assert "fix: only the Annoy index is damaged" in output

    assert main(["index", "compact", str(folder)]) == 0
    assert main(["index", "verify", str(folder)]) == 0
    repaired = Gallery.open(folder)
    assert _top_ids(repaired.search) == before


def test_damaged_shard_is_rebuilt(tmp_path):
    vectors = _unit(60, 12)
    folder = Gallery.build(vectors, [f"base-{i}" for i in range(60)], model_fingerprint="a" * 64,
                           shards=3).save(tmp_path / "sharded")
    gallery = Gallery.open(folder)
    gallery.add(_unit(2, 13), ["new-0", "new-1"])
    gallery.remove(["base-5"])
    expected = _top_ids(gallery.search_exact)
    shard = folder / _manifest(folder)["base"]["shards"][1]["file"]
    _flip_byte(shard)  # the size stays, so only the SHA-256 shows the damage

    assert verify(folder).problems == [f"{shard}: SHA-256 differs from the manifest (the content changed)"]
    assert "edgeembed index compact" in verify(folder).fix
    Gallery.open(folder, load_index=False).compact()

    assert verify(folder).ok
    repaired = Gallery.open(folder)
    assert len(_manifest(folder)["base"]["shards"]) == 3
    assert len(repaired) == 61
    assert "base-5" not in repaired
    assert _top_ids(repaired.search) == expected


@pytest.mark.parametrize("file_key, damage", [("vectors", "flip"), ("vectors", "truncate"),
                                              ("items_file", "flip")])
def test_damaged_data_stops_compaction(saved, caplog, file_key, damage):
    _, folder = saved
    Gallery.open(folder).remove(["base-1"])  # a first change creates the lock file before the snapshot
    path = folder / _manifest(folder)["base"][file_key]
    if damage == "flip":
        _flip_byte(path)
    else:
        path.write_bytes(path.read_bytes()[:300])
    before = _snapshot(folder)

    assert main(["index", "compact", str(folder)]) == 1
    errors = [record.getMessage() for record in caplog.records if record.levelname == "ERROR"]
    assert len(errors) == 1
    assert str(path) in errors[0]
    assert "rebuilt from the images with `edgeembed index build`" in errors[0]
    assert _snapshot(folder) == before
    assert "rebuilt from the images" in verify(folder).fix


def test_search_without_index_is_rejected(saved):
    vectors, folder = saved
    gallery = Gallery.open(folder, load_index=False)
    with pytest.raises(GalleryError, match="opened without its Annoy index"):
        gallery.search(vectors[0])
    assert gallery.search_exact(vectors[0], k=1)[0].id == "base-0"
