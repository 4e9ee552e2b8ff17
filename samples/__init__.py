"""Deterministic sample datasets and small local models (no downloads), for
the examples, the tests and the benchmarks.

    python -m samples.data     # datasets (and models) in data/sample
    python -m samples.models   # the models alone, in data/sample/models

``samples.text`` makes the text both use; ``samples.data`` builds the models
after the datasets, ``samples.models`` never imports ``samples.data``.
"""
