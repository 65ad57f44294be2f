"""kNN and the authors' linear probe of the quick-start network at its random initialisation, for seeds 0-5 (the
initialisation train.seed gives, as Trainer.setup draws it), with §1's settings (fp32, the CIFAR-10 mirror).

    cd CHECKOUT && OMP_NUM_THREADS=1 python docs/results/cpu_predictors_6seeds/untrained.py OUT.json \
        ../shared/data/cifar10-jpeg.tar.gz
"""

import json
import sys
import tempfile
import time

from directpred.config import load_config
from directpred.eval.protocol import evaluate
from directpred.train.loop import Trainer

out = {}
for seed in range(6):
    cfg = load_config(
        "configs/cpu/quickstart.yaml",
        [
            "train.epochs=1",
            "data.dataset=folder",
            f"data.path={sys.argv[2]}",
            "train.precision=fp32",
            f"train.seed={seed}",
            "train.progress=false",
        ],
    )
    t = Trainer(cfg, f"{tempfile.gettempdir()}/untrained_run_{seed}")  # a run directory it needs
    t.setup()
    t0 = time.time()
    r = evaluate(t.method, t.data, cfg, t.device, linear=True)
    out[seed] = {k: float(v) for k, v in r.items()} | {"seconds": time.time() - t0}
    print(seed, out[seed], flush=True)
    t.logger.close()
json.dump(out, open(sys.argv[1], "w"), indent=1)
