"""Int8 inference (`quantize_int8`): the function torch.ao's FX quantization computes, torchvision's
quantized module tree and keys, and clear refusals."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.ao.quantization import QConfigMapping
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

import resnext
from resnext.errors import ConfigError
from resnext.speed.int8 import int8_template, qconfig, quantize_int8, quantized_engine

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _fx_reference(model: nn.Module, calibration: torch.Tensor, observer: str) -> nn.Module:
    """torch.ao's graph-mode quantization of the float model: its own tracing, fusion and
    observer placement, with the same observers."""
    with quantized_engine("auto"):
        prepared = prepare_fx(
            copy.deepcopy(model), QConfigMapping().set_global(qconfig(observer)), (calibration,)
        )
        with torch.no_grad():
            prepared(calibration)
        return convert_fx(prepared)


@pytest.mark.parametrize(
    ("name", "size"), [("resnext_tiny_in", 64), ("resnext29_4x16d", 32)], ids=["imagenet", "cifar"]
)
def test_int8_computes_what_torch_ao_graph_quantization_computes(
    name: str, size: int, randomize_bn: Callable[[nn.Module], None]
) -> None:
    torch.manual_seed(3)
    model = resnext.create_model(name).eval()
    randomize_bn(model)
    calibration, x = torch.randn(8, 3, size, size), torch.randn(4, 3, size, size)
    ours = quantize_int8(model, [calibration], observer="minmax")
    fx = _fx_reference(model, calibration, "minmax")
    with torch.no_grad():
        want, got, reference = model(x), ours(x), fx(x)
    if name == "resnext_tiny_in":
        # the same fusion, observers and int8 ops: the same numbers, up to float rounding after
        assert _rel(got, reference) < 1e-5
    # FX places a few observers otherwise in the CIFAR network: as close to it as it is to float
    assert _rel(got, reference) <= 2 * _rel(reference, want)
    assert _rel(got, want) < 0.1  # 7-bit activations over ~10 layers
    assert got.dtype == torch.float32 and not got.is_quantized


def _expected_torchvision_keys(depths: tuple[int, ...]) -> set[str]:
    """The keys of torchvision's quantized ResNet (its QuantizableResNet and QuantizableBottleneck
    after fuse_model and torch.ao's convert) for these stage depths, from its module names."""
    conv = ("weight", "bias", "scale", "zero_point")
    keys = {"quant.scale", "quant.zero_point"} | {f"conv1.{p}" for p in conv}
    for k, depth in enumerate(depths, start=1):
        for i in range(depth):
            block = f"layer{k}.{i}"
            for layer in ("conv1", "conv2", "conv3") + (("downsample.0",) if i == 0 else ()):
                keys |= {f"{block}.{layer}.{p}" for p in conv}
            keys |= {f"{block}.skip_add_relu.scale", f"{block}.skip_add_relu.zero_point"}
    return keys | {
        "fc.scale",
        "fc.zero_point",
        "fc._packed_params.dtype",
        "fc._packed_params._packed_params",
    }


def test_state_dict_keys_are_torchvisions_quantized_keys() -> None:
    spec = resnext.ModelSpec(depths=(2, 1, 1, 1), cardinality=4, base_width=4, num_classes=7)
    net = int8_template(resnext.build_model(spec))
    state = net.state_dict()
    assert set(state) == _expected_torchvision_keys(spec.depths)
    assert state["layer1.0.conv2.weight"].is_quantized
    assert state["layer1.0.conv2.weight"].qscheme() == torch.per_channel_affine
    assert state["fc._packed_params._packed_params"][0].shape == (7, spec.stage_out_widths[-1])


def test_the_float_model_is_left_as_it_was_and_the_engine_restored(
    randomize_bn: Callable[[nn.Module], None],
) -> None:
    model = resnext.create_model("resnext_tiny_in").train()
    randomize_bn(model)
    before = copy.deepcopy(model.state_dict())
    engine = torch.backends.quantized.engine
    quantize_int8(model, torch.randn(2, 3, 32, 32), engine="onednn")
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.backends.quantized.engine == engine


def test_logit_scale_and_a_headless_model() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    spec = resnext.get_spec("resnext_tiny_in")
    scaled = resnext.build_model(spec.replace(logit_scale=4.0)).eval()
    plain = resnext.build_model(spec).eval()
    plain.load_state_dict(scaled.state_dict())
    a = quantize_int8(scaled, [x], observer="minmax")
    b = quantize_int8(plain, [x], observer="minmax")
    with torch.no_grad():
        assert torch.allclose(a(x), 4.0 * b(x))
    plain.reset_classifier(0)
    with torch.no_grad():
        pooled = quantize_int8(plain, [x])(x)
    assert pooled.shape == (2, plain.num_features)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"se_reduction": 4}, "se_reduction"),
        ({"preact": True}, "preact"),
        ({"stem": "deep"}, "stem"),
        ({"block_form": "a"}, "block_form"),
    ],
)
def test_networks_it_does_not_take_are_refused_by_field(
    overrides: dict[str, object], field: str
) -> None:
    spec = resnext.get_spec("resnext_tiny_in").replace(**overrides)
    # a ConfigError, which the command line reports in one line (it showed a plain ValueError's
    # traceback), still a ValueError
    with pytest.raises(ConfigError, match=f"^{field}: int8 quantization takes"):
        quantize_int8(resnext.build_model(spec), [torch.randn(1, 3, 32, 32)])


def test_bad_calibration_engine_and_observer_are_named() -> None:
    model = resnext.create_model("resnext_tiny_in")
    with pytest.raises(ValueError, match="calibration: expected at least one batch"):
        quantize_int8(model, [])
    with pytest.raises(ValueError, match=r"calibration\[1\]: expected a float \(N, 3, H, W\)"):
        quantize_int8(model, [torch.randn(1, 3, 32, 32), torch.randn(1, 1, 32, 32)])
    with pytest.raises(ValueError, match=r"calibration\[0\]: .*got a torch.int64 tensor"):
        quantize_int8(model, [torch.zeros(1, 3, 32, 32, dtype=torch.long)])
    with pytest.raises(ValueError, match="engine: int8 quantization takes one of"):
        quantize_int8(model, [torch.randn(1, 3, 32, 32)], engine="tpu")
    with pytest.raises(ValueError, match="observer: int8 quantization takes one of"):
        quantize_int8(model, [torch.randn(1, 3, 32, 32)], observer="mean")
    with pytest.raises(ValueError, match="model: int8 quantization takes a float32 model"):
        quantize_int8(model.to(torch.bfloat16), [torch.randn(1, 3, 32, 32)])
    model.float()
    for calibration in (None, 5):  # were "'NoneType' object is not iterable"
        with pytest.raises(ConfigError, match=r"^calibration: expected float \(N, C, H, W\)"):
            quantize_int8(model, calibration)
    with pytest.raises(ConfigError, match=r"calibration\[0\]: expected a float"):
        quantize_int8(model, [None])


def test_the_command_refuses_a_network_or_an_output_folder_before_calibrating(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # a network it cannot quantize and a missing output folder ended in tracebacks, the second
    # after the calibration; the calibration images are not even read now
    from resnext.cli import main
    from resnext.commands import quantize_cmd

    def read(*args: object, **kwargs: object) -> None:
        raise AssertionError("the calibration images were read")

    monkeypatch.setattr(quantize_cmd, "preprocessed_images", read)
    missing = tmp_path / "no-such-folder" / "int8.pth"
    cases = [
        ("resnext29_8x64d_preact", tmp_path / "int8.pth", r"preact: int8 quantization takes"),
        ("resnext_tiny_in", missing, rf"--output {missing}: folder \S+ does not exist"),
        ("resnext_tiny_in", tmp_path, r"--output: expected a \.pth or \.pt file"),
    ]
    (tmp_path / "a-folder.pth").mkdir()
    cases.append(("resnext_tiny_in", tmp_path / "a-folder.pth", r"is a folder, expected a file"))
    for name, output, message in cases:
        argv = ["quantize", name, "--calibration", str(tmp_path), "--output", str(output)]
        assert main(argv) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()[-1:]
        assert re.fullmatch(rf"resnext quantize: error: .*{message}.*", line), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-folder.pth"]


def test_the_inference_benchmark_builds_its_int8_variant_on_a_batch_of_its_own() -> None:
    from resnext.speed.infer_bench import build_runner

    torch.manual_seed(0)
    model = resnext.create_model("resnext_tiny_in").eval()
    x = torch.randn(2, 3, 32, 32)
    fn, _ = build_runner("eager-int8", model, x)
    engine, _ = build_runner("eager-engine-int8", model, x)
    with torch.no_grad():
        got, want = fn(x), model(x)
    assert isinstance(fn, nn.Module) and any(
        m.__class__.__module__.startswith("torch.ao.nn.quantized") for m in fn.modules()
    )
    assert _rel(got, want) < 0.1
    # the peer variant: every grouped 3×3 on torch's engine, none on our kernel
    assert all(b.kernels for s in fn.stage_names for b in getattr(fn, s))
    assert not any(b.kernels for s in engine.stage_names for b in getattr(engine, s))


def test_auto_engine_is_onednn_where_torch_has_it_else_x86() -> None:
    from resnext.speed.int8 import resolve_engine

    assert resolve_engine("auto", ["none", "x86", "onednn"]) == "onednn"
    assert resolve_engine("auto", ["none", "x86", "fbgemm"]) == "x86"
    assert resolve_engine("fbgemm", ["none", "x86", "onednn"]) == "fbgemm"  # asked: as asked
    assert resolve_engine("auto") in torch.backends.quantized.supported_engines


@pytest.mark.parametrize("bits", [7, 8])
def test_activations_spread_over_the_bits_asked(bits: int, monkeypatch: pytest.MonkeyPatch) -> None:
    from resnext.speed import int8

    monkeypatch.setattr(int8, "cpu_flags", lambda: {"avx512f", "avx512_vnni"})
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    net = quantize_int8(
        resnext.create_model("resnext_tiny_in"), [x], observer="minmax", activation_bits=bits
    )
    # min-max puts the calibration input's extremes on the ends of the range
    codes = net.quant(x.contiguous(memory_format=torch.channels_last)).int_repr()
    assert (codes.min().item(), codes.max().item()) == (0, 2**bits - 1)


def test_eight_bit_activations_are_refused_without_vnni(monkeypatch: pytest.MonkeyPatch) -> None:
    from resnext.speed import int8

    monkeypatch.setattr(int8, "cpu_flags", lambda: {"avx2", "fma"})
    with pytest.raises(ValueError, match="activation_bits: 8 needs a CPU that sums"):
        quantize_int8(
            resnext.create_model("resnext_tiny_in"), [torch.randn(1, 3, 32, 32)], activation_bits=8
        )


def test_the_uniform_interface_gives_forwards_numbers(
    randomize_bn: Callable[[nn.Module], None],
) -> None:
    torch.manual_seed(1)
    model = resnext.create_model("resnext_tiny_in").eval()
    randomize_bn(model)
    net = quantize_int8(model, [torch.randn(4, 3, 32, 32)])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        maps, logits = net.forward_stages(x), net(x)
        # the dequantized map is exactly representable on the last block's scale
        assert torch.equal(net.forward_head(net.forward_features(x)), logits)
        pooled = net.forward_head(maps[-1], pre_logits=True)
    want = [m.shape for m in model.forward_stages(x)]
    assert [m.shape for m in maps] == want and not maps[-1].is_quantized
    assert torch.allclose(pooled, maps[-1].mean((2, 3)))


def _quantizable_50_layer_or_smaller() -> list[str]:
    """The registry's networks `quantize_int8` takes, up to 50 layers and 30 M parameters (the
    deeper and wider ones repeat their blocks); the rest are refused by field above."""
    names = []
    for name in resnext.list_models():
        spec = resnext.get_spec(name)
        plain = not (spec.preact or spec.se_reduction or spec.stem == "deep")
        small = sum(spec.depths) <= 16 and resnext.count(spec).params <= 30_000_000
        if plain and spec.block_form == "c" and small:
            names.append(name)
    return names


@pytest.mark.parametrize("name", _quantizable_50_layer_or_smaller())
def test_every_small_registry_network_it_takes_stays_near_its_float_function(
    name: str, randomize_bn: Callable[[nn.Module], None]
) -> None:
    model = resnext.create_model(name).eval()
    randomize_bn(model)
    x = torch.randn(2, 3, 32, 32)
    net = quantize_int8(model, [torch.randn(2, 3, 32, 32)], observer="minmax")
    with torch.no_grad():
        # a wrong fold, block or requantization is off by the output's own size
        assert _rel(net(x), model(x)) < 0.15


def test_the_inference_benchmark_records_which_int8_grouped_layers_ran_on_our_kernel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from resnext.speed import autotune, grouped_int8
    from resnext.speed.infer_bench import InferConfig, run_infer_bench

    if grouped_int8.unavailable_reason() is not None:
        pytest.skip(
            f"our int8 grouped kernel does not run here: {grouped_int8.unavailable_reason()}"
        )
    monkeypatch.setattr(autotune, "CHOOSER", autotune.Chooser())
    config = InferConfig(
        models=("resnext_tiny_in",), variants=("eager-int8",), batch=2, image_size=32, rounds=1
    )
    result = run_infer_bench(config, log=lambda line: None)
    choices = result["autotune"]
    assert choices and {c["op"] for c in choices} == {"grouped3x3.int8"}
    assert all(
        c["winner"] in ("engine", "ours") and set(c["ms"]) == {"engine", "ours"} for c in choices
    )
