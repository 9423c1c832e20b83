"""`train.fused_bn`, `train.grouped_kernels`, `train.gemm_weight_grad` and `train.fast_maxpool` train
the same model as torch's own ops would."""

from __future__ import annotations

import functools
import json

import pytest
import torch

from resnext.speed import (
    autotune,
    bn_kernel,
    grouped_kernel,
    grouped_wgrad,
    maxpool,
    pointwise_fp16,
    pointwise_train,
)
from resnext.train import runner, train

BN_REASON = bn_kernel.unavailable_reason()
GROUPED_REASON = grouped_wgrad.unavailable_reason() or grouped_kernel.unavailable_reason()

# (config key, module whose kernel calls are counted, its functions, train.amp of both runs,
# the implementation pinned in the fast run, why it cannot run here). The 1×1 path is bf16 only:
# its own test is below.
CASES = [
    pytest.param(
        "fused_bn", bn_kernel, ("forward", "backward"), "none", (),
        marks=pytest.mark.skipif(BN_REASON is not None, reason=f"bn kernel: {BN_REASON}"),
        id="fused_bn",
    ),
    pytest.param(
        "grouped_kernels", grouped_wgrad, ("weight_grad",), "none", ("ours",),
        marks=pytest.mark.skipif(GROUPED_REASON is not None, reason=f"grouped: {GROUPED_REASON}"),
        id="grouped_kernels",
    ),
    pytest.param(
        "fast_maxpool", maxpool, ("forward", "backward"), "none", (),
        marks=pytest.mark.skipif(
            maxpool.unavailable_reason() is not None,
            reason=f"max-pool kernel: {maxpool.unavailable_reason()}",
        ),
        id="fast_maxpool",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("key", "module", "names", "amp", "pinned"), CASES)
def test_fast_kernel_run_follows_the_plain_run(
    key, module, names, amp, pinned, tmp_path, tiny_cfg, tiny_data, monkeypatch
) -> None:
    calls = dict.fromkeys(names, 0)
    for name in names:
        original = getattr(module, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    results = {}
    # The CIFAR-stem tiny model has no max pooling; its ImageNet-stem twin has the stem's.
    name = "resnext_tiny_in" if key == "fast_maxpool" else "resnext_tiny"
    for fast in (False, True):
        out = tmp_path / ("fast" if fast else "plain")
        cfg = tiny_cfg(
            out,
            # 4 and 8 channels per group in stages 1 and 2: the grouped kernels' shapes.
            model={"name": name, "spec": {"num_classes": 4, "cardinality": 4}},
            train={"epochs": 2, "channels_last": True, "amp": amp, key: fast},
        )
        # The kernels under test pinned: which implementation wins a shape is timing's choice
        # (tested in tests/speed), and a run must not depend on it to be compared.
        with autotune.CHOOSER.prefer(*pinned):
            results[fast] = train(cfg, train_set=tiny_data(64), val_set=tiny_data(40, seed=2))
        assert getattr(cfg.train, key) is fast
        if not fast:
            assert not any(calls.values())
    assert all(calls.values()), calls  # the fast run used the kernels
    plain, fast = results[False].final, results[True].final
    assert set(plain) == set(fast)
    for name, value in plain.items():
        if name.endswith("loss"):
            # Two epochs of float32 SGD from the same seed: rounding differences only.
            assert fast[name] == pytest.approx(value, rel=1e-3), name
    weights = {
        name: torch.load(tmp_path / name / "checkpoints" / "last.pt", weights_only=True)["model"]
        for name in ("plain", "fast")
    }
    assert list(weights["plain"]) == list(weights["fast"])
    for name, value in weights["plain"].items():
        if value.dtype.is_floating_point:
            torch.testing.assert_close(weights["fast"][name], value, rtol=1e-3, atol=1e-4)


def _tiny_run(
    tmp_path,
    tiny_cfg,
    tiny_data,
    folder: str,
    fast: bool,
    pinned: tuple[str, ...],
    fp16_products: bool = False,
):
    # bf16, but for the float32 reference and the float16 products (which replace float32 ones)
    amp = "none" if folder == "float32" or fp16_products else "bfloat16"
    train_keys = {"epochs": 2, "channels_last": True, "amp": amp, "gemm_weight_grad": fast}
    cfg = tiny_cfg(
        tmp_path / folder,
        model={"name": "resnext_tiny", "spec": {"num_classes": 4, "cardinality": 4}},
        train={**train_keys, "fp16_products": fp16_products},
    )
    with autotune.CHOOSER.prefer(*pinned):
        result = train(cfg, train_set=tiny_data(64), val_set=tiny_data(40, seed=2))
    model = torch.load(tmp_path / folder / "checkpoints" / "last.pt", weights_only=True)["model"]
    return result.final, model


def _distance(a: dict, b: dict) -> float:
    """‖a − b‖ / ‖b‖ over all trained parameters (running statistics left out)."""
    keys = [k for k, v in b.items() if v.dtype.is_floating_point and "running" not in k]
    num = sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in keys)
    return (num / sum(float((b[k].double() ** 2).sum()) for k in keys)) ** 0.5


def test_pointwise_path_run_follows_the_plain_run_in_bf16(
    tmp_path, tiny_cfg, tiny_data, monkeypatch
) -> None:
    calls = []
    original = pointwise_train.gemm_weight_grad
    monkeypatch.setattr(
        pointwise_train, "gemm_weight_grad", lambda *a: calls.append(1) or original(*a)
    )
    plain, plain_w = _tiny_run(tmp_path, tiny_cfg, tiny_data, "plain", False, ())
    assert not calls
    # Pinned to oneDNN, the fast path's autograd functions and the block fork must compute what
    # plain torch computes, bit for bit: the same kernels, the same roundings.
    same, same_w = _tiny_run(tmp_path, tiny_cfg, tiny_data, "onednn", True, ("onednn",))
    assert not calls
    for name, value in plain.items():
        if name.endswith(("loss", "err")):
            assert same[name] == value, name
    for key, value in plain_w.items():
        torch.testing.assert_close(same_w[key], value, rtol=0, atol=0, msg=key)
    # Pinned to the GEMMs: exact products that round differently in bf16 (the fork's addmm rounds
    # the summed input gradient once where oneDNN and autograd's add round twice), and 8 SGD steps
    # carry the differences on. The yardstick is bf16 itself: the GEMM run must be no further
    # from the float32 run than torch's own bf16 run is, and closer to that bf16 run than bf16 is
    # to float32 (measured: 0.008 vs 0.013, and 0.013 from float32 for both).
    gemm, gemm_w = _tiny_run(tmp_path, tiny_cfg, tiny_data, "gemm", True, ("gemm",))
    assert calls
    _, fp32_w = _tiny_run(tmp_path, tiny_cfg, tiny_data, "float32", False, ())
    bf16_drift = _distance(plain_w, fp32_w)
    assert _distance(gemm_w, fp32_w) <= 1.25 * bf16_drift
    assert _distance(gemm_w, plain_w) <= bf16_drift
    for name, value in plain.items():
        if name.endswith("loss"):
            assert gemm[name] == pytest.approx(value, rel=3e-2), name


def test_a_fast_run_records_what_the_chooser_picked(tmp_path, tiny_cfg, tiny_data, monkeypatch):
    monkeypatch.setattr(autotune, "CHOOSER", autotune.Chooser())
    cfg = tiny_cfg(
        tmp_path / "run",
        model={"name": "resnext_tiny", "spec": {"num_classes": 4, "cardinality": 4}},
        train={"epochs": 1, "channels_last": True, "amp": "bfloat16", "gemm_weight_grad": True},
    )
    result = train(cfg, train_set=tiny_data(32), val_set=tiny_data(8, seed=2))
    choices = json.loads((result.run_dir / "fast_path_choices.json").read_text())
    ops = {c["op"] for c in choices}
    # The weight gradient always has two candidates (oneDNN, the GEMM); the forward and input
    # gradient have ours too where the CPU and the channel counts allow it.
    assert "conv1x1.weight_grad" in ops
    assert ops <= {
        "conv1x1.forward",
        "conv1x1.input_grad",
        "conv1x1.input_grad+shortcut",
        "conv1x1.weight_grad",
    }
    for choice in choices:
        assert choice["winner"] in choice["ms"] and "onednn" in choice["ms"]


@pytest.mark.parametrize("keep", [True, False])
def test_a_fast_run_keeps_its_timings_for_the_next(
    tmp_path, tiny_cfg, tiny_data, monkeypatch, keep
):
    from resnext.speed.timing_cache import default_folder

    def run(name: str) -> list[dict]:
        monkeypatch.setattr(autotune, "CHOOSER", autotune.Chooser())  # a new process's chooser
        cfg = tiny_cfg(
            tmp_path / name,
            model={"name": "resnext_tiny", "spec": {"num_classes": 4, "cardinality": 4}},
            train={
                "epochs": 1,
                "channels_last": True,
                "amp": "bfloat16",
                "gemm_weight_grad": True,
                "timing_cache": keep,
            },
        )
        result = train(cfg, train_set=tiny_data(32), val_set=tiny_data(8, seed=2))
        return json.loads((result.run_dir / "fast_path_choices.json").read_text())

    first = run("first")
    kept = list(default_folder().glob("*.json"))  # the test's own folder (conftest)
    assert bool(kept) == keep
    second = run("second")
    same = [(c["op"], c["key"], c["winner"], c["ms"]) for c in first]
    # times equal to the last digit only when read back, not measured again
    assert ([(c["op"], c["key"], c["winner"], c["ms"]) for c in second] == same) == keep
    # the run folder says which choices were read rather than measured
    assert not any(c["stored"] for c in first)
    assert all(c["stored"] == keep for c in second)


@pytest.mark.skipif(
    pointwise_fp16.unavailable_reason() is not None,
    reason=f"fp16 kernel: {pointwise_fp16.unavailable_reason()}",
)
def test_float16_products_train_no_further_from_float32_than_bf16_does(
    tmp_path, tiny_cfg, tiny_data, monkeypatch
) -> None:
    calls = []
    for name in ("run", "weight_grad"):
        original = getattr(pointwise_fp16, name)
        monkeypatch.setattr(
            pointwise_fp16, name, lambda *a, _o=original, **k: calls.append(1) or _o(*a, **k)
        )

    run = functools.partial(_tiny_run, tmp_path, tiny_cfg, tiny_data)
    fp32, fp32_w = run("float32", False, ())
    _, bf16_w = run("bf16", False, ())
    assert not calls
    fp16, fp16_w = run("fp16", True, ("ours-fp16",), fp16_products=True)
    assert calls  # the float16 products ran
    assert _distance(fp16_w, fp32_w) <= _distance(bf16_w, fp32_w)
    for name, value in fp32.items():
        if name.endswith("loss"):
            assert fp16[name] == pytest.approx(value, rel=3e-2), name


def test_float16_products_say_so_when_the_run_is_not_float32(
    tmp_path, tiny_cfg, tiny_data, monkeypatch, capsys
) -> None:
    monkeypatch.setattr(runner, "resolve_amp", lambda amp, device: torch.bfloat16)  # auto → bf16
    cfg = tiny_cfg(
        tmp_path / "run",
        model={"name": "resnext_tiny", "spec": {"num_classes": 4, "cardinality": 4}},
        train={"epochs": 1, "channels_last": True, "gemm_weight_grad": True, "fp16_products": True},
    )
    train(cfg, train_set=tiny_data(16), val_set=tiny_data(8, seed=2))
    assert (
        "train.fp16_products: not used, this run computes in torch.bfloat16"
        in capsys.readouterr().out
    )


@pytest.mark.parametrize(
    ("gemm_weight_grad", "fp16_products", "noted"),
    [(True, False, True), (False, False, False), (True, True, False)],
)
def test_a_float32_run_on_the_1x1_fast_path_notes_float16_products_while_they_are_off(
    tmp_path, tiny_cfg, tiny_data, monkeypatch, capsys, gemm_weight_grad, fp16_products, noted
) -> None:
    monkeypatch.setattr(runner, "resolve_amp", lambda amp, device: None)  # auto → float32
    monkeypatch.setattr(pointwise_fp16, "unavailable_reason", lambda: None)  # as on any CPU
    # the kernel itself may be missing here: the note is what is checked, not the products
    monkeypatch.setattr(runner, "fp16_products_unused", lambda amp, device: None)
    monkeypatch.setattr(pointwise_train, "fp16_product_applies", lambda *a: False)
    cfg = tiny_cfg(
        tmp_path / "run",
        model={"name": "resnext_tiny", "spec": {"num_classes": 4, "cardinality": 4}},
        train={
            "epochs": 1,
            "channels_last": True,
            "gemm_weight_grad": gemm_weight_grad,
            "fp16_products": fp16_products,
        },
    )
    train(cfg, train_set=tiny_data(16), val_set=tiny_data(8, seed=2))
    assert ("train.fp16_products=true runs" in capsys.readouterr().out) is noted
