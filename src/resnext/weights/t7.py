"""A restricted reader of Lua Torch7's binary `torch.save` format: data only, nothing is executed.

Objects come back as plain Python: numbers, strings, booleans, dicts (Lua tables), numpy arrays
(torch.*Tensor / torch.*Storage) and `TorchObject` (any other class, e.g. nn.* modules, whose
fields are a dict). Functions (serialised Lua bytecode) are refused.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from resnext.errors import WeightsError
from resnext.weights.errors import UnsafeWeightsError

NIL, NUMBER, STRING, TABLE, TORCH, BOOLEAN, FUNCTION, LEGACY_RECUR_FUNCTION, RECUR_FUNCTION = range(
    9
)

_STORAGE_DTYPES = {
    "Double": np.float64,
    "Float": np.float32,
    "Half": np.float16,
    "Long": np.int64,
    "Int": np.int32,
    "Short": np.int16,
    "Char": np.int8,
    "Byte": np.uint8,
}
_MAX_STRING = 1 << 20
_MAX_DIMS = 16
# A saved ResNeXt nests a few dozen objects deep; the limit turns a crafted deep file into a
# WeightsError long before Python's own recursion limit.
_MAX_DEPTH = 200


@dataclass
class TorchObject:
    """An instance of a Torch7 class other than tensors/storages: its class name and fields."""

    torch_typename: str
    fields: dict[Any, Any] = field(default_factory=dict)

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)


def _storage_kind(name: str) -> tuple[str, str] | None:
    """('Tensor'|'Storage', element kind) for torch.FloatTensor, torch.CudaTensor, torch.CudaLongStorage ..."""
    for suffix in ("Tensor", "Storage"):
        prefix = "torch."
        if name.startswith(prefix) and name.endswith(suffix):
            kind = name[len(prefix) : -len(suffix)]
            if kind.startswith("Cuda"):
                # CudaTensor is float; CudaDoubleTensor etc. name their element type.
                kind = kind[len("Cuda") :] or "Float"
            if kind in _STORAGE_DTYPES:
                return suffix, kind
    return None


class T7Reader:
    """Reads one object graph from a binary Torch7 stream, resolving shared references by index."""

    def __init__(self, stream: BinaryIO, *, name: str = "<t7>", size: int | None = None) -> None:
        self.stream = stream
        self.name = name
        self.size = size
        self.memo: dict[int, Any] = {}
        # ids of the 1-D arrays read as torch.*Storage (the memo keeps them alive, so ids stay
        # unique): a tensor may only view one of these, never an earlier tensor.
        self._storages: set[int] = set()
        self._depth = 0

    # ---- primitives ---------------------------------------------------------------------------
    def _read(self, n: int) -> bytes:
        data = self.stream.read(n)
        if len(data) != n:
            raise WeightsError(f"{self.name}: truncated Torch7 file (needed {n} more bytes)")
        return data

    def _int(self) -> int:
        return struct.unpack("<i", self._read(4))[0]

    def _long(self) -> int:
        return struct.unpack("<q", self._read(8))[0]

    def _double(self) -> float:
        return struct.unpack("<d", self._read(8))[0]

    def _string(self) -> str:
        n = self._int()
        if not 0 <= n <= _MAX_STRING:
            raise WeightsError(f"{self.name}: implausible string length {n} (corrupt file)")
        return self._read(n).decode("latin-1")

    # ---- objects ------------------------------------------------------------------------------
    def read_object(self) -> Any:
        if self._depth >= _MAX_DEPTH:
            raise WeightsError(
                f"{self.name}: objects nested more than {_MAX_DEPTH} deep (corrupt file or "
                "not a network saved by Torch7's nn)"
            )
        self._depth += 1
        try:
            return self._read_object()
        finally:
            self._depth -= 1

    def _read_object(self) -> Any:
        tag = self._int()
        if tag == NIL:
            return None
        if tag == NUMBER:
            value = self._double()
            return int(value) if value.is_integer() and abs(value) < 2**53 else value
        if tag == STRING:
            return self._string()
        if tag == BOOLEAN:
            return self._int() == 1
        if tag in (FUNCTION, LEGACY_RECUR_FUNCTION, RECUR_FUNCTION):
            raise UnsafeWeightsError(
                f"{self.name}: contains a serialised Lua function (type tag {tag}); this reader "
                "loads data only and never runs code from a file"
            )
        if tag == TABLE:
            index = self._int()
            if index in self.memo:
                return self.memo[index]
            table: dict[Any, Any] = {}
            self.memo[index] = table
            count = self._int()
            if count < 0:
                raise WeightsError(f"{self.name}: negative table size {count} (corrupt file)")
            for _ in range(count):
                key = self.read_object()
                value = self.read_object()
                try:
                    table[key if not isinstance(key, dict) else id(key)] = value
                except TypeError:
                    # Lua tables may be keyed by any object; a ResNeXt file only uses numbers
                    # and strings, so an unhashable key (a tensor, a module) means corruption.
                    raise WeightsError(
                        f"{self.name}: table keyed by a {type(key).__name__} (corrupt file or "
                        "not a network saved by Torch7's nn)"
                    ) from None
            return table
        if tag == TORCH:
            index = self._int()
            if index in self.memo:
                return self.memo[index]
            return self._read_torch(index)
        raise WeightsError(
            f"{self.name}: unknown Torch7 type tag {tag} (corrupt or not a .t7 file)"
        )

    def _read_torch(self, index: int) -> Any:
        version_or_name = self._string()
        # Files written before versioning carry the class name directly.
        versioned = version_or_name.startswith("V ")
        class_name = self._string() if versioned else version_or_name
        kind = _storage_kind(class_name)
        if kind is None:
            obj = TorchObject(class_name)
            self.memo[index] = obj
            content = self.read_object()
            obj.fields = content if isinstance(content, dict) else {"_content": content}
            return obj
        what, elem = kind
        dtype = np.dtype(_STORAGE_DTYPES[elem]).newbyteorder("<")
        if what == "Storage":
            n = self._long()
            if n < 0 or (self.size is not None and n * dtype.itemsize > self.size):
                raise WeightsError(f"{self.name}: storage of {n} elements exceeds the file size")
            array = np.frombuffer(self._read(n * dtype.itemsize), dtype=dtype).copy()
            self.memo[index] = array
            self._storages.add(id(array))
            return array
        return self._read_tensor(index, dtype)

    def _read_tensor(self, index: int, dtype: np.dtype) -> np.ndarray:
        ndim = self._int()
        if not 0 <= ndim <= _MAX_DIMS:
            raise WeightsError(f"{self.name}: tensor with {ndim} dimensions (corrupt file)")
        sizes = [self._long() for _ in range(ndim)]
        strides = [self._long() for _ in range(ndim)]
        offset = self._long() - 1  # Lua is 1-based
        storage = self.read_object()
        if ndim == 0 or storage is None:
            array = np.zeros((0,), dtype=dtype)
        else:
            if not isinstance(storage, np.ndarray) or id(storage) not in self._storages:
                # Only a torch.*Storage is flat memory; anything else (an earlier tensor in
                # particular) would make the element counts below mean something else.
                got = "tensor" if isinstance(storage, np.ndarray) else type(storage).__name__
                raise WeightsError(
                    f"{self.name}: a tensor's storage must be a torch.*Storage, found a {got} "
                    "(corrupt file)"
                )
            if storage.dtype != dtype:
                raise WeightsError(
                    f"{self.name}: tensor of {dtype} over a storage of {storage.dtype} (corrupt file)"
                )
            numel = int(np.prod(sizes, dtype=object))
            last = offset + sum((s - 1) * st for s, st in zip(sizes, strides, strict=True))
            if (
                offset < 0
                or min(sizes) < 0
                or min(strides) < 0
                or (numel > 0 and last >= storage.size)
                or numel > storage.size
            ):
                # numel > storage.size: overlapping strides would let a tiny file ask for an
                # unbounded copy; a saved weight never overlaps itself.
                raise WeightsError(
                    f"{self.name}: tensor of size {sizes} / stride {strides} at offset {offset} "
                    f"does not fit its storage of {storage.size} elements"
                )
            if numel == 0:
                try:
                    array = np.zeros(tuple(sizes), dtype=dtype)
                except ValueError:  # e.g. size [0, 2**62]: numpy refuses the shape itself
                    raise WeightsError(
                        f"{self.name}: empty tensor of implausible size {sizes} (corrupt file)"
                    ) from None
            else:
                array = np.lib.stride_tricks.as_strided(
                    storage[offset:],
                    shape=tuple(sizes),
                    strides=tuple(s * storage.itemsize for s in strides),
                    writeable=False,
                ).copy()
        self.memo[index] = array
        return array


def load_t7(path: str | Path) -> Any:
    """The object stored in a binary Torch7 file (see module docstring for the Python types)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            return T7Reader(f, name=str(path), size=size).read_object()
    except OSError as exc:
        raise WeightsError(f"cannot read Torch7 file {path}: {exc}") from exc
