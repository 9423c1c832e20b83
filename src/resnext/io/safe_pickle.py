"""A restricted unpickler for data pickles (CIFAR batches, detectron2 weights): plain data only."""

from __future__ import annotations

import _codecs
import io
import pickle
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from resnext.errors import DataError, UnsafeFileError

try:  # numpy >= 2 moved the implementation to numpy._core; pickles name either module
    from numpy._core import multiarray as _multiarray
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]

# Element counts numpy itself writes as the placeholder shape of `_reconstruct` (always (0,)).
_MAX_PLACEHOLDER_ELEMENTS = 1


def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    # numpy pickles an array as _reconstruct(ndarray, (0,), b'b') + __setstate__(real data); a
    # hostile file could ask for a subclass or a huge placeholder, so only the plain form passes.
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError(f"array reconstruction of {subtype!r} is not allowed")
    if not isinstance(shape, tuple) or int(np.prod(shape)) > _MAX_PLACEHOLDER_ELEMENTS:
        raise pickle.UnpicklingError(f"array placeholder shape {shape!r} is not allowed")
    return _multiarray._reconstruct(np.ndarray, shape, dtype)


def _dtype(spec: Any, align: Any = False, copy: Any = False) -> np.dtype:
    if not isinstance(spec, (str, bytes)):
        raise pickle.UnpicklingError(f"dtype spec {spec!r} is not allowed")
    result = np.dtype(spec.decode("latin1") if isinstance(spec, bytes) else spec, align, copy)
    if result.hasobject:
        raise pickle.UnpicklingError("object arrays are not allowed")
    return result


def _scalar(dtype: Any, data: Any = None) -> Any:
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise pickle.UnpicklingError("object scalars are not allowed")
    return _multiarray.scalar(dtype, data)


def _frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    # Protocol-5 pickles of contiguous arrays: raw bytes + dtype + shape, nothing callable.
    if not isinstance(buffer, (bytes, bytearray, pickle.PickleBuffer)):
        raise pickle.UnpicklingError("array buffer of an unexpected type is not allowed")
    if not isinstance(dtype, np.dtype) or dtype.hasobject or order not in ("C", "F"):
        raise pickle.UnpicklingError("array buffer with object dtype is not allowed")
    return np.frombuffer(buffer, dtype=dtype).reshape(shape, order=order)


def _encode(text: Any, encoding: Any = "latin1") -> bytes:
    # Python 3 writes bytes in protocol-2 pickles as _codecs.encode(str, 'latin1').
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("only _codecs.encode(str, 'latin1') is allowed")
    return _codecs.encode(text, "latin1")


_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _dtype,
    ("_codecs", "encode"): _encode,
    # detectron2 model files written by Python 3 may hold OrderedDicts: a dict with nothing more.
    ("collections", "OrderedDict"): dict,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler whose only importable names are the numpy array builders above."""

    def __init__(self, stream: BinaryIO, what: str, encoding: str) -> None:
        super().__init__(stream, encoding=encoding)
        self._what = what

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafeFileError(
                f"{self._what}: refused: the pickle asks for the Python global {module}.{name}, "
                "which a data file never needs (it could run code). Nothing was executed."
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeFileError(f"{self._what}: refused: the pickle uses persistent ids ({pid!r})")


def _check_arrays(obj: Any, what: str) -> None:
    # Structured dtypes could gain object fields through dtype.__setstate__: check the result.
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, np.ndarray) and item.dtype.hasobject:
            raise UnsafeFileError(f"{what}: refused: the pickle holds an object array")
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)


def safe_load(
    source: BinaryIO | bytes | bytearray | str | Path, *, what: str, encoding: str = "latin1"
) -> Any:
    """Unpickle plain data (containers, numbers, strings, numpy arrays); refuse anything else.

    `what` names the file in error messages. `encoding` decodes Python-2 `str` objects; latin1
    (the default) keeps numpy's raw array bytes intact, as numpy requires for Python-2 pickles.
    """
    if isinstance(source, (str, Path)):
        try:
            with open(source, "rb") as f:
                return safe_load(f, what=what, encoding=encoding)
        except OSError as exc:
            raise DataError(f"{what}: cannot read {source}: {exc.strerror or exc}") from None
    stream = io.BytesIO(bytes(source)) if isinstance(source, (bytes, bytearray)) else source
    try:
        result = _RestrictedUnpickler(stream, what, encoding).load()
    except UnsafeFileError:
        raise
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "not allowed" in text:
            raise UnsafeFileError(f"{what}: refused: {text}. Nothing was executed.") from None
        raise DataError(f"{what}: not a readable pickle ({text})") from None
    except (EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{what}: corrupt or truncated pickle ({detail})") from None
    except MemoryError:
        raise DataError(f"{what}: the pickle asks for more memory than is available") from None
    _check_arrays(result, what)
    return result
