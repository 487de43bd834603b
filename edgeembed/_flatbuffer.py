"""Read the metadata entries of a TFLite flatbuffer without TensorFlow.

The runtime needs only two things from the model file that the interpreter does not
expose: the named metadata buffers and the file identifier. This module reads them with
`struct`, following the TFLite schema (``tensorflow/compiler/mlir/lite/schema/schema.fbs``):
the root ``Model`` table has ``buffers`` at field 4 and ``metadata`` at field 6, each
``Metadata`` has ``name`` (field 0) and ``buffer`` (field 1), and each ``Buffer`` has
``data`` (field 0) or, for models over 2 GB, ``offset`` and ``size`` (fields 1 and 2).
"""

from __future__ import annotations

import struct

FILE_IDENTIFIER = b"TFL3"

_MODEL_BUFFERS = 4
_MODEL_METADATA = 6


class FlatbufferError(ValueError):
    """Raised when bytes are not a readable TFLite flatbuffer."""


def _u16(data: bytes, pos: int) -> int:
    return struct.unpack_from("<H", data, pos)[0]


def _u32(data: bytes, pos: int) -> int:
    return struct.unpack_from("<I", data, pos)[0]


def _field_position(data: bytes, table: int, field: int) -> int | None:
    """Return the absolute position of a table field, or None when it is absent."""
    vtable = table - struct.unpack_from("<i", data, table)[0]
    vtable_size = _u16(data, vtable)
    entry = 4 + 2 * field
    if entry >= vtable_size:
        return None

    offset = _u16(data, vtable + entry)
    return table + offset if offset else None


def _indirect(data: bytes, pos: int) -> int:
    return pos + _u32(data, pos)


def _vector(data: bytes, table: int, field: int) -> tuple[int, int]:
    """Return (first element position, length) of a vector field; (0, 0) when absent."""
    pos = _field_position(data, table, field)
    if pos is None:
        return 0, 0

    start = _indirect(data, pos)
    return start + 4, _u32(data, start)


def _buffer_bytes(data: bytes, buffer_table: int) -> bytes:
    start, length = _vector(data, buffer_table, 0)
    if length:
        return bytes(data[start:start + length])

    offset_pos = _field_position(data, buffer_table, 1)
    size_pos = _field_position(data, buffer_table, 2)
    if offset_pos is None or size_pos is None:
        return b""

    offset = struct.unpack_from("<Q", data, offset_pos)[0]
    size = struct.unpack_from("<Q", data, size_pos)[0]
    return bytes(data[offset:offset + size])


def read_metadata_buffers(data: bytes) -> dict[str, bytes]:
    """Read every named metadata buffer of a TFLite model.

    Args:
        data: The whole model file.

    Returns:
        A mapping from metadata name (for example ``"min_runtime_version"``) to the
        buffer's bytes.

    Raises:
        FlatbufferError: If the bytes are not a TFLite flatbuffer or are truncated.
    """
    if len(data) < 8 or data[4:8] != FILE_IDENTIFIER:
        raise FlatbufferError("missing the TFL3 file identifier, so this is not a TFLite model")

    try:
        root = _u32(data, 0)
        buffers_start, buffer_count = _vector(data, root, _MODEL_BUFFERS)
        metadata_start, metadata_count = _vector(data, root, _MODEL_METADATA)

        entries: dict[str, bytes] = {}
        for i in range(metadata_count):
            entry = _indirect(data, metadata_start + 4 * i)
            name_pos = _field_position(data, entry, 0)
            buffer_pos = _field_position(data, entry, 1)
            if name_pos is None or buffer_pos is None:
                continue

            name_start = _indirect(data, name_pos)
            name = data[name_start + 4:name_start + 4 + _u32(data, name_start)].decode("utf-8")
            buffer_index = _u32(data, buffer_pos)
            if buffer_index >= buffer_count:
                raise FlatbufferError(f"metadata {name!r} points to missing buffer {buffer_index}")

            buffer_table = _indirect(data, buffers_start + 4 * buffer_index)
            entries[name] = _buffer_bytes(data, buffer_table)
    except (struct.error, UnicodeDecodeError) as error:
        raise FlatbufferError(f"truncated or corrupted flatbuffer ({error})") from error

    return entries
