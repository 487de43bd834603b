"""Interpreter backend selection."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from edgeembed import backends
from edgeembed.backends import BackendError


def test_default_order_prefers_litert(monkeypatch):
    monkeypatch.delenv(backends.ENV_VARIABLE, raising=False)
    backend, interpreter_class = backends.load_interpreter_class()
    assert backend.name == "litert"
    assert interpreter_class.__module__.startswith("ai_edge_litert")


def test_environment_variable_forces_backend(monkeypatch):
    monkeypatch.setenv(backends.ENV_VARIABLE, "no-such-backend")
    with pytest.raises(BackendError, match="unknown backend 'no-such-backend'"):
        backends.load_interpreter_class()


@pytest.mark.skipif(importlib.util.find_spec("tflite_runtime") is not None,
                    reason="tflite-runtime is installed here, so it cannot be missing")
def test_missing_backend_names_its_package():
    with pytest.raises(BackendError, match="pip install tflite-runtime"):
        backends.load_interpreter_class("tflite-runtime")


def _threads_started_by_interpreter(num_threads: int) -> int:
    code = (
        "import os, numpy as np\n"
        "from edgeembed import Embedder\n"
        "before = len(os.listdir('/proc/self/task'))\n"
        f"embedder = Embedder(num_threads={num_threads})\n"
        "embedder.embed(np.zeros((300, 300, 3), np.uint8))\n"
        "print(len(os.listdir('/proc/self/task')) - before)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return int(result.stdout.split()[-1])


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through /proc")
def test_num_threads_reaches_the_interpreter():
    single = _threads_started_by_interpreter(1)
    several = _threads_started_by_interpreter(3)
    assert single == 0
    assert several >= 2


def test_thread_counts_give_the_same_embedding(photos):
    from edgeembed import Embedder

    one = Embedder(num_threads=1)
    two = Embedder(num_threads=2)
    assert one.embed(photos["coffee"]) == pytest.approx(two.embed(photos["coffee"]), abs=1e-6)


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="TensorFlow is not installed")
def test_tensorflow_backend_embeds_like_litert(photos):
    from edgeembed import Embedder

    litert = Embedder(backend="litert")
    tensorflow = Embedder(backend="tensorflow")
    assert tensorflow.backend.name == "tensorflow"
    assert tensorflow.embed(photos["coffee"]) == pytest.approx(litert.embed(photos["coffee"]), abs=1e-5)


def test_option_error_does_not_mention_environment(monkeypatch):
    monkeypatch.delenv(backends.ENV_VARIABLE, raising=False)
    if importlib.util.find_spec("tflite_runtime") is not None:
        pytest.skip("tflite-runtime is installed here, so it cannot be missing")
    with pytest.raises(BackendError) as caught:
        backends.load_interpreter_class("tflite-runtime")
    assert backends.ENV_VARIABLE not in str(caught.value)


def test_xnnpack_notice_goes_to_log():
    # TFLite prints the notice once per process, so a fresh process shows it.
    script = ("import logging; logging.basicConfig(level=logging.DEBUG, format='%(levelname)s %(name)s: %(message)s'); "
              "from edgeembed import Embedder; Embedder(num_threads=1)")

    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert not [line for line in lines if line.startswith("INFO: Created TensorFlow Lite XNNPACK")]
    assert [line for line in lines if line.startswith("DEBUG edgeembed.backends: INFO: Created TensorFlow Lite XNNPACK")]
