"""Model metadata: the flatbuffer reader, the JSON schema and preprocessing inference."""

from __future__ import annotations

import pytest

from edgeembed import Embedder
from edgeembed._flatbuffer import FlatbufferError, read_metadata_buffers
from edgeembed.model import (
    METADATA_NAME,
    ModelError,
    ModelMetadata,
    PreprocessConfig,
    default_model_path,
    infer_preprocess,
    read_metadata,
)
from conftest import DEFAULT_EMBEDDING_DIM


def test_default_model_carries_metadata():
    data = default_model_path().read_bytes()
    metadata = read_metadata(data)
    assert metadata is not None
    assert metadata.preprocess.input_size == (256, 256)
    assert metadata.preprocess.color_order == "RGB"
    assert metadata.embedding_dim == DEFAULT_EMBEDDING_DIM
    assert metadata.pooling == "gem"
    assert metadata.provenance["backbone"] == "efficientnet_lite0"
    assert len(metadata.provenance["weights_sha256"]) == 64


def test_metadata_json_round_trip():
    original = ModelMetadata(
        preprocess=PreprocessConfig(input_size=(160, 192), color_order="BGR", crop_fraction=0.875,
                                    mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6)),
        embedding_dim=512, pooling="gem", l2_normalized=True, provenance={"backbone": "x"},
    )
    restored = ModelMetadata.from_json(original.to_json())
    assert restored == original


@pytest.mark.parametrize("values, message", [
    ({"input_size": (0, 224)}, "input_size"),
    ({"color_order": "RGBA"}, "color_order"),
    ({"resize": "stretch"}, "resize"),
    ({"crop_fraction": 1.5}, "crop_fraction"),
    ({"interpolation": "cubic"}, "interpolation"),
    ({"std": (0.5, 0.0, 0.5)}, "std"),
])
def test_invalid_preprocess_values_are_rejected(values, message):
    with pytest.raises(ModelError, match=message):
        PreprocessConfig(**values)


def test_unknown_preprocess_key_is_rejected():
    with pytest.raises(ModelError, match="unknown preprocess keys"):
        PreprocessConfig.from_dict({"input_size": [224, 224], "gamma": 2.2})


def test_invalid_metadata_json_names_the_problem():
    with pytest.raises(ModelError, match="not valid JSON"):
        ModelMetadata.from_json(b"{not json")
    with pytest.raises(ModelError, match="schema"):
        ModelMetadata.from_json('{"schema": "other/1"}')


def test_reader_rejects_non_tflite_bytes():
    with pytest.raises(FlatbufferError, match="TFL3"):
        read_metadata_buffers(b"PK\x03\x04 a zip file, not a model")


def test_reader_rejects_truncated_model():
    data = default_model_path().read_bytes()
    with pytest.raises(FlatbufferError):
        read_metadata_buffers(data[:4096])


def test_foreign_models_have_no_edgeembed_metadata(shared_assets):
    for path in sorted((shared_assets / "models").glob("*.tflite")):
        buffers = read_metadata_buffers(path.read_bytes())
        assert METADATA_NAME not in buffers, path.name
        assert buffers["min_runtime_version"].startswith(b"1."), path.name


def test_infer_preprocess_from_uint8_quantisation():
    config = infer_preprocess((1, 224, 224, 3), "uint8", 1 / 127.5, 127)
    assert config.input_size == (224, 224)
    assert config.mean[0] == pytest.approx(127 / 255)
    assert config.std[0] == pytest.approx(0.5)


def test_infer_preprocess_from_int8_quantisation():
    config = infer_preprocess((1, 96, 128, 3), "int8", 1 / 255, -128)
    assert config.input_size == (96, 128)
    assert config.mean[0] == pytest.approx(0.0)
    assert config.std[0] == pytest.approx(1.0)


def test_infer_preprocess_rejects_float_inputs():
    with pytest.raises(ModelError, match="pass preprocess options"):
        infer_preprocess((1, 224, 224, 3), "float32", 0.0, 0)


@pytest.mark.parametrize("name, dim", [
    ("mobilenet_v1_1.0_224_quant_embedding_extractor.tflite", 1024),
    ("mobilenet_v2_1.0_224_quant.tflite", 1001),
    ("tf2_mobilenet_v2_1.0_224_ptq.tflite", 1001),
])
def test_foreign_models_load_with_inferred_preprocessing(shared_assets, photos, name, dim):
    embedder = Embedder(shared_assets / "models" / name)
    assert embedder.metadata.preprocess_source == "inferred"
    assert embedder.preprocess.mean[0] == pytest.approx(0.5, abs=0.01)
    assert embedder.preprocess.std[0] == pytest.approx(0.5, abs=0.01)
    vector = embedder.embed(photos["coffee"])
    assert vector.shape == (dim,)


def test_explicit_options_override_inference(shared_assets, photos):
    config = PreprocessConfig(input_size=(224, 224), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    path = shared_assets / "models" / "mobilenet_v1_1.0_224_quant_embedding_extractor.tflite"
    embedder = Embedder(path, preprocess=config)
    assert embedder.metadata.preprocess_source == "options"
    assert embedder.preprocess == config


def test_coral_extractor_ranks_same_class_first(shared_assets):
    path = shared_assets / "models" / "mobilenet_v1_1.0_224_quant_embedding_extractor.tflite"
    embedder = Embedder(path)
    images = shared_assets / "images" / "imprinting"
    cat = embedder.embed(images / "cat_test_0.bmp")
    same = float(cat @ embedder.embed(images / "cat_train_0.bmp"))
    other = float(cat @ embedder.embed(images / "hotdog_train_0.bmp"))
    assert same > other
