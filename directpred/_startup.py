"""What is noted as soon as ``directpred`` is first imported, before torch and the seconds its import takes (layer 0,
imports nothing of the package).

``PARENT_PID``: the parent process at that moment; under ``torchrun``, the launcher that started this worker, which
:func:`directpred.distributed.die_with_launcher` tells apart from whatever adopted the worker if the launcher was
killed during those imports.
"""

import os

PARENT_PID = os.getppid()
