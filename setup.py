# Everything about the package is in pyproject.toml; this shim only serves pips older than 21.3,
# which cannot install a pyproject-only project in editable mode.
from setuptools import setup

setup()
