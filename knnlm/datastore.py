"""The on-disk datastore: a JSON header beside ``.npy`` arrays and a FAISS index.

Layout of a datastore directory::

    header.json      everything needed to trust the arrays (below); written atomically
    documents.json   per document: name, source, token offset, length, first row, sha256
    tokens.npy       (T,)   int32  the tokenized corpus, documents concatenated
    values.npy       (N,)   int32  next-token id of every key row (N = sum over docs of len - 1)
    keys.npy         (N, D) fp16   hidden states (fp32 with key_dtype="float32")
    index.faiss      FAISS index over keys.npy (CPU index, whatever built it)

All arrays are standard ``.npy`` files (self-describing header, memory-mappable). ``keys.npy`` is
allocated at full size up front and filled in row order; ``header["count"]`` says how many rows
are final, and only advances after the rows are flushed to disk. ``header["status"]`` is
``"building"`` until the index is written, and ``open_datastore`` refuses anything else than
``"complete"`` — an interrupted or failed build never loads as valid.

Row ``r`` of the keys is the hidden state that predicts token ``tokens[doc.offset + j]`` for the
document ``doc`` with ``doc.first_row <= r < doc.first_row + doc.length - 1`` and
``j = r - doc.first_row + 1``: that is the provenance of every key.
"""

from __future__ import annotations

from knnlm.errors import KnnlmError

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "FORMAT_VERSION", "DatastoreError", "Datastore", "open_datastore", "model_identity",
    "write_json_atomic", "read_header", "KEY_DTYPES", "open_or_create",
]

FORMAT_VERSION = 1
HEADER = "header.json"
DOCUMENTS = "documents.json"
TOKENS = "tokens.npy"
VALUES = "values.npy"
KEYS = "keys.npy"
INDEX = "index.faiss"
KEY_DTYPES = {"float16": np.float16, "float32": np.float32}


class DatastoreError(KnnlmError):
    """A datastore is missing, incomplete, corrupt, or does not match the model."""


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON to ``path`` so that readers see the old or the new file, never a torn one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_header(directory: str | os.PathLike) -> dict | None:
    """The header of ``directory``, or None when it holds no datastore."""
    p = Path(directory) / HEADER
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatastoreError(f"{p} is not valid JSON ({e}); the datastore is corrupt, rebuild it") from None


def _hash(parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
        h.update(b"\x00")
    return h.hexdigest()[:16]


# Config fields that describe how a checkpoint was saved or run, not what it computes.
_VOLATILE_CONFIG = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache",
                    "quantization_config", "_attn_implementation", "_attn_implementation_autoset",
                    "architectures", "_commit_hash", "name_or_path", "output_hidden_states",
                    "return_dict", "tie_word_embeddings"}


def model_identity(model, tokenizer, key_module: str) -> dict:
    """What a datastore is tied to: config hash, a weight fingerprint, tokenizer hash.

    The weight fingerprint hashes the first elements of every parameter of the key module's
    decoder layer, rounded to bfloat16 so that fp32 / bf16 loads of one checkpoint agree.
    """
    import torch

    cfg = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE_CONFIG}
    config_hash = _hash([json.dumps(cfg, sort_keys=True, default=str)])
    layer_prefix = key_module.rsplit(".", 1)[0]
    parts = []
    for name, p in sorted(model.named_parameters()):
        if name.startswith(layer_prefix + "."):
            flat = p.detach().reshape(-1)[:256].to("cpu", torch.bfloat16).view(torch.int16)
            parts += [name, flat.numpy().tobytes()]
    vocab = tokenizer.get_vocab()
    tok_parts = [f"{t}\t{i}" for t, i in sorted(vocab.items(), key=lambda x: x[1])]
    tok_parts.append(json.dumps(
        {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}, sort_keys=True))
    return {
        "name_or_path": str(getattr(model, "name_or_path", "") or model.config._name_or_path),
        "class": type(model).__name__,
        "model_type": model.config.model_type,
        "config_hash": config_hash,
        "weights_fingerprint": _hash(parts),
        "tokenizer_hash": _hash(tok_parts),
        "vocab_size": int(model.config.vocab_size),
    }


@dataclass
class Datastore:
    """A complete datastore opened for reading. Arrays are memory-mapped, read-only."""
    path: Path
    header: dict
    documents: list[dict] = field(repr=False)
    keys: np.ndarray = field(repr=False)  # (N, D)
    values: np.ndarray = field(repr=False)  # (N,)
    tokens: np.ndarray = field(repr=False)  # (T,)
    _index: Any = field(default=None, repr=False)

    def __len__(self) -> int:
        return int(self.header["count"])

    @property
    def dim(self) -> int:
        return int(self.header["key"]["dim"])

    @property
    def index(self):
        """The FAISS index, read from disk on first use."""
        if self._index is None:
            from knnlm.index import load_index

            self._index = load_index(self.path / INDEX, self.header)
        return self._index

    def check_compatible(self, identity: dict) -> None:
        """Refuse a model / tokenizer other than the one the datastore was built with."""
        mine = self.header["model"]
        for fieldname, what in (("tokenizer_hash", "tokenizer"), ("config_hash", "model config"),
                                ("weights_fingerprint", "model weights")):
            if mine.get(fieldname) != identity.get(fieldname):
                raise DatastoreError(
                    f"datastore {self.path} was built with another {what} ({fieldname} "
                    f"{mine.get(fieldname)} != {identity.get(fieldname)}; built with model "
                    f"{mine.get('name_or_path')!r}); use that model or rebuild the datastore")

    def provenance(self, rows: np.ndarray) -> list[tuple[str, int]]:
        """(document name, token position of the value) for each key row."""
        starts = np.array([d["first_row"] for d in self.documents], dtype=np.int64)
        rows = np.asarray(rows, dtype=np.int64)
        di = np.searchsorted(starts, rows, side="right") - 1
        out = []
        for r, d in zip(rows.tolist(), di.tolist()):
            doc = self.documents[d]
            out.append((doc["name"], r - doc["first_row"] + 1))
        return out

    def document_tokens(self, doc: int) -> np.ndarray:
        d = self.documents[doc]
        return self.tokens[d["offset"]: d["offset"] + d["length"]]

    def token_counts(self) -> np.ndarray:
        """How often each token id occurs as a value: the datastore-corpus frequency."""
        return np.bincount(self.values, minlength=int(self.header["model"]["vocab_size"]))


def _expect_npy(path: Path, shape: tuple, dtype, what: str) -> np.ndarray:
    if not path.exists():
        raise DatastoreError(f"{path} is missing; the datastore is incomplete, rebuild it")
    try:
        arr = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as e:
        raise DatastoreError(f"{path} is not a readable .npy file ({e}); rebuild the datastore") from None
    if arr.shape != shape or arr.dtype != np.dtype(dtype):
        raise DatastoreError(f"{path} holds {what} of shape {arr.shape} {arr.dtype}, header says "
                             f"{shape} {np.dtype(dtype)}; the datastore is corrupt, rebuild it")
    return arr


def open_datastore(path: str | os.PathLike, *, require_index: bool = True) -> Datastore:
    """Open a complete datastore, validating the header against the files."""
    path = Path(path)
    if not path.is_dir():
        raise DatastoreError(f"datastore directory not found: {path}")
    header = read_header(path)
    if header is None:
        raise DatastoreError(f"{path} holds no datastore ({HEADER} missing); build one with `knnlm build-index`")
    if header.get("format") != "knnlm-datastore" or header.get("format_version") != FORMAT_VERSION:
        raise DatastoreError(f"{path}/{HEADER} is format {header.get('format')!r} v{header.get('format_version')}, "
                             f"this knnlm reads knnlm-datastore v{FORMAT_VERSION}; rebuild the datastore")
    if header.get("status") != "complete":
        raise DatastoreError(f"datastore {path} is incomplete (status {header.get('status')!r}, "
                             f"{header.get('count')}/{header.get('total')} rows); "
                             "finish it with `knnlm build-index --resume` using the same arguments")
    n, d = int(header["count"]), int(header["key"]["dim"])
    if n != int(header["total"]):
        raise DatastoreError(f"datastore {path} is marked complete but has {n}/{header['total']} rows; rebuild it")
    keys = _expect_npy(path / KEYS, (n, d), KEY_DTYPES[header["key"]["dtype"]], "keys")
    values = _expect_npy(path / VALUES, (n,), np.int32, "values")
    tokens = _expect_npy(path / TOKENS, (int(header["tokens"]),), np.int32, "tokens")
    try:
        documents = json.loads((path / DOCUMENTS).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DatastoreError(f"{path}/{DOCUMENTS} is unreadable ({e}); rebuild the datastore") from None
    if len(documents) != int(header["corpus"]["documents"]):
        raise DatastoreError(f"{path}/{DOCUMENTS} lists {len(documents)} documents, header says "
                             f"{header['corpus']['documents']}; rebuild the datastore")
    if require_index:
        if not header.get("index"):
            raise DatastoreError(f"datastore {path} has no index; run `knnlm build-index --resume` to build it")
        if not (path / INDEX).exists():
            raise DatastoreError(f"{path / INDEX} is missing; rebuild the index with "
                                 f"`knnlm build-index --resume` using the same arguments")
    return Datastore(path, header, documents, keys, values, tokens)


def open_or_create(path: str | os.PathLike, create, *, discard_incomplete: bool = False) -> Datastore:
    """The complete datastore at ``path``, or ``create()`` when there is none yet.

    ``create`` is a no-argument callable returning a ``Datastore`` (a build with ``resume=True``,
    a subset, a merge). With ``discard_incomplete`` an incomplete datastore left at ``path`` (an
    interrupted subset or merge, which cannot resume) is removed first; a directory that holds no
    datastore is never removed.
    """
    import shutil

    path = Path(path)
    header = read_header(path) if path.is_dir() else None
    if header is not None and header.get("status") == "complete":
        return open_datastore(path)
    if header is not None and discard_incomplete:
        shutil.rmtree(path)
    return create()


def new_header(*, identity: dict, key_layer: str, dim: int, key_dtype: str, sources: list,
               settings: dict, version: str) -> dict:
    """A fresh header for a build that is about to start (status "tokenizing")."""
    return {
        "format": "knnlm-datastore",
        "format_version": FORMAT_VERSION,
        "knnlm_version": version,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "status": "tokenizing",
        "model": identity,
        "key": {"layer": key_layer, "kind": "ffn_input", "dim": dim, "dtype": key_dtype},
        "values": {"dtype": "int32", "meaning": "next token id"},
        "count": 0,
        "total": None,
        "tokens": None,
        "corpus": {"sources": [s.to_json() for s in sources], "documents": None,
                   "text_field": settings.get("text_field")},
        "window": {"context": settings["context"], "stride": settings["stride"]},
        "build": settings,
        "index": None,
    }
