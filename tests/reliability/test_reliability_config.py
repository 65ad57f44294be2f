"""Property-based tests of the strict config parser: any key/value is either a valid Config or a ConfigError
naming the key, never another exception."""

from __future__ import annotations

import dataclasses
import math

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from directpred.config import Config, ConfigError, config_from_dict, load_config


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


KEYS = sorted(_flat(Config().to_dict()))
SECTIONS = sorted(Config().to_dict())
keys = st.one_of(
    st.sampled_from(KEYS),
    st.sampled_from(SECTIONS),
    st.sampled_from(KEYS).map(lambda k: k + "x"),
    st.sampled_from(KEYS).map(lambda k: k.upper()),
    st.text(min_size=0, max_size=12).filter(lambda k: "=" not in k),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(
        [
            "byol",
            "simsiam",
            "directpred",
            "directcopy",
            "linear",
            "mlp",
            "none",
            "folder",
            "cpu",
            "auto",
            "fp32",
            "bf16",
            "ema",
            "cumulative",
            "code",
            "paper",
            "cuda:0",
            "~nouser/x",
            "a\x00b",
        ]
    ),
)
values = st.one_of(scalars, st.lists(scalars, max_size=3), st.dictionaries(st.text(max_size=6), scalars, max_size=3))


def _check_valid(cfg: Config) -> None:
    """What every accepted Config satisfies: finite floats, and it survives a round trip through config.yaml."""
    for k, v in _flat(cfg.to_dict()).items():
        if isinstance(v, float):
            assert math.isfinite(v), k
    assert config_from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg
    assert dataclasses.asdict(cfg) == cfg.to_dict()


@settings(max_examples=300, deadline=None)
@given(pairs=st.lists(st.tuples(keys, values), min_size=1, max_size=3))
def test_override_values_give_a_config_or_a_config_error_naming_the_key(pairs):
    overrides = [
        f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}" for k, v in pairs
    ]
    try:
        cfg = load_config(None, overrides)
    except ConfigError as exc:
        msg = str(exc)
        assert any(k.strip().split(".")[0] in msg for k, _ in pairs) or "override" in msg, msg
    else:
        _check_valid(cfg)


@settings(max_examples=300, deadline=None)
@given(pairs=st.lists(st.tuples(keys, st.text(max_size=16)), min_size=1, max_size=3))
def test_raw_override_text_never_crashes(pairs):
    try:
        cfg = load_config(None, [f"{k}={text}" for k, text in pairs])
    except ConfigError as exc:
        assert str(exc)
    else:
        _check_valid(cfg)


@settings(max_examples=200, deadline=None)
@given(
    tree=st.dictionaries(
        st.one_of(st.sampled_from(SECTIONS), st.text(max_size=8), st.integers()),
        st.one_of(
            values,
            st.dictionaries(
                st.one_of(st.sampled_from(KEYS).map(lambda k: k.split(".", 1)[1]), st.text(max_size=8)),
                values,
                max_size=3,
            ),
        ),
        max_size=3,
    )
)
def test_yaml_mappings_give_a_config_or_a_config_error(tree, tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(yaml.safe_dump(tree))
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        assert str(exc)
    else:
        _check_valid(cfg)


def test_examples_found_by_the_properties():
    """Regression cases behind the properties: each was accepted (or raised a bare ValueError) before the fix."""
    for override, needle in [
        ("predictor.eps=.inf", "predictor.eps"),
        ("optim.lr=.nan", "optim.lr"),
        ("train.seed=-1", "train.seed"),
        ("train.seed=18446744073709551616", "train.seed"),
        ("optim.lr=1" + "0" * 400, "optim.lr"),
    ]:
        try:
            load_config(None, [override])
        except ConfigError as exc:
            assert needle in str(exc)
        else:
            raise AssertionError(f"{override} was accepted")
    try:
        load_config(None, ["data.dataset=folder", "data.path=a\x00b"])
    except ConfigError as exc:
        assert "data.path" in str(exc)
    else:
        raise AssertionError("a path with a NUL byte was accepted")
