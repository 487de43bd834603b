"""Pooling options: GeM, max and average pooling, earlier layers, concatenations, and their conversion."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from edgeembed.toolchain.pooling import FeatureLayer, PoolingOptions, parse_layers

SIZE = 64
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "clock")


def test_parse_layers_weights():
    layers = parse_layers("head, block11,block0:0.8")

    assert layers == (FeatureLayer("head"), FeatureLayer("block11"), FeatureLayer("block0", 0.8))
    assert [layer.spelling() for layer in layers] == ["head", "block11", "block0:0.8"]


@pytest.mark.parametrize("text", ["", "head,", "head:", "head:abc", "head:0", "Head"])
def test_parse_layers_rejects(text):
    with pytest.raises(ValueError, match="invalid"):
        parse_layers(text)


def test_options_reject_repeated_layer():
    with pytest.raises(ValueError, match="more than once"):
        PoolingOptions("gem", layers=parse_layers("head,head:0.5"))


@pytest.mark.parametrize("values, message", [
    ({"method": "mean"}, "invalid pooling"),
    ({"method": "gem", "p": 0.5}, "invalid GeM exponent"),
    ({"layers": ()}, "no feature layer"),
])
def test_options_reject_invalid(values, message):
    with pytest.raises(ValueError, match=message):
        PoolingOptions(**values)


def test_options_record():
    record = PoolingOptions("gem", 3.0, parse_layers("head,block0:0.8")).record()

    assert record["method"] == "gem"
    assert record["p"] == 3.0
    assert record["layers"] == ["head", "block0:0.8"]
    assert "combination" in record


# Everything below builds TensorFlow graphs.


@pytest.fixture(scope="module")
def backbone():
    pytest.importorskip("tensorflow", reason="the pooling graph needs the toolchain extra (tensorflow)")
    from edgeembed.toolchain.architecture import get_backbone
    from edgeembed.toolchain.weights import fold_weights, load_weights

    spec = get_backbone("efficientnet_lite0")
    return spec, fold_weights(load_weights(spec, "random").state_dict, spec)


@pytest.fixture(scope="module")
def inputs():
    import sample_photos  # tools/, put on sys.path by conftest

    from edgeembed.preprocess import prepare_pixels
    from edgeembed.toolchain.images import float_inputs
    from edgeembed.toolchain.pipeline import default_preprocess

    config = default_preprocess(SIZE)
    pixels = np.stack([prepare_pixels(sample_photos.load_skimage_photo(name), config) for name in PHOTOS])
    return float_inputs(pixels, config)


def features(backbone, inputs, method: str, layers: str = "head", p: float = 3.0) -> np.ndarray:
    from edgeembed.toolchain.efficientnet_lite import EfficientNetLiteFeatures

    spec, folded = backbone
    model = EfficientNetLiteFeatures(spec, folded, (SIZE, SIZE), PoolingOptions(method, p, parse_layers(layers)))
    return model.features_batch(inputs)


@pytest.mark.toolchain
def test_pooling_methods_differ(backbone, inputs):
    pooled = {method: features(backbone, inputs, method) for method in ("avg", "gem", "max")}

    for method, vectors in pooled.items():
        assert vectors.shape == (len(PHOTOS), 1280), method
    assert not np.allclose(pooled["avg"], pooled["gem"])
    assert not np.allclose(pooled["gem"], pooled["max"])
    # The generalised mean lies between the mean and the maximum.
    assert np.all(pooled["gem"] >= pooled["avg"] - 1e-4)
    assert np.all(pooled["gem"] <= pooled["max"] + 1e-4)


@pytest.mark.toolchain
def test_gem_p1_is_average(backbone, inputs):
    gem = features(backbone, inputs, "gem", p=1.0)
    average = features(backbone, inputs, "avg")

    # GeM clamps at 1e-6 before pooling; ReLU6 activations are 0 or above, so p = 1 is the mean.
    np.testing.assert_allclose(gem, average, rtol=1e-4, atol=1e-5)


@pytest.mark.toolchain
def test_gem_matches_formula():
    import tensorflow as tf

    from edgeembed.toolchain.pooling import generalized_mean

    maps = np.random.default_rng(0).normal(size=(2, 5, 4, 7)).astype(np.float32)
    expected = np.mean(np.maximum(maps, 1e-6) ** 2.5, axis=(1, 2)) ** (1 / 2.5)

    np.testing.assert_allclose(generalized_mean(tf.constant(maps), 2.5).numpy(), expected, rtol=1e-5)


@pytest.mark.toolchain
@pytest.mark.parametrize("layer, width", [("block5", 80), ("block15", 320), ("block12_depthwise", 1152),
                                          ("stem", 32)])
def test_layer_sets_width(backbone, inputs, layer, width):
    vectors = features(backbone, inputs, "gem", layer)

    assert vectors.shape == (len(PHOTOS), width)
    assert np.all(np.isfinite(vectors))


@pytest.mark.toolchain
def test_concatenation_weights_parts(backbone, inputs):
    vectors = features(backbone, inputs, "gem", "head,block11,block0:0.8")

    assert vectors.shape == (len(PHOTOS), 1280 + 192 + 16)
    np.testing.assert_allclose(np.linalg.norm(vectors[:, :1280], axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(vectors[:, 1280:1472], axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(vectors[:, 1472:], axis=1), 0.8, rtol=1e-5)


@pytest.mark.toolchain
def test_unknown_layer_names_valid(backbone):
    from edgeembed.toolchain.efficientnet_lite import EfficientNetLiteFeatures

    spec, folded = backbone
    with pytest.raises(ValueError, match="unknown feature layers \\['block16'\\]"):
        EfficientNetLiteFeatures(spec, folded, (SIZE, SIZE), PoolingOptions("avg", layers=parse_layers("block16")))


def op_types(model_bytes: bytes) -> list[tuple[str, str]]:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=model_bytes)
    return [(op["op_name"], np.dtype(op["result_types"][0]).name) for op in interpreter._get_ops_details()]


@pytest.fixture(scope="module")
def gem_model():
    pytest.importorskip("tensorflow", reason="conversion needs the toolchain extra (tensorflow)")
    from edgeembed.toolchain.architecture import get_backbone
    from edgeembed.toolchain.efficientnet_lite import EfficientNetLiteFeatures
    from edgeembed.toolchain.weights import fold_weights, load_weights

    spec = get_backbone("efficientnet_lite0")
    folded = fold_weights(load_weights(spec, "random").state_dict, spec)
    return EfficientNetLiteFeatures(spec, folded, (SIZE, SIZE), PoolingOptions("gem"))


@pytest.mark.toolchain
def test_gem_int8_root_stays_float(gem_model, inputs):
    from edgeembed.toolchain.convert import ConvertOptions, convert

    ops = op_types(convert(gem_model, ConvertOptions(), inputs))

    # The power and the mean quantise; TFLite has no int8 POW kernel, so the
    # converter leaves the root in float32 behind a DEQUANTIZE.
    assert ("MUL", "int8") in ops
    assert ("MEAN", "int8") in ops
    assert ops[-2:] == [("DEQUANTIZE", "float32"), ("POW", "float32")]


@pytest.mark.toolchain
def test_float_pooling_keeps_gem_float(gem_model, inputs):
    from edgeembed.toolchain.convert import ConvertOptions, convert

    ops = op_types(convert(gem_model, ConvertOptions(float_layers=("pooling",)), inputs))

    pooling_ops = ops[ops.index(("DEQUANTIZE", "float32")) + 1:]
    assert [name for name, _ in pooling_ops] == ["RELU", "MAXIMUM", "MUL", "MUL", "MEAN", "POW"]
    assert {dtype for _, dtype in pooling_ops} == {"float32"}


@pytest.mark.toolchain
def test_joined_layers_end_in_float(backbone, inputs):
    from edgeembed.toolchain.convert import ConvertOptions, convert
    from edgeembed.toolchain.efficientnet_lite import EfficientNetLiteFeatures

    spec, folded = backbone
    model = EfficientNetLiteFeatures(spec, folded, (SIZE, SIZE), PoolingOptions("gem", layers=parse_layers("head,block0")))

    ops = op_types(convert(model, ConvertOptions(float_layers=("pooling",)), inputs))

    # The joined vector is never quantised: concatenation and root run in float32.
    assert ops[-2:] == [("CONCATENATION", "float32"), ("POW", "float32")]


@pytest.mark.toolchain
def test_gem_keeps_block_range(backbone, inputs):
    from ai_edge_litert.interpreter import Interpreter

    from edgeembed.toolchain.convert import ConvertOptions, convert
    from edgeembed.toolchain.efficientnet_lite import EfficientNetLiteFeatures

    spec, folded = backbone
    model = EfficientNetLiteFeatures(spec, folded, (SIZE, SIZE), PoolingOptions("gem", layers=parse_layers("head,block0")))
    interpreter = Interpreter(model_content=convert(model, ConvertOptions(float_layers=("pooling",)), inputs))

    # block0's output also feeds block1, so GeM's clamp at 0 must not narrow its int8 range.
    block0 = [tensor for tensor in interpreter.get_tensor_details()
              if tensor["name"].startswith("block0_project/") and tensor["dtype"] == np.int8]
    assert block0, "no int8 block0 output found; the tensor naming may have changed"
    scale, zero_point = block0[0]["quantization"]
    assert zero_point > -128, "the int8 range of block0's output starts at 0, so negative values are clipped"


def test_joined_layers_need_float_pooling():
    from edgeembed.toolchain.pooling import check_quantization

    options = PoolingOptions("gem", layers=parse_layers("head,block11"))

    with pytest.raises(ValueError, match="add 'pooling' to --float-layers"):
        check_quantization(options, "int8", ("stem",))
    check_quantization(options, "int8", ("pooling",))
    check_quantization(options, "float32", ())


def parse(argv: list[str]) -> argparse.Namespace:
    from edgeembed.toolchain import command

    parser = argparse.ArgumentParser(prog="edgeembed convert")
    command.configure_parser(parser)
    return parser.parse_args(argv)


@pytest.mark.toolchain
def test_convert_layer_metadata(backbone, tmp_path, photo_dir):
    from edgeembed import Embedder
    from edgeembed.model import read_metadata
    from edgeembed.toolchain import command

    out = tmp_path / "block5.tflite"
    args = parse(["efficientnet_lite0", "--weights", "random", "--calib", str(photo_dir), "--out", str(out),
                  "--input-size", str(SIZE), "--pooling", "max", "--layer", "block5"])

    assert command.run(args) == 0

    metadata = read_metadata(out.read_bytes())
    assert metadata.pooling == "max"
    assert metadata.embedding_dim == 80
    assert metadata.provenance["pooling"]["layers"] == ["block5"]
    assert Embedder(out).embed(photo_dir / "astronaut.jpg").shape == (80,)


@pytest.mark.toolchain
def test_convert_pca_and_l2_normalize(backbone, tmp_path, photo_dir):
    from ai_edge_litert.interpreter import Interpreter

    from edgeembed import Embedder
    from edgeembed.model import read_metadata
    from edgeembed.toolchain import command

    out = tmp_path / "pca4.tflite"
    args = parse(["efficientnet_lite0", "--weights", "random", "--calib", str(photo_dir), "--out", str(out),
                  "--input-size", str(SIZE), "--pooling", "gem", "--dim", "4", "--l2-normalize"])

    assert command.run(args) == 0

    data = out.read_bytes()
    metadata = read_metadata(data)
    ops = {op["op_name"] for op in Interpreter(model_content=data)._get_ops_details()}
    assert metadata.embedding_dim == 4
    assert metadata.l2_normalized is True
    assert metadata.provenance["head"]["projection"]["method"] == "pca"
    assert metadata.provenance["pooling"]["method"] == "gem"
    assert {"FULLY_CONNECTED", "L2_NORMALIZATION"} <= ops
    raw = Embedder.create_from_model_path(out).embed(photo_dir / "astronaut.jpg")
    assert raw.shape == (4,)


@pytest.mark.parametrize("extra, message", [
    (["--gem-p", "4"], "--gem-p needs --pooling gem"),
    (["--pooling", "gem", "--gem-p", "0.5"], "invalid --gem-p"),
    (["--layer", "head:x"], "invalid layer 'head:x'"),
    (["--loss", "triplet"], "--loss needs --train-head"),
    (["--train-head", "photos"], "--train-head needs --dim"),
])
def test_convert_rejects_options(tmp_path, caplog, extra, message):
    from edgeembed.toolchain import command

    args = parse(["efficientnet_lite0", "--weights", "random", "--out", str(tmp_path / "m.tflite"), *extra])

    assert command.run(args) == 2
    assert message in caplog.text


def test_pooling_rejected_for_other_backbones(tmp_path, caplog):
    from edgeembed.toolchain import command

    args = parse(["mobilenet_v2", "--weights", "random", "--out", str(tmp_path / "m.tflite"), "--pooling", "gem"])

    assert command.run(args) == 2
    assert "--pooling applies to efficientnet_liteN backbones only" in caplog.text


@pytest.mark.parametrize("extra, message", [
    (["--layer", "block99"], "unknown feature layers ['block99']"),
    (["--layer", "head,block11", "--calib", "photos"], "add 'pooling' to --float-layers"),
])
def test_convert_checks_layers_early(tmp_path, caplog, extra, message):
    from edgeembed.toolchain import command

    args = parse(["efficientnet_lite0", "--weights", "random", "--out", str(tmp_path / "m.tflite"), *extra])

    assert command.run(args) == 2
    assert message in caplog.text
    assert not (tmp_path / "m.tflite").exists()


@pytest.mark.toolchain
def test_convert_dim_needs_more_photos(tmp_path, caplog, photo_dir):
    from edgeembed.toolchain import command

    args = parse(["efficientnet_lite0", "--weights", "random", "--calib", str(photo_dir), "--out",
                  str(tmp_path / "m.tflite"), "--dim", "64"])

    assert command.run(args) == 1
    assert f"--dim 64 fits a PCA on the calibration photos and needs more than 64 of them; {photo_dir} gives 19" \
        in caplog.text
