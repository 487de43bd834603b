"""The wheel carries the default model, so a regular install finds it."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contains_the_default_model(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q",
                             "-w", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    wheel = next(tmp_path.glob("edgeembed-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "edgeembed/_models/efficientnet_lite0_int8.tflite" in names
    assert "edgeembed/_models/MODEL_CARD.md" in names
    assert "edgeembed/toolchain/command.py" in names
    assert not any(name.startswith("tests/") for name in names)
