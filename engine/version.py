"""The package version: one definition, read by the build (pyproject's dynamic version) and the code."""
__version__ = "0.3.0"
