"""Host-device synchronisations per two-view augmentation call, per recipe, counted on the CPU.

    OMP_NUM_THREADS=1 python benchmarks/augment_syncs.py --out benchmarks/results/augment_syncs_<commit>.json

A GPU run stalls the host whenever it reads a value off the device (``bool(t)``, ``.item()``, ``.tolist()``), asks
for a result whose shape depends on the data (``.nonzero()``, boolean-mask indexing, ``unique``), or copies from the
host without ``non_blocking=True`` (``.to(device)``, ``torch.tensor(data, device=...)``: PyTorch ends such a copy
with ``cudaStreamSynchronize``). This script finds those calls without a GPU: :class:`SyncCounter`, a
``TorchFunctionMode``, marks the image batch and everything computed from it or moved to "the device" (any ``.to``
or factory call that names a device: on this CPU run the batch's device is the CPU) as device tensors, and counts
the calls above on them. Calls on host tensors (the parameter draw, index building) are not syncs and are not
counted; an operation mixing a device tensor with a host tensor of more than one element is counted apart
(``mixed``: it would raise on a GPU). kornia's ``_to_device_nonblocking`` copies without blocking on CUDA (its
docstring) and is counted as such. The review's count (every ``nonzero``/``any``/``all``/``__bool__``/``item``/
``tolist`` call, host or device) is reported beside it.

Per recipe: the counts for one ``TwoViewAugment`` call, the same for parameters drawn onto the device
(``draw_view_params(..., device=...)`` then ``apply_view_params``, the placement the augmentation used before
``augsync``), a SHA-256 digest of both views (equal digests at two commits: bit-identical views) and the CPU wall
time per call (the cost of a sync is GPU time the host waits for: only a GPU run can measure the gain).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import weakref
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from directpred.data.augment import TwoViewAugment, apply_view_params, draw_view_params, recipe

#: The review's counted names (/tmp/review3/syncs.py), on any tensor.
REVIEW_NAMES = {"nonzero", "item", "__bool__", "tolist", "any", "all"}
#: Reading a device value on the host.
READS = {"__bool__", "item", "tolist", "__int__", "__float__", "__index__", "numpy", "cpu"}
#: Results whose shape depends on the data.
DATA_SHAPES = {"nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "repeat_interleave"}
#: Copies a device tensor may take host data by (blocking unless ``non_blocking=True``).
TRANSFERS = {"to", "cuda", "copy_"}
#: Factories that copy host data to the named device (blocking).
HOST_DATA_FACTORIES = {"tensor", "as_tensor", "asarray"}
#: Indexing calls (a host index tensor is copied to the device, blocking).
INDEXING = {"__getitem__", "__setitem__", "index_put_", "index_select", "index_add_", "index_copy_"}
#: Recipes: name -> (view size, input image size); the training sizes of each dataset.
RECIPES = {"cifar": (32, 32), "stl10": (96, 96), "imagenet": (224, 256)}


class SyncCounter(TorchFunctionMode):
    """Count the calls that would make the host wait for the device, on tensors marked as device tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: Counter[str] = Counter()  # host-device syncs, by the call's name
        self.mixed: Counter[str] = Counter()  # device and host tensors in one op: an error on a GPU
        self.review: Counter[str] = Counter()  # the review's count, host tensors included
        self._device: dict[int, weakref.ref[torch.Tensor]] = {}

    def mark(self, t: torch.Tensor) -> torch.Tensor:
        """Mark ``t`` as living on the device."""
        self._device[id(t)] = weakref.ref(t)
        return t

    def on_device(self, t: Any) -> bool:
        r = self._device.get(id(t)) if isinstance(t, torch.Tensor) else None
        return r is not None and r() is t

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 (torch's protocol)
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name in REVIEW_NAMES:
            self.review[name] += 1
        leaves = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)]
        dev = [self.on_device(x) for x in leaves]
        names_device = "device" in kwargs or any(isinstance(a, (torch.device, str)) for a in args[1:])
        nonblocking = bool(kwargs.get("non_blocking")) or sys._getframe(1).f_code.co_name == "_to_device_nonblocking"
        to_device = False
        if name in TRANSFERS and (names_device or name == "cuda" or (name == "copy_" and dev[0])):
            to_device = True
            src = leaves[-1] if name == "copy_" else leaves[0]
            if not self.on_device(src) and src.numel() > 0 and not nonblocking:
                self.syncs[f"{name} (blocking host->device)"] += 1
        elif name in HOST_DATA_FACTORIES and kwargs.get("device") is not None:
            to_device = True
            if not (args and isinstance(args[0], torch.Tensor) and self.on_device(args[0])):
                self.syncs[f"{name}(data, device=...) (blocking host->device)"] += 1
        elif any(dev):
            if name in READS or name in DATA_SHAPES or (name == "where" and len(args) + len(kwargs) == 1):
                self.syncs[name] += 1
            elif name in INDEXING and any(x.dtype == torch.bool and x.dim() > 0 for x in leaves[1:2]):
                self.syncs[f"{name} (boolean mask)"] += 1
            for x, d in zip(leaves, dev, strict=True):
                if d or x.dim() == 0:  # a 0-dim host tensor is a scalar argument, allowed with device tensors
                    continue
                if name in INDEXING and dev[0] and not x.is_floating_point():
                    self.syncs[f"{name} (host index, blocking host->device)"] += 1  # PyTorch copies the index
                else:
                    self.mixed[name] += 1
        elif "device" in kwargs and kwargs["device"] is not None:
            to_device = True  # a factory filling a tensor on the device (torch.arange, torch.full): no copy
        out = func(*args, **kwargs)
        if to_device and isinstance(out, torch.Tensor) and any(out is x for x in leaves):
            out = out.view(out.shape)  # a copy to the CPU's "device" returns its source: mark a new alias only
        if to_device or any(dev):
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self.mark(t)
        return out


def _digest(*views: torch.Tensor) -> str:
    h = hashlib.sha256()
    for v in views:
        h.update(v.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def measure(name: str, batch: int, seed: int, repeats: int) -> dict[str, Any]:
    """Counts, digest and CPU time of one two-view call of recipe ``name``."""
    size, side = RECIPES[name]
    views = recipe(name, size)
    aug = TwoViewAugment(*views)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, side, side, 3), dtype=torch.uint8, generator=g)
    with SyncCounter() as c:
        x1, x2 = aug(c.mark(images.clone()), torch.Generator().manual_seed(seed))
    x = images.permute(0, 3, 1, 2).float().div(255.0)
    with SyncCounter() as legacy:  # the parameters drawn onto the device, as before augsync
        g = torch.Generator().manual_seed(seed)
        xd = legacy.mark(x.clone())
        for r in views:
            apply_view_params(xd.clone(), draw_view_params(batch, side, side, r, g, device=xd.device), r)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        aug(images, torch.Generator().manual_seed(seed))
        times.append(time.perf_counter() - t)
    return {
        "view_size": size,
        "image_size": side,
        "batch": batch,
        "syncs": sum(c.syncs.values()),
        "syncs_by_call": dict(c.syncs),
        "mixed_device_ops": dict(c.mixed),
        "review_count": sum(c.review.values()),
        "review_count_by_call": dict(c.review),
        "params_on_device_syncs": sum(legacy.syncs.values()),
        "params_on_device_syncs_by_call": dict(legacy.syncs),
        "views_sha256": _digest(x1, x2),
        "cpu_ms_per_call_median": 1000 * statistics.median(times),
    }


def _commit() -> str:
    repo = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "directpred"], cwd=repo, capture_output=True)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--batch", type=int, default=64, help="images per call (default 64)")
    p.add_argument("--seed", type=int, default=0, help="the augmentation generator's seed")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per recipe (CPU wall time, median)")
    p.add_argument("--small", action="store_true", help="every recipe at 32 px (a quick check of the counts)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    a = p.parse_args()
    if a.batch < 1 or a.repeats < 1:
        p.error(f"--batch and --repeats must be at least 1, got {a.batch} and {a.repeats}")
    if a.small:
        RECIPES.update({k: (32, 40) for k in ("stl10", "imagenet")})
    torch.set_num_threads(1)
    results: dict[str, Any] = {
        "commit": _commit(),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "load_avg_1min_before": os.getloadavg()[0],
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": 1,
        },
        "recipes": {name: measure(name, a.batch, a.seed, a.repeats) for name in a.recipes},
    }
    results["machine"]["load_avg_1min_after"] = os.getloadavg()[0]
    print("| recipe | syncs per two-view call | review's count | parameters on the device | views sha256 | CPU ms |")
    print("|---|---|---|---|---|---|")
    for name, m in results["recipes"].items():
        print(
            f"| {name} | {m['syncs']} | {m['review_count']} | {m['params_on_device_syncs']} | "
            f"`{m['views_sha256']}` | {m['cpu_ms_per_call_median']:.0f} |"
        )
    for name, m in results["recipes"].items():
        print(f"{name}: {m['syncs_by_call']}; mixed-device ops: {m['mixed_device_ops'] or 'none'}")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
