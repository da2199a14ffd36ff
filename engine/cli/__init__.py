"""The ``freezeasguard`` console script (``freezeasguard.engine.cli.main:main``)."""
