#!/usr/bin/env python
"""Run fxghost's benchmark suite, as ``python -m fxghost bench`` does (``--help`` for options).

Run it from the repository root: the JSON results go to ``benchmarks/results/`` under the current
directory unless ``--out`` says otherwise.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    from fxghost._bench import main
except ImportError:  # a checkout that is not installed: import the package beside this folder
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from fxghost._bench import main

if __name__ == "__main__":
    raise SystemExit(main())
