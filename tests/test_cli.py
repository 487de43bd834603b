"""Every CLI command on real photos, through a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import DEFAULT_EMBEDDING_DIM


def run_cli(*args: str | Path, check_code: int | None = 0) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "edgeembed", *map(str, args)],
                            capture_output=True, text=True, timeout=300)
    if check_code is not None:
        assert result.returncode == check_code, result.stderr
    return result


@pytest.fixture(scope="module")
def gallery_dir(photo_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "gallery"
    result = run_cli("index", "build", photo_dir, "--out", out, "--trees", "5")
    assert "indexed 19 of 19 images, 0 skipped" in result.stderr
    return out


def test_info_shows_preprocessing_and_ops():
    result = run_cli("info")
    assert "efficientnet_lite0_int8.tflite" in result.stdout
    assert "preprocess         from metadata: input_size=[256, 256]" in result.stdout
    assert "uint8" in result.stdout
    assert "CONV_2D x" in result.stdout


def test_info_json_of_foreign_model(shared_assets):
    model = shared_assets / "models" / "mobilenet_v1_1.0_224_quant_embedding_extractor.tflite"
    info = json.loads(run_cli("info", model, "--json").stdout)
    assert info["preprocess_source"] == "inferred"
    assert info["embedding_dim"] == 1024
    assert info["input"]["dtype"] == "uint8"


def test_embed_writes_vectors_and_ids(photo_dir, tmp_path):
    out = tmp_path / "vectors.npy"
    run_cli("embed", photo_dir / "coffee.jpg", photo_dir, "--out", out)
    vectors = np.load(out)
    ids = (tmp_path / "vectors.ids.txt").read_text().splitlines()
    assert vectors.shape == (20, DEFAULT_EMBEDDING_DIM)
    assert len(ids) == 20
    assert ids[0].endswith("coffee.jpg")
    assert np.allclose(vectors[0], vectors[ids.index(ids[0], 1)], atol=1e-6)


def test_embed_skips_bad_files_and_fails(photo_dir, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff truncated")
    out = tmp_path / "v.npy"
    result = run_cli("embed", photo_dir / "rocket.jpg", bad, "--out", out, check_code=1)
    assert f"skipped {bad}" in result.stderr
    assert "embedded 1 of 2 images, 1 skipped" in result.stderr
    assert np.load(out).shape == (1, DEFAULT_EMBEDDING_DIM)


def test_search_table_lists_best_match_first(gallery_dir, photo_dir):
    result = run_cli("search", gallery_dir, photo_dir / "chelsea.jpg", "-k", "3")
    lines = result.stdout.splitlines()
    assert lines[0] == f"query: {photo_dir / 'chelsea.jpg'}"
    assert lines[2].split()[:3] == ["1", "1.000", "chelsea.jpg"]
    assert len(lines) == 5


def test_search_json_has_one_object_per_query(gallery_dir, photo_dir, tmp_path):
    from PIL import Image

    query = tmp_path / "rocket_flipped.jpg"
    Image.open(photo_dir / "rocket.jpg").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(query)
    result = run_cli("search", gallery_dir, query, photo_dir / "coffee.jpg", "-k", "2", "--json")
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["query"] for r in records] == [str(query), str(photo_dir / "coffee.jpg")]
    assert records[0]["matches"][0]["id"] == "rocket.jpg"
    assert {"id", "path", "score"} <= set(records[0]["matches"][0])
    assert records[0]["matches"][0]["score"] > records[0]["matches"][1]["score"]
    assert len(records[1]["matches"]) == 2


def test_search_reports_bad_query(gallery_dir, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not a png")
    result = run_cli("search", gallery_dir, bad, check_code=1)
    assert "not a recognised image format" in result.stderr


def test_search_with_other_model_fails_clearly(gallery_dir, photo_dir, shared_assets):
    model = shared_assets / "models" / "mobilenet_v1_1.0_224_quant_embedding_extractor.tflite"
    result = run_cli("search", gallery_dir, photo_dir / "coffee.jpg", "--model", model, check_code=1)
    assert "search with the same model or rebuild the gallery" in result.stderr


def test_index_build_refuses_to_overwrite(gallery_dir, photo_dir):
    result = run_cli("index", "build", photo_dir, "--out", gallery_dir, check_code=1)
    assert "pass --overwrite" in result.stderr


def test_index_build_counts_skipped_files(tmp_path, photo_dir):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "good.jpg").write_bytes((photo_dir / "coffee.jpg").read_bytes())
    (folder / "empty.png").write_bytes(b"")
    result = run_cli("index", "build", folder, "--out", tmp_path / "g", check_code=1)
    assert "indexed 1 of 2 images, 1 skipped" in result.stderr
    assert (tmp_path / "g" / "manifest.json").is_file()


def test_index_lifecycle_commands(photo_dir, tmp_path):
    from PIL import Image

    gallery = tmp_path / "life"
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\ncoffee.jpg,drink\nrocket.jpg,vehicle\n")
    run_cli("index", "build", photo_dir, "--out", gallery, "--labels", labels)

    extra = tmp_path / "extra"
    extra.mkdir()
    Image.open(photo_dir / "coffee.jpg").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(extra / "mug.jpg")
    result = run_cli("index", "add", gallery, extra, "--label", "new")
    assert "added 1 of 1 images, 0 skipped" in result.stderr

    found = json.loads(run_cli("search", gallery, extra / "mug.jpg", "-k", "2", "--json").stdout)
    assert [m["id"] for m in found["matches"]] == ["mug.jpg", "coffee.jpg"]
    assert [m.get("label") for m in found["matches"]] == ["new", "drink"]

    run_cli("index", "remove", gallery, "coffee.jpg")
    missing = run_cli("index", "remove", gallery, "no-such-id", check_code=1)
    assert "'no-such-id' is not in" in missing.stderr

    counts = json.loads(run_cli("index", "stats", gallery, "--json").stdout)
    assert (counts["items"], counts["live"], counts["removed"]) == (20, 19, 1)

    run_cli("index", "compact", gallery)
    counts = json.loads(run_cli("index", "stats", gallery, "--json").stdout)
    assert (counts["items"], counts["live"], counts["removed"]) == (19, 19, 0)
    found = json.loads(run_cli("search", gallery, extra / "mug.jpg", "-k", "2", "--json").stdout)
    assert "coffee.jpg" not in [m["id"] for m in found["matches"]]
    assert run_cli("index", "verify", gallery).stdout.startswith(f"{gallery}: ok")


def test_index_verify_lists_problems(gallery_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(gallery_dir, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    (broken / manifest["base"]["vectors"]).write_bytes(b"\x93NUMPY")
    result = run_cli("index", "verify", broken, check_code=1)
    assert result.stdout.splitlines()[0] == f"{broken}: 1 problem"
    assert manifest["base"]["vectors"] in result.stdout


def test_index_add_skips_known_ids(gallery_dir, photo_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(gallery_dir, copy)
    result = run_cli("index", "add", copy, photo_dir / "coffee.jpg", check_code=1)
    assert "id 'coffee.jpg' is already in the gallery" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["search", "GALLERY", "QUERY", "-k", "0"], "argument -k: invalid value 0: use 1 or more"),
    (["search", "GALLERY", "QUERY", "--search-k", "0"], "invalid search_k '0'"),
    (["index", "build", "PHOTOS", "--out", "OUT", "--trees", "-1"], "argument --trees: invalid value -1"),
    (["index", "compact", "GALLERY", "--trees", "-5"], "argument --trees: invalid value -5"),
    (["info", "--threads", "0"], "argument --threads: invalid value 0"),
])
def test_invalid_numbers_exit_2(args, message, gallery_dir, photo_dir, tmp_path):
    names = {"GALLERY": gallery_dir, "QUERY": photo_dir / "coffee.jpg", "PHOTOS": photo_dir, "OUT": tmp_path / "o"}
    result = run_cli(*[names.get(a, a) for a in args], check_code=2)
    assert message in result.stderr


def test_empty_folder_is_reported(tmp_path, gallery_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    for args in (["embed", empty, "--out", tmp_path / "v.npy"], ["index", "build", empty, "--out", tmp_path / "g"],
                 ["search", gallery_dir, empty]):
        result = run_cli(*args, check_code=1)
        assert "no image files (.bmp, " in result.stderr
        assert str(empty) in result.stderr


def test_info_rejects_two_models(shared_assets):
    model = shared_assets / "models" / "mobilenet_v1_1.0_224_quant_embedding_extractor.tflite"
    result = run_cli("info", model, "--model", model.with_name("mobilenet_v2_1.0_224_quant.tflite"), check_code=2)
    assert "give the model once" in result.stderr


def test_index_build_with_shards_locally(photo_dir, tmp_path):
    run_cli("index", "build", photo_dir, "--out", tmp_path / "g", "--shards", "3")
    manifest = json.loads((tmp_path / "g" / "manifest.json").read_text())
    assert len(manifest["base"]["shards"]) == 3
    found = json.loads(run_cli("search", tmp_path / "g", photo_dir / "moon.jpg", "-k", "1", "--json").stdout)
    assert found["matches"][0]["id"] == "moon.jpg"
