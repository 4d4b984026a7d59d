"""distrib's version, written here and nowhere else.

Read without importing anything: by the build (``pyproject.toml`` names this attribute; setuptools
reads the assignment statically, so building needs no torch), by ``distrib.__version__`` and by
``distrib-launch --version`` (``launch/version.py`` runs this file alone: the launcher never
imports torch). Keep it one plain string assignment.
"""
__version__ = "0.1.0"
