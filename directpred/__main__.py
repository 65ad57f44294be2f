"""``python -m directpred`` is the same as the ``directpred`` command."""

from directpred.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
