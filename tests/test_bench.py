"""`edgeembed bench` plumbing: one short run under a profile, its JSON, Markdown, PNGs and merge.

The run uses a few iterations and a 150-item gallery, so it checks that every field is
produced, not what the numbers are. The numbers come from benchmarks/, never from tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import SHARED_ASSETS
from edgeembed.bench_targets import evaluate_targets
from edgeembed.cli import main
from edgeembed.model import ModelError, default_model_path

# Landscape and square photos; the run makes its 0.3 MP and 12 MP JPEGs from the largest.
BENCH_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle", "camera", "brick", "coins")
STAGES = ("decode", "preprocess", "invoke", "postprocess", "embed")
STATS = ("runs", "mean_ms", "p50_ms", "p95_ms", "p99_ms", "min_ms", "max_ms")


def _model() -> Path:
    try:
        return default_model_path()
    except ModelError:
        fallback = SHARED_ASSETS / "models" / "mobilenet_v1_1.0_224_quant_embedding_extractor.tflite"
        if not fallback.is_file():
            pytest.skip("neither the default model nor the shared MobileNet embedder is present")
        return fallback


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory, photos) -> tuple[int, Path]:
    """Run a short benchmark under the pi3 profile; return the exit code and output folder."""
    root = tmp_path_factory.mktemp("bench")
    folder = root / "photos"
    folder.mkdir()
    for name in BENCH_PHOTOS:
        photos[name].save(folder / f"{name}.jpg", quality=92)

    out = root / "out"
    code = main(["bench", "--model", str(_model()), "--photos", str(folder), "--runs", "3", "--warmup", "1",
                 "--profile", "pi3", "--gallery-sizes", "150", "--n-trees", "2", "--search-k=-1,300",
                 "--queries", "3", "--real-images", "8", "--folder-images", "4", "--cold-runs", "1",
                 "--peers", "pytorch", "--out", str(out)])
    return code, out


@pytest.fixture(scope="module")
def result(bench_run) -> dict:
    _, out = bench_run
    return json.loads(next(out.glob("*.json")).read_text())


def test_run_exit_code(bench_run):
    code, _ = bench_run
    assert code == 0


def test_run_files(bench_run):
    _, out = bench_run
    assert len(list(out.glob("bench-*-pi3.json"))) == 1
    assert len(list(out.glob("bench-*-pi3.md"))) == 1


def test_run_plots(bench_run):
    pytest.importorskip("matplotlib")
    _, out = bench_run
    pngs = sorted(path.name.rsplit("-", 1)[1] for path in out.glob("*.png"))
    assert pngs == ["latency.png", "recall.png"]
    for path in out.glob("*.png"):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_machine_fields(result):
    machine = result["machine"]
    for key in ("cpu_model", "cpu_count", "cpus_usable", "memory_total_mb", "os", "python", "packages",
                "load_average", "load_average_after"):
        assert machine[key] is not None, key
    assert result["models"][0]["backend"] in ("litert", "tflite-runtime", "tensorflow")
    assert result["models"][0]["backend_version"]


def test_profile_applied(result):
    import os

    machine = result["machine"]
    assert machine["profile"]["name"] == "pi3"
    assert machine["applied"]["memory_limit_mb"] == 800
    assert machine["rlimit_data_mb"] == 800
    assert len(machine["applied"]["cpus"]) == min(4, len(os.sched_getaffinity(0)))


def test_model_fields(result):
    model = result["models"][0]
    assert model["size_bytes"] == Path(model["path"]).stat().st_size
    assert model["quantization"] == "int8"
    assert model["load_s"] > 0
    assert 0 < model["cold_start"]["load_s"] < model["cold_start"]["total_s"]
    assert model["memory"]["peak_rss_mb"] >= model["memory"]["checkpoints"]["model_loaded"]["rss_mb"]
    assert set(model["floor"]) == set(STATS) | {"cpu_p50_ms"}


def test_latency_cases(result):
    latency = result["models"][0]["latency"]
    assert sorted(latency) == ["array", "input", "phone", "small"]
    for case, stages in latency.items():
        assert sorted(stages) == sorted(STAGES), case
        assert stages["embed"]["runs"] == 3, case
        assert stages["embed"]["p50_ms"] <= stages["embed"]["p99_ms"], case


def test_threads_and_throughput(result):
    model = result["models"][0]
    cpus = len(result["machine"]["applied"]["cpus"])
    assert [row["threads"] for row in model["threads_sweep"]] == list(range(1, cpus + 1))
    assert len(model["throughput"]) == 2 * cpus
    for row in model["throughput"]:
        assert row["failed"] == 0
        assert row["images_per_s"] > 0


def test_naive_baseline(result):
    naive = result["models"][0]["naive"]
    assert naive["naive_phone"]["runs"] == 3
    assert naive["embed_phone"]["runs"] == 3


def test_overhead_fields(result):
    overhead = result["models"][0]["overhead"]
    assert sorted(overhead) == ["embed_array", "embed_input", "invoke"]
    assert result["models"][0]["floor"] == overhead["invoke"]


def test_comparison_fields(result):
    comparisons = result["comparison"]
    assert [c["threads"] for c in comparisons] == sorted({1, result["threads"]})
    for comparison in comparisons:
        assert list(comparison["models"]) == [result["models"][0]["name"]]
        assert comparison["models"][result["models"][0]["name"]]["runs"] == 3


def test_photos(result):
    photos = result["photos"]
    assert photos["phone"]["width"] * photos["phone"]["height"] >= 12_000_000
    assert 0.25 <= photos["small"]["megapixels"] <= 0.35
    assert photos["array"]["dtype"] == "uint8"


def test_peers_recorded(result):
    peers = result["peers"]
    assert [peer["name"] for peer in peers] == ["pytorch"]
    peer = peers[0]
    if "skipped" not in peer:
        assert peer["forward"]["runs"] == 3
        assert peer["cosine_to_first_model"] > 0.5


def test_gallery_fields(result):
    gallery = result["gallery"]
    assert gallery["query_source"] == "held-out real embeddings"
    size = gallery["sizes"][0]
    assert size["items"] == 150
    assert size["exact"]["recall_at_10"] == 1.0
    index = size["indexes"][0]
    assert index["n_trees"] == 2
    assert index["index_bytes"] > 0
    assert index["memory"]["checkpoints"]["gallery_opened"]["rss_mb"] > 0
    assert [row["search_k"] for row in index["sweep"]] == [-1, 300]
    for row in index["sweep"]:
        assert 0.0 <= row["recall_at_10"] <= 1.0


def test_targets_listed(result):
    ids = [target["id"] for target in result["targets"]]
    assert ids == ["embed-array-overhead", "phone-vs-naive", "int8-vs-float32", "int8-vs-pytorch",
                   "throughput-2-threads", "memory-100k", "annoy-100k"]
    assert not result["errors"]


def _tables(markdown: str) -> list[list[str]]:
    tables, current = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    return tables


def _cells(line: str) -> int:
    return line.replace("\\|", "").count("|") - 1


def test_markdown_tables(bench_run):
    _, out = bench_run
    markdown = next(out.glob("*.md")).read_text()
    tables = _tables(markdown)
    assert len(tables) >= 8
    for rows in tables:
        assert set(rows[1].strip("|").split("|")) == {"---"}, rows[0]
        assert len({_cells(row) for row in rows}) == 1, rows[0]


def test_markdown_caveat(bench_run):
    _, out = bench_run
    markdown = next(out.glob("*.md")).read_text()
    assert "does not reproduce an ARM core's speed" in markdown


def test_merge_two_runs(bench_run, result, tmp_path, capsys):
    _, out = bench_run
    other = dict(result, machine={**result["machine"], "profile": {"name": "pi5"}})
    second = tmp_path / "other.json"
    second.write_text(json.dumps(other))
    capsys.readouterr()

    code = main(["bench", "--merge", str(next(out.glob("*.json"))), str(second)])
    printed = capsys.readouterr().out
    assert code == 0
    header = printed.splitlines()[0]
    assert _cells(header) == 3
    assert "pi3 on" in header
    assert "pi5 on" in header


def test_merge_rejects_other_json(tmp_path):
    stray = tmp_path / "stray.json"
    stray.write_text(json.dumps({"schema": "something/1"}))
    assert main(["bench", "--merge", str(stray)]) == 1


def test_missing_photos_folder(tmp_path):
    assert main(["bench", "--photos", str(tmp_path / "missing")]) == 2


def test_targets_not_measured():
    targets = evaluate_targets({"models": [], "peers": [], "gallery": None})
    assert all(target.met is None for target in targets)
    assert all(target.gap.startswith("not measured") for target in targets)


def test_target_ratio_missed():
    overhead = {"invoke": {"p50_ms": 10.0}, "embed_input": {"p50_ms": 12.0}}
    model = {"name": "m", "quantization": "int8", "embedding_dim": 8, "overhead": overhead}
    target = evaluate_targets({"models": [model]})[0]
    assert target.met is False
    assert target.value == "1.20x"
    assert target.gap == "0.15x over"
