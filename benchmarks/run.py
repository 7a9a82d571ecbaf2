#!/usr/bin/env python
"""Run fxghost's benchmark suite (``--help`` for options): ``python benchmarks/run.py``.

Tables go to stdout, progress to stderr, the raw numbers to ``benchmarks/results/`` unless
``--out`` says otherwise.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The checkout's fxghost, installed or not: the suite measures the code beside it.
sys.path[:0] = [str(HERE), str(HERE.parent)]

from suite import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
