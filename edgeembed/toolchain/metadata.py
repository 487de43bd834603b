"""Write the edgeembed metadata JSON into a TFLite model file.

TFLite models carry named metadata as entries of the root table's ``metadata``
vector, each pointing to a buffer. This module unpacks the model with the object
API of ``ai_edge_litert.schema_py_generated``, appends one buffer and one entry named
`edgeembed.model.METADATA_NAME`, and packs it again. It then reads the entry back with
the runtime's own reader to prove the runtime will find it.
"""

from __future__ import annotations

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as schema

from edgeembed.model import METADATA_NAME, ModelMetadata, read_metadata

_FILE_IDENTIFIER = b"TFL3"


def _name(entry) -> str:
    name = entry.name
    return name.decode("utf-8") if isinstance(name, bytes) else str(name)


def add_metadata_buffer(model_bytes: bytes, name: str, payload: bytes) -> bytes:
    """Store a named metadata buffer in a TFLite model, replacing one of the same name.

    Args:
        model_bytes: The model file.
        name: The metadata name.
        payload: The bytes to store.

    Returns:
        The new model file.
    """
    model = schema.ModelT.InitFromPackedBuf(bytearray(model_bytes), 0)
    model.metadata = [entry for entry in (model.metadata or []) if _name(entry) != name]

    # A replaced entry leaves its old buffer unreferenced. That costs only its bytes,
    # and removing it would renumber the buffers that tensors point to.
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(payload, dtype=np.uint8)
    model.buffers.append(buffer)

    entry = schema.MetadataT()
    entry.name = name
    entry.buffer = len(model.buffers) - 1
    model.metadata.append(entry)

    builder = flatbuffers.Builder(len(model_bytes) + len(payload) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=_FILE_IDENTIFIER)
    return bytes(builder.Output())


def embed_metadata(model_bytes: bytes, metadata: ModelMetadata) -> bytes:
    """Write the edgeembed metadata into a model and check that the runtime reads it back.

    Args:
        model_bytes: The converted model.
        metadata: The preprocessing, embedding and provenance record.

    Returns:
        The model file with the metadata entry.

    Raises:
        RuntimeError: If the runtime reader does not return the same metadata.
    """
    document = metadata.to_json()
    result = add_metadata_buffer(model_bytes, METADATA_NAME, document.encode("utf-8"))

    read_back = read_metadata(result)
    if read_back is None or read_back.to_json() != document:
        raise RuntimeError(f"the {METADATA_NAME!r} metadata did not read back unchanged after writing")
    return result
