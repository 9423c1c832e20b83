"""The restricted Torch7 reader on the real sample file, and a ResNeXt written in Lua's layout.

`_T7Writer` is a test-only serialiser of the `torch.save` binary format (type tags, reference
indices, 'V 1' class headers, tensors over storages), used to build fb.resnet.torch-shaped networks.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import resnext
from resnext.errors import WeightsError
from resnext.weights import build_with_weights, read_weights_file
from resnext.weights.errors import UnsafeWeightsError
from resnext.weights.t7 import TorchObject, load_t7

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


class Mod:
    """A Lua object of class `name` with a table of fields."""

    def __init__(self, name: str, **fields: Any) -> None:
        self.name, self.fields = name, fields


class _T7Writer:
    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.index: dict[int, int] = {}
        self.keep: list[object] = []

    def i32(self, v: int) -> None:
        self.buf.write(struct.pack("<i", v))

    def i64(self, v: int) -> None:
        self.buf.write(struct.pack("<q", v))

    def string(self, s: str) -> None:
        data = s.encode()
        self.i32(len(data))
        self.buf.write(data)

    def _ref(self, obj: object) -> bool:
        """Write the reference index; True when the object was written before."""
        key = id(obj)
        seen = key in self.index
        if not seen:
            self.index[key] = len(self.index) + 1
            self.keep.append(obj)
        self.i32(self.index[key])
        return seen

    def obj(self, value: Any) -> None:
        if value is None:
            self.i32(0)
        elif isinstance(value, bool):
            self.i32(5)
            self.i32(int(value))
        elif isinstance(value, (int, float)):
            self.i32(1)
            self.buf.write(struct.pack("<d", float(value)))
        elif isinstance(value, str):
            self.i32(2)
            self.string(value)
        elif isinstance(value, dict):
            self.i32(3)
            if not self._ref(value):
                self.i32(len(value))
                for k, v in value.items():
                    self.obj(k)
                    self.obj(v)
        elif isinstance(value, list):  # a Lua array: keys 1..n
            self.obj({i + 1: v for i, v in enumerate(value)})
        elif isinstance(value, np.ndarray):
            self.tensor(value)
        elif isinstance(value, Mod):
            self.i32(4)
            if not self._ref(value):
                self.string("V 1")
                self.string(value.name)
                self.obj(value.fields)
        else:
            raise TypeError(type(value))

    def tensor(self, array: np.ndarray) -> None:
        kind = {np.float32: "Float", np.float64: "Double", np.int64: "Long"}[array.dtype.type]
        self.i32(4)
        if self._ref(array):
            return
        self.string("V 1")
        self.string(f"torch.{kind}Tensor")
        self.i32(array.ndim)
        for s in array.shape:
            self.i64(s)
        for s in array.strides:
            self.i64(s // array.itemsize)
        self.i64(1)
        storage = np.ascontiguousarray(array).reshape(-1)
        self.i32(4)
        self._ref(storage)
        self.string("V 1")
        self.string(f"torch.{kind}Storage")
        self.i64(storage.size)
        self.buf.write(storage.astype(storage.dtype.newbyteorder("<")).tobytes())


def write_t7(path: Path, value: Any) -> None:
    writer = _T7Writer()
    writer.obj(value)
    path.write_bytes(writer.buf.getvalue())


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().astype(np.float32).copy()


def _conv(
    conv: torch.nn.Conv2d, cudnn: bool, bias: np.ndarray | None = None, flat: bool = False
) -> Mod:
    w = _np(conv.weight)
    return Mod(
        "cudnn.SpatialConvolution" if cudnn else "nn.SpatialConvolution",
        weight=w.reshape(w.shape[0], -1) if flat else w,  # early nn stored 2-D conv weights
        bias=bias,
        nInputPlane=conv.in_channels,
        nOutputPlane=conv.out_channels,
        kW=conv.kernel_size[1], kH=conv.kernel_size[0],
        dW=conv.stride[1], dH=conv.stride[0],
        padW=conv.padding[1], padH=conv.padding[0],
        groups=conv.groups,
        gradWeight=np.zeros_like(w),
        train=False,
    )  # fmt: skip


def _bn(bn: torch.nn.BatchNorm2d, mean_shift: np.ndarray | None = None) -> Mod:
    mean = _np(bn.running_mean) + (mean_shift if mean_shift is not None else 0)
    return Mod(
        "nn.SpatialBatchNormalization",
        weight=_np(bn.weight), bias=_np(bn.bias), running_mean=mean.astype(np.float32),
        running_var=_np(bn.running_var), eps=bn.eps, momentum=0.1, affine=True,
    )  # fmt: skip


def lua_network(model: torch.nn.Module) -> Mod:
    """The fb.resnet.torch layout of `model` (stem conv with a bias folded out of bn1)."""
    stem_bias = np.random.default_rng(0).normal(size=model.conv1.out_channels).astype(np.float32)
    relu = Mod("cudnn.ReLU", inplace=True)
    top: list[Any] = [
        _conv(model.conv1, cudnn=False, bias=stem_bias, flat=True),
        _bn(model.bn1, mean_shift=stem_bias),  # BN(conv + b) with mean + b equals our network
        relu,
        Mod("cudnn.SpatialMaxPooling", kW=3, kH=3, dW=2, dH=2),
    ]
    for stage in model.stages():
        blocks = []
        for block in stage:
            residual = Mod("nn.Sequential", modules=[
                _conv(block.conv1, True), _bn(block.bn1), relu,
                _conv(block.conv2, True), _bn(block.bn2), relu,
                _conv(block.conv3, True), _bn(block.bn3),
            ])  # fmt: skip
            if block.downsample is None:
                shortcut = Mod("nn.Identity")
            else:
                shortcut = Mod("nn.Sequential", modules=[
                    _conv(block.downsample[0], True), _bn(block.downsample[1])])  # fmt: skip
            concat = Mod("nn.ConcatTable", modules=[residual, shortcut])
            blocks.append(Mod("nn.Sequential", modules=[concat, Mod("nn.CAddTable"), relu]))
        top.append(Mod("nn.Sequential", modules=blocks))
    top += [
        Mod("cudnn.SpatialAveragePooling", kW=1, kH=1),
        Mod("nn.View", size=np.array([model.num_features], dtype=np.int64)),
        Mod("nn.Linear", weight=_np(model.fc.weight), bias=_np(model.fc.bias)),
    ]
    return Mod("nn.Sequential", modules=top, train=False, _type="torch.FloatTensor")


def random_model(**overrides: Any) -> torch.nn.Module:
    model = resnext.create_model("resnext_tiny_in", **overrides)
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if value.is_floating_point():
                value.copy_(torch.randn_like(value) * 0.5)
                if key.endswith("running_var"):
                    value.abs_().add_(0.5)
    return model.eval()


# ---- the real file --------------------------------------------------------------------------
def test_reads_real_torch7_file(t7_sample: Path) -> None:
    root = load_t7(t7_sample / "linear_2x10.t7")
    assert isinstance(root, TorchObject) and root.torch_typename == "nn.Sequential"
    linear = root.get("modules")[1]
    assert linear.torch_typename == "nn.Linear"
    weight, bias = linear.get("weight"), linear.get("bias")
    assert weight.shape == (2, 10) and weight.dtype == np.float64
    np.testing.assert_allclose(weight[0, :3], [0.13874006, 0.22636552, 0.02741558], atol=1e-8)
    np.testing.assert_allclose(bias, [-0.00744641, -0.19135825], atol=1e-8)


def _same(ours: Any, theirs: Any, where: str = "root") -> None:
    """Our reader's tree equals torchfile's (which uses bytes keys, lists and its own objects)."""
    if isinstance(ours, TorchObject):
        assert theirs._typename.decode() == ours.torch_typename, where
        _same(ours.fields, dict(theirs._obj), where)
    elif isinstance(ours, dict):
        if isinstance(theirs, list):
            theirs = {i + 1: v for i, v in enumerate(theirs)}
        norm = {(k.decode() if isinstance(k, bytes) else k): v for k, v in theirs.items()}
        assert set(ours) == set(norm), where
        for k in ours:
            _same(ours[k], norm[k], f"{where}.{k}")
    elif isinstance(ours, np.ndarray):
        if ours.size:  # empty scratch tensors (output, gradInput) have no shape to compare
            np.testing.assert_array_equal(
                ours, np.asarray(theirs).reshape(ours.shape), err_msg=where
            )
    elif isinstance(ours, str):
        assert (theirs.decode() if isinstance(theirs, bytes) else theirs) == ours, where
    else:
        assert ours == theirs, where


def test_reader_agrees_with_torchfile_on_real_file(t7_sample: Path) -> None:
    torchfile = pytest.importorskip(
        "torchfile", reason="independent reference reader (pip install torchfile)"
    )
    path = t7_sample / "linear_2x10.t7"
    _same(load_t7(path), torchfile.load(str(path)))


# ---- written ResNeXt networks ---------------------------------------------------------------
@pytest.mark.parametrize("stride_in_1x1", [False, True])
def test_written_resnext_loads_to_identical_outputs(tmp_path: Path, stride_in_1x1: bool) -> None:
    src = random_model(depths=(2, 1, 1, 1), stride_in_1x1=stride_in_1x1)
    path = tmp_path / "resnext.t7"
    write_t7(path, lua_network(src))
    loaded = read_weights_file(path)
    assert loaded.source_format == "lua_t7"
    assert loaded.spec_overrides["stride_in_1x1"] is stride_in_1x1
    model = build_with_weights("resnext_tiny_in", loaded, depths=(2, 1, 1, 1))
    with torch.no_grad():
        got, want = model.eval()(X), src(X)
    # The stem bias is folded in float32 (mean + b, then - b): allow float32 rounding at output scale.
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_reader_agrees_with_torchfile_on_written_network(tmp_path: Path) -> None:
    torchfile = pytest.importorskip(
        "torchfile", reason="independent reference reader (pip install torchfile)"
    )
    path = tmp_path / "net.t7"
    write_t7(path, lua_network(random_model()))
    _same(load_t7(path), torchfile.load(str(path)))


def test_shared_references_resolve_to_one_object(tmp_path: Path) -> None:
    shared = np.arange(6, dtype=np.float32).reshape(2, 3)
    table = {"a": shared, "b": shared, "t": {1: "x"}}
    table["self"] = table  # a cycle, as nn modules' parent links make
    path = tmp_path / "shared.t7"
    write_t7(path, table)
    root = load_t7(path)
    assert root["a"] is root["b"] and root["self"] is root
    np.testing.assert_array_equal(root["a"], shared)


def test_lua_function_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "fn.t7"
    # A table whose value has type tag 6 (FUNCTION: dumped Lua bytecode follows).
    body = struct.pack("<iii", 3, 1, 1) + struct.pack("<i", 2) + struct.pack("<i", 1) + b"f"
    body += struct.pack("<i", 6) + struct.pack("<i", 4) + b"\x1bLua"
    path.write_bytes(body)
    with pytest.raises(UnsafeWeightsError, match="Lua function"):
        load_t7(path)


def test_truncated_and_foreign_files_give_one_error(tmp_path: Path) -> None:
    path = tmp_path / "net.t7"
    write_t7(path, lua_network(random_model()))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="truncated"):
        read_weights_file(path)
    other = tmp_path / "other.t7"
    write_t7(other, Mod("nn.Sequential", modules=[Mod("nn.Tanh")]))
    with pytest.raises(WeightsError, match=r"unexpected nn\.Tanh"):
        read_weights_file(other)


def _tensor_header(
    w: _T7Writer, index: int, sizes: list[int], strides: list[int], offset: int
) -> None:
    """A torch.FloatTensor header up to (not including) its storage reference."""
    w.i32(4)
    w.i32(index)
    w.string("V 1")
    w.string("torch.FloatTensor")
    w.i32(len(sizes))
    for s in sizes:
        w.i64(s)
    for s in strides:
        w.i64(s)
    w.i64(offset + 1)  # Lua's 1-based offset


def test_tensor_whose_storage_is_an_earlier_tensor_is_refused(tmp_path: Path) -> None:
    # {1: A (a 100x100 tensor over a 10,000-element storage), 2: B whose "storage" is the
    # reference to tensor A (index 1), viewing 9,900 elements from offset 99. Read as rows of A,
    # B would reach 99 rows past A's memory; a storage is flat, so this file is corrupt.
    w = _T7Writer()
    w.i32(3)
    w.i32(100)  # the table's index; the writer numbers A 1 and its storage 2
    w.i32(2)
    w.obj(1)
    w.obj(np.ones((100, 100), dtype=np.float32))
    w.obj(2)
    _tensor_header(w, 3, [9900], [1], 99)
    w.i32(4)
    w.i32(1)
    path = tmp_path / "oob.t7"
    path.write_bytes(w.buf.getvalue())
    with pytest.raises(WeightsError, match=r"must be a torch\.\*Storage, found a tensor"):
        load_t7(path)


def _two_views(tmp_path: Path, sizes: list[int], strides: list[int], offset: int) -> Path:
    """{1: a 1-D tensor over a 10-element storage (index 2), 2: a tensor over that same storage}."""
    w = _T7Writer()
    w.i32(3)
    w.i32(100)
    w.i32(2)
    w.obj(1)
    w.obj(np.arange(10, dtype=np.float32))
    w.obj(2)
    _tensor_header(w, 3, sizes, strides, offset)
    w.i32(4)
    w.i32(2)
    path = tmp_path / "view.t7"
    path.write_bytes(w.buf.getvalue())
    return path


def test_tensor_views_of_a_shared_storage_are_bounds_checked(tmp_path: Path) -> None:
    # A 2x3 view at offset 4 with strides (3, 1) reads elements 4..9 of 0..9: it fits exactly.
    view = load_t7(_two_views(tmp_path, [2, 3], [3, 1], 4))[2]
    np.testing.assert_array_equal(view, [[4, 5, 6], [7, 8, 9]])
    # Offset 5 needs element 10 of a 10-element storage: one past the end.
    with pytest.raises(WeightsError, match="does not fit its storage of 10 elements"):
        load_t7(_two_views(tmp_path, [2, 3], [3, 1], 5))
    # Stride 0 repeats one element a million times: a copy far larger than the 40-byte storage
    # (a crafted file can ask for terabytes this way).
    with pytest.raises(WeightsError, match="does not fit its storage"):
        load_t7(_two_views(tmp_path, [10**6], [0], 0))


def test_deeply_nested_file_gives_one_error(tmp_path: Path) -> None:
    # 100,000 tables each holding the next: far past Python's recursion limit.
    w = _T7Writer()
    for k in range(100_000):
        w.i32(3)
        w.i32(k + 1)
        w.i32(1)
        w.obj(1)
    w.i32(0)
    path = tmp_path / "deep.t7"
    path.write_bytes(w.buf.getvalue())
    with pytest.raises(WeightsError, match="nested more than"):
        load_t7(path)
