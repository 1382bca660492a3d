"""Tests for the numpy-only safetensors reader, on hand-built files and the packaged weights."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from idlefleet.models.safetensors_io import (
    SafetensorsError,
    load_safetensors,
    read_safetensors_header,
)

Entry = tuple[str, list[int], bytes]  # dtype, shape, raw little-endian bytes


def write_safetensors(
    path: Path,
    entries: dict[str, Entry],
    metadata: dict[str, str] | None = None,
    *,
    header_override: dict[str, object] | None = None,
    trailing: bytes = b"",
) -> Path:
    """Write a safetensors file the way the reference implementation lays it out."""
    header: dict[str, object] = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    blob = b""
    for name, (dtype, shape, raw) in entries.items():
        header[name] = {
            "dtype": dtype,
            "shape": shape,
            "data_offsets": [len(blob), len(blob) + len(raw)],
        }
        blob += raw
    if header_override is not None:
        header = header_override
    encoded = json.dumps(header).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the format pads the header to 8-byte alignment
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + blob + trailing)
    return path


def test_round_trips_common_dtypes_and_shapes(tmp_path: Path) -> None:
    f32 = np.arange(6, dtype="<f4").reshape(2, 3) / 7
    f16 = np.array([0.5, -1.25, 65504.0], dtype="<f2")
    i64 = np.array([[-(2**40), 3]], dtype="<i8")
    u8 = np.array([0, 255, 7], dtype="u1")
    flags = np.array([True, False, True])
    scalar = np.array(3.5, dtype="<f8")
    empty = np.zeros((0, 3), dtype="<f4")
    path = write_safetensors(
        tmp_path / "t.safetensors",
        {
            "f32": ("F32", [2, 3], f32.tobytes()),
            "f16": ("F16", [3], f16.tobytes()),
            "i64": ("I64", [1, 2], i64.tobytes()),
            "u8": ("U8", [3], u8.tobytes()),
            "flags": ("BOOL", [3], flags.tobytes()),
            "scalar": ("F64", [], scalar.tobytes()),
            "empty": ("F32", [0, 3], b""),
        },
    )

    tensors = load_safetensors(path)

    assert sorted(tensors) == sorted(["f32", "f16", "i64", "u8", "flags", "scalar", "empty"])
    for name, expected in [
        ("f32", f32),
        ("f16", f16),
        ("i64", i64),
        ("u8", u8),
        ("flags", flags),
        ("scalar", scalar),
        ("empty", empty),
    ]:
        assert tensors[name].dtype == expected.dtype.newbyteorder("="), name
        assert tensors[name].shape == expected.shape, name
        np.testing.assert_array_equal(tensors[name], expected)


def test_bf16_is_widened_to_float32_exactly(tmp_path: Path) -> None:
    # bfloat16 is the top half of a float32: 1.0 = 0x3F80, -2.5 = 0xC020, 0.15625 = 0x3E20.
    raw = np.array([0x3F80, 0xC020, 0x3E20], dtype="<u2").tobytes()
    path = write_safetensors(tmp_path / "bf16.safetensors", {"w": ("BF16", [3], raw)})

    w = load_safetensors(path)["w"]

    assert w.dtype == np.float32
    np.testing.assert_array_equal(w, np.array([1.0, -2.5, 0.15625], dtype=np.float32))


def test_arrays_are_writable_copies(tmp_path: Path) -> None:
    raw = np.ones(4, dtype="<f4").tobytes()
    path = write_safetensors(tmp_path / "w.safetensors", {"w": ("F32", [4], raw)})

    first = load_safetensors(path)["w"]
    first[:] = 0.0  # would raise if the array were a read-only view of the file

    np.testing.assert_array_equal(load_safetensors(path)["w"], np.ones(4, dtype=np.float32))


def test_header_and_metadata_without_reading_data(tmp_path: Path) -> None:
    path = write_safetensors(
        tmp_path / "m.safetensors",
        {"a": ("F32", [2], bytes(8)), "b": ("I32", [1], bytes(4))},
        metadata={"format": "pt"},
    )

    infos, metadata = read_safetensors_header(path)

    assert metadata == {"format": "pt"}
    assert infos["a"].dtype == "F32" and infos["a"].shape == (2,)
    assert infos["b"].end - infos["b"].begin == 4


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("short_file", "shorter than"),
        ("header_too_long", "header length"),
        ("not_json", "not valid UTF-8 JSON"),
        ("wrong_byte_count", "expected"),
        ("out_of_bounds", "outside the data"),
        ("overlap", "overlap"),
        ("unknown_dtype", "unsupported dtype"),
        ("negative_dim", "bad shape"),
    ],
)
def test_malformed_files_are_rejected(tmp_path: Path, case: str, message: str) -> None:
    path = tmp_path / f"{case}.safetensors"
    good = {"w": ("F32", [2], bytes(8))}
    if case == "short_file":
        path.write_bytes(b"\x01\x00")
    elif case == "header_too_long":
        path.write_bytes(struct.pack("<Q", 1000) + b"{}")
    elif case == "not_json":
        path.write_bytes(struct.pack("<Q", 8) + b"{not js}")
    elif case == "wrong_byte_count":
        write_safetensors(path, {"w": ("F32", [3], bytes(8))})
    elif case == "out_of_bounds":
        write_safetensors(
            path,
            good,
            header_override={"w": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
        )
    elif case == "overlap":
        write_safetensors(
            path,
            good,
            header_override={
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
            },
        )
    elif case == "unknown_dtype":
        write_safetensors(path, {"w": ("F8_E4M3", [8], bytes(8))})
    elif case == "negative_dim":
        write_safetensors(
            path,
            good,
            header_override={"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}},
        )

    with pytest.raises(SafetensorsError, match=message):
        load_safetensors(path)


def test_truncated_data_is_rejected(tmp_path: Path) -> None:
    path = write_safetensors(tmp_path / "t.safetensors", {"w": ("F32", [4], bytes(16))})
    path.write_bytes(path.read_bytes()[:-4])

    with pytest.raises(SafetensorsError, match="outside the data"):
        load_safetensors(path)


def test_reads_the_packaged_minilm_weights(minilm_dir: Path) -> None:
    tensors = load_safetensors(minilm_dir / "model.safetensors")

    assert tensors["embeddings.word_embeddings.weight"].shape == (30522, 384)
    assert tensors["embeddings.word_embeddings.weight"].dtype == np.float32
    assert tensors["encoder.layer.5.intermediate.dense.weight"].shape == (1536, 384)
    np.testing.assert_array_equal(tensors["embeddings.position_ids"], np.arange(512)[None, :])
    # Trained LayerNorm gains sit around 1 and are never all zeros: catches offset mix-ups.
    gamma = tensors["embeddings.LayerNorm.weight"]
    assert 0.1 < float(np.abs(gamma).mean()) < 10
    assert all(np.isfinite(t).all() for t in tensors.values() if t.dtype.kind == "f")
