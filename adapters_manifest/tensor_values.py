"""Reading an adapter's tensor values, streamed in bounded chunks: NaN, infinity and values the
serving dtype cannot hold are refused with the tensor's name (a header can be right while the
weights are garbage). numpy's ufuncs release the GIL, so a big file does not stall the event loop."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from adapters_manifest.safetensors_header import TensorInfo

CHUNK_BYTES = 1 << 20  # a multiple of every element size
# The largest finite value of each dtype a gateway serves in; float32 holds whatever an F32 does.
SERVING_MAX = {"float16": 65504.0, "bfloat16": 3.3895313892515355e38, "float32": None}


class TensorValueError(ValueError):
    """A tensor holds values the gateway must not serve; the message names it."""


def check_values(path: Path, header: dict[str, TensorInfo], serving_dtype: str | None) -> None:
    """Refuse NaN, +-infinity, and (for `serving_dtype` float16 or bfloat16) finite values beyond
    its range. `header` is the file's parsed header (layout already checked)."""
    limit = SERVING_MAX.get(serving_dtype or "float32")
    with path.open("rb") as f:
        data_start = 8 + int.from_bytes(f.read(8), "little")
        for name, info in sorted(header.items(), key=lambda item: item[1].start):
            for chunk in _chunks(f, data_start + info.start, info.nbytes):
                _check_chunk(name, info.dtype, chunk, limit, serving_dtype)


def _chunks(f, offset: int, size: int) -> Iterator[bytes]:  # noqa: ANN001 (a binary file)
    f.seek(offset)
    while size > 0:
        chunk = f.read(min(CHUNK_BYTES, size))
        if not chunk:
            raise TensorValueError("the file ended inside a tensor's data")
        size -= len(chunk)
        yield chunk


def _as_float32(dtype: str, chunk: bytes) -> np.ndarray:
    if dtype == "BF16":  # numpy has no bfloat16: its bits are the top half of a float32's
        return (np.frombuffer(chunk, np.uint16).astype(np.uint32) << 16).view(np.float32)
    return np.frombuffer(chunk, {"F32": np.float32, "F16": np.float16}[dtype])


def _check_chunk(name: str, dtype: str, chunk: bytes, limit: float | None, serving_dtype: str | None) -> None:
    values = _as_float32(dtype, chunk)
    finite = np.isfinite(values)
    if not finite.all():
        bad = values[~finite][0]
        raise TensorValueError(f"tensor {name} holds {'NaN' if np.isnan(bad) else 'infinity'}")
    if limit is not None and values.size:
        largest = float(np.abs(values).max())
        if largest > limit:
            raise TensorValueError(
                f"tensor {name} holds {largest:g}, beyond the range of {serving_dtype} (+-{limit:g}), "
                "the dtype the gateway serves in"
            )
