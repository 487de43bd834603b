"""Find a TFLite interpreter: LiteRT, then tflite-runtime, then TensorFlow Lite.

All three expose the same ``Interpreter`` class. The environment variable
``EDGEEMBED_BACKEND`` (or the ``backend`` argument) forces one of them by name.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

ENV_VARIABLE = "EDGEEMBED_BACKEND"

# The TFLite runtime prints this line to the native stderr once per process, when an interpreter
# applies its default XNNPACK delegate, and no Python setting turns it off.
_XNNPACK_NOTICE = "Created TensorFlow Lite XNNPACK delegate"

# File descriptor 2 is process-wide, so only one thread may redirect it at a time.
_STDERR_LOCK = threading.Lock()


@dataclass(frozen=True)
class Backend:
    """An importable TFLite interpreter.

    Attributes:
        name: The name accepted by ``EDGEEMBED_BACKEND``.
        module: The module that defines ``Interpreter``.
        package: The pip package that provides the module.
    """

    name: str
    module: str
    package: str


BACKENDS = (
    Backend("litert", "ai_edge_litert.interpreter", "ai-edge-litert"),
    Backend("tflite-runtime", "tflite_runtime.interpreter", "tflite-runtime"),
    Backend("tensorflow", "tensorflow", "tensorflow"),
)


class BackendError(RuntimeError):
    """Raised when no TFLite interpreter can be imported or a name is unknown."""


def _find(name: str) -> Backend:
    for backend in BACKENDS:
        if backend.name == name:
            return backend
    names = ", ".join(b.name for b in BACKENDS)
    raise BackendError(f"unknown backend {name!r}; use one of: {names}")


def _import(backend: Backend) -> Any:
    module = importlib.import_module(backend.module)
    if backend.name == "tensorflow":
        # The package tensorflow.lite is not the tf.lite API, so go through tensorflow.
        return module.lite.Interpreter
    return module.Interpreter


def load_interpreter_class(name: str | None = None) -> tuple[Backend, Any]:
    """Import the interpreter class of the requested or first available backend.

    Args:
        name: A backend name; None reads ``EDGEEMBED_BACKEND`` and, when that is unset
            too, tries the backends in order.

    Returns:
        The backend and its ``Interpreter`` class.

    Raises:
        BackendError: If the requested backend or every backend fails to import. The
            message names the pip package to install.
    """
    requested = name or os.environ.get(ENV_VARIABLE) or None
    if requested:
        backend = _find(requested)
        try:
            return backend, _import(backend)
        except ImportError as error:
            alternative = f", or unset {ENV_VARIABLE}" if not name else ""
            raise BackendError(
                f"backend {backend.name!r} is not importable ({error}); "
                f"pip install {backend.package}{alternative}"
            ) from error

    failures = []
    for backend in BACKENDS:
        try:
            return backend, _import(backend)
        except ImportError as error:
            logger.debug("backend %s unavailable: %s", backend.name, error)
            failures.append(f"{backend.name}: {error}")

    raise BackendError(
        "no TFLite interpreter found; pip install ai-edge-litert "
        "(or tflite-runtime with numpy<2). Tried " + "; ".join(failures)
    )


def backend_version(backend: Backend) -> str:
    """Return the installed version of a backend's package, or "unknown"."""
    from importlib import metadata

    for distribution in (backend.package, backend.package.replace("-", "_"), "tensorflow-cpu"):
        try:
            return metadata.version(distribution)
        except metadata.PackageNotFoundError:
            continue
    return "unknown"


def create_interpreter(model_path: str, num_threads: int | None = None,
                       backend: str | None = None) -> tuple[Backend, Any]:
    """Create and allocate an interpreter for a model file.

    The interpreter memory-maps the file, so the model's weights count towards
    resident memory only as they are read.

    Args:
        model_path: The ``.tflite`` file.
        num_threads: CPU threads for the interpreter; None lets the backend choose.
        backend: A backend name, or None for the default order.

    Returns:
        The backend used and the allocated interpreter.

    Raises:
        BackendError: If no backend can be imported.
        ValueError: If the interpreter rejects the model.
    """
    chosen, interpreter_class = load_interpreter_class(backend)
    with _STDERR_LOCK, native_stderr_to_log():
        interpreter = interpreter_class(model_path=model_path, num_threads=num_threads)
        interpreter.allocate_tensors()
    logger.debug("loaded model with %s, %s threads", chosen.name, num_threads)
    return chosen, interpreter


@contextlib.contextmanager
def native_stderr_to_log() -> Iterator[None]:
    """Send what native code writes to stderr inside the block to this module's logger.

    The XNNPACK notice goes to DEBUG, every other line to WARNING, so runtime errors
    stay visible. Python writes to ``sys.stderr`` from other threads during the block
    are captured too and logged after it. Without a usable file descriptor 2 the
    block runs unchanged.
    """
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return

    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode("utf-8", "replace")

    for line in text.splitlines():
        if line.strip():
            level = logging.DEBUG if _XNNPACK_NOTICE in line else logging.WARNING
            logger.log(level, "%s", line.strip())
