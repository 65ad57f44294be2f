"""``python -m directpred`` is the same as the ``directpred`` command."""

import gc

from directpred.cli import main

if __name__ == "__main__":
    try:
        code = main()
    finally:
        # The interpreter's last garbage collection walks every object torch, torchvision and torch._dynamo
        # allocated at import: 1.5-2.5 s of each process's exit on the 2-core machine, for nothing, since the
        # process ends. Frozen objects are skipped by it (and are freed by reference counting as before).
        gc.freeze()
    raise SystemExit(code)
