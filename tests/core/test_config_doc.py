"""The configuration reference generated from the config dataclasses: current, complete and true to the loader."""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from typing import Literal, get_args, get_origin

import pytest
import yaml

from directpred import config_doc
from directpred.config import Config, ConfigError, load_config, merge_into, nest, parse_override


def test_readme_and_docs_page_are_current():
    stale = config_doc.stale_files()
    assert not stale, (
        f"{', '.join(map(str, stale))}: the configuration reference is out of date; regenerate it "
        f"with `{config_doc.REGENERATE}` (from the repository root)"
    )


def test_the_intro_names_every_setting_a_resume_may_change():
    from directpred.train.rundir import RESUMABLE_CHANGES

    intro = " ".join(config_doc._INTRO.split())
    named = {k.rstrip(".") + (".*" if k.endswith(".") else "") for k in RESUMABLE_CHANGES}
    assert [k for k in sorted(named) if f"`{k}`" not in intro] == []
    assert set(re.findall(r"`((?:train|data|eval|log|diag)\.[a-z_*]+)`", intro.split("--resume")[1])) == named


def _all_keys() -> list[str]:
    return [
        f"{s.name}.{f.name}"
        for s in dataclasses.fields(Config)
        for f in dataclasses.fields(type(getattr(Config(), s.name)))
    ]


def test_every_key_has_a_row_with_a_meaning_in_the_readme():
    readme = config_doc.README.read_text()
    table = readme[readme.index(config_doc.START) : readme.index(config_doc.END)]
    rows = dict(re.findall(r"^\| `([a-z_]+\.[a-z_]+)` \|.*\| (.*) \|$", table, flags=re.M))
    assert list(rows) == _all_keys()
    assert all(len(meaning.split()) >= 2 for meaning in rows.values()), rows
    for key in ("train.skip_nonfinite", "train.channels_last", "projector.out_dim", "diag.stop_on_collapse"):
        assert key in rows


def test_defaults_read_back_as_yaml_and_allowed_values_load():
    """The default column parses (as YAML) to the dataclass default, and each value the type column lists as
    allowed passes the strict merge."""
    defaults = Config()
    checked = 0
    for sec in config_doc.sections():
        obj = getattr(defaults, sec.name)
        hints = typing.get_type_hints(type(obj))
        for f in sec.fields:
            name = f.key.split(".")[1]
            assert yaml.safe_load(f.default) == getattr(obj, name), f.key
            listed = re.findall(r"`([^`]+)`", f.type)
            for value in listed:  # the strict merge (types and Literals; validate's cross-key rules aside)
                cfg = Config()
                merge_into(cfg, nest(*parse_override(f"{f.key}={value}")))
                assert getattr(getattr(cfg, sec.name), name) == yaml.safe_load(value), f.key
            tp = hints[name]
            if get_origin(tp) is Literal:
                assert listed == list(get_args(tp)), f.key
                checked += 1
    assert checked >= 10
    with pytest.raises(ConfigError, match="train.channels_last"):
        load_config(None, ["train.channels_last=maybe"])


def test_a_field_without_docstring_is_refused_by_name():
    @dataclass
    class Section:
        """A section."""

        documented: int = 1
        """Has a meaning."""
        bare: float = 0.5  # a comment is not a docstring

    @dataclass
    class Cfg:
        sec: Section = field(default_factory=Section)

    assert config_doc.attribute_docstrings(Section) == {"documented": "Has a meaning."}
    with pytest.raises(ValueError, match="Section: fields without a docstring: bare; .*directpred.config_doc"):
        config_doc.sections(Cfg)


def test_readme_text_replaces_only_between_the_markers(tmp_path):
    before, after = "# Title\n\nintro\n\n", "\n\n## Next\ntext\n"
    old = f"{before}{config_doc.START}\nold table\n{config_doc.END}{after}"
    new = config_doc.readme_text(old)
    assert new.startswith(before + config_doc.START) and new.endswith(config_doc.END + after)
    assert "old table" not in new and "| `predictor.rho` | float | `0.3` |" in new
    assert config_doc.readme_text(new) == new
    with pytest.raises(ValueError, match="config-reference:start"):
        config_doc.readme_text("no markers here")


def test_check_flags_a_stale_copy_and_regeneration_fixes_it(tmp_path, capsys):
    readme, page = tmp_path / "README.md", tmp_path / "configuration.md"
    readme.write_text(f"x\n{config_doc.START}\n| `train.epochs` | int | `100` | stale |\n{config_doc.END}\n")
    args = ["--readme", str(readme), "--page", str(page)]
    assert config_doc.main([*args, "--check"]) == 1
    err = capsys.readouterr().err
    assert f"{readme}: the configuration reference is out of date; run `python -m directpred.config_doc`" in err
    assert str(page) in err
    assert config_doc.main(args) == 0
    assert config_doc.main([*args, "--check"]) == 0
    assert page.read_text() == config_doc.page_text() and "stale" not in readme.read_text()
