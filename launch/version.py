"""The version ``distrib-launch --version`` prints: distrib's, from ``distrib/_version.py``.

The launcher must not import the ``distrib`` package (its ``__init__`` imports torch, ~2 s, and
``--version`` should answer even where torch is broken), so this finds the package's folder
without running it and executes the one-line version file alone.
"""
from __future__ import annotations

import importlib.util
import os
import runpy


def distrib_version() -> str:
    """``distrib.__version__`` without importing distrib; "unknown" when distrib is not installed."""
    spec = importlib.util.find_spec("distrib")  # locates the package; does not run its __init__
    if spec is None or not spec.submodule_search_locations:
        return "unknown"
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, "_version.py")
        if os.path.isfile(path):
            return runpy.run_path(path)["__version__"]
    return "unknown"
