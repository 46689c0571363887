"""knnlm: turn any Hugging Face causal language model into a kNN-LM (Khandelwal et al., 2020).

Public API (imported lazily, so ``import knnlm`` and the CLI start fast)::

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
    # the core object and the ways to use it
    "KNNLM": "knnlm.model",
    "evaluate": "knnlm.model",
    "tune": "knnlm.model",
    "Gate": "knnlm.gate",
    "load_gate": "knnlm.gate",
    "LMCache": "knnlm.evaluation",
    "format_results": "knnlm.evaluation",
    "KNNLogitsProcessor": "knnlm.generate",
    "Retriever": "knnlm.retrieval",
    # settings
    "BuildConfig": "knnlm.config",
    "EvalConfig": "knnlm.config",
    # datastores: building, the on-disk format
    "build_datastore": "knnlm.build",
    "check_build_inputs": "knnlm.data",
    "Datastore": "knnlm.datastore",
    "DatastoreWriter": "knnlm.datastore",
    "Header": "knnlm.datastore",
    "open_datastore": "knnlm.datastore",
    "open_or_create": "knnlm.datastore",
    "subset_datastore": "knnlm.datastore",
    "merge_datastores": "knnlm.datastore",
    "reindex_datastore": "knnlm.datastore",
    # models, keys, corpora
    "load_model": "knnlm.loading",
    "capture_keys": "knnlm.capture",
    "find_key_module": "knnlm.capture",
    "windows": "knnlm.data",
    # the formula
    "interpolate": "knnlm.scoring",
    "interpolate_target": "knnlm.scoring",
    "reference_interpolate": "knnlm.scoring",
    "reference_interpolate_target": "knnlm.scoring",
    # errors
    "KnnlmError": "knnlm.errors",
    "ConfigError": "knnlm.errors",
    "CorpusError": "knnlm.errors",
    "DatastoreError": "knnlm.errors",
    "GenerateError": "knnlm.errors",
    "IndexSpecError": "knnlm.errors",
    "KeyLayerError": "knnlm.errors",
    "ModelLoadError": "knnlm.errors",
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
