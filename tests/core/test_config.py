"""Strict configuration: unknown keys, wrong types and impossible values fail with the key's name."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from directpred.config import Config, ConfigError, diff_configs, load_config, nest, parse_override

REPO = Path(__file__).resolve().parents[2]


def test_defaults_are_the_paper_recipe():
    c = Config()
    assert (c.optim.lr, c.optim.momentum, c.optim.weight_decay, c.train.batch_size) == (0.03, 0.9, 4e-4, 128)
    assert (c.method.ema, c.predictor.rho, c.predictor.eps, c.predictor.freq) == (0.996, 0.3, 0.1, 1)
    assert c.backbone.name == "resnet18" and c.train.epochs == 100 and c.optim.schedule == "constant"


def test_overrides_are_parsed_as_yaml_and_typed():
    cfg = load_config(
        None,
        ["predictor.rho=0.5", "train.epochs=3", "method.symmetric_loss=false", "predictor.name=optimal", "optim.lr=1"],
    )
    assert cfg.predictor.rho == 0.5 and cfg.train.epochs == 3 and cfg.method.symmetric_loss is False
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == 1.0
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])


@pytest.mark.parametrize(
    "override,needle",
    [
        ("predictor.rhoo=0.5", "predictor.rhoo"),
        ("predictr.rho=0.5", "predictr"),
        ("predictor.rho=1.0", "predictor.rho"),
        ("predictor.rho=-0.1", "predictor.rho"),
        ("predictor.freq=0", "predictor.freq"),
        ("predictor.eps=-0.1", "predictor.eps"),
        ("predictor.name=mlp3", "predictor.name"),
        ("train.epochs=two", "train.epochs"),
        ("train.epochs=1.5", "train.epochs"),
        ("method.symmetric_loss=3", "method.symmetric_loss"),
        ("data.dataset=folder", "data.path"),
        ("method.stop_gradient=false", "method.stop_gradient"),
        ("train.batch_size=1", "train.batch_size"),
        ("predictor", "key=value"),
    ],
)
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(None, [override])


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["predictor.name=mlp", "predictor.bias=true"], "two-layer predictor's biases are predictor.mlp_bias"),
        (["predictor.bias=true"], "predictor.name=directpred has none"),
        (["predictor.partitions=2", "predictor.zero_mean=true"], "use zero_mean=false with predictor.partitions"),
    ],
)
def test_settings_a_predictor_would_ignore_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides)
    assert load_config(None, ["predictor.name=linear", "predictor.bias=true"]).predictor.bias is True


def test_exponent_notation_is_a_float_where_a_float_is_expected(tmp_path):
    """YAML 1.1 (PyYAML) reads 4e-4 as a string; float keys take it as the number, other types still refuse it."""
    cfg = load_config(None, ["optim.predictor_weight_decay=4e-4", "optim.lr=3E-2", "predictor.eps=.5e-1"])
    assert (cfg.optim.predictor_weight_decay, cfg.optim.lr, cfg.predictor.eps) == (4e-4, 3e-2, 0.05)
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  weight_decay: 1e-5\n")
    assert load_config(f).optim.weight_decay == 1e-5
    with pytest.raises(ConfigError, match="train.epochs: '1e2' has the wrong type; expected int"):
        load_config(None, ["train.epochs=1e2"])
    with pytest.raises(ConfigError, match="predictor.rho: 'e-4' has the wrong type"):
        load_config(None, ["predictor.rho=e-4"])


@pytest.mark.parametrize(
    "overrides, fix",
    [
        ("predictor.rho=0.5", "not a single string: write ['predictor.rho=0.5']"),
        ({"predictor.rho": 0.5}, "not a dict: write ['predictor.rho=0.5']"),
        ({"predictor": {"rho": 0.5}}, "not a dict: write ['predictor.rho=0.5']"),
    ],
)
def test_overrides_that_are_not_a_list_of_strings_are_refused_naming_the_fix(overrides, fix):
    """A str was iterated character by character ("override 'p' must look like key=value"), a dict by its keys."""
    with pytest.raises(TypeError, match=re.escape('overrides must be a list of "key=value" strings, ' + fix)):
        load_config(None, overrides)
    assert load_config(None, ("predictor.rho=0.5",)).predictor.rho == 0.5  # a tuple (and any list) still works


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ConfigError, match="Did you mean 'predictor.rho'"):
        load_config(None, ["predictor.rh=0.5"])


@pytest.mark.parametrize(
    "override,suggestion",
    [
        ("train.lr=0.1", "'optim.lr'"),
        ("optim.seed=3", "'train.seed'"),
        ("rho=0.5", "'predictor.rho' or 'diag.rho'"),
    ],
)
def test_a_key_of_another_section_is_suggested(override, suggestion, tmp_path):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=re.escape(f"unknown config key '{key}'. Did you mean {suggestion}?")):
        load_config(None, [override])
    f = tmp_path / "c.yaml"  # the same in a config file
    f.write_text(yaml.safe_dump(nest(key, 1)))
    with pytest.raises(ConfigError, match=re.escape(f"Did you mean {suggestion}?")):
        load_config(f)


def test_missing_data_path_is_named(tmp_path):
    with pytest.raises(ConfigError, match="data.path"):
        load_config(None, ["data.dataset=folder", f"data.path={tmp_path / 'nope.tar.gz'}"])


def test_yaml_file_unknown_key(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("predictor:\n  name: directpred\n  rhoo: 0.3\n")
    with pytest.raises(ConfigError, match="predictor.rhoo"):
        load_config(f)
    f.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(f)


def test_diff_configs_lists_changed_keys():
    a, b = load_config(None), load_config(None, ["train.epochs=5", "predictor.rho=0.5"])
    assert diff_configs(a, b) == {"train.epochs": (100, 5), "predictor.rho": (0.3, 0.5)}


def test_every_shipped_config_loads():
    files = sorted((REPO / "configs").rglob("*.yaml"))
    training = [f for f in files if "theory" not in f.parts]
    assert len(training) >= 2
    for f in training:
        first = f.read_text().splitlines()[0]
        assert first.startswith("#"), f"{f} must begin with a comment (command, hardware, time, result)"
        try:
            load_config(f)
        except ConfigError as exc:
            assert "data.path" in str(exc), f"{f}: {exc}"  # only a missing data folder is acceptable here


def test_a_key_given_twice_in_a_yaml_file_is_refused_naming_its_line(tmp_path):
    # PyYAML keeps the last of two `predictor:` blocks without a word: rho=0.5 would be dropped.
    f = tmp_path / "c.yaml"
    f.write_text("predictor:\n  name: directpred\n  rho: 0.5\ntrain:\n  epochs: 1\npredictor:\n  freq: 5\n")
    with pytest.raises(ConfigError) as info:
        load_config(f)
    assert str(info.value) == f"{f} line 6: key 'predictor' appears twice (first at line 1); merge the two blocks"
    f.write_text("train:\n  epochs: 1\n  epochs: 2\n")  # a repeated setting inside a block
    with pytest.raises(ConfigError, match="line 3: key 'epochs' appears twice .*; keep one of them"):
        load_config(f)
    with pytest.raises(ConfigError, match="key 'rho' appears twice"):  # in a --set value too
        load_config(None, ["predictor={rho: 0.5, rho: 0.9}"])
    from directpred.theory.simulate import load_simulate_config  # the theory configs are read the same way

    f.write_text("rho: 0.3\nrho: 0.5\n")
    with pytest.raises(ConfigError, match="line 2: key 'rho' appears twice"):
        load_simulate_config(f)
    # A key a merge (<<: *anchor) brings may be overridden: that is what merges are for.
    f.write_text("train: {epochs: 1}\npredictor:\n  <<: {name: directpred, rho: 0.5}\n  rho: 0.9\n")
    assert load_config(f).predictor.rho == 0.9
    # A mapping checked before a merge copies its keys into another (x: 1 then x: 2 inside `a`) stays valid.
    from directpred.config import UniqueKeyLoader

    text = "a: &a {<<: {x: 1}, x: 2}\nb: {<<: *a, y: 3}\n"
    assert yaml.load(text, UniqueKeyLoader) == {"a": {"x": 2}, "b": {"x": 2, "y": 3}} == yaml.safe_load(text)
