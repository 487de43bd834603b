"""Toolchain pieces that need no TensorFlow: metadata writing, fidelity measures, photo choice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgeembed.model import ModelMetadata, PreprocessConfig, read_metadata

SHARED_MODEL = Path(__file__).resolve().parents[2] / "shared" / "assets" / "models" / "mobilenet_v2_1.0_224_quant.tflite"
SHIPPED_MODEL = Path(__file__).resolve().parents[1] / "models" / "efficientnet_lite0_int8.tflite"


def any_model_bytes() -> bytes:
    for path in (SHIPPED_MODEL, SHARED_MODEL):
        if path.is_file():
            return path.read_bytes()
    pytest.skip("no .tflite model found to write metadata into")


def test_metadata_written_reads_back():
    pytest.importorskip("ai_edge_litert")
    from ai_edge_litert.interpreter import Interpreter

    from edgeembed.toolchain.metadata import embed_metadata

    metadata = ModelMetadata(PreprocessConfig(input_size=(224, 224)), embedding_dim=1280, pooling="avg",
                             provenance={"backbone": "test"})

    data = embed_metadata(any_model_bytes(), metadata)

    assert read_metadata(data).to_json() == metadata.to_json()
    Interpreter(model_content=data).allocate_tensors()


def test_metadata_rewrite_replaces_entry():
    pytest.importorskip("ai_edge_litert")
    from edgeembed._flatbuffer import read_metadata_buffers
    from edgeembed.toolchain.metadata import add_metadata_buffer

    first = add_metadata_buffer(any_model_bytes(), "edgeembed", b'{"version": 1}')
    second = add_metadata_buffer(first, "edgeembed", b'{"version": 2}')

    buffers = read_metadata_buffers(second)
    assert buffers["edgeembed"] == b'{"version": 2}'
    assert list(buffers).count("edgeembed") == 1


def test_topk_agreement_identical_is_one():
    from edgeembed.toolchain.fidelity import topk_agreement

    vectors = np.random.default_rng(0).normal(size=(40, 16))

    assert topk_agreement(vectors, vectors, k=10) == 1.0


def test_topk_agreement_unrelated_is_low():
    from edgeembed.toolchain.fidelity import topk_agreement

    rng = np.random.default_rng(1)
    reference = rng.normal(size=(200, 16))
    unrelated = rng.normal(size=(200, 16))

    # Random 10-NN sets among 199 candidates overlap by about 10 * 10 / 199 items.
    assert topk_agreement(reference, unrelated, k=10) < 0.1


def test_topk_agreement_needs_more_than_k():
    from edgeembed.toolchain.fidelity import topk_agreement

    with pytest.raises(ValueError, match="more than 10 images"):
        topk_agreement(np.ones((10, 4)), np.ones((10, 4)), k=10)


def test_cosine_summary_values():
    from edgeembed.toolchain.fidelity import cosine_summary

    reference = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    candidate = np.array([[2.0, 0.0], [0.0, 1.0], [0.0, 1.0]])

    summary = cosine_summary(reference, candidate)

    assert summary["mean"] == pytest.approx(2.0 / 3.0)
    assert summary["min"] == pytest.approx(0.0)


def test_spread_sample_covers_list():
    from edgeembed.toolchain.images import spread_sample

    paths = [Path(f"c{i // 20}/{i:03d}.jpg") for i in range(340)]

    chosen = spread_sample(paths, 17)

    assert len(chosen) == 17
    assert chosen[0] == paths[0]
    assert chosen[-1] == paths[-1]
    assert len({path.parent for path in chosen}) == 17


def test_folder_images_caps_and_hashes(tmp_path):
    from PIL import Image

    from edgeembed.toolchain.images import folder_images

    for name in ("b.png", "a.png", "c.png", "notes.txt"):
        if name.endswith(".png"):
            Image.new("RGB", (8, 8)).save(tmp_path / name)
        else:
            (tmp_path / name).write_text("x")

    images = folder_images(tmp_path, max_images=2)

    assert images.names == ["a.png", "c.png"]
    assert len(images.names_sha256()) == 64
    assert images.provenance()["n_images"] == 2


def test_folder_images_missing_folder(tmp_path):
    from edgeembed.toolchain.images import folder_images

    with pytest.raises(FileNotFoundError, match="not found"):
        folder_images(tmp_path / "absent")
