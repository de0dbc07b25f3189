"""A bundle's parameters on disk: the safetensors layout, read and written with numpy alone.

Stock ONNX Runtime cannot read the ORT Training checkpoint format, so a bundle ships its
parameters (frozen weights at their own dtype, trainable ones in fp32) as one safetensors file:
an 8-byte little-endian header length, a JSON header `{name: {"dtype", "shape", "data_offsets":
[begin, end]}, "__metadata__": {...}}`, then the tensors back to back. The format is
documented and has readers in every language a device may be written in
(https://huggingface.co/docs/safetensors). Writing it here keeps the `safetensors` package off
devices; the tests check that package reads what this writes.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from edgeftl.device.files import atomic_path

# safetensors dtype codes <-> numpy dtypes (the ones bundles use).
DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "U8": np.uint8,
          "I16": np.int16, "I32": np.int32, "I64": np.int64, "BOOL": np.bool_}
CODES = {np.dtype(v): k for k, v in DTYPES.items()}
MAX_HEADER_BYTES = 100 * 2**20  # the reference implementation's limit


class ParamsError(ValueError):
    """A parameter file that cannot be read; the message names the file and the problem."""


def write_params(path: Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> None:
    """Write tensors to `path` atomically (temp file + rename).

    Tensors are stored widest dtype first, so every tensor starts at a multiple of its item
    size when the data section starts at a multiple of 8 (the header is padded to that).
    """
    order = sorted(tensors, key=lambda name: (-np.dtype(tensors[name].dtype).itemsize, name))
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in order:
        array = tensors[name]
        if np.dtype(array.dtype) not in CODES:
            raise ParamsError(f"tensor {name!r} has dtype {array.dtype}; accepted: "
                              f"{', '.join(str(np.dtype(d)) for d in DTYPES.values())}")
        header[name] = {"dtype": CODES[np.dtype(array.dtype)], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    with atomic_path(Path(path)) as tmp, open(tmp, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw)
        for name in order:
            handle.write(np.ascontiguousarray(tensors[name]).astype(tensors[name].dtype.newbyteorder("<"),
                                                                    copy=False).tobytes())


def read_header(path: Path) -> tuple[dict[str, dict], dict[str, str], int]:
    """(tensor entries, metadata, byte offset of the data section), every entry checked.

    Raises:
        ParamsError: a truncated file, a header that is not the format, or entries that
            overlap, leave holes or point past the end of the file.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) != 8:
            raise ParamsError(f"{str(path)!r} is not a safetensors file: shorter than 8 bytes")
        (length,) = struct.unpack("<Q", head)
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise ParamsError(f"{str(path)!r}: header length {length} does not fit a {size}-byte file")
        try:
            header = json.loads(handle.read(length))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ParamsError(f"{str(path)!r}: header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise ParamsError(f"{str(path)!r}: header must be a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    position = 0
    for name, entry in sorted(header.items(), key=lambda item: _offsets(path, item)[0]):
        begin, end = _offsets(path, (name, entry))
        dtype, shape = entry.get("dtype"), entry.get("shape")
        if dtype not in DTYPES or not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ParamsError(f"{str(path)!r}: tensor {name!r} has dtype {dtype!r} / shape {shape!r}; "
                              f"accepted dtypes: {', '.join(DTYPES)}")
        if begin != position or end - begin != int(np.prod(shape, dtype=np.int64)) * np.dtype(DTYPES[dtype]).itemsize:
            raise ParamsError(f"{str(path)!r}: tensor {name!r} spans bytes {begin}..{end}, which does not "
                              "match its shape or leaves a hole; the file is corrupt")
        position = end
    if 8 + length + position != size:
        raise ParamsError(f"{str(path)!r}: {size} bytes but the header describes {8 + length + position}")
    return header, metadata, 8 + length


def _offsets(path: Path, item: tuple[str, object]) -> tuple[int, int]:
    name, entry = item
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise ParamsError(f"{str(path)!r}: tensor {name!r} has no valid data_offsets")
    return offsets[0], offsets[1]


def read_params(path: Path, names: set[str] | None = None) -> dict[str, np.ndarray]:
    """Tensors of the file (only `names` when given), each in its own writable array."""
    header, _, start = read_header(path)
    wanted = header if names is None else {n: e for n, e in header.items() if n in names}
    missing = sorted(set(names or ()) - set(header))
    if missing:
        raise ParamsError(f"{str(path)!r} lacks tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    out: dict[str, np.ndarray] = {}
    with open(path, "rb") as handle:
        for name, entry in wanted.items():
            begin, end = entry["data_offsets"]
            array = np.empty(entry["shape"], dtype=np.dtype(DTYPES[entry["dtype"]]).newbyteorder("<"))
            handle.seek(start + begin)
            if handle.readinto(array.reshape(-1).view(np.uint8).data) != end - begin:
                raise ParamsError(f"{str(path)!r}: tensor {name!r} is truncated")
            out[name] = array.astype(array.dtype.newbyteorder("="), copy=False)
    return out
