"""edgeembed convert --from-tflite: cut a TFLite classifier into an embedder at its pooled features.

The cut model's output must equal the pooled tensor of the uncut classifier, read
with ``experimental_preserve_all_tensors``, and the file must lose the classifier
head's weights. The shared Coral MobileNetV2 classifiers are real int8 models; a
tiny classifier converted here covers the same path on a fresh clone.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from edgeembed.model import infer_preprocess, read_metadata
from edgeembed.toolchain import command

pytestmark = pytest.mark.toolchain

CLASSIFIERS = ("mobilenet_v2_1.0_224_quant.tflite", "tf2_mobilenet_v2_1.0_224_ptq.tflite")
HEAD_BYTES = 1001 * 1280  # int8 weights of the 1280-to-1001 classification layer
TINY_SIZE = 32


@pytest.fixture(scope="module", autouse=True)
def toolchain():
    pytest.importorskip("tensorflow", reason="the cut needs the toolchain extra (tensorflow)")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="edgeembed convert")
    command.configure_parser(parser)
    return parser.parse_args([str(arg) for arg in argv])


def photo_paths(shared: Path) -> list[Path]:
    images = shared / "images"
    return sorted(path for path in images.iterdir() if path.suffix in (".bmp", ".jpg"))


def preserved_interpreter(model: bytes):
    from ai_edge_litert.interpreter import Interpreter

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the debugging-only warning of preserve_all_tensors
        interpreter = Interpreter(model_content=model, experimental_preserve_all_tensors=True)
    interpreter.allocate_tensors()
    return interpreter


def read_tensor(interpreter, tensor_name: str, input_tensor: np.ndarray) -> np.ndarray:
    """Invoke the uncut classifier and read one intermediate tensor by name."""
    index = next(item["index"] for item in interpreter.get_tensor_details() if item["name"] == tensor_name)
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], input_tensor)
    interpreter.invoke()
    return interpreter.get_tensor(index)


def assert_output_is_source_tensor(source: bytes, cut: Path, photos: list[Path]) -> None:
    from edgeembed import Embedder

    embedder = Embedder(cut)
    tensor_name = embedder.metadata.provenance["cut"]["tensor"]
    original = preserved_interpreter(source)
    for photo in photos:
        input_tensor = embedder.input_tensor(embedder.prepare(photo))

        expected = read_tensor(original, tensor_name, input_tensor).reshape(-1)
        actual = embedder.invoke(input_tensor)

        assert actual.dtype == expected.dtype, photo.name
        assert np.array_equal(actual, expected), photo.name


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_cut_shared_classifier(tmp_path, shared_assets, name):
    from edgeembed import Embedder

    source = shared_assets / "models" / name
    out = tmp_path / "cut.tflite"
    report = tmp_path / "cut.json"

    code = command.run(parse(["--from-tflite", source, "--out", out, "--eval", shared_assets / "images",
                              "--report", report]))

    assert code == 0
    assert source.stat().st_size - out.stat().st_size >= HEAD_BYTES
    embedder = Embedder(out)
    cut = embedder.metadata.provenance["cut"]
    assert cut["removed_ops"]["CONV_2D"] == 1
    assert cut["removed_ops"]["SOFTMAX"] == 1
    assert cut["removed_buffer_bytes"] >= HEAD_BYTES
    assert embedder.metadata.preprocess == infer_preprocess(
        embedder.input.shape, embedder.input.dtype, embedder.input.scale, embedder.input.zero_point)
    assert embedder.metadata.provenance["preprocess_from"] == "input quantisation"
    assert embedder.embedding_dim == 1280
    assert json.loads(report.read_text())["cosine"]["min"] > 0.9999

    photos = photo_paths(shared_assets)
    assert_output_is_source_tensor(source.read_bytes(), out, photos)
    vectors = np.stack([embedder.embed(photo) for photo in photos])
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("name, tensor", [
    ("mobilenet_v2_1.0_224_quant.tflite", "MobilenetV2/Logits/AvgPool"),
    ("tf2_mobilenet_v2_1.0_224_ptq.tflite", "MobileNetV2/top/GlobalPool/Mean"),
])
def test_cut_named_tensor(tmp_path, shared_assets, name, tensor):
    from edgeembed.toolchain.from_tflite import cut_classifier

    source = (shared_assets / "models" / name).read_bytes()
    found = cut_classifier(source)

    named = cut_classifier(source, tensor)

    assert named.tensor_index == found.tensor_index
    assert named.model_bytes == found.model_bytes


def test_cut_unknown_tensor_fails(tmp_path, shared_assets, caplog):
    source = shared_assets / "models" / CLASSIFIERS[0]

    code = command.run(parse(["--from-tflite", source, "--tensor", "no/such/tensor", "--out", tmp_path / "m.tflite"]))

    assert code == 1
    assert "no operator output is named 'no/such/tensor'" in caplog.text
    assert not (tmp_path / "m.tflite").exists()


def test_cut_normalization_options(tmp_path, shared_assets):
    source = shared_assets / "models" / CLASSIFIERS[1]
    out = tmp_path / "cut.tflite"

    code = command.run(parse(["--from-tflite", source, "--mean", "0.5", "--std", "0.5", "--out", out]))

    assert code == 0
    metadata = read_metadata(out.read_bytes())
    assert metadata.preprocess.mean == (0.5, 0.5, 0.5)
    assert metadata.preprocess.std == (0.5, 0.5, 0.5)
    assert metadata.provenance["preprocess_from"] == "options"


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory, photos) -> Path:
    """A small int8 classifier (convolutions, global average pooling, dense, softmax) built here."""
    import keras

    from edgeembed.toolchain.convert import ConvertOptions, convert
    from edgeembed.toolchain.extractor import SIGNED_UNIT_RANGE
    from edgeembed.toolchain.from_keras import freeze_keras_model
    from edgeembed.toolchain.images import float_inputs
    from edgeembed.preprocess import prepare_pixels

    keras.utils.set_random_seed(1)
    inputs = keras.Input((TINY_SIZE, TINY_SIZE, 3))
    x = keras.layers.Conv2D(16, 3, strides=2, activation="relu")(inputs)
    x = keras.layers.Conv2D(32, 3, strides=2, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(64, activation="softmax")(x)
    model = keras.Model(inputs, outputs)

    config = SIGNED_UNIT_RANGE.preprocess((TINY_SIZE, TINY_SIZE))
    pixels = np.stack([prepare_pixels(image, config) for image in list(photos.values())[:8]])
    features = freeze_keras_model(model, (TINY_SIZE, TINY_SIZE), "tiny")
    data = convert(features, ConvertOptions(quantization="int8"), float_inputs(pixels, config))

    path = tmp_path_factory.mktemp("tiny") / "tiny_classifier.tflite"
    path.write_bytes(data)
    return path


def test_cut_tiny_classifier(tmp_path, tiny_classifier, photos):
    from edgeembed.toolchain.from_tflite import cut_classifier

    source = tiny_classifier.read_bytes()
    out = tmp_path / "tiny_cut.tflite"

    code = command.run(parse(["--from-tflite", tiny_classifier, "--out", out]))

    assert code == 0
    cut = cut_classifier(source)
    assert cut.pooling_op == "MEAN"
    assert cut.embedding_dim == 32
    assert cut.removed_ops["FULLY_CONNECTED"] == 1
    assert cut.removed_ops["SOFTMAX"] == 1
    assert cut.removed_bytes >= 32 * 64
    photo_folder = tmp_path / "photos"
    photo_folder.mkdir()
    for name in ("astronaut", "coffee", "rocket"):
        photos[name].save(photo_folder / f"{name}.png")
    assert_output_is_source_tensor(source, out, sorted(photo_folder.iterdir()))
