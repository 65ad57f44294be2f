"""The benchmark scripts run end to end (the GPU check's CPU fallback path included) and report sane numbers."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_cpu_fallback(tiny_archive, tmp_path):
    if torch.cuda.is_available():  # the fallback is what CI machines (no GPU) run
        pytest.skip("a GPU is present: gpu_check.sh runs its GPU path, not the CPU fallback tested here")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)}
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", str(tiny_archive), str(tmp_path / "out")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "CPU fallback" in proc.stdout and "gpu_check summary" in proc.stdout
    assert re.search(r"^source digest: [0-9a-f]{64}$", proc.stderr, re.M), proc.stderr[-3000:]  # the code, named
    # step 0: the batched decode tests (their CUDA cases skip here) and the decode benchmark, per decoder
    assert "FAILED" not in proc.stdout and re.search(r"\b[4-9] passed, [2-4] skipped", proc.stdout), proc.stdout
    decode = json.loads((tmp_path / "out" / "decode_cpu.json").read_text())["batched_decode"]
    assert decode["batched_decode_torchvision_cpu_images_per_s"] > 0
    t = json.loads((tmp_path / "out" / "throughput_d128.json").read_text())
    step = t["steps"]["directpred_freq1"]
    assert t["limit"]["images_per_s"] > 0 and step["step_images_per_s"] > 0 and t["pipeline"]["images_per_s"] > 0
    assert 0 < step["predictor_update_share_of_step"] < 1
    assert set(t["eigh_s"]) == {"128", "256"}
    assert t["hardware"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()  # the machine is named
    s = json.loads((tmp_path / "out" / "knn_run" / "summary.json").read_text())
    assert s["epochs"] == 1 and 0 <= s["knn_top1"] <= 100
    r = json.loads((tmp_path / "out" / "sweep" / "results.json").read_text())  # step 4: the sweep and its table
    assert [(c["cell"], c["n"]) for c in r["cells"]] == [("directpred", 1), ("linear", 1), ("mlp", 1)]
    assert all(0 <= c[k]["mean"] <= 100 for c in r["cells"] for k in ("knn_top1", "linear_top1", "linear_top1_best"))
    assert "| `mlp` | 1 |" in proc.stdout and "sweep mlp" in proc.stdout


def _benchmark(script: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    """Run ``benchmarks/<script>`` from the repository root, on one thread, with this checkout's package."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, f"benchmarks/{script}", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_stream_benchmark_runs_with_fewer_images_than_one_batch(tmp_path):
    """``--images`` below the batch of 32 (the smallest run): the batched decode takes them as one batch (an empty
    batch plan raised IndexError) and the throughput paths as a warm-up batch and a timed one (StopIteration)."""
    out = tmp_path / "stream.json"
    args = ["--images", "8", "--rss-sizes", "64", "--rss-steps", "1", "--out", str(out)]
    proc = _benchmark("stream_throughput.py", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["batched_decode"]["batched_decode_torchvision_cpu_images_per_s"] > 0
    assert results["throughput"]["images"] == 4 and results["throughput"]["worker_decode_images_per_s"] > 0
    # what ran is recorded in the file itself: the command, the image count, the code (a digest git cannot go stale on)
    assert results["images"] == 8 and "--images 8" in results["command"] and len(results["source_digest"]) == 64
    assert [r["images_in_set"] for r in results["rss"]] == [64]


def test_diagnostics_benchmark_refuses_steps_that_are_all_warm_up(tiny_overrides):
    """``--steps`` at most the 2 warm-up steps leaves nothing to time: said at once (it trained, then raised
    ``StatisticsError: no median for empty data``)."""
    sets = [arg for o in tiny_overrides if o != "diag.every=0" for arg in ("--set", o)]  # it reports every step
    proc = _benchmark("diagnostics_overhead.py", "--steps", "2", *sets)
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith(
        "error: --steps must be at least 3: the first 2 steps are warm-up, not timed"
    ), proc.stderr[-2000:]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "diag.every=0"], "--set diag.every is not taken: the script times a report on every step itself"),
        (["--every", "0"], "--every must be at least 1, not 0"),
    ],
)
def test_diagnostics_benchmark_refuses_a_report_period_it_cannot_use(args, message):
    """``--set diag.every=0`` used to train and then fail on the missing report row; now it is refused at once, with
    the option that does what was meant."""
    proc = _benchmark("diagnostics_overhead.py", *args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_proxy_check_kill_and_resume_from_shards_equals_the_folder_run(tmp_path):
    """benchmarks/proxy_check.py at a tiny size: the shard run, killed after a checkpoint and resumed, ends with every
    checkpoint tensor equal to the folder run's, and the same figures."""
    sets = ["train.batch_size=32", "train.checkpoint_every_steps=4", "backbone.width=8", "eval.linear_epochs=1"]
    proc = _benchmark(
        "proxy_check.py",
        *["--work", str(tmp_path / "w"), "--out", str(tmp_path / "r.json")],
        *["--train", "192", "--val", "64", "--shard-size", "64", "--kill-after", "4"],
        *[a for kv in sets for a in ("--set", kv)],
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["killed_at_checkpoint_step"] >= 4 and res["folder"]["steps"] == res["shards"]["steps"] == 12
    assert res["tensors_compared"] > 100 and res["tensors_equal"] == res["tensors_compared"]
    same = ("knn_top1", "linear_top1", "linear_top5")
    assert {k: res["folder"][k] for k in same} == {k: res["shards"][k] for k in same}
    assert res["shards_train_rows_unique"]


def test_augment_syncs_benchmark_counts_no_host_device_sync_per_two_view_call(tmp_path):
    """benchmarks/augment_syncs.py at 32 px: no host-device synchronisation in a two-view call of any recipe (56 to 61
    before ``augsync``), and none of the ops mixes host and device tensors (it would raise on a GPU). The counter is
    not blind: the parameters placed on the device, as before, give at least the 2 x 19 ``nonzero`` selections."""
    out = tmp_path / "syncs.json"
    proc = _benchmark("augment_syncs.py", "--small", "--batch", "16", "--repeats", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    recipes = json.loads(out.read_text())["recipes"]
    assert sorted(recipes) == ["cifar", "imagenet", "stl10"]
    for name, m in recipes.items():
        assert m["syncs"] == 0 and m["mixed_device_ops"] == {}, (name, m["syncs_by_call"], m["mixed_device_ops"])
        assert m["params_on_device_syncs_by_call"]["nonzero"] >= 38, (name, m["params_on_device_syncs_by_call"])
        assert m["params_on_device_syncs"] > 40


def test_source_digest_names_the_code_and_ignores_results_and_caches(tmp_path):
    """The digest that identifies a device run's code: it moves with a source file's bytes or name, and not with the
    results the run writes, byte-compiled caches or files outside the code folders; the command line prints it."""
    import hashlib

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from source_digest import source_digest
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    for rel, text in [("directpred/a.py", "x = 1\n"), ("configs/c.yaml", "k: 1\n"), ("benchmarks/b.sh", "echo\n")]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    (tmp_path / "sweeps").mkdir()
    expected = hashlib.sha256()  # the documented rule, computed independently: sorted paths, path NUL bytes NUL
    for rel in ["benchmarks/b.sh", "configs/c.yaml", "directpred/a.py"]:
        expected.update(rel.encode() + b"\0" + (tmp_path / rel).read_bytes() + b"\0")
    base = source_digest(tmp_path)
    assert base == expected.hexdigest()
    for rel in ["benchmarks/results/r.json", "directpred/__pycache__/a.pyc", "docs/d.md", "README.md"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("noise")
    assert source_digest(tmp_path) == base
    (tmp_path / "directpred/a.py").write_text("x = 2\n")
    changed = source_digest(tmp_path)
    assert changed != base
    (tmp_path / "directpred/a.py").rename(tmp_path / "directpred/b.py")
    assert source_digest(tmp_path) not in (base, changed)
    proc = subprocess.run([sys.executable, "benchmarks/source_digest.py"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == source_digest(REPO)


def test_throughput_names_the_step_its_pipeline_ratio_is_against(tmp_path):
    """Without DirectPred among the predictors, the pipeline / step ratio is against the measured predictor's step,
    and says so (it was labelled "directpred freq 1" whatever it was against)."""
    out = tmp_path / "t.json"
    tiny = ["backbone.width=4", "projector.hidden_dim=32", "train.batch_size=8", "train.precision=fp32"]
    args = ["--synthetic", "--steps", "1", "--warmup", "1", "--predictors", "linear", "--eigh-dims", "", "--out"]
    proc = _benchmark("throughput.py", *args, str(out), *[a for kv in tiny for a in ("--set", kv)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    t = json.loads(out.read_text())
    assert t["pipeline_over_step_of"] == "linear" and "pipeline / step (linear):" in proc.stdout
    assert len(t["source_digest"]) == 64 and "--synthetic" in t["command"]
    assert t["pipeline_over_step"] == pytest.approx(
        t["pipeline"]["images_per_s"] / t["steps"]["linear"]["step_images_per_s"]
    )


@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "benchmarks").glob("*.sh")))
def test_benchmark_shell_scripts_parse(script):
    """Every shell script of benchmarks/ is valid bash (``bash -n``): the GPU scripts run where no one is watching,
    once, and a syntax error found there costs a whole device session."""
    proc = subprocess.run(["bash", "-n", f"benchmarks/{script}"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_gpu_imagenet_step_names_configs_and_predictors_that_exist():
    """gpu_imagenet_step.sh (no CPU test run: minutes of ResNet-50) loops over configs/imagenet/byol_<P>_<R>.yaml and
    throughput.py's step variants: each must exist, each config must name the predictor it is timed with."""
    from directpred.config import load_config

    text = (REPO / "benchmarks" / "gpu_imagenet_step.sh").read_text()
    recipes = re.search(r"for recipe in ([\w ]+); do", text).group(1).split()
    pairs = [p.split(":") for p in re.search(r"for pred in ([\w: ]+); do", text).group(1).split()]
    variants = dict(
        re.findall(r'\("(\w+)", \["predictor.name=(\w+)"', (REPO / "benchmarks" / "throughput.py").read_text())
    )
    assert recipes == ["60ep", "300ep"] and len(pairs) == 3
    for recipe in recipes:
        for config_name, variant in pairs:
            cfg = load_config(REPO / "configs" / "imagenet" / f"byol_{config_name}_{recipe}.yaml", ["data.path=."])
            assert variants[variant] == cfg.predictor.name == config_name, (recipe, config_name, variant)
