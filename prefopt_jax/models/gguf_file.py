"""Read a GGUF file's metadata and tensor records without decoding what is not asked for.

``gguf.GGUFReader`` builds numpy views of every metadata element on open, the ~49k vocabulary
strings and ~48k merges of a tokenizer included: about 3 s for SmolLM2-135M before a single tensor
is read. This reader walks the same layout (GGUF v2/v3, either byte order, ``general.alignment``)
with ``struct`` over a memory map: scalars and strings are decoded, arrays of numbers are unpacked
in one call, arrays of strings are kept as raw bytes (only their length is ever needed here).
Tensor data are views of the mapped file in the shapes and dtypes ``GGUFReader`` gives them, so
``gguf.quants.dequantize`` reads them the same way. Malformed input raises ``ValueError`` or
``struct.error``.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

_MAGIC = 0x46554747  # b"GGUF" read little-endian
_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32
# GGUF value types (gguf.GGUFValueType) -> struct format; 8 is a string, 9 an array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
            12: "d"}
_STRING, _ARRAY, _UINT32 = 8, 9, 4
# Unquantised GGML tensor types (gguf.GGMLQuantizationType) -> numpy element type.
_PLAIN_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8,
                 "I16": np.int16, "I32": np.int32, "I64": np.int64}


class GGUFTensor(NamedTuple):
    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # as GGUF lists it: fastest-varying dimension first
    data: np.ndarray  # elements (plain types) or bytes (quantised), slowest dimension first


class GGUFFile(NamedTuple):
    fields: dict[str, Any]
    tensors: list[GGUFTensor]


class _Cursor:
    """Sequential ``struct`` reads from a buffer in one byte order."""

    def __init__(self, buf, order: str, offset: int):
        self.buf, self.order, self.offset = buf, order, offset

    def read(self, fmt: str, count: int = 1) -> tuple:
        fmt = f"{self.order}{count}{fmt}"
        values = struct.unpack_from(fmt, self.buf, self.offset)
        self.offset += struct.calcsize(fmt)
        return values

    def one(self, fmt: str):
        return self.read(fmt)[0]

    def raw_string(self) -> bytes:
        n = self.one("Q")
        end = self.offset + n
        if end > len(self.buf):
            raise ValueError(f"string of {n} bytes runs past the end of the file")
        out, self.offset = self.buf[self.offset:end], end
        return out

    def string(self) -> str:
        return self.raw_string().decode("utf-8")

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.one(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item_kind, count = self.one("I"), self.one("Q")
            if item_kind in _SCALARS:
                return list(self.read(_SCALARS[item_kind], count))
            if item_kind == _STRING:
                return [self.raw_string() for _ in range(count)]
            return [self.value(item_kind) for _ in range(count)]
        raise ValueError(f"unknown GGUF value type {kind}")


def read_gguf_file(path: str | Path) -> GGUFFile:
    """Metadata (key -> Python value) and tensors of the GGUF file at ``path``."""
    import gguf

    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # ValueError when empty
    magic, version = struct.unpack_from("<II", buf, 0)
    if magic != _MAGIC:
        raise ValueError("GGUF magic invalid")
    order = "<"
    if version & 0xFFFF == 0:  # written on a machine of the other byte order
        order, version = ">", struct.unpack_from(">I", buf, 4)[0]
    if version not in _VERSIONS:
        raise ValueError(f"GGUF version {version} is not supported (supported: 2, 3)")
    cursor = _Cursor(buf, order, 8)
    n_tensors, n_fields = cursor.read("Q", 2)
    fields: dict[str, Any] = {}
    kinds: dict[str, int] = {}
    for _ in range(n_fields):
        key, kind = cursor.string(), cursor.one("I")
        if key in fields:
            raise ValueError(f"duplicate GGUF metadata key {key!r}")
        fields[key], kinds[key] = cursor.value(kind), kind
    records = []
    for _ in range(n_tensors):
        name = cursor.string()
        dims = cursor.read("Q", cursor.one("I"))
        records.append((name, gguf.GGMLQuantizationType(cursor.one("I")), dims, cursor.one("Q")))
    alignment = fields.get("general.alignment", _DEFAULT_ALIGNMENT)
    if "general.alignment" in fields and kinds["general.alignment"] != _UINT32:
        raise ValueError("bad type for general.alignment")
    if alignment == 0 or alignment & (alignment - 1):
        raise ValueError("invalid alignment: must be a non-zero power of two")
    start = -(-cursor.offset // alignment) * alignment
    tensors, names = [], set()
    for name, kind, dims, offset in records:
        if name in names:
            raise ValueError(f"duplicate tensor {name!r}")
        names.add(name)
        data = _tensor_data(gguf, buf, order, start + offset, kind, dims)
        tensors.append(GGUFTensor(name, kind, tuple(int(d) for d in dims), data))
    return GGUFFile(fields, tensors)


def _tensor_data(gguf, buf, order: str, offset: int, kind, dims) -> np.ndarray:
    """A tensor's stored data as ``GGUFReader`` shapes it (bytes per row when quantised)."""
    shape = tuple(int(d) for d in reversed(dims))
    n_elements = int(np.prod(shape, dtype=np.int64))
    if kind.name in _PLAIN_DTYPES:
        dtype, count = np.dtype(_PLAIN_DTYPES[kind.name]).newbyteorder(order), n_elements
    else:
        block_size, type_size = gguf.GGML_QUANT_SIZES[kind]
        dtype, count = np.dtype(np.uint8), n_elements * type_size // block_size
        shape = gguf.quants.quant_shape_to_byte_shape(shape, kind)
    return np.frombuffer(buf, dtype, count, offset).reshape(shape)
