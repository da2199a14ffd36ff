"""Package discovery under the ``package_dir`` mapping (the rest of the metadata is in pyproject.toml).

``engine/`` and ``kernels/`` sit at the top of the repository and install as ``freezeasguard.engine``
and ``freezeasguard.kernels``. Neither folder has an ``__init__.py``: with the repository root on
``sys.path`` (``python -m ...`` or ``python -c ...`` run from it), a top-level ``kernels/`` package
would shadow any installed distribution of that name (Hugging Face's ``kernels``, which transformers
imports), while a folder without ``__init__.py`` is only a namespace portion, and Python prefers a
regular package wherever it sits on the path. Every subpackage below them is found here, so a new one
cannot be left out of the wheel.
"""
from setuptools import find_namespace_packages, setup

PACKAGE_DIR = {"freezeasguard.engine": "engine", "freezeasguard.kernels": "kernels"}


def packages() -> list[str]:
    found = []
    for name, folder in PACKAGE_DIR.items():
        found += [name + sub.removeprefix(folder) for sub in find_namespace_packages(include=[folder, folder + ".*"])
                  if "__pycache__" not in sub]
    return found


setup(packages=packages(), package_dir=PACKAGE_DIR)
