"""Property-based fuzzing of model specs and config overrides: a valid result or the project's error."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rel_helpers import record

from resnext import ModelSpec, build_model
from resnext.config import Config, make_config
from resnext.errors import ConfigError, SpecError

EXAMPLES = 50
COUNTS = {"spec_valid": 0, "spec_refused": 0, "config_valid": 0, "config_refused": 0}

junk = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.integers(-3, 0),
    st.lists(st.integers(-2, 3), max_size=3),
)

# Values in range, small enough that every valid network builds and runs in milliseconds.
VALID = {
    "depths": st.lists(st.integers(1, 2), min_size=1, max_size=4).map(tuple),
    "cardinality": st.integers(1, 4),
    "base_width": st.integers(1, 4),
    "stem": st.sampled_from(["imagenet", "deep", "cifar"]),
    "stem_width": st.integers(1, 8),
    "out_width": st.integers(1, 16),
    "bottleneck_widths": st.one_of(st.none(), st.lists(st.integers(1, 8), max_size=4).map(tuple)),
    "stride_in_1x1": st.booleans(),
    "block_form": st.sampled_from(["a", "b", "c"]),
    "preact": st.booleans(),
    "residual": st.booleans(),
    "zero_init_last_bn": st.booleans(),
    "avg_down": st.booleans(),
    "se_reduction": st.integers(0, 4),
    "num_classes": st.integers(0, 5),
    "in_chans": st.integers(1, 4),
    "logit_scale": st.floats(0.01, 4.0),
    "drop_rate": st.floats(0.0, 0.9),
    "drop_path_rate": st.sampled_from([0.0, 0.0, 0.3]),  # needs residual=True when not 0
    "description": st.text(max_size=5),
}
assert set(VALID) == {f.name for f in dataclasses.fields(ModelSpec)}, "ModelSpec fields changed"


@st.composite
def spec_kwargs(draw: st.DrawFn) -> dict:
    """Every field in range, then up to two fields replaced by junk or dropped (defaults)."""
    kwargs = {name: draw(strategy) for name, strategy in VALID.items()}
    for name in draw(st.lists(st.sampled_from(sorted(VALID)), max_size=2, unique=True)):
        if draw(st.booleans()) and name != "depths":
            del kwargs[name]
        else:
            kwargs[name] = draw(junk)
    return kwargs


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(spec_kwargs())
def test_any_spec_is_a_working_model_or_a_spec_error(kwargs: dict) -> None:
    try:
        spec = ModelSpec(**kwargs)
    except SpecError as exc:
        assert str(exc)
        COUNTS["spec_refused"] += 1
        return
    model = build_model(spec).eval()
    with torch.no_grad():
        out = model(torch.randn(1, spec.in_chans, 16, 16))
    expected = spec.num_classes if spec.num_classes else model.num_features
    assert out.shape == (1, expected) and torch.isfinite(out).all()
    COUNTS["spec_valid"] += 1


def test_non_iterable_bottleneck_widths_is_a_spec_error() -> None:
    with pytest.raises(SpecError, match="bottleneck_widths"):
        ModelSpec(depths=(1,), bottleneck_widths=True)  # type: ignore[arg-type]


def _leaf_keys(cls: type = Config, prefix: str = "") -> list[str]:
    keys = []
    for name, tp in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(tp):
            keys += _leaf_keys(tp, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


CONFIG_KEYS = [*_leaf_keys(), "model.spec.cardinality", "model.spec.depths", "bogus", "train.x"]
TEXT_VALUES = st.one_of(
    st.sampled_from(
        [
            "0",
            "-1",
            "1",
            "3",
            "1e9",
            "nan",
            "inf",
            "-inf",
            "true",
            "no",
            "[1,2]",
            "[]",
            "{}",
            "",
            "none",
            "cpu",
            "cuda",
            "auto",
            "step",
            "cosine",
            "digits",
            "x.pt",
            "0.5",
            "2.5",
        ]
    ),
    st.integers(-5, 100).map(str),
    st.floats(allow_nan=True).map(repr),
    st.text(max_size=8),
)


@settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True)
@given(st.lists(st.tuples(st.sampled_from(CONFIG_KEYS), TEXT_VALUES), min_size=1, max_size=4))
def test_any_overrides_give_a_valid_config_or_a_config_error(pairs: list) -> None:
    base = {"model": {"name": "resnext_tiny"}, "output_dir": "/nonexistent/run"}
    overrides = [f"{k}={v}" for k, v in pairs]
    try:
        cfg = make_config(base, overrides)
    except ConfigError as exc:
        assert str(exc)
        COUNTS["config_refused"] += 1
        return
    assert isinstance(cfg, Config) and cfg.train.epochs > 0 and cfg.data.batch_size > 0
    COUNTS["config_valid"] += 1


def test_zz_report_fuzz_counts() -> None:
    """Runs after the two properties in this file (pytest keeps file order) to print their counts."""
    total = sum(COUNTS.values())
    record("fuzz_spec_and_config", total, **COUNTS)
    assert total == 0 or total >= EXAMPLES
