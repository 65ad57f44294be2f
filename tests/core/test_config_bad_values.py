"""Every config key's impossible values are refused when the config loads, by a ConfigError that names the key and
what is allowed: one table, one row (or more) per key, and a check that no key of the schema is missing from it."""

from __future__ import annotations

import dataclasses
import re
import warnings
from pathlib import Path

import pytest

from directpred.config import PREDICTOR_OPTIONS, Config, ConfigError, PredictorConfig, flatten, load_config
from directpred.heads import PREDICTORS, build_predictor

REPO_DIR = str(Path(__file__).resolve().parents[2])  # a path that exists (data.path checks)
STREAM = f"data.stream=true data.dataset=folder data.path={REPO_DIR} data.image_size=32"

# (space-separated overrides, the key the message names, a fragment of what is allowed). The key under test is the
# named one; the other overrides only set up the context in which its value is impossible.
BAD = [
    ("method.name=moco", "method.name", ": 'moco' is not allowed; expected one of 'byol', 'simsiam'"),
    ("method.ema=1.5", "method.ema", "=1.5 is not allowed: the target momentum must lie in [0, 1]"),
    ("method.ema=-0.1", "method.ema", "must lie in [0, 1]"),
    ("method.ema_schedule=linear", "method.ema_schedule", "expected one of 'constant', 'cosine'"),
    ("method.symmetric_loss=3", "method.symmetric_loss", ": 3 has the wrong type; expected bool"),
    ("method.stop_gradient=false", "method.stop_gradient", "needs method.name=simsiam"),
    ("method.target_init=zeros", "method.target_init", "expected one of 'copy', 'random'"),
    ("method.isoloss=true predictor.name=linear", "method.isoloss", "needs a predictor without trainable parameters"),
    ("method.isoloss=2", "method.isoloss", ": 2 has the wrong type; expected bool"),
    ("predictor.name=mlp3", "predictor.name", "expected one of 'directpred', 'directcopy', 'optimal'"),
    ("predictor.bias=true", "predictor.bias", "predictor.name=directpred has none"),
    ("predictor.mlp_bias=maybe", "predictor.mlp_bias", "has the wrong type; expected bool"),
    ("predictor.symmetric=1", "predictor.symmetric", "has the wrong type; expected bool"),
    ("predictor.hidden_dim=0", "predictor.hidden_dim", "=0 is not allowed: must be >= 1"),
    ("predictor.hidden_dim=2.5", "predictor.hidden_dim", "has the wrong type; expected int"),
    ("predictor.rho=1.0", "predictor.rho", "the moving-average rate must lie in [0, 1)"),
    ("predictor.rho=-0.1", "predictor.rho", "must lie in [0, 1)"),
    ("predictor.rho=.nan", "predictor.rho", "is not a finite number"),
    ("predictor.eps=-0.1", "predictor.eps", "must be >= 0"),
    ("predictor.eps=.inf", "predictor.eps", "is not a finite number"),
    ("predictor.freq=0", "predictor.freq", "must be an integer >= 1"),
    ("predictor.eps_mode=eq18", "predictor.eps_mode", "expected one of 'code', 'paper'"),
    ("predictor.c=x", "predictor.c", "has the wrong type; expected float"),
    ("predictor.c=1.0", "predictor.c", "must be < 1 with predictor.eps_mode=code"),
    ("predictor.c=.nan", "predictor.c", "is not a finite number"),
    ("predictor.zero_mean=true predictor.partitions=2", "predictor.zero_mean", "use zero_mean=false with"),
    ("predictor.average=mean", "predictor.average", "expected one of 'ema', 'cumulative'"),
    ("predictor.partitions=-1", "predictor.partitions", "must be >= 0 (0 = one global F^)"),
    ("predictor.partitions=2 predictor.name=linear", "predictor.partitions", "for predictor.name=directpred only"),
    ("predictor.partitions=2 predictor.average=cumulative", "predictor.partitions", "use the ema average"),
    ("predictor.ridge=-1", "predictor.ridge", "must be >= 0"),
    ("predictor.update_at=backward", "predictor.update_at", "expected one of 'forward', 'after_step'"),
    ("backbone.name=resnet101", "backbone.name", "expected one of 'resnet18', 'resnet34', 'resnet50'"),
    ("backbone.width=0", "backbone.width", "base channel count must be >= 1"),
    ("backbone.cifar_stem=maybe", "backbone.cifar_stem", "has the wrong type; expected bool"),
    ("projector.hidden_dim=0", "projector.hidden_dim", "=0 is not allowed: must be >= 1"),
    ("projector.out_dim=0", "projector.out_dim", "=0 is not allowed: must be >= 1 (the size d of F^)"),
    ("projector.bn_affine=2", "projector.bn_affine", "has the wrong type; expected bool"),
    ("data.dataset=imagenet", "data.dataset", "expected one of 'cifar10', 'cifar100', 'stl10', 'folder'"),
    ("data.dataset=folder", "data.path", "data.dataset=folder needs data.path"),
    ("data.path=/no/such/dir", "data.path", "the path does not exist"),
    ("data.local_copy=3", "data.local_copy", "has the wrong type; expected str or NoneType"),
    ("data.root=''", "data.root", "must name a folder"),
    ("data.download=x", "data.download", "has the wrong type; expected bool"),
    ("data.cache_dir=''", "data.cache_dir", "must name a folder"),
    ("data.augment=simclr", "data.augment", "expected one of 'cifar', 'stl10', 'imagenet', 'auto'"),
    ("data.image_size=-1", "data.image_size", "must be 0 (the dataset's size) or a side of 8 to 8192 pixels"),
    ("data.image_size=4", "data.image_size", "must be 0 (the dataset's size) or a side of 8 to 8192 pixels"),
    ("data.image_size=99999999999999999999", "data.image_size", "a side of 8 to 8192 pixels (32 for CIFAR"),
    (f"{STREAM} data.image_size=0", "data.image_size", "a streamed data set (data.stream=true) needs"),
    ("data.train_subset=-1", "data.train_subset", "must be >= 0"),
    (f"{STREAM} data.train_subset=10", "data.train_subset", "subsets are not supported with data.stream=true"),
    ("data.test_subset=-1", "data.test_subset", "must be >= 0"),
    ("data.workers=-1", "data.workers", "must be >= 0"),
    ("data.skip_corrupt=x", "data.skip_corrupt", "has the wrong type; expected bool"),
    (f"{STREAM} data.dataset=cifar10", "data.stream", "streaming reads data.dataset=folder"),
    ("data.decode_size=-1", "data.decode_size", "must be 0 (= data.image_size) to 8192 pixels"),
    ("data.decode_size=100000", "data.decode_size", "must be 0 (= data.image_size) to 8192 pixels"),
    (f"{STREAM} data.decode_size=16", "data.decode_size", "must be >= data.image_size=32"),
    ("data.decode=gpu", "data.decode", "expected one of 'auto', 'cpu', 'cuda'"),
    ("data.jpeg_decoder=pil", "data.jpeg_decoder", "expected one of 'auto', 'torchcodec', 'torchvision'"),
    ("optim.name=adam", "optim.name", "expected one of 'sgd', 'lars'"),
    ("optim.lr=0", "optim.lr", "must be > 0"),
    ("optim.momentum=1.0", "optim.momentum", "must lie in [0, 1)"),
    ("optim.weight_decay=-1", "optim.weight_decay", "must be >= 0"),
    ("optim.alpha_p=-1", "optim.alpha_p", "must be >= 0 (0 freezes the predictor)"),
    ("optim.predictor_weight_decay=.nan", "optim.predictor_weight_decay", "is not a finite number"),
    ("optim.schedule=cosine", "optim.schedule", "expected one of 'constant', 'warmup_cosine'"),
    ("optim.warmup_epochs=-1", "optim.warmup_epochs", "must be >= 0"),
    ("optim.lars_eta=0", "optim.lars_eta", "the LARS trust coefficient must be > 0"),
    ("optim.lars_eta=-0.001", "optim.lars_eta", "must be > 0"),
    ("train.epochs=0", "train.epochs", "must be >= 1"),
    ("train.epochs=1.5", "train.epochs", "has the wrong type; expected int"),
    ("train.batch_size=1", "train.batch_size", "must be >= 2 (BatchNorm needs two samples)"),
    ("train.seed=-1", "train.seed", "must lie in [0, 2**32)"),
    ("train.seed=4294967296", "train.seed", "must lie in [0, 2**32)"),
    ("train.device=mps", "train.device", "use auto, cpu, cuda or cuda:N"),
    ("train.device=cudafoo", "train.device", "use auto, cpu, cuda or cuda:N"),
    ("train.device=cuda:x", "train.device", "use auto, cpu, cuda or cuda:N"),
    ("train.precision=fp8", "train.precision", "expected one of 'auto', 'fp32', 'bf16', 'fp16'"),
    ("train.channels_last=sometimes", "train.channels_last", "has the wrong type; expected one of 'auto' or bool"),
    ("train.compile=x", "train.compile", "has the wrong type; expected bool"),
    ("train.sync_bn=x", "train.sync_bn", "has the wrong type; expected bool"),
    ("train.checkpoint_every=0", "train.checkpoint_every", "must be >= 1 epoch"),
    ("train.checkpoint_every_steps=-1", "train.checkpoint_every_steps", "must be >= 0"),
    ("train.log_every=0", "train.log_every", "must be >= 1"),
    ("train.progress=x", "train.progress", "has the wrong type; expected bool"),
    ("train.max_steps=-1", "train.max_steps", "must be >= 0 (0 = no limit)"),
    ("train.skip_nonfinite=-1", "train.skip_nonfinite", "must be >= 0 (0 = stop at the first"),
    ("eval.knn_every=-1", "eval.knn_every", "must be >= 0 (0 = only at the end)"),
    ("eval.knn_k=0", "eval.knn_k", "must be >= 1"),
    ("eval.knn_t=0", "eval.knn_t", "the temperature must be > 0"),
    ("eval.linear=x", "eval.linear", "has the wrong type; expected bool"),
    ("eval.linear_epochs=0", "eval.linear_epochs", "must be >= 1"),
    ("eval.linear_lr=0", "eval.linear_lr", "must be > 0"),
    ("eval.linear_weight_decay=-1", "eval.linear_weight_decay", "must be >= 0"),
    ("eval.linear_batch_size=0", "eval.linear_batch_size", "=0 is not allowed: must be >= 1"),
    ("eval.linear_protocol=byol", "eval.linear_protocol", "it needs data.stream=true"),
    (
        f"{STREAM} eval.linear_protocol=byol",
        "eval.linear_lr",
        "=0.0003 is not allowed: it is the default of the authors' Adam probe, not a learning rate for "
        "eval.linear_protocol=byol (SGD with Nesterov momentum); set BYOL's values, as configs/imagenet/*.yaml do: "
        "--set eval.linear_lr=0.2 --set eval.linear_weight_decay=0 --set eval.linear_batch_size=128 --set "
        "eval.linear_epochs=80 (the batch is per process: 1024 on 8 GPUs)",
    ),
    ("eval.linear_protocol=simclr", "eval.linear_protocol", "expected one of 'authors', 'byol'"),
    ("eval.linear_momentum=1", "eval.linear_momentum", "must lie in [0, 1)"),
    ("eval.batch_size=0", "eval.batch_size", "=0 is not allowed: must be >= 1"),
    ("eval.online_probe=x", "eval.online_probe", "has the wrong type; expected bool"),
    ("eval.online_probe_lr=0", "eval.online_probe_lr", "must be > 0"),
    ("eval.untrained=sometimes", "eval.untrained", "has the wrong type; expected bool"),
    ("diag.every=-1", "diag.every", "must be >= 0 (0 disables diagnostics)"),
    ("diag.stop_on_collapse=x", "diag.stop_on_collapse", "has the wrong type; expected bool"),
    ("diag.rho=1", "diag.rho", "must lie in [0, 1)"),
    ("log.backends=[tensorboard,tensorboard]", "log.backends", "name each tracker once"),
    ("log.backends=[comet]", "log.backends[0]", "expected one of 'tensorboard', 'wandb', 'mlflow'"),
    ("log.backends={a:1}", "log.backends", "has the wrong type; expected a list"),
    ("log.backends=comet", "log.backends[0]", "expected one of 'tensorboard', 'wandb', 'mlflow'"),
    ("log.project=''", "log.project", "must not be empty"),
]


@pytest.mark.parametrize("overrides,key,allowed", BAD, ids=[row[0].split()[0] for row in BAD])
def test_impossible_value_is_refused_naming_the_key_and_what_is_allowed(overrides, key, allowed):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides.split())
    msg = str(info.value)
    assert msg.startswith((f"{key}=", f"{key}: ")), msg  # the key first, as `key=value` or `key: value`
    assert allowed in msg, msg
    assert "\n" not in msg  # one line on the command line


def test_the_table_covers_every_key_of_the_schema():
    """A new config key must get its impossible values (at least a wrong type) into BAD."""
    named = {key.split("[")[0] for _, key, _ in BAD}
    assert set(flatten(Config().to_dict())) - named == set()


# Options the chosen predictor does not read: a warning naming the option, the predictor and who reads it (not a
# refusal: a sweep-wide --set over mixed predictors is legitimate), so config.yaml never silently records a setting
# that did nothing.
UNUSED = [
    (
        "predictor.name=optimal predictor.zero_mean=true",
        re.escape(
            "predictor.zero_mean=True has no effect: predictor.name=optimal does not use it (only directpred, "
            "directcopy do); config.yaml records it as given (its default is predictor.zero_mean=false)"
        ),
    ),
    (
        "predictor.name=directcopy predictor.c=0.1",
        re.escape(
            "predictor.c=0.1 has no effect: predictor.name=directcopy does not use it (only directpred does); "
            "config.yaml records it as given (its default is predictor.c=0.0)"
        ),
    ),
    (
        "predictor.name=directcopy predictor.eps_mode=paper",
        re.escape(
            "predictor.eps_mode='paper' has no effect: predictor.name=directcopy does not use it (only directpred does)"
        ),
    ),
    ("predictor.name=optimal predictor.eps=0.2", "predictor.eps=0.2 has no effect: .*only directpred, directcopy do"),
    ("predictor.name=linear predictor.rho=0.5", "predictor.rho=0.5 has no effect: .*directpred, directcopy, optimal"),
    ("predictor.name=none predictor.freq=4", "predictor.freq=4 has no effect: predictor.name=none does not use it"),
    ("predictor.name=linear predictor.average=cumulative", "predictor.average='cumulative' has no effect"),
    ("predictor.name=directpred predictor.ridge=0.01", r"predictor.ridge=0.01 has no effect: .*\(only optimal does\)"),
    ("predictor.hidden_dim=64", r"predictor.name=directpred does not use it \(only mlp does\)"),
    ("predictor.name=linear predictor.mlp_bias=false", r"its default is predictor.mlp_bias=true\)"),
    ("predictor.name=directcopy predictor.symmetric=true", r"\(only linear, mlp do\)"),
]


@pytest.mark.parametrize("overrides,message", UNUSED, ids=[row[0] for row in UNUSED])
def test_an_option_the_predictor_does_not_read_draws_a_warning(overrides, message):
    with pytest.warns(UserWarning, match=message) as record:
        load_config(None, overrides.split())
    assert len([w for w in record if "has no effect" in str(w.message)]) == 1  # the one option, once


# A valid value other than the default for every predictor option.
OTHER_VALUE = dict(
    bias="true",
    mlp_bias="false",
    symmetric="true",
    hidden_dim="64",
    rho="0.5",
    eps="0.2",
    freq="2",
    eps_mode="paper",
    c="0.1",
    zero_mean="true",
    average="cumulative",
    partitions="2",
    ridge="0.01",
    update_at="after_step",
)


@pytest.mark.parametrize("name", sorted(PREDICTOR_OPTIONS))
def test_each_predictor_takes_exactly_the_options_it_reads(name):
    """Every option other than its default is accepted silently with a predictor that reads it (update_at: all of
    them) and with a warning naming the option with any other; the refusals of bias and partitions say more."""
    assert set(OTHER_VALUE) == {f.name for f in dataclasses.fields(PredictorConfig)} - {"name"}
    for key, value in OTHER_VALUE.items():
        overrides = [f"predictor.name={name}", f"predictor.{key}={value}"]
        refused = {"partitions": "predictor.name=directpred only", "bias": f"predictor.name={name} has none"}
        if key in PREDICTOR_OPTIONS[name] or key == "update_at":
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # no warning for an option the predictor reads
                assert str(getattr(load_config(None, overrides).predictor, key)).lower() == value
        elif key in refused:
            with pytest.raises(ConfigError, match=rf"^predictor\.{key}=.* is not allowed: ") as info:
                load_config(None, overrides)
            assert refused[key] in str(info.value)
        else:
            with pytest.warns(UserWarning, match=rf"^predictor\.{key}=.* has no effect: predictor.name={name} "):
                assert str(getattr(load_config(None, overrides).predictor, key)).lower() == value


def test_the_predictor_options_table_is_what_the_builders_read():
    """PREDICTOR_OPTIONS against directpred.heads: the PredictorConfig fields each registered builder reads (the
    partitioned DirectPred included), recorded on a proxy, are the table's row for that name."""

    class Recording:
        def __init__(self, cfg: PredictorConfig) -> None:
            self.cfg, self.read = cfg, set()

        def __getattr__(self, key: str):
            self.read.add(key)
            return getattr(self.cfg, key)

    assert set(PREDICTORS) == set(PREDICTOR_OPTIONS)
    for name in PREDICTORS:
        read = set()
        for partitions in (0, 2) if name == "directpred" else (0,):
            cfg = Recording(PredictorConfig(name=name, partitions=partitions))
            build_predictor(8, cfg)  # type: ignore[arg-type]
            read |= cfg.read
        assert read - {"name"} == set(PREDICTOR_OPTIONS[name]), name


def test_a_single_tracker_name_is_a_one_element_list():
    assert load_config(None, ["log.backends=tensorboard"]).log.backends == ["tensorboard"]


def test_a_gpu_index_beyond_the_machine_is_refused_naming_the_ones_there(monkeypatch):
    """cuda:N passes the config check on any machine; where the run starts, an N the machine lacks is a ConfigError
    (torch's 'invalid device ordinal' later)."""
    import torch

    from directpred.runtime import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ConfigError) as info:
        resolve_device("cuda:2")
    assert (
        str(info.value)
        == "train.device='cuda:2' but this machine has 2 GPU(s) (cuda:0 to cuda:1); use one of them, or auto"
    )


WARMUP_TOO_LONG = (
    "optim.warmup_epochs=5.0 is not allowed: the linear warm-up must end before train.epochs=2 ends, else the "
    "learning rate never reaches optim.lr=0.03 (at most 0.4 x it, in the last step); set optim.warmup_epochs below 2 "
    "(e.g. --set optim.warmup_epochs=0.2) or raise train.epochs"
)


def test_a_warmup_as_long_as_the_run_is_refused_naming_both_keys_and_the_fix():
    """The lr warm-up runs over round(warmup_epochs * steps_per_epoch) steps and the schedule over train.epochs (also
    under train.max_steps): a warm-up that does not end first never lets the learning rate reach optim.lr."""
    from directpred.config import check_schedule
    from directpred.train.optim import lr_factor

    # the property the check protects: 2 epochs of 10 steps under a 5-epoch warm-up peak at 2/5 of optim.lr
    assert max(lr_factor(s, 20, 50, "warmup_cosine") for s in range(20)) == pytest.approx(0.4)
    for extra in ([], ["train.max_steps=3"], ["optim.schedule=warmup_cosine"]):
        cfg = load_config(None, ["optim.warmup_epochs=5", "train.epochs=2", *extra])  # validate() lets old runs load
        with pytest.raises(ConfigError) as info:
            check_schedule(cfg)
        assert str(info.value) == WARMUP_TOO_LONG
    with pytest.raises(ConfigError, match=r"^optim.warmup_epochs=2.0 is not allowed: .* reaches optim.lr=0.03 only "):
        check_schedule(load_config(None, ["optim.warmup_epochs=2", "train.epochs=2"]))
    check_schedule(load_config(None, ["optim.warmup_epochs=1.5", "train.epochs=2"]))  # ends before the run does


def test_the_trainer_refuses_a_too_long_warmup_before_making_the_run_directory(tmp_path):
    from directpred.train.loop import Trainer

    cfg = load_config(None, ["optim.warmup_epochs=5", "train.epochs=2", "train.device=cpu"])
    with pytest.raises(ConfigError) as info:
        Trainer(cfg, tmp_path / "run").fit()
    assert str(info.value) == WARMUP_TOO_LONG
    assert not (tmp_path / "run").exists()


def test_a_warmup_that_rounds_to_the_whole_run_in_steps_is_refused():
    """warmup_epochs=0.95 of a 1-epoch run passed the check in epochs, but at 10 steps per epoch the trainer's
    round(0.95 x 10) = 10 warm-up steps are the whole run: the learning rate reached optim.lr only in its last step."""
    from directpred.config import check_schedule
    from directpred.train.optim import lr_factor

    assert [lr_factor(s, 10, round(0.95 * 10), "warmup_cosine") for s in range(10)].index(1.0) == 9
    cfg = load_config(None, ["optim.warmup_epochs=0.95", "train.epochs=1"])
    check_schedule(cfg)  # in epochs: 0.95 < 1
    with pytest.raises(ConfigError) as info:
        check_schedule(cfg, steps_per_epoch=10)
    assert str(info.value) == (
        "optim.warmup_epochs=0.95 is not allowed: the linear warm-up of 10 steps (round(0.95 x 10 steps per epoch)) "
        "must end before the run's 10 steps (train.epochs=1) end, else the learning rate reaches optim.lr=0.03 only "
        "in the last step; set optim.warmup_epochs to at most 0.9 (9 steps; e.g. --set optim.warmup_epochs=0.1) or "
        "raise train.epochs"
    )
    for ok, spe in (("0.9", 10), ("0.95", 100), ("0.04", 10), ("0", 1)):  # 9 of 10, 95 of 100, 0 steps: no warm-up
        check_schedule(load_config(None, [f"optim.warmup_epochs={ok}", "train.epochs=1"]), steps_per_epoch=spe)


def test_the_trainer_refuses_a_warmup_as_long_as_the_run_in_steps(tmp_path, tiny_overrides):
    from directpred.train.loop import Trainer

    cfg = load_config(None, [*tiny_overrides, "optim.warmup_epochs=0.95", "train.epochs=1"])  # 128 images / 16
    with pytest.raises(ConfigError) as info:
        Trainer(cfg, tmp_path / "run").setup()
    assert str(info.value) == (
        "optim.warmup_epochs=0.95 is not allowed: the linear warm-up of 8 steps (round(0.95 x 8 steps per epoch)) "
        "must end before the run's 8 steps (train.epochs=1) end, else the learning rate reaches optim.lr=0.03 only "
        "in the last step; set optim.warmup_epochs to at most 0.875 (7 steps; e.g. --set optim.warmup_epochs=0.1) or "
        "raise train.epochs"
    )
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


def test_a_sweep_cell_with_a_too_long_warmup_is_refused_when_the_file_loads(tmp_path):
    from directpred.sweep import load_sweep

    quickstart = Path(REPO_DIR) / "configs" / "cpu" / "quickstart.yaml"
    sweep = tmp_path / "warm.yaml"
    sweep.write_text(f"base: {quickstart}\naxes: {{optim.warmup_epochs: [0.5, 5]}}\nset: {{train.epochs: 2}}\n")
    with pytest.raises(ConfigError) as info:
        load_sweep(sweep)
    assert str(info.value).startswith(f"{sweep}: cell 'warmup_epochs=5' (seed 0): optim.warmup_epochs=5.0 is not")


def test_the_byol_probe_values_the_refusal_names_are_the_imagenet_configs_and_load():
    """eval.linear_protocol=byol under the Adam probe's eval.linear_lr default is refused (row in BAD); the values its
    message gives are those of the six paper configs (configs/imagenet/byol_*.yaml), and they load as --set."""
    with pytest.raises(ConfigError) as info:
        load_config(None, [*STREAM.split(), "eval.linear_protocol=byol"])
    fix = re.findall(r"--set (eval\.\w+)=(\S+)", str(info.value))
    assert [k for k, _ in fix] == [
        "eval.linear_lr",
        "eval.linear_weight_decay",
        "eval.linear_batch_size",
        "eval.linear_epochs",
    ]
    configs = sorted((Path(REPO_DIR) / "configs" / "imagenet").glob("byol_*.yaml"))
    assert len(configs) == 6
    for path in configs:
        cfg = load_config(path, ["data.path=/"])
        assert cfg.eval.linear_protocol == "byol"
        assert {k: float(v) for k, v in fix} == {k: float(getattr(cfg.eval, k[5:])) for k, _ in fix}, path
    cfg = load_config(None, [*STREAM.split(), "eval.linear_protocol=byol", *(f"{k}={v}" for k, v in fix)])
    assert (cfg.eval.linear_lr, cfg.eval.linear_epochs) == (0.2, 80)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # BYOL's values draw no warning (nor do the configs above)
        load_config(None, [*STREAM.split(), "eval.linear_protocol=byol", *(f"{k}={v}" for k, v in fix)])
        assert load_config(None, ["eval.linear_protocol=authors"]).eval.linear_lr == 3e-4  # the authors' probe
    # Any other lr is taken; the Adam probe's weight decay and epochs under it, kept unseen before, are named.
    with pytest.warns(UserWarning) as caught:
        load_config(None, [*STREAM.split(), "eval.linear_protocol=byol", "eval.linear_lr=3e-3"])
    assert [str(w.message) for w in caught] == [
        "eval.linear_protocol=byol runs with eval.linear_weight_decay=0.001 (BYOL: 0) and eval.linear_epochs=50 "
        "(BYOL: 80): the defaults of the authors' Adam probe, not BYOL's values; set them (configs/imagenet/*.yaml "
        "do) unless you mean these"
    ]
