"""Measure the cost of the training diagnostics (not a test; run by hand, numbers go to docs/diagnostics.md).

    OMP_NUM_THREADS=1 python benchmarks/diagnostics_overhead.py [--steps 20] [--every 50] [--set key=value ...]

Times, on the quick-start recipe (ResNet-18 width 16, batch 128, BYOL + DirectPred unless overridden): a
training step, ``Diagnostics.observe`` on an ordinary step (the F^ update only), ``observe`` on a report step,
and logging the report row (metrics.jsonl + TensorBoard, spectra as histograms). Prints the overhead at
``diag.every = --every`` (50 by default). The script times a report on every step itself, so ``diag.every`` is not
an override it takes.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time

import torch

from directpred.config import load_config
from directpred.data.order import epoch_order
from directpred.diagnostics.hook import Diagnostics
from directpred.train.loop import Trainer

WARMUP = 2  # untimed steps first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help=f"training steps, the first {WARMUP} untimed (warm-up)")
    parser.add_argument("--every", type=int, default=50, help="the diag.every to give the overhead for (default 50)")
    parser.add_argument("--set", action="append", default=[], help="config override key=value (repeatable)")
    args = parser.parse_args()
    if args.steps <= WARMUP:
        parser.error(f"--steps must be at least {WARMUP + 1}: the first {WARMUP} steps are warm-up, not timed")
    if args.every < 1:
        parser.error(f"--every must be at least 1, not {args.every}")
    if any(kv.split("=", 1)[0].strip() == "diag.every" for kv in args.set):
        parser.error(
            "--set diag.every is not taken: the script times a report on every step itself; "
            "give the report period for the overhead figure as --every N"
        )
    cfg = load_config("configs/cpu/quickstart.yaml", ["train.progress=false", "diag.every=1", *args.set])
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, tmp).setup()
        diag = trainer.diagnostics
        ordinary = Diagnostics(cfg, trainer.method)
        ordinary.every = 10**9  # never reports: the per-step cost only
        order = epoch_order(len(trainer.data.pretrain), cfg.train.seed, 0)
        t_step, t_ord, t_rep, t_log = [], [], [], []
        trainer.method.train()
        for i in range(args.steps):
            t0 = time.perf_counter()
            res = trainer.train_step(trainer._batch(order, i))
            t1 = time.perf_counter()
            ordinary.observe(trainer.step, res.out)
            t2 = time.perf_counter()
            row = diag.observe(trainer.step, res.out)
            t3 = time.perf_counter()
            trainer.logger.log({"step": trainer.step, **row}, group="diag")
            t4 = time.perf_counter()
            if i >= WARMUP:
                t_step.append(t1 - t0)
                t_ord.append(t2 - t1)
                t_rep.append(t3 - t2)
                t_log.append(t4 - t3)
        trainer.logger.close()
    m = {k: statistics.median(v) for k, v in (("step", t_step), ("ordinary", t_ord), ("report", t_rep), ("log", t_log))}
    every = args.every
    overhead = (m["report"] + m["log"] + (every - 1) * m["ordinary"]) / (every * m["step"])
    print(
        f"threads={torch.get_num_threads()} {cfg.method.name}+{cfg.predictor.name} "
        f"width={cfg.backbone.width} "
        f"batch={cfg.train.batch_size} (medians over {len(t_step)} steps)"
    )
    print(f"  training step       {1e3 * m['step']:8.1f} ms")
    for key, name in (("ordinary", "observe, ordinary "), ("report", "observe, report   ")):
        print(f"  {name}  {1e3 * m[key]:8.2f} ms  ({100 * m[key] / m['step']:.2f} % of a step)")
    print(f"  log the report row  {1e3 * m['log']:8.1f} ms")
    print(f"  overhead at diag.every={every}: {100 * overhead:.2f} % of training time")


if __name__ == "__main__":
    main()
    gc.freeze()  # skip the exit's collection over torch's import-time objects (1-2 s; see directpred/__main__.py)
