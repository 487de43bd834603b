"""The runtime must never import TensorFlow or PyTorch."""

from __future__ import annotations

import ast
import subprocess
import sys

HEAVY = ("tensorflow", "torch", "keras", "cv2", "ray", "matplotlib")


def _loaded_heavy_modules(code: str) -> list[str]:
    probe = code + f"\nimport sys\nprint([m for m in {HEAVY!r} if m in sys.modules])\n"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return ast.literal_eval(result.stdout.strip().splitlines()[-1])


def test_import_loads_no_framework():
    assert _loaded_heavy_modules("import edgeembed; edgeembed.Embedder") == []


def test_search_command_loads_no_framework(photo_dir, tmp_path):
    from edgeembed.cli import main

    assert main(["index", "build", str(photo_dir), "--out", str(tmp_path / "g")]) == 0
    code = ("from edgeembed.cli import main\n"
            f"assert main(['search', {str(tmp_path / 'g')!r}, {str(photo_dir / 'coffee.jpg')!r}]) == 0")
    assert _loaded_heavy_modules(code) == []
