"""Every error knnlm reports to users, in one place (the ground floor: imports nothing of knnlm).

Library errors speak the Python API: a bad setting names its parameter (``k must be at least 1,
got 0``) and carries it in ``param``; front ends (the command line, the harness's model_args)
rename them with ``rename_params``, from a map derived from their own argument parsers, and
print every ``KnnlmError`` as one line.
"""

from __future__ import annotations

import re

__all__ = ["rename_params", "PARAM_ALIASES",
    "KnnlmError", "ConfigError", "CorpusError", "DatastoreError", "IndexSpecError", "KeyLayerError",
    "ModelLoadError", "GenerateError", "DistributedError",
]


class KnnlmError(ValueError):
    """Bad input or state, with a message that says what was wrong and what to do.

    ``param`` names the Python parameter at fault when there is one; the message then starts with
    that name, so that a front end can replace it by its own spelling (a CLI flag).
    ``everywhere``: every rank of a torchrun job raised it (``knnlm.distributed``), so one of
    them (rank 0) reports it.
    """

    everywhere = False

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.param = param


class ConfigError(KnnlmError):
    """An invalid setting (names the parameter)."""


class CorpusError(KnnlmError):
    """The corpus cannot be read: missing path, no files, empty, binary, undecodable, bad jsonl."""


class DatastoreError(KnnlmError):
    """A datastore is missing, incomplete, corrupt, busy, or does not match the model."""


class IndexSpecError(ConfigError):
    """An index specification FAISS cannot build."""


class KeyLayerError(ConfigError):
    """The key layer could not be found or does not exist."""


class ModelLoadError(KnnlmError):
    """The model or tokenizer cannot be loaded."""


class GenerateError(KnnlmError):
    """kNN-LM generation was asked for something it cannot do (and what to do instead)."""


class DistributedError(KnnlmError):
    """The ranks of a torchrun job disagree (arguments, state), or one of them failed."""


_PARAM = re.compile(r"`([a-z_]+)`")
# a library parameter and its sweep / single-value twin: a front end may spell only one of each pair
PARAM_ALIASES = {"lam": "lambdas", "lambdas": "lam", "temperature": "temperatures", "temperatures": "temperature",
                 "k": "ks", "ks": "k"}


def rename_params(message: str, names: dict[str, str]) -> str:
    """An error message in a front end's words: every `parameter` (in backquotes) that ``names``
    knows (directly or by its ``PARAM_ALIASES`` twin) becomes ``names[parameter]``; whitespace
    runs become one space (one line)."""
    def sub(m: re.Match) -> str:
        p = m.group(1)
        new = names.get(p) or names.get(PARAM_ALIASES.get(p, ""))
        return new if new else m.group(0)

    return _PARAM.sub(sub, " ".join(message.split()))
