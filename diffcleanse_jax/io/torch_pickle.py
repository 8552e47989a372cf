"""Read torch checkpoints (`.bin` / `.pth` / `.pt`) into numpy without importing torch.

A torch zip archive (torch >= 1.6) holds `<prefix>/data.pkl` (a pickle of the state dict whose tensors refer to
storages by persistent id) and one raw blob per storage, `<prefix>/data/<key>`. The older magic-number format
(torch 0.4-1.5) is a run of pickles followed by the storages' bytes; it is read too. Every pickle is read by a
restricted `pickle.Unpickler`: `find_class` resolves only the handful of globals a state dict needs
(`collections.OrderedDict`, `torch._utils._rebuild_tensor_v2` & co., `torch.*Storage` types, dtype objects) to
local stand-ins, so no torch code and no code from the file ever runs; any other global raises
`CheckpointError`. Tensors are rebuilt after unpickling with `np.frombuffer` + a bounds-checked `as_strided`
and copied.
"""
from __future__ import annotations

import collections
import os
import pickle
import struct
import tarfile
import zipfile
from typing import Any, Mapping

import numpy as np

from diffcleanse_jax.io import CheckpointError

# torch storage class name -> numpy dtype ("bfloat16" is decoded by hand: numpy has no bfloat16).
_STORAGE_DTYPES: dict[str, str] = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16",
    "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128", "UntypedStorage": "uint8",
}
_TORCH_DTYPES: dict[str, str] = {
    "float32": "float32", "float": "float32", "float64": "float64", "double": "float64", "float16": "float16",
    "half": "float16", "bfloat16": "bfloat16", "int64": "int64", "long": "int64", "int32": "int32",
    "int": "int32", "int16": "int16", "short": "int16", "int8": "int8", "uint8": "uint8", "bool": "bool",
}
# torch's pickle magic number (pre-1.6 "legacy" format), and as pickle protocol 2 writes it (LONG1, 10 bytes).
_LEGACY_MAGIC_NUMBER = 0x1950a86a20f9469cfc6c
_LEGACY_MAGIC = b"\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"


class _Sealed:
  """Stand-ins handed to the pickle refuse BUILD (no attribute of theirs can be rewritten by the file)."""

  __slots__ = ()

  def __setstate__(self, state):
    raise CheckpointError("refusing to set state on a torch stand-in object (tampered pickle?)")


class _StorageType(_Sealed):
  """Stand-in for a `torch.*Storage` class: only its element dtype matters."""

  __slots__ = ("name", "dtype")

  def __init__(self, name: str, dtype: str):
    self.name, self.dtype = name, dtype

  def __repr__(self):
    return f"torch.{self.name}"


class _Storage(_Sealed):
  """A handle on one storage (`<prefix>/data/<key>` in a zip archive); `base`/`numel` select a legacy view."""

  __slots__ = ("key", "dtype", "base", "numel")

  def __init__(self, key: str, dtype: str, base: int = 0, numel: int | None = None):
    self.key, self.dtype, self.base, self.numel = key, dtype, base, numel


class _LazyTensor(_Sealed):
  """A tensor whose bytes are fetched after unpickling (legacy files store the data after the pickle)."""

  __slots__ = ("storage", "offset", "size", "stride")

  def __init__(self, storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...]):
    self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


class _TorchDType(_Sealed):
  __slots__ = ("name",)

  def __init__(self, name: str):
    self.name = name

  def __repr__(self):
    return f"torch.{self.name}"


class _TensorType(_Sealed):
  """Stand-in for `torch.Tensor` / `torch.nn.Parameter` as the `new_type` of `_rebuild_from_type_v2`."""

  __slots__ = ("name",)

  def __init__(self, name: str):
    self.name = name


class _Func(_Sealed):
  """An allowed callable (OrderedDict, tensor rebuilders) that the pickle cannot modify."""

  __slots__ = ("fn",)

  def __init__(self, fn):
    self.fn = fn

  def __call__(self, *args, **kwargs):
    return self.fn(*args, **kwargs)


class _Reader:
  """Storage bytes by key: read lazily from a zip archive, or filled in after the pickle (legacy format)."""

  def __init__(self, path: str, zf: zipfile.ZipFile | None = None, prefix: str = "", big_endian: bool = False):
    self.path, self.zf, self.prefix, self.big_endian = path, zf, prefix, big_endian
    self.cache: dict[str, np.ndarray] = {}
    self.dtypes: dict[str, str] = {}  # storage key -> element dtype, as declared by the pickle

  def fail(self, msg: str) -> CheckpointError:
    return CheckpointError(f"{self.path}: {msg}")

  def np_dtype(self, dtype: str) -> np.dtype:
    d = np.dtype("uint16" if dtype == "bfloat16" else dtype)
    return d.newbyteorder(">" if self.big_endian else "<")

  def declare(self, key: str, dtype: str) -> None:
    if self.dtypes.setdefault(key, dtype) != dtype:
      raise self.fail(f"storage {key!r} is declared as both {self.dtypes[key]} and {dtype}")

  def storage_array(self, key: str, dtype: str) -> np.ndarray:
    """The storage as a flat array of its element dtype (bfloat16 as raw uint16)."""
    if key not in self.cache:
      if self.zf is None:
        raise self.fail(f"storage {key!r} is referenced by the pickle but not stored in the file")
      name = f"{self.prefix}/data/{key}" if self.prefix else f"data/{key}"
      try:
        raw = self.zf.read(name)
      except KeyError:
        raise self.fail(f"storage {key!r} referenced by data.pkl is missing from the archive ({name})") from None
      np_dtype = self.np_dtype(dtype)
      if len(raw) % np_dtype.itemsize:
        raise self.fail(f"storage {key!r} has {len(raw)} bytes, not a multiple of its {dtype} element size")
      self.cache[key] = np.frombuffer(raw, dtype=np_dtype)
    return self.cache[key]

  def rebuild(self, storage, storage_offset, size, stride) -> _LazyTensor:
    if not isinstance(storage, _Storage):
      raise self.fail(f"tensor rebuilt from {type(storage).__name__}, expected a storage reference")
    try:
      offset, size, stride = int(storage_offset), tuple(int(s) for s in size), tuple(int(s) for s in stride)
    except (TypeError, ValueError):
      raise self.fail(f"tensor with malformed size/stride {size!r}/{stride!r}") from None
    if len(size) != len(stride) or offset < 0 or any(s < 0 for s in size) or any(s < 0 for s in stride):
      raise self.fail(f"tensor with invalid layout offset={offset} size={size} stride={stride}")
    return _LazyTensor(storage, offset, size, stride)

  def materialize(self, t: _LazyTensor) -> np.ndarray:
    storage, offset, size, stride = t.storage, t.offset, t.size, t.stride
    flat = self.storage_array(storage.key, storage.dtype)
    if storage.base or storage.numel is not None:  # a legacy storage view
      flat = flat[storage.base: storage.base + (storage.numel if storage.numel is not None else flat.size)]
    if any(s == 0 for s in size):
      out = np.zeros(size, dtype=flat.dtype)
    else:
      last = offset + sum((n - 1) * s for n, s in zip(size, stride))
      if last >= flat.size:  # never let as_strided read past the storage (a crafted file could)
        raise self.fail(f"tensor of size {size} stride {stride} at offset {offset} reads past its storage "
                        f"{storage.key!r} of {flat.size} elements (truncated or corrupt file)")
      view = np.lib.stride_tricks.as_strided(flat[offset:], shape=size,
                                             strides=tuple(s * flat.itemsize for s in stride), writeable=False)
      out = np.array(view, copy=True, order="C")
    if out.dtype.byteorder not in ("=", "|"):
      out = out.astype(out.dtype.newbyteorder("="))
    if storage.dtype == "bfloat16":
      out = (out.astype(np.uint32) << 16).view(np.float32)
    return out

  def resolve(self, obj: Any, depth: int = 0) -> Any:
    """Replaces every lazy tensor in nested dicts/lists/tuples by its array."""
    if depth > 50:
      raise self.fail("containers nested too deeply for a state dict")
    if isinstance(obj, _LazyTensor):
      return self.materialize(obj)
    if isinstance(obj, Mapping):
      return {k: self.resolve(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
      return type(obj)(self.resolve(v, depth + 1) for v in obj)
    return obj


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves only the globals a torch state dict needs, each to a local stand-in."""

  def __init__(self, f, reader: _Reader):
    super().__init__(f)
    self.reader = reader
    r = reader

    def rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                          metadata=None):
      return r.rebuild(storage, storage_offset, size, stride)

    def rebuild_tensor(storage, storage_offset, size, stride):
      return r.rebuild(storage, storage_offset, size, stride)

    def rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
      if not isinstance(data, _LazyTensor):
        raise r.fail(f"parameter rebuilt from {type(data).__name__}, expected a tensor")
      return data

    rebuild_tensor_v2, rebuild_tensor, rebuild_parameter = (
        _Func(rebuild_tensor_v2), _Func(rebuild_tensor), _Func(rebuild_parameter))
    allowed_funcs = (rebuild_tensor_v2, rebuild_tensor, rebuild_parameter)

    def rebuild_from_type_v2(func, new_type, args, state):
      if not any(func is f for f in allowed_funcs) or not isinstance(new_type, _TensorType) \
          or not isinstance(args, tuple):
        raise r.fail("refusing _rebuild_from_type_v2 of anything but a plain tensor or parameter")
      return func(*args)

    self._globals: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): _Func(collections.OrderedDict),
        ("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor"): rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): rebuild_parameter,
        ("torch._tensor", "_rebuild_from_type_v2"): _Func(rebuild_from_type_v2),
        ("torch", "Tensor"): _TensorType("Tensor"),
        ("torch._tensor", "Tensor"): _TensorType("Tensor"),
        ("torch.nn.parameter", "Parameter"): _TensorType("Parameter"),
    }
    for name, dt in _STORAGE_DTYPES.items():
      self._globals[("torch", name)] = _StorageType(name, dt)
    self._globals[("torch.storage", "UntypedStorage")] = _StorageType("UntypedStorage", "uint8")
    for name in _TORCH_DTYPES:
      self._globals[("torch", name)] = _TorchDType(name)

  def find_class(self, module, name):
    obj = self._globals.get((module, name))
    if obj is None:
      raise self.reader.fail(f"refusing to unpickle global {module}.{name}: only plain state dicts of "
                             "tensors are loaded (save `model.state_dict()`, not the model; or the file was tampered "
                             "with)")
    return obj

  def persistent_load(self, pid):
    # zip format: ('storage', type, key, location, numel); legacy: (..., numel, view_metadata | None)
    if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
      raise self.reader.fail(f"unsupported persistent id {str(pid)[:80]!r} in the pickle (only tensor "
                             "storages are loaded, not pickled modules)")
    stype, key = pid[1], str(pid[2])
    if isinstance(stype, _TorchDType):
      dtype = _TORCH_DTYPES[stype.name]
    elif isinstance(stype, _StorageType):
      dtype = stype.dtype
    else:
      raise self.reader.fail(f"unsupported storage type {stype!r} in the pickle")
    self.reader.declare(key, dtype)
    if len(pid) == 5 or pid[5] is None:
      return _Storage(key, dtype)
    view = pid[5]
    if not (isinstance(view, tuple) and len(view) == 3 and all(isinstance(v, int) for v in view[1:])
            and view[1] >= 0 and view[2] >= 0):
      raise self.reader.fail(f"malformed storage view {str(view)[:80]!r} in the pickle")
    return _Storage(key, dtype, base=view[1], numel=view[2])


_HINT = ("re-save it with a newer torch (`torch.save(torch.load(p), p)`) or convert it to safetensors "
         "(`safetensors.torch.save_file(torch.load(p), p2)`)")


def _not_zip_error(path: str, head: bytes) -> CheckpointError:
  try:
    is_tar = tarfile.is_tarfile(path)
  except OSError:
    is_tar = False
  if is_tar:
    return CheckpointError(f"{path}: legacy tar-format torch checkpoint (torch < 0.4) is not supported; {_HINT}")
  if head[:1] == b"\x80":
    return CheckpointError(f"{path}: a bare pickle, not a torch checkpoint; refusing to unpickle it. If it is "
                           f"a torch checkpoint, {_HINT}")
  return CheckpointError(f"{path}: not a torch zip checkpoint (no zip archive found; truncated or wrong file?)")


def _find_prefix(path: str, zf: zipfile.ZipFile) -> str:
  pkls = [n for n in zf.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
  if not pkls and "data.pkl" in zf.namelist():
    return ""
  if len(pkls) != 1:
    raise CheckpointError(f"{path}: expected exactly one '<name>/data.pkl' in the zip archive, found "
                          f"{len(pkls)}; not a torch checkpoint")
  return pkls[0].rsplit("/", 1)[0]


def _load_zip(path: str, zf: zipfile.ZipFile) -> Any:
  prefix = _find_prefix(path, zf)
  join = (lambda n: f"{prefix}/{n}") if prefix else (lambda n: n)
  big = False
  if join("byteorder") in zf.namelist():
    order = zf.read(join("byteorder")).decode("ascii", "replace").strip()
    if order not in ("little", "big"):
      raise CheckpointError(f"{path}: unknown byteorder {order!r} in archive")
    big = order == "big"
  reader = _Reader(path, zf, prefix, big)
  with zf.open(join("data.pkl")) as f:
    obj = _RestrictedUnpickler(f, reader).load()
  return reader.resolve(obj)


def _load_legacy(path: str, f) -> Any:
  """torch < 1.6 (or `_use_new_zipfile_serialization=False`) files: five pickles, then the storages.

  magic number, protocol 1001, sys_info, the object (storages by persistent id), the list of storage keys;
  then per key an int64 element count and the raw little-endian bytes.
  """
  reader = _Reader(path)

  def load():
    return _RestrictedUnpickler(f, reader).load()

  if load() != _LEGACY_MAGIC_NUMBER:
    raise reader.fail("bad torch magic number (corrupt file?)")
  proto = load()
  if proto != 1001:
    raise reader.fail(f"unsupported legacy torch protocol version {proto!r}; {_HINT}")
  sys_info = load()
  if not isinstance(sys_info, Mapping) or not sys_info.get("little_endian", True):
    raise reader.fail(f"big-endian legacy torch checkpoints are not supported; {_HINT}")
  obj = load()
  keys = load()
  if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
    raise reader.fail("corrupt legacy torch checkpoint (storage key list)")
  remaining = os.fstat(f.fileno()).st_size - f.tell()
  for key in keys:
    if key not in reader.dtypes:
      raise reader.fail(f"storage {key!r} is stored but never referenced (corrupt file?)")
    head = f.read(8)
    if len(head) < 8:
      raise reader.fail("truncated legacy torch checkpoint (storage header)")
    (numel,) = struct.unpack("<q", head)
    itemsize = reader.np_dtype(reader.dtypes[key]).itemsize
    nbytes = numel * itemsize
    remaining -= 8
    if numel < 0 or nbytes > remaining:
      raise reader.fail(f"truncated legacy torch checkpoint: storage {key!r} needs {nbytes} bytes, "
                        f"{remaining} left")
    reader.cache[key] = np.frombuffer(f.read(nbytes), dtype=reader.np_dtype(reader.dtypes[key]))
    remaining -= nbytes
  return reader.resolve(obj)


def _load_object(path: str) -> Any:
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: no such file")
  try:
    with open(path, "rb") as f:
      head = f.read(64)
      if not zipfile.is_zipfile(f):
        if _LEGACY_MAGIC not in head[:32]:
          raise _not_zip_error(path, head)
        f.seek(0)
        return _load_legacy(path, f)
    with zipfile.ZipFile(path) as zf:
      return _load_zip(path, zf)
  except CheckpointError:
    raise
  except OSError as e:
    raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
  except Exception as e:  # pylint: disable=broad-except  (untrusted bytes: any decode failure is "corrupt")
    raise CheckpointError(f"{path}: corrupt torch checkpoint ({type(e).__name__}: {e})") from None


def _flatten_state_dict(path: str, obj: Any, key: str | None) -> dict[str, np.ndarray]:
  if key is not None:
    if not isinstance(obj, Mapping) or key not in obj:
      keys = sorted(map(str, obj)) if isinstance(obj, Mapping) else []
      raise CheckpointError(f"{path}: no entry {key!r} at the top level (keys: {', '.join(keys[:10]) or 'none'})")
    obj = obj[key]
  elif isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
    obj = obj["state_dict"]
  if not isinstance(obj, Mapping):
    raise CheckpointError(f"{path}: expected a state dict (name -> tensor), found a pickled {type(obj).__name__}")
  bad = [str(k) for k, v in obj.items() if not isinstance(v, np.ndarray)]
  if bad:
    raise CheckpointError(f"{path}: expected a flat state dict (name -> tensor) but {len(bad)} entries are not "
                          f"tensors, e.g. {', '.join(map(repr, bad[:5]))}; pass key=... to pick the nested "
                          "state dict")
  return {str(k): v for k, v in obj.items()}


def load_torch_object(path: str | os.PathLike) -> Any:
  """The object a torch checkpoint file holds (dicts, lists, tuples, numbers, strings and tensors as numpy
  arrays), read by the same restricted unpickler as `load_torch_state_dict`."""
  return _load_object(os.fspath(path))


def load_torch_state_dict(path: str | os.PathLike, key: str | None = None) -> dict[str, np.ndarray]:
  """Loads a torch checkpoint's state dict as {name: C-contiguous np.ndarray}, without torch.

  Reads the zip format (torch >= 1.6) and the older magic-number format (torch 0.4-1.5, or
  `_use_new_zipfile_serialization=False`; what `torch.load(weights_only=True)` also still reads); the tar
  format of torch < 0.4 is refused with a hint. Accepts a plain state dict (diffusers `.bin`, pytorch-fid
  `.pth`), or a dict holding one under 'state_dict' (or under `key`, if given). bfloat16 tensors come back as
  float32; other dtypes as stored. Raises CheckpointError for refused pickle globals and corrupt files.
  """
  path = os.fspath(path)
  return _flatten_state_dict(path, _load_object(path), key)
