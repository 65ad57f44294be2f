"""Sweep files: a base config, overrides for all cells, axes and/or named variants, seeds, the paper's numbers.

A sweep file is YAML::

    base: ../../configs/stl10/byol_optimal.yaml      # relative to the sweep file
    set: {train.epochs: 100}                         # overrides for every cell (dotted keys or nested sections;
                                                     # data.path/local_copy relative to the sweep file)
    variants:                                        # named cells, each a mapping of overrides ...
      ema: {predictor.rho: 0.3}
      no_ema: {predictor.rho: 0.0}
    axes:                                            # ... and/or keys with lists of values: their product
      predictor.freq: [1, 5]
    seeds: [0, 1, 2, 3, 4]                           # train.seed of each run
    paper:                                           # optional: the paper's figure per cell
      note: "Table 1: STL-10 top-1, linear probe (best over probe epochs), mean +- std of 5 seeds"
      values: {"ema,freq=1": "40.67 +- 0.50"}

Cells are ``variants x product(axes)``, named by the variant and ``key=value`` pairs joined with ``,`` (the key's
last component when that is unambiguous): here ``ema,freq=1``, ``ema,freq=5``, ``no_ema,freq=1``, ``no_ema,freq=5``,
the names ``paper.values`` uses. Every cell x seed resolves to exactly the ``directpred train`` command line a user
would type, and that command line's config is validated by :func:`directpred.config.load_config` before any run
starts.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from directpred.config import (
    DATA_LOCATION,
    DATA_PATH_KEYS,
    Config,
    ConfigError,
    absolute_data_path,
    check_schedule,
    dump_config,
    load_config,
    parse_override,
    read_yaml,
)

TOP_KEYS = ("base", "set", "axes", "variants", "seeds", "paper")
# Keys that say where the data lies or how a run is shown, not what it computes: --set may override them in cells
# that set them (a copy of the data elsewhere). Every other key a cell sets, --set refuses.
WHERE_NOT_WHAT = (
    *DATA_LOCATION,
    "train.device",
    "train.progress",
    "train.log_every",
    "log.",
)
PAPER_KEYS = ("note", "values")
_PAPER_VALUE = re.compile(r"^\s*(-?[0-9.]+)\s*(?:(?:±|\+-|\+/-)\s*([0-9.]+))?\s*$")


@dataclass(frozen=True)
class PaperValue:
    """The paper's figure for a cell: ``mean`` and, where reported, ``std``."""

    mean: float
    std: float | None = None

    def text(self) -> str:
        return f"{self.mean:.2f}" if self.std is None else f"{self.mean:.2f} ± {self.std:.2f}"


@dataclass(frozen=True)
class Run:
    """One cell x seed: the ``directpred train`` arguments after ``train`` and its run directory name."""

    cell: str
    seed: int
    sets: tuple[str, ...]  # --set KEY=VALUE strings, in order: sweep set, cell, command line, seed

    @property
    def rel_dir(self) -> Path:
        return Path("runs") / self.cell / f"seed{self.seed}"


@dataclass
class Sweep:
    """A parsed, validated sweep file."""

    path: Path
    base: Path
    cells: dict[str, list[str]]  # cell name -> --set strings (sweep set + cell overrides + command line)
    seeds: list[int]
    paper: dict[str, PaperValue] = field(default_factory=dict)
    paper_note: str = ""
    overrides: list[str] = field(default_factory=list)  # the command line's --set, in every cell (the report says)

    @property
    def name(self) -> str:
        return self.path.stem

    def runs(self) -> list[Run]:
        """Every cell x seed, seed by seed (each cell's first seed before any cell's second: a sweep stopped early
        has every cell), cells in file order."""
        return [
            Run(cell, seed, (*sets, f"train.seed={seed}")) for seed in self.seeds for cell, sets in self.cells.items()
        ]

    def config(self, run: Run) -> Config:
        """The resolved configuration of ``run``: what ``directpred train BASE --set ...`` builds."""
        cfg = load_config(self.base, list(run.sets))
        check_schedule(cfg)  # what the run's Trainer refuses, refused when the sweep file loads
        return cfg


def yaml_value(value: Any) -> str:
    """A value as ``--set`` text that :func:`directpred.config.parse_override` reads back unchanged."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9).strip()
    return text[:-4].strip() if text.endswith("\n...") else text.removesuffix("...").strip()


def _flatten(overrides: Any, where: str, prefix: str = "") -> list[tuple[str, Any]]:
    """``{'a': {'b': 1}, 'c.d': 2}`` -> ``[('a.b', 1), ('c.d', 2)]`` (dotted keys and nested sections mix; a key
    given both ways, e.g. ``predictor.rho`` and ``predictor: {rho: ...}``, is refused rather than last-wins)."""
    out = _flatten_pairs(overrides, where, prefix)
    keys = [k for k, _ in out]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise ConfigError(
            f"{where}: {', '.join(twice)} given twice (as a dotted key and in a nested section); keep one of them"
        )
    return out


def _flatten_pairs(overrides: Any, where: str, prefix: str = "") -> list[tuple[str, Any]]:
    if not isinstance(overrides, dict):
        raise ConfigError(f"{where}: expected a mapping of config keys to values, e.g. {{predictor.rho: 0.5}}")
    out: list[tuple[str, Any]] = []
    for key, value in overrides.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"{where}: config keys must be strings, got {key!r}")
        full = f"{prefix}{key}"
        if isinstance(value, dict):
            out.extend(_flatten_pairs(value, where, f"{full}."))
        else:
            if full == "train.seed":
                raise ConfigError(f"{where}: train.seed is set by the sweep's `seeds` list; remove it here")
            out.append((full, value))
    return out


def _sets(pairs: list[tuple[str, Any]], folder: Path) -> list[str]:
    """``--set`` strings of ``pairs``; relative data paths (``data.path``, ``data.local_copy``) are made absolute
    against the sweep file's ``folder``, as a config file's are against its own, so the sweep works from any
    current directory."""
    paths = {f"data.{k}" for k in DATA_PATH_KEYS}
    return [
        f"{k}={yaml_value(absolute_data_path(v, folder) if k in paths and isinstance(v, str) else v)}" for k, v in pairs
    ]


def _label(value: Any) -> str:
    text = yaml_value(value) if not isinstance(value, str) else value
    return re.sub(r"[^A-Za-z0-9._+-]", "_", text) or "_"


def _axis_names(keys: list[str]) -> dict[str, str]:
    """The last dotted component of each axis key where that is unique among the axes, else the full key."""
    short = {k: k.rsplit(".", 1)[-1] for k in keys}
    counts = {s: list(short.values()).count(s) for s in short.values()}
    return {k: short[k] if counts[short[k]] == 1 else k for k in keys}


def _where_wrong(base: Path, exc: ConfigError, run: Any) -> str:
    """Where a cell's config error lies: in the base config itself (the same error without the sweep's overrides:
    a typo there, which named only the first cell before), else in the cell."""
    try:
        load_config(base)
    except ConfigError as base_exc:
        if str(base_exc) == str(exc):
            return f"its base config {base}"
    return f"cell '{run.cell}' (seed {run.seed})"


def parse_paper_value(text: Any, where: str) -> PaperValue:
    """``77.86``, ``"77.86 +- 0.16"`` or ``"77.86±0.16"`` -> :class:`PaperValue`."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return PaperValue(float(text))
    match = _PAPER_VALUE.match(str(text)) if isinstance(text, str) else None
    if not match:
        raise ConfigError(
            f"{where}: {text!r} is not a paper value; write a number or 'mean +- std', e.g. '77.86 +- 0.16'"
        )
    try:
        return PaperValue(float(match[1]), float(match[2]) if match[2] else None)
    except ValueError:  # digits and dots that are no number: 77.86.1
        raise ConfigError(
            f"{where}: {text!r} is not a paper value; write a number or 'mean +- std', e.g. '77.86 +- 0.16'"
        ) from None


def _cells(data: dict[str, Any], where: str) -> dict[str, list[tuple[str, Any]]]:
    variants = data.get("variants") or {}
    axes = data.get("axes") or {}
    if not isinstance(variants, dict) or not isinstance(axes, dict):
        raise ConfigError(f"{where}: `variants` and `axes` must be mappings")
    if not variants and not axes:
        raise ConfigError(f"{where}: give `variants` (named cells) and/or `axes` (keys with lists of values)")
    for kind, names_ in (("axes", axes), ("variants", variants)):  # `5:` or `~:` as a key crashed or named no cell
        bad = [k for k in names_ if not isinstance(k, str) or not k.strip()]
        if bad:
            raise ConfigError(
                f"{where}: {kind} has the key {bad[0]!r}, which is not a name; "
                + (
                    "an axis is a dotted config key, e.g. predictor.rho"
                    if kind == "axes"
                    else "name each variant, e.g. freq5"
                )
            )
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: axes.{key} must be a non-empty list of values")
        if key == "train.seed":
            raise ConfigError(f"{where}: axes.train.seed: use the sweep's `seeds` list for seeds")
    names = _axis_names(list(axes))
    flat = {
        vname: _flatten(overrides or {}, f"{where}: variants.{vname}")
        for vname, overrides in (variants.items() if variants else [(None, {})])
    }
    for key in axes:  # the axis's value comes last on the command line: the variant's would be dropped unseen
        setters = [str(v) for v, pairs in flat.items() if any(k == key for k, _ in pairs)]
        if setters:
            raise ConfigError(
                f"{where}: {key} is set both by axes.{key} and by variant(s) {', '.join(setters)}, whose value the "
                f"axis would override; set {key} in one place: remove it from the variants or drop the axis"
            )
    cells: dict[str, list[tuple[str, Any]]] = {}
    for vname, pairs in flat.items():
        if vname is not None and not re.fullmatch(r"[A-Za-z0-9._+=,-]+", str(vname)):
            raise ConfigError(f"{where}: variant name {vname!r} may use only letters, digits and . _ + = , -")
        if str(vname) in (".", ".."):  # the run directory OUT/runs/<cell>/ would be OUT/runs/ or OUT/
            raise ConfigError(f"{where}: variant name {vname!r} names a directory of its own; choose another name")
        for combo in itertools.product(*axes.values()):
            parts = ([str(vname)] if vname is not None else []) + [
                f"{names[k]}={_label(v)}" for k, v in zip(axes, combo)
            ]
            name = ",".join(parts)
            if name in cells:
                raise ConfigError(f"{where}: two cells are both named {name!r}; make the values distinct")
            cells[name] = pairs + list(zip(axes, combo))
    return cells


def load_sweep(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Sweep:
    """Read and strictly validate a sweep file; every run's config is resolved and validated here.

    Args:
        path: the sweep YAML file.
        overrides: ``key=value`` strings applied to every cell after the file's overrides (``--set``).

    Raises:
        ConfigError: an unknown key, a malformed entry, or a run whose config does not validate (naming the cell).
    """
    path = Path(path)
    data = read_yaml(path, "sweep file")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping with keys {', '.join(TOP_KEYS)}")
    unknown = [k for k in data if k not in TOP_KEYS]
    if unknown and "base" not in data and {"method", "predictor", "train", "data"} & set(data):
        raise ConfigError(  # "unknown sweep key 'method'" before
            f"{path} is a training config, not a sweep file; train it with `directpred train {path}`, or write a "
            f"sweep file with `base: {path.name}` and its variants/axes and seeds (see sweeps/)"
        )
    if unknown:
        raise ConfigError(f"{path}: unknown sweep key '{unknown[0]}'; allowed keys: {', '.join(TOP_KEYS)}")
    if not isinstance(data.get("base"), str):
        raise ConfigError(f"{path}: `base` (a config file, relative to the sweep file) is required")
    base = (path.parent / data["base"]).resolve()
    if not base.is_file():
        raise ConfigError(f"{path}: base config {data['base']!r} does not exist (looked for {base})")
    seeds = data.get("seeds", [0])
    if (
        not isinstance(seeds, list)
        or not seeds
        or len(set(seeds)) != len(seeds)
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
    ):
        raise ConfigError(f"{path}: seeds={seeds!r}; expected a list of distinct integers >= 0, e.g. [0, 1, 2]")
    # No progress bar in the runs' logs (a sweep prints one line per run); the sweep's `set` may turn it back on.
    common = ["train.progress=false"] + _sets(_flatten(data.get("set") or {}, f"{path}: set"), path.parent)
    cell_pairs = _cells(data, str(path))
    per_cell = {k for pairs in cell_pairs.values() for k, _ in pairs}  # what the axes and variants set
    cli = []
    for text in overrides:
        key, value = parse_override(text)
        if key == "train.seed":
            raise ConfigError("--set train.seed: the sweep's `seeds` list sets the seed of each run")
        # the keys it sets: a whole section (--set 'predictor={rho: 0.7}') sets each key under it
        given = [f"{key}.{k}" for k, _ in _flatten(value, f"--set {key}")] if isinstance(value, dict) else [key]
        clash = sorted(
            k
            for k in per_cell
            if not k.startswith(WHERE_NOT_WHAT) and any(k == g or k.startswith(f"{g}.") for g in given)
        )
        if clash:  # one value for every cell, whose names say another
            raise ConfigError(
                f"--set {key}: {path} sets {', '.join(clash)} per cell (in its axes or variants), and --set would "
                f"override every cell's value while the cells keep their names; change it in the sweep file (or a copy)"
            )
        cli.append(text)
    cells = {name: common + _sets(pairs, path.parent) + cli for name, pairs in cell_pairs.items()}
    sweep = Sweep(path=path, base=base, cells=cells, seeds=list(seeds), overrides=list(overrides))
    resolved: dict[str, str] = {}  # a cell's resolved config (its first seed's) -> the cell
    for run in sweep.runs():
        try:
            cfg = sweep.config(run)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {_where_wrong(base, exc, run)}: {exc}") from None
        if run.seed == sweep.seeds[0]:
            text = dump_config(cfg)
            if text in resolved:  # e.g. an axis [0, 0.0]: the same runs twice, reported as two cells
                raise ConfigError(
                    f"{path}: cells '{resolved[text]}' and '{run.cell}' resolve to the same configuration, so "
                    "they would train the same runs twice; remove one or make their values differ"
                )
            resolved[text] = run.cell
    # After the cells' configs: a misspelt axis key also misnames the cells, and its own error is the one to show.
    sweep.paper, sweep.paper_note = _paper(data.get("paper"), cells, str(path))
    return sweep


def _paper(data: Any, cells: dict[str, Any], where: str) -> tuple[dict[str, PaperValue], str]:
    if data is None:
        return {}, ""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: `paper` must be a mapping with keys {', '.join(PAPER_KEYS)}")
    unknown = [k for k in data if k not in PAPER_KEYS]
    if unknown:
        raise ConfigError(f"{where}: unknown key 'paper.{unknown[0]}'; allowed keys: {', '.join(PAPER_KEYS)}")
    if not isinstance(data.get("note"), str) or not data["note"].strip():
        raise ConfigError(f"{where}: paper.note is required: say which table, metric and protocol the values are")
    values = data.get("values") or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: paper.values must map cell names to numbers")
    out = {}
    for cell, value in values.items():
        if cell not in cells:
            raise ConfigError(f"{where}: paper.values names unknown cell '{cell}'; cells: {', '.join(cells)}")
        out[cell] = parse_paper_value(value, f"{where}: paper.values.{cell}")
    return out, data["note"].strip()
