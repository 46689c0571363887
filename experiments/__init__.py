"""Experiments on knnlm: importable modules, each runnable from the repository root.

    python -m experiments.memorization ...      the memorization suite (docs/memorization.md)
    python -m experiments.train_family ...      train the suite's model family on its own
    python -m experiments.stdlib_quality ...    held-out stdlib perplexity vs datastore size
    python -m experiments.kill_resume_check     SIGKILL a build midway, resume, byte-compare

They use knnlm's public API only; shared helpers are in ``experiments.common``.
"""
