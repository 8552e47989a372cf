"""safetensors <-> {name: np.ndarray}, with header validation, BF16 support and atomic writes.

Format: 8-byte little-endian header length N, N bytes of JSON `{name: {dtype, shape, data_offsets}, ...,
"__metadata__": {str: str}}`, then the raw little-endian tensor bytes (offsets relative to the byte buffer).
The header is checked here first so that truncated or corrupt files give one-line `CheckpointError`s naming the
file; reading is then done by `safetensors.numpy` (or by hand when the file holds BF16, which safetensors' numpy
binding cannot return; BF16 comes back as float32).
"""
from __future__ import annotations

import json
import math
import os
import secrets
import struct
from typing import Any, Mapping

import numpy as np

from diffcleanse_jax.io import CheckpointError

_DTYPES: dict[str, str] = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8",
    "BOOL": "bool", "C64": "complex64",
}
_ITEMSIZE = {"bfloat16": 2}
_MAX_HEADER = 100 * 1024 * 1024  # the format's own limit


def _itemsize(dtype: str) -> int:
  return _ITEMSIZE.get(dtype) or np.dtype(dtype).itemsize


def _read_header(path: str) -> tuple[dict[str, dict[str, Any]], dict[str, str], int, int]:
  """Validated (tensor entries, metadata, data start, file size) of a safetensors file."""
  try:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      head = f.read(8)
      if len(head) < 8:
        raise CheckpointError(f"{path}: not a safetensors file ({size} bytes, shorter than the 8-byte header "
                              "length; truncated?)")
      (n,) = struct.unpack("<Q", head)
      if n > min(size - 8, _MAX_HEADER):
        raise CheckpointError(f"{path}: corrupt safetensors header length {n} for a file of {size} bytes "
                              "(truncated, or not a safetensors file)")
      raw = f.read(n)
  except OSError as e:
    raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
  try:
    header = json.loads(raw.decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path}: corrupt safetensors header (invalid JSON: {e})") from None
  if not isinstance(header, dict):
    raise CheckpointError(f"{path}: corrupt safetensors header (expected a JSON object)")
  meta = header.pop("__metadata__", None) or {}
  if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
    raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ must map strings to strings)")
  start, data_size = 8 + n, size - 8 - n
  for name, e in header.items():
    if not (isinstance(e, dict) and isinstance(e.get("dtype"), str) and isinstance(e.get("shape"), list)
            and isinstance(e.get("data_offsets"), list) and len(e["data_offsets"]) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                    for x in e["shape"] + e["data_offsets"])):
      raise CheckpointError(f"{path}: corrupt safetensors header entry for {name!r}: {str(e)[:120]}")
    if e["dtype"] not in _DTYPES:
      raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {e['dtype']}; supported: "
                            f"{', '.join(_DTYPES)}")
    begin, end = e["data_offsets"]
    want = math.prod(e["shape"]) * _itemsize(_DTYPES[e["dtype"]])
    if end > data_size:
      raise CheckpointError(f"{path}: tensor {name!r} data ends at byte {end} but the file holds only "
                            f"{data_size} data bytes (truncated?)")
    if end - begin != want:
      raise CheckpointError(f"{path}: tensor {name!r} spans {end - begin} bytes, but dtype {e['dtype']} shape "
                            f"{tuple(e['shape'])} needs {want} (corrupt header)")
  return header, meta, start, size


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
  """The `__metadata__` string map of a safetensors file (empty if none)."""
  return dict(_read_header(os.fspath(path))[1])


def load_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Loads every tensor as a numpy array (BF16 -> float32). Raises CheckpointError naming the file."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: no such file")
  header, _, start, _ = _read_header(path)
  if not any(e["dtype"] == "BF16" for e in header.values()):
    try:
      from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
      return {k: np.ascontiguousarray(v) for k, v in load_file(path).items()}
    except Exception as e:  # pylint: disable=broad-except  (any failure of the reader means a bad file)
      raise CheckpointError(f"{path}: cannot read safetensors file ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''})") from None
  out = {}
  with open(path, "rb") as f:
    for name, e in header.items():
      dtype = _DTYPES[e["dtype"]]
      begin, end = e["data_offsets"]
      f.seek(start + begin)
      raw = f.read(end - begin)
      if dtype == "bfloat16":
        arr = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
      else:
        arr = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype)
      out[name] = arr.reshape(e["shape"]).copy()
  return out


def _write_raw(tensors: Mapping[str, np.ndarray], f, metadata: Mapping[str, str] | None):
  """Own writer (used when a tensor is bfloat16, which safetensors.numpy cannot write)."""
  header: dict[str, Any] = {}
  if metadata:
    header["__metadata__"] = dict(metadata)
  offset, blobs = 0, []
  for name in sorted(tensors):
    a = tensors[name]
    dt = a.dtype.name
    code = {v: k for k, v in _DTYPES.items()}.get(dt)
    if code is None:
      raise CheckpointError(f"cannot write tensor {name!r} of dtype {dt} to safetensors")
    if dt == "bfloat16":
      data = a.view(np.uint16).astype("<u2").tobytes()
    else:
      data = a.astype(a.dtype.newbyteorder("<")).tobytes()
    header[name] = {"dtype": code, "shape": list(a.shape), "data_offsets": [offset, offset + len(data)]}
    offset += len(data)
    blobs.append(data)
  hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
  hb += b" " * (-len(hb) % 8)
  f.write(struct.pack("<Q", len(hb)) + hb)
  for b in blobs:
    f.write(b)


def save_safetensors(tensors: Mapping[str, Any], path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None) -> None:
  """Writes {name: array} (numpy or jax arrays) to `path` atomically: a temp file in the same folder, fsync,
  then os.replace, so readers never see a half-written file."""
  path = os.fspath(path)
  arrays = {}
  for k, v in tensors.items():
    if not isinstance(k, str):
      raise CheckpointError(f"{path}: tensor names must be strings, got {k!r}")
    arrays[k] = np.ascontiguousarray(np.asarray(v))
  if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
    raise CheckpointError(f"{path}: safetensors metadata must map strings to strings")
  folder = os.path.dirname(os.path.abspath(path))
  tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
  fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies, unlike mkstemp's 0600
  try:
    if any(a.dtype.name == "bfloat16" for a in arrays.values()):
      with os.fdopen(fd, "wb") as f:
        _write_raw(arrays, f, metadata)
        f.flush()
        os.fsync(f.fileno())
    else:
      os.close(fd)
      from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
      save_file(arrays, tmp, metadata=dict(metadata) if metadata else None)
      with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    try:
      os.unlink(tmp)
    except OSError:
      pass
    raise
