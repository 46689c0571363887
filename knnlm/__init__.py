"""knnlm: turn any Hugging Face causal language model into a kNN-LM (Khandelwal et al., 2020).

Public API (imported lazily, so ``import knnlm`` and the CLI start fast)::

    from knnlm import load_model, build_datastore, BuildConfig, open_datastore
    model, tok = load_model("smollm2")
    ds = build_datastore(model, tok, ["corpus/"], "runs/ds", BuildConfig(context=512))
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_API = {
    "BuildConfig": "knnlm.config",
    "EvalConfig": "knnlm.config",
    "evaluate": "knnlm.evaluation",
    "format_results": "knnlm.evaluation",
    "KNNLM": "knnlm.wrapper",
    "KNNLogitsProcessor": "knnlm.generate",
    "GenerateError": "knnlm.generate",
    "Retriever": "knnlm.retrieval",
    "KnnlmError": "knnlm.errors",
    "ConfigError": "knnlm.config",
    "build_datastore": "knnlm.build",
    "subset_datastore": "knnlm.build",
    "merge_datastores": "knnlm.build",
    "Datastore": "knnlm.datastore",
    "DatastoreError": "knnlm.datastore",
    "open_datastore": "knnlm.datastore",
    "open_or_create": "knnlm.datastore",
    "capture_keys": "knnlm.capture",
    "find_key_module": "knnlm.capture",
    "KeyLayerError": "knnlm.capture",
    "CorpusError": "knnlm.data",
    "windows": "knnlm.data",
    "load_model": "knnlm.models",
    "ModelLoadError": "knnlm.models",
    "IndexSpecError": "knnlm.index",
    "interpolate": "knnlm.scoring",
    "interpolate_target": "knnlm.scoring",
    "reference_interpolate": "knnlm.scoring",
    "reference_interpolate_target": "knnlm.scoring",
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
