"""The header of a safetensors file: tensor names, dtypes, shapes and offsets, never the data.

Layout: 8 bytes little-endian N, N bytes of JSON, then the data region. The parser below is
pure Python so that an uploaded file, however malformed, gives a precise message instead of a
Rust error from the safetensors library; it checks everything the library checks about the
layout (dtype sizes aside, which the caller knows).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open

# The safetensors library refuses larger headers too; callers pass a much smaller bound.
MAX_HEADER_BYTES = 100_000_000
# Bounds checked before any arithmetic on a shape: the product of a long shape of large dims is
# a huge integer whose computation holds the GIL (a 1.2 MB header stalled the event loop 7.7 s).
MAX_TENSOR_RANK = 8
MAX_DIM = 1 << 40
MAX_NAME_CHARS = 1024


class HeaderError(ValueError):
    """The file is not a well-formed safetensors file."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int  # byte offsets within the data region
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path, max_header_bytes: int = MAX_HEADER_BYTES) -> dict[str, TensorInfo]:
    """Name -> TensorInfo, after checking the file's whole layout (a truncated file is refused).
    The header is bounded before it is read: parsing JSON holds the GIL for as long as it takes."""
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        prefix = f.read(8)
        if len(prefix) < 8:
            raise HeaderError(f"file is {size} bytes, too short to be safetensors")
        length = int.from_bytes(prefix, "little")
        if length > size - 8:
            raise HeaderError(
                f"header length {length} exceeds the {size - 8} bytes after the length prefix: "
                "the file is truncated or not safetensors"
            )
        if length > max_header_bytes:
            raise HeaderError(f"header length {length} exceeds the {max_header_bytes}-byte limit")
        raw = f.read(length)
    return parse_header(raw, data_size=size - 8 - length)


def parse_header(raw: bytes, data_size: int) -> dict[str, TensorInfo]:
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=refuse_duplicate_keys)
    except (ValueError, RecursionError) as e:  # bad UTF-8, bad JSON, duplicate keys, absurd nesting
        raise HeaderError(f"header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise HeaderError(f"header is a JSON {type(header).__name__}, expected an object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise HeaderError("__metadata__ must be an object of strings")

    tensors = {name: _tensor_info(name, entry) for name, entry in header.items()}
    # The tensors must tile the data region exactly: no gap, no overlap, nothing after the last.
    expected = 0
    for name, info in sorted(tensors.items(), key=lambda item: (item[1].start, item[1].end)):
        if info.end > data_size:
            raise HeaderError(
                f"tensor {name} data_offsets [{info.start}, {info.end}] run past the end of the "
                f"{data_size}-byte data region: the file is truncated"
            )
        if info.start != expected:
            what = "a gap" if info.start > expected else "an overlap"
            raise HeaderError(f"tensor {name} starts at byte {info.start}, leaving {what} after byte {expected}")
        expected = info.end
    if expected != data_size:
        raise HeaderError(f"{data_size - expected} bytes after the last tensor's data")
    return tensors


def _tensor_info(name: str, entry: Any) -> TensorInfo:
    if len(name) > MAX_NAME_CHARS:  # every message names the tensor: keep them short
        raise HeaderError(f"a tensor name is {len(name)} characters long; at most {MAX_NAME_CHARS} are accepted")
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise HeaderError(f"tensor {name} must have dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str):
        raise HeaderError(f"tensor {name} has dtype {_brief(dtype)}, expected a string")
    if isinstance(shape, list) and len(shape) > MAX_TENSOR_RANK:  # before looking at the dims
        raise HeaderError(f"tensor {name} has {len(shape)} dimensions; at most {MAX_TENSOR_RANK} are accepted")
    if not isinstance(shape, list) or not all(_is_count(d) and d <= MAX_DIM for d in shape):
        raise HeaderError(
            f"tensor {name} has shape {_brief(shape)}, "
            f"expected a list of non-negative integers (each at most {MAX_DIM})"
        )
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)) or (
        offsets[0] > offsets[1]
    ):
        raise HeaderError(f"tensor {name} has data_offsets {_brief(offsets)}, expected [begin, end] with begin <= end")
    return TensorInfo(dtype=dtype, shape=tuple(shape), start=offsets[0], end=offsets[1])


def _brief(value: Any, limit: int = 80) -> str:
    """A value for a message, cut short: messages go back to clients."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's object hook: a repeated key would let two readers see different files."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def base_weight_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of a (trusted) base model, read from the headers only."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="np") as f:
            for name in f.keys():
                shapes[name] = tuple(f.get_slice(name).get_shape())
    if not shapes:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    return shapes
