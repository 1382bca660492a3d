"""Read `.safetensors` weight files into numpy arrays without the `safetensors` package.

The format is an 8-byte little-endian header length, a JSON header mapping tensor names to
`{"dtype", "shape", "data_offsets"}` (offsets relative to the end of the header), and the raw
little-endian tensor bytes. We only ever read weights we ship ourselves, but the header is still
validated strictly (bounds, sizes, overlaps) so that a truncated or corrupted file fails loudly
here instead of producing a subtly wrong model later.
"""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np

__all__ = ["SafetensorsError", "TensorInfo", "load_safetensors", "read_safetensors_header"]

# Upper bound taken from the reference implementation: a larger header is a corrupt file, and
# refusing it early avoids allocating gigabytes for a bogus length field.
_MAX_HEADER_BYTES = 100 * 1024 * 1024

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    # BF16 has no numpy dtype: read the raw 16 bits and widen to float32 after the read.
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}


class SafetensorsError(ValueError):
    """The file is not a well-formed safetensors file (or uses a dtype we do not read)."""


@dataclass(frozen=True)
class TensorInfo:
    """One header entry: where a tensor's bytes live and how to interpret them."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute file offset of the first byte
    end: int  # absolute file offset one past the last byte


def _parse_header(raw: bytes, file_size: int) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    if len(raw) < 8:
        raise SafetensorsError("file shorter than the 8-byte header length")
    (header_len,) = struct.unpack("<Q", raw[:8])
    if header_len > _MAX_HEADER_BYTES or 8 + header_len > file_size:
        raise SafetensorsError(f"header length {header_len} does not fit a {file_size}-byte file")
    try:
        header = json.loads(raw[8 : 8 + header_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SafetensorsError(f"header is not valid UTF-8 JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise SafetensorsError("header is not a JSON object")

    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    data_size = file_size - data_start
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise SafetensorsError(f"tensor {name!r}: malformed header entry {entry!r}") from exc
        if dtype not in _DTYPES:
            raise SafetensorsError(f"tensor {name!r}: unsupported dtype {dtype!r}")
        if not all(isinstance(d, int) and d >= 0 for d in shape):
            raise SafetensorsError(f"tensor {name!r}: bad shape {shape!r}")
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= data_size):
            raise SafetensorsError(f"tensor {name!r}: offsets {begin}..{end} outside the data")
        expected = int(np.prod(shape, dtype=np.int64)) * _DTYPES[dtype].itemsize
        if end - begin != expected:
            raise SafetensorsError(
                f"tensor {name!r}: {end - begin} bytes for {dtype}{shape} (expected {expected})"
            )
        infos[name] = TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)

    # Overlapping tensors would mean two names alias the same bytes: a corrupt or hostile header.
    spans = sorted((i.begin, i.end, i.name) for i in infos.values() if i.end > i.begin)
    for (_, prev_end, prev_name), (begin, _, name) in pairwise(spans):
        if begin < prev_end:
            raise SafetensorsError(f"tensors {prev_name!r} and {name!r} overlap")
    return infos, {str(k): str(v) for k, v in metadata.items()}


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Return the tensor table and the `__metadata__` strings without reading tensor data."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        f.seek(0)
        head = f.read(8)
        if len(head) < 8:
            raise SafetensorsError("file shorter than the 8-byte header length")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > _MAX_HEADER_BYTES:
            raise SafetensorsError(f"header length {header_len} is implausibly large")
        return _parse_header(head + f.read(header_len), size)


def load_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Load every tensor of a safetensors file as an independent, writable numpy array.

    BF16 tensors are widened to float32 (numpy has no bfloat16); all other dtypes keep their
    own numpy dtype, in native byte order.
    """
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size < 8:
            raise SafetensorsError("file shorter than the 8-byte header length")
        # mmap instead of read(): the arrays are copied out anyway, so this avoids holding the
        # whole file and all its copies in memory at the same time.
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            (header_len,) = struct.unpack("<Q", mm[:8])
            infos, _ = _parse_header(mm[: 8 + header_len], size)
            tensors: dict[str, np.ndarray] = {}
            for name, info in infos.items():
                dtype = _DTYPES[info.dtype]
                flat = np.frombuffer(
                    mm,
                    dtype=dtype,
                    count=(info.end - info.begin) // dtype.itemsize,
                    offset=info.begin,
                )
                array = flat.reshape(info.shape).astype(dtype.newbyteorder("="), copy=True)
                if info.dtype == "BF16":
                    array = (array.astype(np.uint32) << 16).view(np.float32)
                tensors[name] = array
                del flat  # the mmap cannot close while a view into it is alive
            return tensors
