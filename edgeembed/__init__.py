"""edgeembed: image embeddings with int8 TFLite models and Annoy search on small boards.

The runtime needs numpy, Pillow, a TFLite interpreter and annoy; it never imports
TensorFlow or PyTorch.
"""

from edgeembed.backends import BackendError
from edgeembed.embedder import Embedder, EmbedderOptions, FileEmbedding, TensorInfo, cosine_similarity
from edgeembed.model import ModelError, ModelMetadata, PreprocessConfig
from edgeembed.preprocess import ImageError

__all__ = [
    "BackendError",
    "Embedder",
    "EmbedderOptions",
    "FileEmbedding",
    "ImageError",
    "ModelError",
    "ModelMetadata",
    "PreprocessConfig",
    "TensorInfo",
    "cosine_similarity",
]

__version__ = "0.1.0"
