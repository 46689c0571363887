"""knnlm: turn any Hugging Face causal language model into a kNN-LM (Khandelwal et al., 2020).

Public API (imported lazily, so ``import knnlm`` and the CLI start fast); everything else stays
importable from its module (``knnlm.scoring``, ``knnlm.retrieval``, ``knnlm.gate``, ...)::

    from knnlm import KNNLM, BuildConfig, build_datastore, load_model
    model, tok = load_model("smollm2")
    ds = build_datastore(model, tok, ["corpus/"], "runs/ds", BuildConfig(context=512))
    knn = KNNLM(model, ds, tok, lam=0.25)
    print(knn.evaluate(texts=["def f(x):\n    return x\n"])["ppl_knn"])
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_API = {
    # the core object, its settings, the ways to use it
    "KNNLM": "knnlm.model",
    "KNNSettings": "knnlm.config",
    "EvalConfig": "knnlm.config",
    "evaluate": "knnlm.model",
    "tune": "knnlm.model",
    "LMCache": "knnlm.evaluation",
    "format_results": "knnlm.evaluation",
    "KNNLogitsProcessor": "knnlm.generate",
    # models and datastores
    "load_model": "knnlm.loading",
    "BuildConfig": "knnlm.config",
    "build_datastore": "knnlm.build",
    "open_datastore": "knnlm.datastore",
    "merge_datastores": "knnlm.derive",
    "subset_datastore": "knnlm.derive",
    "reindex_datastore": "knnlm.derive",
    # errors (every one a KnnlmError; the others are in knnlm.errors)
    "KnnlmError": "knnlm.errors",
    "ConfigError": "knnlm.errors",
    "DatastoreError": "knnlm.errors",
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'knnlm' has no attribute {name!r}")


def __dir__():
    return __all__
