"""The `directpred theory` CLI: strict configs, simulate/portrait/figures in-process, and register()."""

import argparse
import json
import re

import numpy as np
import pytest

from directpred.cli.theory import main, register
from directpred.theory.simulate import build_simulate_config, load_simulate_config

ISOLOSS_REFUSAL = "^" + re.escape(
    "isoloss: true passes no gradient to the predictor (IsoLoss is p.detach() + z - z.detach()), but "
    "predictor_rule: gradient trains W_p by Eq. 2's gradient; set predictor_rule: directpred or directcopy "
    "(W_p set in closed form), or isoloss: false"
)


def test_shipped_configs_load():
    for name in ("linear", "reduced", "no_stop_gradient", "isoloss"):
        cfg = load_simulate_config(f"configs/theory/{name}.yaml")
        assert cfg.dt > 0


@pytest.mark.parametrize(
    "raw, msg",
    [
        ({"etaa": 0.1}, "unknown config key 'etaa'.*Allowed keys here: .*eta"),
        ({"dt": 0}, "dt must be > 0"),
        ({"dt": -0.1}, "dt must be > 0"),
        ({"eta": -0.01}, "eta .* must be >= 0"),
        ({"steps": 0}, "steps must be >= 1"),
        ({"steps": 1.5}, "steps: 1.5 has the wrong type; expected int"),
        ({"mode": "moco"}, "mode: 'moco' is not allowed; expected one of 'byol', 'simsiam'"),
        ({"p0": ["a"]}, r"p0\[0\]: 'a' has the wrong type"),
        ({"stop_gradient": False}, "needs mode: simsiam"),
        # a traceback (numpy's 'zero-size array', random's 'expected non-negative integer') or accepted before
        ({"model": "reduced", "p0": [], "s0": []}, r"^p0 and s0 need at least one mode, e.g. p0: \[0.1\], s0: "),
        (
            {"model": "reduced", "tau0": -0.5},
            r"^tau0 \(the initial EMA ratio W_a/W; 0 = the target starts at zero\) "
            r"must be >= 0, got -0.5$",
        ),
        ({"seed": -1}, r"^seed must lie in \[0, 2\*\*32\) \(it seeds numpy and torch\), got -1$"),
        ({"predictor_rule": "eig"}, "predictor_rule: 'eig' is not allowed; expected one of 'gradient', 'directpred'"),
        ({"eps": 0.1}, r"^eps must be >= 0, and 0 unless predictor_rule is directpred or directcopy .* got eps: 0.1 "),
        ({"predictor_rule": "directpred", "eps": float("nan")}, "^eps: nan is not a finite number"),
        ({"predictor_rule": "directpred", "eps": -0.1}, "^eps must be >= 0, and 0 unless"),
        ({"predictor_rule": "directcopy", "predictor": False}, "predictor: false fixes W_p = I; drop one"),
        ({"isoloss": True, "mode": "simsiam", "stop_gradient": False}, "isoloss: true needs the stop-gradient"),
        # IsoLoss gives W_p no gradient (the trainer refuses it with a trained predictor); it used to train W_p anyway
        ({"isoloss": True}, ISOLOSS_REFUSAL),
        ({"model": "reduced", "isoloss": True}, ISOLOSS_REFUSAL),
        ({"rho": 0.3}, r"rho .* is read only with a closed-form predictor_rule and sgd_batch > 0; got rho: 0.3"),
        ({"predictor_rule": "directpred", "rho": 0.3}, "is read only with a closed-form predictor_rule and sgd_batch"),
        ({"predictor_rule": "directpred", "sgd_batch": 8, "rho": 1.0}, r"rho .* must lie in \[0, 1\)"),
        # NaN with a RuntimeWarning (n1 // 2 = 0 coordinates scrambled) before
        ({"data": "scrambling", "n1": 1}, r"data: scrambling needs n1 >= 2 \(it scrambles .*\), got n1: 1"),
    ],
)
def test_config_rejects_bad_values(raw, msg):
    with pytest.raises(ValueError, match=msg):
        build_simulate_config(raw)


def test_config_accepts_isoloss_with_a_closed_form_or_identity_predictor():
    assert build_simulate_config({"isoloss": True, "predictor_rule": "directcopy"}).isoloss
    assert build_simulate_config({"model": "reduced", "isoloss": True, "predictor_rule": "directpred"}).isoloss
    assert build_simulate_config({"isoloss": True, "predictor": False}).isoloss  # W_p = I: nothing to train


def test_set_overrides_parse_yaml_and_are_strict():
    cfg = build_simulate_config({"eta": 0.1}, ["eta=0.02", "mode=simsiam"])
    assert cfg.eta == 0.02 and cfg.mode == "simsiam"
    cfg = build_simulate_config({"model": "reduced"}, ["p0=[0.1, 0.2]", "s0=[0.1, 0.2]"])
    assert cfg.p0 == [0.1, 0.2]
    with pytest.raises(ValueError, match="unknown config key 'nope'"):
        build_simulate_config({}, ["nope=1"])


def test_keys_of_the_other_model_are_errors_naming_the_model_and_its_keys():
    """`p0` on the linear model used to fail as 'p0 and s0 need equal lengths'; now it names what applies."""
    with pytest.raises(ValueError) as info:
        build_simulate_config({"model": "linear"}, ["p0=[0.1]"])
    assert str(info.value) == (
        "p0 does not apply to model: linear (only to model: reduced); remove it or set model: reduced. The linear "
        "model reads: model, predictor_rule, eps, isoloss, alpha_p, eta, beta, sigma2, dt, steps, method, "
        "record_every, n1, n2, mode, stop_gradient, predictor, symmetric, data, init_scale, wa_init, sgd_batch, rho, "
        "seed"
    )
    with pytest.raises(ValueError) as info:
        build_simulate_config({"model": "reduced", "n1": 4}, ["sgd_batch=8", "n1=5"])
    assert str(info.value) == (
        "n1, sgd_batch do not apply to model: reduced (only to model: linear); remove them or set model: linear. "
        "The reduced model reads: model, predictor_rule, eps, isoloss, alpha_p, eta, beta, sigma2, dt, steps, "
        "method, record_every, p0, s0, tau0, ema"
    )
    # the two models' keys and the common ones are exactly the config's fields, each once
    from dataclasses import fields

    from directpred.theory.simulate import COMMON_KEYS, MODEL_KEYS, SimulateConfig

    listed = [*COMMON_KEYS, *MODEL_KEYS["linear"], *MODEL_KEYS["reduced"]]
    assert sorted(listed) == sorted(f.name for f in fields(SimulateConfig))


def test_cli_names_the_model_for_a_stray_key(tmp_path, capsys):
    assert main(["simulate", "configs/theory/linear.yaml", "--out", str(tmp_path), "--set", "p0=[0.1]"]) == 2
    assert capsys.readouterr().err.startswith(
        "directpred theory simulate: error: p0 does not apply to model: linear (only to model: reduced)"
    )


def test_simulate_linear_writes_outputs_and_obeys_theorem1(tmp_path, capsys):
    out = tmp_path / "lin"
    rc = main(
        [
            "simulate",
            "configs/theory/linear.yaml",
            "--out",
            str(out),
            "--set",
            "steps=300",
            "--set",
            "sgd_batch=64",
            "--set",
            "method=rk4",
        ]
    )
    assert rc == 0
    z = np.load(out / "trajectory.npz")
    pred = z["balance_prediction"]
    np.testing.assert_allclose(z["balance"], pred, rtol=1e-6)  # RK4: Theorem 1 holds to O(dt⁴)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["steps"] == 300 and "sgd" in summary
    assert (out / "summary.png").stat().st_size > 1000 and (out / "sgd.npz").exists()


def test_simulate_reduced_and_bad_config_exit_code(tmp_path, capsys):
    out = tmp_path / "red"
    assert main(["simulate", "configs/theory/reduced.yaml", "--out", str(out), "--set", "steps=200"]) == 0
    z = np.load(out / "trajectory.npz")
    assert z["p"].shape[1] == 4
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: linear\nlearning_rate: 0.1\n")
    assert main(["simulate", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert "unknown config key 'learning_rate'" in capsys.readouterr().err


def test_simulate_reduced_config_weakest_mode_is_delayed_not_trapped(tmp_path):
    """configs/theory/reduced.yaml's stated outcome: at its end (t = 60) the weakest mode is still just above
    p*₋ (it used to say "ends stuck at p*₋"), and run 10x longer it reaches p*₊ like the others."""
    from directpred.theory.reduced import p_star

    pm, pp = p_star(1.0, 0.04, 0.1)
    finals = []
    for steps in ("6000", "60000"):
        out = tmp_path / steps
        assert main(["simulate", "configs/theory/reduced.yaml", "--out", str(out), "--set", f"steps={steps}"]) == 0
        finals.append(json.loads((out / "summary.json").read_text())["p_final"])
    assert pm < finals[0][0] < 0.044 and finals[0][1:] == pytest.approx([pp] * 3, rel=1e-3)
    assert finals[1] == pytest.approx([pp] * 4, rel=1e-3)


def test_simulate_isoloss_config_lifts_every_mode_and_directpred_alone_does_not(tmp_path):
    """configs/theory/isoloss.yaml's stated outcome, and its isoloss=false contrast, read back from summary.json."""
    from directpred.theory.reduced import isoloss_fixed_point, p_star

    assert main(["simulate", "configs/theory/isoloss.yaml", "--out", str(tmp_path / "iso")]) == 0
    assert (
        main(["simulate", "configs/theory/isoloss.yaml", "--out", str(tmp_path / "dp"), "--set", "isoloss=false"]) == 0
    )
    iso = json.loads((tmp_path / "iso" / "summary.json").read_text())
    dp = json.loads((tmp_path / "dp" / "summary.json").read_text())
    np.testing.assert_allclose(iso["p_final"], isoloss_fixed_point(1.0, 0.04, 0.1), rtol=1e-6)
    assert iso["p_star_isoloss_at_tau1"] == pytest.approx(isoloss_fixed_point(1.0, 0.04, 0.1))
    assert "K_min" not in iso and "K_min" not in dp  # Theorem 3's K is about a gradient-trained W_p
    assert max(dp["p_final"][:2]) < 0.01 and min(dp["p_final"][2:]) == pytest.approx(p_star(1.0, 0.04, 0.1)[1], 1e-3)
    lin = tmp_path / "lin"
    sets = ["predictor_rule=directpred", "isoloss=true", "sgd_batch=256", "rho=0.3", "steps=300", "method=rk4"]
    assert (
        main(["simulate", "configs/theory/linear.yaml", "--out", str(lin), *(a for s in sets for a in ("--set", s))])
        == 0
    )
    summary = json.loads((lin / "summary.json").read_text())
    assert summary["theorem1_applies"] is False and summary["sgd_vs_flow_rel_W"] < 0.05


@pytest.mark.parametrize(
    "config, sets, what",
    [
        ("reduced", ["dt=100", "steps=100", "record_every=10"], "simulation"),
        ("linear", ["dt=50", "steps=50", "record_every=10"], "gradient-flow simulation"),
    ],
)
def test_a_diverged_simulation_is_an_error_with_strict_json(tmp_path, capsys, config, sets, what):
    """A step size too large for the dynamics: exit code 1 and one line naming the first record from which the
    trajectory stays non-finite, and the fix (it exited 0 and wrote bare NaN into summary.json, which strict JSON
    readers refuse)."""
    out = tmp_path / "sim"
    args = ["simulate", f"configs/theory/{config}.yaml", "--out", str(out)]
    for s in sets:
        args += ["--set", s]
    with pytest.warns(RuntimeWarning):  # numpy's overflow on the way
        assert main(args) == 1
    # Independently: the first recorded time after which every record is non-finite, over the states.
    recorded = np.load(out / "trajectory.npz")
    states = [k for k in recorded.files if k not in ("t", "params_json")]
    finite = np.stack([np.isfinite(recorded[k].reshape(len(recorded["t"]), -1)).all(axis=1) for k in states])
    everything_finite = finite.all(axis=0)
    first_bad = int(np.flatnonzero(everything_finite)[-1]) + 1
    assert 0 < first_bad < len(everything_finite) and not everything_finite[first_bad:].any()
    t, dt = float(recorded["t"][first_bad]), float(sets[0].split("=")[1])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(
        f"directpred theory simulate: error: the {what} diverged: a state is not finite from t={t:g} "
        f"(step {round(t / dt)}); lower dt (now {dt:g})"
    )
    summary = json.loads((out / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(f"bare {c}"))
    assert summary["diverged_at_t"] == {what: t}


def test_portrait_reports_fixed_points(tmp_path, capsys):
    png = tmp_path / "p.png"
    assert main(["portrait", "--eta", "0.01", "--alpha-p", "1", "--tau", "1", "--out", str(png)]) == 0
    assert png.stat().st_size > 1000
    out = capsys.readouterr().out
    # fixed points of Eq. 16 at σ² = 0: (1 ∓ sqrt(1 − 0.04))/2
    assert f"{(1 - np.sqrt(0.96)) / 2:.4f}"[:6] in out and f"{(1 + np.sqrt(0.96)) / 2:.4f}"[:6] in out


def test_portrait_names_the_file_it_writes_and_refuses_an_unknown_format(tmp_path, capsys):
    """--out without an extension writes NAME.png (matplotlib's default) and the message names that file (it named
    NAME, which does not exist); an extension matplotlib cannot write is one error line (a traceback before)."""
    assert main(["portrait", "--out", str(tmp_path / "p")]) == 0
    assert (tmp_path / "p.png").stat().st_size > 1000 and not (tmp_path / "p").exists()
    assert capsys.readouterr().out.startswith(f"wrote {tmp_path / 'p.png'}; fixed points")
    assert main(["portrait", "--out", str(tmp_path / "p.v1")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"directpred theory portrait: error: --out {tmp_path / 'p.v1'}: cannot write '.v1' files;")
    assert ".png" in err and "Traceback" not in err and not (tmp_path / "p.v1").exists()


def test_pgf_is_offered_only_where_a_tex_engine_is(tmp_path, capsys, monkeypatch):
    """.pgf was listed as writable and then failed with a traceback (RuntimeError: 'xelatex' not found): matplotlib's
    pgf backend runs TeX. Without a TeX engine on the PATH it is refused as any unknown format."""
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    assert main(["portrait", "--out", str(tmp_path / "p.pgf")]) == 2
    err = capsys.readouterr().err
    assert "cannot write '.pgf' files" in err and ".pgf" not in err.split("use one of")[1]
    assert "Traceback" not in err


E = "directpred theory portrait: error: "
TAU = "the EMA ratio τ = W_a/W, 1 for SimSiam; an EMA started at 0 keeps it >= 0"


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--tau", "-1"], f"--tau -1.0: must be >= 0 ({TAU})"),  # drew a portrait of a system that cannot arise
        (["--tau", "nan"], f"--tau nan: must be a finite number ({TAU})"),  # numpy's LinAlgError before
        (["--eta", "-0.1"], "--eta -0.1: must be >= 0 (the weight decay η)"),
        (["--eta", "inf"], "--eta inf: must be a finite number (the weight decay η)"),
        (["--alpha-p", "0"], "--alpha-p 0.0: must be > 0 (the relative predictor learning rate α_p)"),
        (["--sigma2", "-1"], "--sigma2 -1.0: must be >= 0 (the augmentation variance σ²)"),
        (["--s-max", "0"], "--s-max 0.0: must be > 0 (the top of the s axis; s_j, an eigenvalue of F, is >= 0)"),
        (["--p-min=-inf"], "--p-min -inf: must be a finite number (the left edge of the p axis)"),
        (["--p-min", "2"], "--p-min 2.0 --p-max 1.6: the p axis needs --p-min < --p-max"),  # matplotlib's before
        (["--p-min", "1", "--p-max", "1"], "--p-min 1.0 --p-max 1.0: the p axis needs --p-min < --p-max"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else "",
)
def test_portrait_refuses_impossible_values_naming_the_option_and_the_range(argv, message, tmp_path, capsys):
    png = tmp_path / "p.png"
    assert main(["portrait", *argv, "--out", str(png)]) == 2
    err = capsys.readouterr().err
    assert err == E + message + "\n" and not png.exists()


def test_portrait_accepts_the_edges_of_the_ranges(tmp_path, capsys):
    """τ = 0 (the EMA's start: only collapse, Eq. 16 has p* = 0 alone), η = 0 and σ² = 0 are allowed."""
    assert main(["portrait", "--tau", "0", "--eta", "0", "--sigma2", "0", "--out", str(tmp_path / "p.png")]) == 0
    assert capsys.readouterr().out.endswith("fixed points p* on s=p²/α_p: [0.0]\n")


def test_register_adds_theory_subcommand():
    parser = argparse.ArgumentParser(prog="directpred")
    sub = parser.add_subparsers(dest="command")
    register(sub)
    args = parser.parse_args(["theory", "figures", "--out", "x", "--only", "fig4"])
    assert callable(args.func) and args.only == "fig4"
    args = parser.parse_args(["theory", "portrait", "--eta", "0.2", "--out", "p.png"])
    assert args.eta == 0.2 and args.alpha_p == 1.0


def test_simulate_names_every_file_it_writes(tmp_path, capsys):
    """With sgd_batch > 0 the linear model also writes sgd.npz, which the success line left out."""
    config = "configs/theory/linear.yaml"
    assert main(["simulate", config, "--out", str(tmp_path / "a"), "--set", "steps=10"]) == 0
    written = sorted(p.name for p in (tmp_path / "a").iterdir())
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert written == ["sgd.npz", "summary.json", "summary.png", "trajectory.npz"]
    assert line.startswith(f"wrote {tmp_path / 'a'}/{{trajectory.npz,sgd.npz,summary.json,summary.png}} in ")
    assert main(["simulate", config, "--out", str(tmp_path / "b"), "--set", "steps=10", "--set", "sgd_batch=0"]) == 0
    assert "sgd.npz" not in capsys.readouterr().out and not (tmp_path / "b" / "sgd.npz").exists()
