"""The memorization suite: how much a kNN-LM datastore is worth as the base model shrinks.

    python -m experiments.memorization --help

``documents`` (the corpora as lists of ``{"name", "text"}``), ``tasks`` (the evaluations),
``suite`` (the cached runner and its command line), ``summary`` (summary.json, parameter
multiples), ``plots`` (the PNGs). See docs/memorization.md.
"""
