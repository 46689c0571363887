"""The on-disk datastore, read and written in one place: ``Header``, ``Datastore``,
``DatastoreWriter`` (the datastore-to-datastore operations, subset / merge / reindex, are in
``knnlm.derive``).

Layout of a datastore directory::

    header.json      a ``Header``: everything needed to trust the arrays; written atomically
    documents.json   per document: name, source, token offset, length, first row, sha256
    tokens.npy       (T,)   int32  the tokenized corpus, documents concatenated
    values.npy       (N,)   int32  next-token id of every key row (N = sum over docs of len - 1)
    keys.npy         (N, D) fp16   hidden states (fp32 with key_dtype="float32"; absent with "none")
    index.faiss      FAISS index over the keys (CPU index, whatever built it); ids = row numbers
    index.ivfdata    with index storage "disk": the IVF inverted lists, memory-mapped on load

The header's ``index`` section names the index files (``file``, ``ivfdata``), their ``storage``
(ram | disk) and sizes; ``knnlm reindex`` writes a new index under fresh names and switches the
header to it atomically, so an interrupted reindex leaves the old index in use.
With ``key.dtype`` "none" the keys are spooled to ``keys.npy`` (fp16) while building and removed
once the index is complete: the index's codes are all that is kept (no re-ranking).
Format version 2 (this one) adds key dtype "none" and index storage; version 1 headers are read as
keys kept and index in RAM.
    gate.json        optional: the adaptive-λ / retrieval gate fitted by ``knnlm tune`` (``knnlm.gate``);
                     the header's ``gate`` entry holds its SHA-256 and the datastore identity it
                     was fitted on (``Datastore.identity``), and ``write_gate`` writes both

All arrays are standard ``.npy`` files (self-describing header, memory-mappable). ``keys.npy`` is
allocated at full size up front and filled in row order; ``Header.count`` says how many rows are
final, and only advances after the rows are flushed to disk. A sharded build (torchrun) fills
several row ranges at once: each rank records the ranges it has flushed in its own
``progress.rank<R>.json``, rank 0 folds them into ``progress.json`` (and the prefix into
``count``) when it resumes or finishes; both files are gone once every row is final. ``Header.status`` goes
``tokenizing`` -> ``building`` -> ``complete`` (once the index is written), and ``open_datastore``
refuses anything but ``complete``: an interrupted or failed build never loads as valid.

Row ``r`` of the keys is the hidden state that predicts token ``tokens[doc.offset + j]`` for the
document ``doc`` with ``doc.first_row <= r < doc.first_row + doc.length - 1`` and
``j = r - doc.first_row + 1``: that is the provenance of every key.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import stat
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from knnlm import __version__, config
from knnlm.data import count_targets
from knnlm.errors import ConfigError, CorpusError, DatastoreError

logger = logging.getLogger(__name__)

__all__ = [
    "FORMAT", "FORMAT_VERSION", "DatastoreError", "Header", "KeySpec", "WindowSpec", "CorpusSpec",
    "ModelIdentity", "Datastore", "DatastoreWriter", "open_datastore", "open_or_create", "read_header",
    "model_identity", "write_json_atomic", "disk_errors", "command_of",
    "KEY_DTYPES", "write_gate", "read_gate", "GATE", "build_index", "merge_index", "merge_fills",
    "check_index_shards",
    "index_record", "index_work_dir", "ivfdata_name", "tokenizer_hash",
]

FORMAT = "knnlm-datastore"
FORMAT_VERSION = 2  # written; v2 adds key.dtype "none" and index.storage / index.ivfdata
READABLE_VERSIONS = (1, 2)  # v1 headers without window.bos read as "no <bos> per window" (their protocol)
HEADER = "header.json"
DOCUMENTS = "documents.json"
TOKENS = "tokens.npy"
VALUES = "values.npy"
KEYS = "keys.npy"
INDEX = "index.faiss"
PROGRESS = "progress.json"  # key rows final out of order (a sharded build): [[first, end], ...]
PROGRESS_RANK = "progress.rank{}.json"  # the same, written by one rank of a sharded build
IVFDATA = "index.ivfdata"
INDEX_SHARD = "{stem}.s{part}.faiss"  # shard ``part`` of an index split over rows (``index_shards``): index.s0.faiss
TRAINED = "trained.faiss"  # work files of an index build, in index_work_dir(index): the trained, empty index
SHARD = "shard{:05d}.faiss"  # ... and the shards filled from it (one per rank of a distributed build)
GATE = "gate.json"
GATE_NEXT = "gate.r1.json"  # write_gate alternates between the two: the header's gate is never overwritten
LOCK = ".knnlm.lock"  # held (flock) by the one writer of a directory; other writers are refused
# header key.dtype -> numpy dtype of keys.npy (for "none": of the spool file removed once the index is built)
KEY_DTYPES = {name: np.dtype("float16" if name == "none" else name) for name in config.KEY_DTYPES}
_OWNED_FILES = (HEADER, HEADER + ".tmp", DOCUMENTS, DOCUMENTS + ".tmp", TOKENS, TOKENS + ".tmp", VALUES,
                VALUES + ".tmp", KEYS, INDEX, INDEX + ".tmp", IVFDATA, TOKENS + ".part", VALUES + ".part",
                PROGRESS, PROGRESS + ".tmp", GATE, GATE + ".tmp", GATE_NEXT, GATE_NEXT + ".tmp")
_OWNED_GLOBS = ("index.r*.faiss", "index.r*.ivfdata", "index.s*.faiss", "index.s*.ivfdata",
                "*.tmp", ".index*.staging", ".index*.build",
                PROGRESS_RANK.format("*"))
COPY_ROWS = 1 << 16  # key rows per chunk when copying between datastores (constant memory)


_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


def open_own(path: str | os.PathLike, flags: int, mode: int = 0o644) -> int:
    """``os.open`` of a file the package writes inside a datastore: never through a symbolic link
    (``O_NOFOLLOW``), never blocking on a FIFO; a link or a non-regular file there is refused with
    one line. Returns the descriptor."""
    path = Path(path)
    try:
        fd = os.open(path, flags | _NOFOLLOW | os.O_NONBLOCK, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise DatastoreError(f"{path} is a symbolic link; a datastore's own files must be regular files in it, "
                                 "refusing to write through it") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise DatastoreError(f"{path} is not a regular file; a datastore's own files must be regular files in it")
    os.set_blocking(fd, True)
    return fd


def create_own(path: str | os.PathLike, mode: str = "wb"):
    """A new file object at ``path`` (a work or temp file): whatever is there is removed first
    (``unlink`` removes a link, never its target), then created exclusively (``O_EXCL``), never
    following a link."""
    path = Path(path)
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISDIR(os.lstat(path).st_mode):
            raise DatastoreError(f"{path} is a directory; a datastore's own files must be regular files in it")
        os.unlink(path)
    fd = open_own(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    return os.fdopen(fd, mode)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON to ``path`` so that readers see the old or the new file, never a torn one: a
    fresh temp file (``O_EXCL | O_NOFOLLOW``) renamed over ``path`` (a rename replaces a link at
    ``path``, never writes through it)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with create_own(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(staged: Sequence[Path], directory: Path) -> None:
    """Move staged files into ``directory`` so that a crash leaves each either absent or whole:
    fsync each, rename in the given order (the file that names the others last), fsync the
    directory."""
    for p in staged:
        fd = open_own(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    for p in staged:
        os.replace(p, directory / p.name)
    _fsync_dir(directory)


# ------------------------------------------------------------------------------------ index files


def ivfdata_name(index_file: str) -> str:
    """The inverted-lists file of an index stored on disk: next to it, same stem."""
    return str(Path(index_file).with_suffix(".ivfdata"))


def index_work_dir(index_path: str | os.PathLike) -> Path:
    """Where the trained index and the shards of the index ``index_path`` are written while it is
    built (next to it: on the same filesystem, shared by every rank of a distributed build)."""
    index_path = Path(index_path)
    return index_path.parent / f".{index_path.name}.build"


def index_record(plan, merged: dict, seconds: float) -> dict:
    """The index section of the header: the plan (``knnlm.index.IndexPlan``), ``merge_index``'s
    record, the time."""
    return {"spec": plan.spec, "factory": plan.factory, "metric": "l2", "nprobe": plan.nprobe, **merged,
            "build_seconds": round(seconds, 2)}


def merge_index(trained: Path, shards: Sequence[Path], index_path: str | os.PathLike, *, storage: str,
                ntotal: int) -> dict:
    """``knnlm.index.merge_shards`` into a staging directory next to ``index_path``, then the
    files renamed into place, the inverted lists first and the index file (which names them) last:
    a crash leaves either no index at ``index_path`` or a complete one (callers record it in the
    header only after). Returns ``{"file", "ivfdata", "ivfdata_bytes", "bytes", "ntotal",
    "storage"}``."""
    from knnlm.index import merge_shards

    index_path = Path(index_path)
    lists = ivfdata_name(index_path.name)
    stage = index_path.parent / f".{index_path.name}.staging"
    if storage == "disk":  # FAISS writes on-disk lists through a memory map: a full disk there is a SIGBUS
        need = int(sum(Path(p).stat().st_size for p in shards) * 1.05) + (1 << 20)
        fs = os.statvfs(index_path.parent)
        if fs.f_bavail * fs.f_frsize < need:
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)}: the inverted lists need about {need:,} bytes, "
                          f"{fs.f_bavail * fs.f_frsize:,} are free")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        got = merge_shards(trained, shards, stage / index_path.name, ivfdata_path=stage / lists, storage=storage,
                           ntotal=ntotal)
        _commit([p for p in (stage / lists, stage / index_path.name) if p.exists()], index_path.parent)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    data = index_path.parent / lists
    on_disk = got["on_disk"]
    return {"file": index_path.name, "ivfdata": lists if on_disk else None,
            "ivfdata_bytes": data.stat().st_size if on_disk else None,
            "bytes": index_path.stat().st_size + (data.stat().st_size if on_disk else 0),
            "ntotal": got["ntotal"], "storage": storage}


def check_index_shards(plan, n: int, index_shards: int) -> None:
    """``index_shards`` N > 1 needs an IVF recipe (the shards share its coarse quantizer) and N <= ``n``."""
    if index_shards > 1:
        if "IVF" not in plan.factory:
            raise DatastoreError(f"`index_shards` needs an IVF index (shards share its coarse quantizer); "
                                 f"{plan.factory} is not one: use `index` ivfsq, ivfpq or an IVF factory string",
                                 param="index_shards")
        if index_shards > n:
            raise DatastoreError(f"`index_shards` {index_shards} is more than the {n} keys", param="index_shards")


def merge_fills(trained: Path, fills: Sequence[Path], bounds: Sequence[int], index_path: str | os.PathLike, *,
                storage: str, index_shards: int = 1) -> dict:
    """The filled row ranges ``fills`` (``knnlm.index.fill_shard`` of rows ``[bounds[i],
    bounds[i + 1])``) -> the index file(s) at ``index_path`` (``merge_index``): one index, or with
    ``index_shards`` N > 1 one index file per fill (``INDEX_SHARD``, ``len(fills)`` == N). Returns
    the record of the header's index section (``shards``: each file's record and rows)."""
    index_path = Path(index_path)
    n = bounds[-1]
    if index_shards == 1:
        return merge_index(trained, fills, index_path, storage=storage, ntotal=n)
    if len(fills) != index_shards:
        raise ValueError(f"merge_fills: {len(fills)} fills for {index_shards} index shards")
    parts = []
    for i, p in enumerate(fills):
        part = index_path.parent / INDEX_SHARD.format(stem=index_path.stem, part=i)
        rec = merge_index(trained, [p], part, storage=storage, ntotal=bounds[i + 1] - bounds[i])
        parts.append({**rec, "rows": [bounds[i], bounds[i + 1]]})
    record = {**parts[0], "shards": parts, "bytes": sum(r["bytes"] for r in parts), "ntotal": n}
    del record["rows"]
    return record


def build_index(keys_path: str | os.PathLike, n: int, dim: int, plan, index_path: str | os.PathLike, *,
                seed: int = 0, progress: bool = True, use_gpu: bool | None = None, shards: int = 1,
                index_shards: int = 1, trained_from: str | os.PathLike | None = None) -> dict:
    """Train, fill (in ``shards`` consecutive row ranges, one after the other) and merge the
    planned index (``knnlm.index.plan_index``) over ``keys_path`` into ``index_path``: the
    single-process path, the same functions a distributed build runs per rank. Returns the index
    section of the header (``index_record``).

    ``index_shards`` N > 1: N index files (``INDEX_SHARD`` next to ``index_path``) that share the
    one trained index (coarse quantizer and PQ), shard i holding rows ``[n i / N, n (i + 1) / N)``
    with their global row numbers as ids (``knnlm.sharding``); the record lists them under
    ``shards`` and its ``file`` is shard 0's.

    ``trained_from``: an IVF index file of ``plan``'s recipe over the same keys whose training
    (quantizer, codebooks) is reused instead of training anew (``knnlm.index.copy_training``)."""
    check_index_shards(plan, n, index_shards)
    from tqdm.auto import tqdm

    from knnlm.index import copy_training, fill_shard, train_index

    keys = np.load(keys_path, mmap_mode="r") if isinstance(keys_path, (str, os.PathLike)) else keys_path
    if keys.shape != (n, dim):
        raise DatastoreError(f"{keys_path} holds keys of shape {keys.shape}, expected {(n, dim)}")
    index_path = Path(index_path)
    t0 = time.time()
    work = index_work_dir(index_path)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        if trained_from is not None:
            copy_training(trained_from, work / TRAINED)
        else:
            train_index(keys, plan, work / TRAINED, seed=seed, use_gpu=use_gpu)
        shards = 1 if not plan.shardable else max(1, min(int(shards), n))
        if index_shards > 1:  # one fill per index shard, each merged into its own index file
            shards = index_shards
        bounds = [n * i // shards for i in range(shards + 1)]
        paths = [work / SHARD.format(i) for i in range(shards)]
        with tqdm(total=n, unit="key", desc="adding keys", disable=not progress) as bar:
            for i, p in enumerate(paths):
                fill_shard(work / TRAINED, keys, bounds[i], bounds[i + 1], p, progress=bar)
        record = merge_fills(work / TRAINED, paths, bounds, index_path, storage=plan.storage,
                             index_shards=index_shards)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return index_record(plan, record, time.time() - t0)


# ------------------------------------------------------------------------------------ header


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


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


@dataclass(frozen=True)
class ModelIdentity:
    """What a datastore is tied to: the model config, a weight fingerprint, the tokenizer."""
    name_or_path: str
    model_class: str
    model_type: str
    config_hash: str
    weights_fingerprint: str
    tokenizer_hash: str
    vocab_size: int

    # (field, what it is called in errors), in the order they are compared
    COMPARED = (("tokenizer_hash", "tokenizer"), ("config_hash", "model config"),
                ("weights_fingerprint", "model weights"))

    def mismatch(self, other: ModelIdentity) -> tuple[str, str] | None:
        """The first (field, what) on which ``other`` differs, or None when it is the same model."""
        for name, what in self.COMPARED:
            if getattr(self, name) != getattr(other, name):
                return name, what
        return None

    def to_json(self) -> dict:
        d = asdict(self)
        d["class"] = d.pop("model_class")
        return d

    @classmethod
    def from_json(cls, d: dict) -> ModelIdentity:
        return cls(str(d.get("name_or_path") or ""), str(d.get("class") or ""), str(d.get("model_type") or ""),
                   d["config_hash"], d["weights_fingerprint"], d["tokenizer_hash"], int(d["vocab_size"]))


def model_identity(model, tokenizer, key_module: str) -> ModelIdentity:
    """The identity of ``model`` + ``tokenizer`` with keys at ``key_module``.

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
    return ModelIdentity(
        name_or_path=str(getattr(model, "name_or_path", "") or model.config._name_or_path),
        model_class=type(model).__name__, model_type=model.config.model_type, config_hash=config_hash,
        weights_fingerprint=_hash(parts), tokenizer_hash=tokenizer_hash(tokenizer),
        vocab_size=int(model.config.vocab_size))


def tokenizer_hash(tokenizer) -> str:
    """The tokenizer's part of a ``ModelIdentity``: its vocabulary and special tokens."""
    vocab = tokenizer.get_vocab()
    parts = [f"{t}\t{i}" for t, i in sorted(vocab.items(), key=lambda x: x[1])]
    parts.append(json.dumps({k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}, sort_keys=True))
    return _hash(parts)


@dataclass
class KeySpec:
    layer: str  # module path whose input is the key
    dim: int
    dtype: str  # float16 | float32
    kind: str = "ffn_input"


@dataclass
class WindowSpec:
    """The window protocol the keys were extracted with (eval uses the same by default)."""
    context: int
    stride: int
    bos: int | None = None  # token put in front of every mid-document window; None = none


@dataclass
class CorpusSpec:
    sources: list[dict]  # knnlm.data.Source.to_json() of every input
    documents: int | None = None
    text_field: str | None = "text"


@dataclass
class Header:
    """``header.json``, typed. ``from_json`` checks the format and its version."""
    model: ModelIdentity
    key: KeySpec
    window: WindowSpec
    corpus: CorpusSpec
    build: dict  # build settings, stats, subset_of / merged_from
    status: str = "tokenizing"  # tokenizing -> building -> complete
    count: int = 0  # key rows final on disk
    total: int | None = None  # key rows when complete
    tokens: int | None = None  # corpus tokens
    index: dict | None = None  # build_index's record (index_record): spec, factory, nprobe, storage, file, ...
    gate: dict | None = None  # {"file", "sha256", "datastore"} of the tuned gate (write_gate), or None
    generation: str | None = None  # new for every set of arrays + index (build, reindex): what a reader pins
    knnlm_version: str = __version__
    created: str = field(default_factory=_now)

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    @property
    def nprobe(self) -> int | None:
        return (self.index or {}).get("nprobe")

    @property
    def has_keys(self) -> bool:
        return self.key.dtype != "none"

    @property
    def index_file(self) -> str:
        return (self.index or {}).get("file") or INDEX

    @property
    def index_storage(self) -> str:
        return (self.index or {}).get("storage") or "ram"  # v1 headers: always in RAM

    def to_json(self) -> dict:
        d = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "knnlm_version": self.knnlm_version,
            "created": self.created, "status": self.status, "model": self.model.to_json(),
            "key": asdict(self.key), "values": {"dtype": "int32", "meaning": "next token id"},
            "count": self.count, "total": self.total, "tokens": self.tokens, "corpus": asdict(self.corpus),
            "window": asdict(self.window), "build": self.build, "index": self.index,
        }
        if self.gate is not None:  # optional entry: headers without a gate are written as before
            d["gate"] = self.gate
        if self.generation is not None:
            d["generation"] = self.generation
        return d

    @classmethod
    def from_json(cls, d: Any, where: str | os.PathLike = HEADER) -> Header:
        """The typed header of the JSON ``d``, every field type-checked (``check_header``)."""
        check_header(d, where)
        return cls(
            model=ModelIdentity.from_json(d["model"]), key=_typed(KeySpec, d["key"]),
            window=_typed(WindowSpec, d["window"]), corpus=_typed(CorpusSpec, d["corpus"]),
            build=dict(d.get("build") or {}), status=d["status"], count=d["count"], total=d["total"],
            tokens=d["tokens"], index=d.get("index"), gate=d.get("gate"), generation=d.get("generation"),
            knnlm_version=str(d.get("knnlm_version", "?")), created=str(d.get("created", "?")))

    def write(self, directory: str | os.PathLike) -> None:
        write_json_atomic(Path(directory) / HEADER, self.to_json())


STATUSES = ("tokenizing", "building", "complete")
_INT, _STR, _OPT_INT, _OPT_STR = "an integer", "a string", "an integer or null", "a string or null"


def _bare_name(v) -> bool:
    return isinstance(v, str) and v not in ("", ".", "..") and Path(v).name == v and "\x00" not in v


# field -> (what it must be, check): every field of header.json a reader uses, checked in one place
def _is_int(v, lo=0, hi=None) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo and (hi is None or v < hi)


_HEADER_FIELDS = {
    "status": (f"one of {', '.join(STATUSES)}", lambda v: v in STATUSES),
    "count": ("an integer >= 0", _is_int),
    "total": ("an integer >= 0 or null", lambda v: v is None or _is_int(v)),
    "tokens": ("an integer >= 0 or null", lambda v: v is None or _is_int(v)),
    "model": ("an object", lambda v: isinstance(v, dict)),
    "model.config_hash": (_STR, lambda v: isinstance(v, str)),
    "model.weights_fingerprint": (_STR, lambda v: isinstance(v, str)),
    "model.tokenizer_hash": (_STR, lambda v: isinstance(v, str)),
    "model.vocab_size": ("an integer >= 1", lambda v: _is_int(v, 1)),
    "model.name_or_path": (_OPT_STR, lambda v: v is None or isinstance(v, str)),
    "model.class": (_OPT_STR, lambda v: v is None or isinstance(v, str)),
    "model.model_type": (_OPT_STR, lambda v: v is None or isinstance(v, str)),
    "key": ("an object", lambda v: isinstance(v, dict)),
    "key.layer": (_STR, lambda v: isinstance(v, str)),
    "key.dim": ("an integer >= 1", lambda v: _is_int(v, 1)),
    "key.dtype": (f"one of {', '.join(config.KEY_DTYPES)}", lambda v: v in config.KEY_DTYPES),
    "key.kind": (_OPT_STR, lambda v: v is None or isinstance(v, str)),
    "window": ("an object", lambda v: isinstance(v, dict)),
    "window.context": ("an integer >= 2", lambda v: _is_int(v, 2)),
    "window.stride": ("an integer >= 1", lambda v: _is_int(v, 1)),
    "corpus": ("an object", lambda v: isinstance(v, dict)),
    "corpus.sources": ("a list of objects", lambda v: isinstance(v, list) and all(isinstance(x, dict) for x in v)),
    "corpus.documents": ("an integer >= 0 or null", lambda v: v is None or _is_int(v)),
    "corpus.text_field": (_OPT_STR, lambda v: v is None or isinstance(v, str)),
    "build": ("an object or null", lambda v: v is None or isinstance(v, dict)),
    "build.max_tokens": ("an integer >= 2 or null", lambda v: v is None or _is_int(v, 2)),
    "build.reindexed": ("a list", lambda v: isinstance(v, list)),
    "build.subset_of": ("an object", lambda v: isinstance(v, dict)),
    "build.merged_from": ("a list of objects", lambda v: isinstance(v, list) and all(isinstance(x, dict) for x in v)),
    "index": ("an object or null", lambda v: v is None or isinstance(v, dict)),
    "index.file": ("a file name in the datastore or null", lambda v: v is None or _bare_name(v)),
    "index.ivfdata": ("a file name in the datastore or null", lambda v: v is None or _bare_name(v)),
    "index.ivfdata_bytes": (_OPT_INT, lambda v: v is None or _is_int(v)),
    "index.storage": ("ram, disk or null", lambda v: v in (None, "ram", "disk")),
    "index.nprobe": ("an integer >= 1 or null", lambda v: v is None or _is_int(v, 1)),
    "index.factory": (_OPT_STR, lambda v: v is None or isinstance(v, str)),
    "index.spec": (_OPT_STR, lambda v: v is None or isinstance(v, str)),
    "index.ntotal": (_OPT_INT, lambda v: v is None or _is_int(v)),
    "index.bytes": (_OPT_INT, lambda v: v is None or _is_int(v)),
    "index.build_seconds": ("a number or null", lambda v: v is None or isinstance(v, (int, float))
                            and not isinstance(v, bool)),
    "gate": ("an object or null", lambda v: v is None or isinstance(v, dict)),
    "gate.file": ("a file name in the datastore", _bare_name),
    "gate.sha256": (_STR, lambda v: isinstance(v, str)),
    "gate.datastore": (_STR, lambda v: isinstance(v, str)),
    "generation": (_OPT_STR, lambda v: v is None or isinstance(v, str)),
}
_OPTIONAL_FIELDS = {"model.name_or_path", "model.class", "model.model_type", "key.kind", "corpus.documents",
                    "corpus.text_field", "build", "index", "gate", "generation", "index.file", "index.ivfdata",
                    "build.max_tokens", "build.reindexed", "build.subset_of", "build.merged_from",
                    "index.ivfdata_bytes", "index.storage", "index.nprobe", "index.factory", "index.spec",
                    "index.ntotal", "index.bytes", "index.build_seconds"}


def check_header(d: Any, where: str | os.PathLike = HEADER) -> None:
    """Every field of a ``header.json`` (parsed JSON) a reader uses, type- and range-checked here,
    once: a malformed header is one ``DatastoreError`` naming the field, never a traceback."""
    if not isinstance(d, dict):
        raise DatastoreError(f"{where} is not a JSON object; the datastore is corrupt, rebuild it")
    if d.get("format") != FORMAT or d.get("format_version") not in READABLE_VERSIONS:
        raise DatastoreError(f"{where} is format {str(d.get('format'))[:40]!r} version "
                             f"{str(d.get('format_version'))[:20]}, this knnlm reads {FORMAT} versions "
                             f"{', '.join(map(str, READABLE_VERSIONS))}; rebuild the datastore")
    for name, (what, ok) in _HEADER_FIELDS.items():
        parent, _, key = name.rpartition(".")
        holder = d.get(parent) if parent else d
        if parent and not isinstance(holder, dict):
            continue  # an optional section that is absent / null (a required one fails on its own line)
        if key not in holder:
            if name in _OPTIONAL_FIELDS:
                continue
            raise DatastoreError(f"{where} lacks field {name!r}; the datastore is corrupt, rebuild it")
        if not ok(holder[key]):
            raise DatastoreError(f"{where}: field {name!r} must be {what}, got {_short(holder[key])}; "
                                 "the datastore is corrupt, rebuild it")
    bos, vocab = d["window"].get("bos"), d["model"]["vocab_size"]
    if not (bos is None or _is_int(bos, 0, vocab)):
        raise DatastoreError(f"{where}: field 'window.bos' must be null or a token id below the vocabulary size "
                             f"{vocab}, got {_short(bos)}; the datastore is corrupt, rebuild it")
    if d["window"]["stride"] >= d["window"]["context"]:
        raise DatastoreError(f"{where}: field 'window.stride' must be below 'window.context'; the datastore is "
                             "corrupt, rebuild it")
    if d["status"] == "complete" and (d["total"] is None or d["tokens"] is None):
        raise DatastoreError(f"{where}: a complete datastore must record 'total' and 'tokens'; rebuild it")


def _short(v) -> str:
    """A value from an untrusted file, for a one-line message: repr (escapes control codes), cut."""
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def new_generation() -> str:
    """A fresh id for one set of arrays + index (``Header.generation``)."""
    return os.urandom(8).hex()


def _typed(cls, d: dict):
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


def read_header(directory: str | os.PathLike) -> Header | None:
    """The header of ``directory``, or None when it holds no datastore."""
    p = Path(directory) / HEADER
    if not p.exists():
        return None
    return Header.from_json(read_json(p), p)


def read_json(p: Path) -> Any:
    """A JSON file of a datastore (untrusted): bad JSON, bad bytes or nesting too deep for the
    parser are one ``DatastoreError``."""
    try:
        return json.loads(p.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        what = "nested too deeply" if isinstance(e, RecursionError) else f"not valid JSON ({e})"
        raise DatastoreError(f"{p} is {what}; the datastore is corrupt, rebuild it") from None
    except OSError as e:
        raise DatastoreError(f"{p} is unreadable ({os.strerror(e.errno) if e.errno else e}); "
                             "the datastore is corrupt, rebuild it") from None


def command_of(header: Header) -> str:
    """The command that writes a datastore like ``header``'s: subset, merge or build-index."""
    return "subset" if "subset_of" in header.build else "merge" if "merged_from" in header.build else "build-index"


# ------------------------------------------------------------------------------------ reading


@dataclass
class Datastore:
    """A complete datastore opened for reading. Arrays are memory-mapped, read-only."""
    path: Path
    header: Header
    documents: list[dict] = field(repr=False)
    keys: np.ndarray | None = field(repr=False)  # (N, D); None when the datastore keeps no keys
    values: np.ndarray = field(repr=False)  # (N,)
    tokens: np.ndarray = field(repr=False)  # (T,)
    _index: Any = field(default=None, repr=False)

    def __len__(self) -> int:
        return self.header.count

    @property
    def dim(self) -> int:
        return self.header.key.dim

    @property
    def index(self):
        """The FAISS index, read from disk on first use: the one the header opened with names (the
        header is checked unchanged before and after the read, ``check_generation``); an index
        split over rows (``index_shards``) as one ``knnlm.sharding.ShardedIndex`` of all its shards."""
        if self._index is None:
            shards = (self.header.index or {}).get("shards")
            self.check_generation()
            try:
                if shards:
                    index = self.index_shards(range(len(shards)))
                else:
                    index = self._load_index(self.header.index, len(self))
            except (DatastoreError, OSError):
                self.check_generation()  # a writer replaced the index while it was read: say that instead
                raise
            self.check_generation()
            self._index = index
        return self._index

    @property
    def index_shard_count(self) -> int:
        """How many shards the index is split into (1: one index)."""
        return len((self.header.index or {}).get("shards") or [None])

    def index_shards(self, which, world=None):
        """The index shards ``which`` (their numbers), as a ``knnlm.sharding.ShardedIndex``;
        ``world``: the other shards are searched by the other torchrun ranks (``shard_search``)."""
        from knnlm.sharding import ShardedIndex

        shards = (self.header.index or {}).get("shards") or []
        parts = [self._load_index(shards[i], shards[i]["ntotal"]) for i in which]
        return ShardedIndex(parts, len(self), world)

    def use_index(self, index) -> None:
        """Search ``index`` (e.g. ``index_shards``' share of this rank) instead of the whole index."""
        self._index = index

    def _load_index(self, record: dict, n: int):
        from knnlm.index import load_index

        h = self.header
        lists = record.get("ivfdata")
        return load_index(self.path / (record.get("file") or h.index_file), n=n, dim=self.dim, nprobe=h.nprobe,
                          storage=h.index_storage,
                          ivfdata=self.path / lists if lists else None,
                          ivfdata_bytes=record.get("ivfdata_bytes") if lists else None)

    def check_generation(self) -> None:
        """Refuse when ``header.json`` no longer describes the arrays and index this object opened
        (a concurrent ``build-index --overwrite`` or ``reindex`` replaced them): one line naming
        the writer, never a result mixing two generations."""
        try:
            now = read_header(self.path)
        except DatastoreError:
            now = None
        mine = self.header
        if now is not None and (now.generation, now.status, now.count, now.index) == \
                (mine.generation, mine.status, mine.count, mine.index):
            return
        pid = lock_holder(self.path)
        who = f"another process (pid {pid}) is writing it" if pid != "?" else "another process rewrote it"
        raise DatastoreError(f"datastore {self.path} changed while it was being read ({who}: a `build-index "
                             "--overwrite` or `reindex`); run again once that has finished")

    def require_keys(self, param: str, remedy: str) -> None:
        """Refuse ``param`` (something that reads the stored keys) on a datastore that keeps none."""
        if self.keys is None:
            raise DatastoreError(f"`{param}` needs the stored keys, and datastore {self.path} keeps none (built with "
                                 f"`key_dtype` none); {remedy}", param=param)

    def check_compatible(self, identity: ModelIdentity) -> None:
        """Refuse a model / tokenizer other than the one the datastore was built with."""
        diff = self.header.model.mismatch(identity)
        if diff:
            self._refuse(*diff, getattr(identity, diff[0]))

    def check_tokenizer(self, tokenizer) -> None:
        """Refuse a tokenizer other than the datastore's: with the tokenizer alone, before a model
        is loaded (``check_compatible`` checks the rest once the model is there)."""
        got = tokenizer_hash(tokenizer)
        if got != self.header.model.tokenizer_hash:
            self._refuse("tokenizer_hash", "tokenizer", got)

    def _refuse(self, name: str, what: str, got) -> None:
        mine = self.header.model
        raise DatastoreError(
            f"datastore {self.path} was built with another {what} ({name} {getattr(mine, name)} != {got}; built "
            f"with model {mine.name_or_path!r}); use that model or rebuild the datastore")

    def document_of(self, rows) -> np.ndarray:
        """Index of the document each key row belongs to (rows >= 0)."""
        starts = np.array([d["first_row"] for d in self.documents], dtype=np.int64)
        return np.searchsorted(starts, np.asarray(rows, dtype=np.int64), side="right") - 1

    def provenance(self, rows: np.ndarray) -> list[tuple[str, int]]:
        """(document name, token position of the value) for each key row."""
        rows = np.asarray(rows, dtype=np.int64)
        return [(self.documents[d]["name"], r - self.documents[d]["first_row"] + 1)
                for r, d in zip(rows.tolist(), self.document_of(rows).tolist())]

    def identity(self) -> str:
        """A fingerprint of what the datastore holds: model identity, key spec, window protocol,
        row and token counts, and every document (name, SHA-256, first row). A gate fitted on one
        datastore is refused by another (``knnlm.gate``); rebuilding the same corpus with the same
        model gives the same identity (the index is not part of it)."""
        h = self.header
        docs = [(d["name"], d.get("sha256"), d["first_row"], d["length"]) for d in self.documents]
        return _hash([json.dumps(h.model.to_json(), sort_keys=True), json.dumps(asdict(h.key), sort_keys=True),
                      json.dumps(asdict(h.window), sort_keys=True), h.count, h.tokens, json.dumps(docs)])

    def document_tokens(self, doc: int) -> np.ndarray:
        d = self.documents[doc]
        return self.tokens[d["offset"]: d["offset"] + d["length"]]

    def token_counts(self) -> np.ndarray:
        """How often each token id occurs as a value: the datastore-corpus frequency."""
        return np.bincount(self.values, minlength=self.header.model.vocab_size)


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


_DOC_FIELDS = (("name", str), ("source", int), ("offset", int), ("length", int), ("first_row", int))


def _check_documents(path: Path, documents: Any, header: Header) -> None:
    """``documents.json``, type-checked (one line naming the entry and field), and its documents
    tile the tokens and the key rows in order (provenance and self-exclusion rely on it)."""
    where = f"{path}/{DOCUMENTS}"
    if not isinstance(documents, list):
        raise DatastoreError(f"{where} is not a JSON list; rebuild the datastore")
    if len(documents) != header.corpus.documents:
        raise DatastoreError(f"{where} lists {len(documents)} documents, header says "
                             f"{header.corpus.documents}; rebuild the datastore")
    n_sources = len(header.corpus.sources)
    offset = row = 0
    for i, d in enumerate(documents):
        if not isinstance(d, dict):
            raise DatastoreError(f"{where}: document {i} is not an object; rebuild the datastore")
        for name, kind in _DOC_FIELDS:
            v = d.get(name)
            if not isinstance(v, kind) or isinstance(v, bool) or (kind is int and v < 0):
                raise DatastoreError(f"{where}: document {i} field {name!r} must be "
                                     f"{'a string' if kind is str else 'an integer >= 0'}, got {_short(v)}; "
                                     "rebuild the datastore")
        if d["source"] >= max(n_sources, 1) or not isinstance(d.get("sha256", ""), str):
            raise DatastoreError(f"{where}: document {i} names source {d['source']} of {n_sources} (or a "
                                 "non-string sha256); rebuild the datastore")
        if d["offset"] != offset or d["first_row"] != row:
            raise DatastoreError(f"{where}: document {i} ({_short(d['name'])}) starts at token {d['offset']}, "
                                 f"row {d['first_row']}; expected {offset}, {row}; rebuild the datastore")
        offset += d["length"]
        row += count_targets(d["length"])
    if (offset, row) != (header.tokens, header.count):
        raise DatastoreError(f"{where}: the documents hold {offset} tokens and {row} key rows, the header "
                             f"{header.tokens} and {header.count}; rebuild the datastore")


def check_token_ids(ids: np.ndarray, vocab: int, what: str) -> None:
    """Every id of ``ids`` in ``[0, vocab)`` (scanned in chunks: constant memory over a mapped
    array); a ``DatastoreError`` naming the first one out of range."""
    for lo in range(0, len(ids), 1 << 24):
        chunk = np.asarray(ids[lo:lo + (1 << 24)])
        if len(chunk) and (chunk.min() < 0 or chunk.max() >= vocab):
            bad = lo + int(np.flatnonzero((chunk < 0) | (chunk >= vocab))[0])
            raise DatastoreError(f"{what}: entry {bad} is token id {int(ids[bad])}, outside the model's vocabulary "
                                 f"[0, {vocab}); the datastore is corrupt or of another model, rebuild it")


def open_datastore(path: str | os.PathLike, *, require_index: bool = True) -> Datastore:
    """Open a complete datastore, validating the header against the files."""
    path = Path(path)
    if not path.is_dir():
        raise DatastoreError(f"datastore directory not found: {path}")
    header = read_header(path)
    if header is None:
        raise DatastoreError(f"{path} holds no datastore ({HEADER} missing); build one with `knnlm build-index`")
    check_entries(path, header)
    if not header.complete:
        again = ("finish it with `knnlm build-index --resume` using the same arguments"
                 if command_of(header) == "build-index" else
                 f"it is an interrupted `knnlm {command_of(header)}`: run that command again with the same arguments")
        raise DatastoreError(f"datastore {path} is incomplete (status {header.status!r}, "
                             f"{header.count}/{header.total} rows); {again}")
    n, d = header.count, header.key.dim
    if n != header.total:
        raise DatastoreError(f"datastore {path} is marked complete but has {n}/{header.total} rows; rebuild it")
    keys = _expect_npy(path / KEYS, (n, d), KEY_DTYPES[header.key.dtype], "keys") if header.has_keys else None
    values = _expect_npy(path / VALUES, (n,), np.int32, "values")
    tokens = _expect_npy(path / TOKENS, (header.tokens,), np.int32, "tokens")
    if not (path / DOCUMENTS).exists():
        raise DatastoreError(f"{path}/{DOCUMENTS} is missing; the datastore is incomplete, rebuild it")
    documents = read_json(path / DOCUMENTS)
    _check_documents(path, documents, header)
    check_token_ids(values, header.model.vocab_size, f"{path / VALUES}")
    check_token_ids(tokens, header.model.vocab_size, f"{path / TOKENS}")
    if require_index:
        if not header.index:
            raise DatastoreError(f"datastore {path} has no index; run `knnlm reindex` to build it")
        files = [name for r in header.index.get("shards") or [header.index]
                 for name in (r.get("file") or header.index_file, r.get("ivfdata")) if name]
        for name in files:
            if not (path / name).exists():
                raise DatastoreError(f"{path / name} is missing; rebuild the index with `knnlm reindex`")
    ds = Datastore(path, header, documents, keys, values, tokens)
    ds.check_generation()  # what was opened is still what the header says: no writer came in between
    return ds


def write_gate(ds: Datastore, payload: dict, out: str | os.PathLike | None = None) -> Path:
    """Write a tuned gate (a JSON-ready dict from ``knnlm.gate``) to the file ``out``, or (``out``
    None) into ``ds``'s directory as ``gate.json`` with its SHA-256 and ``ds.identity()`` in the
    header's ``gate`` entry. Into the datastore: takes the directory's writer lock; the file and
    the header are each replaced atomically: the new gate goes to the name the header does not use
    (``gate.json`` / ``gate.r1.json`` in turn), then the header is switched to it, then the old file
    is removed, so a crash at any point leaves the previous gate in use. Returns the file."""
    if out is not None:
        with disk_errors(Path(out), "tune"):
            write_json_atomic(out, payload)
        return Path(out)
    path = Path(ds.path)
    fd = _lock(path)
    try:
        header = read_header(path)
        if header is None or not header.complete:
            raise DatastoreError(f"datastore {path} is not complete; finish it before tuning a gate")
        check_entries(path, header)
        old = (header.gate or {}).get("file")
        name = GATE_NEXT if old == GATE else GATE  # never the file the header names now
        with disk_errors(path, "tune"):
            write_json_atomic(path / name, payload)
            digest = hashlib.sha256((path / name).read_bytes()).hexdigest()
            header.gate = {"file": name, "sha256": digest, "datastore": ds.identity()}
            header.write(path)
        ds.header.gate = header.gate
        if old and old != name:
            (path / old).unlink(missing_ok=True)
        return path / name
    finally:
        _unlock(path, fd)


def read_gate(ds: Datastore, path: str | os.PathLike | None = None) -> tuple[dict, str]:
    """A gate's JSON and where it was read: the file the header's ``gate`` entry names (``path``
    None: a bare name inside the datastore, its SHA-256 checked) or the file at ``path``."""
    if path is None:
        entry = ds.header.gate or {}
        name = entry.get("file", GATE)
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise DatastoreError(f"{ds.path}/{HEADER} names gate file {name!r} outside the datastore; it is corrupt")
        p = Path(ds.path) / name
        if not p.is_file():
            raise DatastoreError(f"{p} is missing (the header lists a gate); re-run `knnlm tune`")
        raw = p.read_bytes()
        if hashlib.sha256(raw).hexdigest() != entry.get("sha256"):
            raise DatastoreError(f"{p} does not match the SHA-256 in {ds.path}/{HEADER}; re-run `knnlm tune`")
    else:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"`gate` file not found: {p}", param="gate")
        raw = p.read_bytes()
    try:
        return json.loads(raw), str(p)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatastoreError(f"{p} is not valid JSON ({e}); re-run `knnlm tune`") from None


def open_or_create(path: str | os.PathLike, create: Callable[[], Datastore], *,
                   discard_incomplete: bool = False) -> Datastore:
    """The complete datastore at ``path``, or ``create()`` when there is none yet.

    ``create`` is a no-argument callable returning a ``Datastore`` (a build with ``resume=True``,
    a subset, a merge). With ``discard_incomplete`` an incomplete datastore left at ``path`` (an
    interrupted subset or merge, which cannot resume) is removed first; a directory that holds no
    datastore is never removed.
    """
    path = Path(path)
    header = read_header(path) if path.is_dir() else None
    if header is not None and header.complete:
        return open_datastore(path)
    if header is not None and discard_incomplete:
        shutil.rmtree(path)
    return create()


# ------------------------------------------------------------------------------------ writing


class DatastoreWriter:
    """Writes one datastore directory, in the order the format requires.

    ``start`` (a fresh datastore, or one to resume) -> ``write_corpus`` (tokens, values,
    documents; status ``building``) -> ``write_rows`` + ``commit`` (keys, durable before counted)
    -> ``finalize`` (index; status ``complete``). Every step leaves a directory that either resumes
    or is refused by ``open_datastore``, never one that opens as valid before it is.
    """

    def __init__(self, path: Path, header: Header, fresh: bool, lock_fd: int | None = None,
                 target: Path | None = None):
        self.path, self.header, self.fresh = path, header, fresh
        self.target = target  # building beside a complete datastore (overwrite): swapped into ``target`` at the end
        self._lock_dir = target if target is not None else path  # whose lock ``lock_fd`` holds
        self._lock_fd = lock_fd
        self._fd: int | None = None
        self._offset = 0
        self._dtype = KEY_DTYPES[header.key.dtype]
        self._row_bytes = header.key.dim * self._dtype.itemsize
        self._keys_allocated = False  # prepare_keys ran (once per writer)

    # ---- starting -----------------------------------------------------------------------------
    @classmethod
    def start(cls, path: str | os.PathLike, header: Header, *, resume: bool = False, overwrite: bool = False,
              resume_keys: Sequence[str] = ()) -> DatastoreWriter:
        """A writer for ``header`` at ``path``: a fresh datastore, or the one there when ``resume``
        (same model, same ``build`` settings named in ``resume_keys``, same sources). The writer
        holds the directory's lock until ``release`` (``finalize`` releases it): a second writer
        of the same directory, in this or another process, is refused and changes nothing."""
        path = Path(path)
        check_out(path, resume=resume, overwrite=overwrite)  # the refusals come before anything is created
        created = not path.exists()
        path.mkdir(parents=True, exist_ok=True)
        try:
            lock_fd = _lock(path)
        except DatastoreError:
            if created:
                path.rmdir()
            raise
        try:
            old = check_out(path, resume=resume, overwrite=overwrite)
            check_entries(path, old)
            if old is not None and overwrite and old.complete and not path.is_symlink():
                return cls._beside(path, header, lock_fd, resume_keys=resume_keys)
            if old is not None and not overwrite:
                cls._check_resumable(path, old, header, resume_keys)
                return cls(path, old, fresh=False, lock_fd=lock_fd)
            _clear(path)
            header.generation = new_generation()
            header.write(path)
            return cls(path, header, fresh=True, lock_fd=lock_fd)
        except BaseException:
            _let_go(path, lock_fd, drop_dir=created)
            raise

    @classmethod
    def _beside(cls, path: Path, header: Header, lock_fd: int, *, resume_keys: Sequence[str]) -> DatastoreWriter:
        """A writer of a new datastore in ``overwrite_dir(path)``, next to the complete one at
        ``path`` (which stays in use, under its lock, until ``complete`` swaps the two): a kill
        during the build leaves the old datastore whole. An interrupted overwrite with the same
        settings continues there (a build resumes to the same bytes); another one starts over."""
        stage = overwrite_dir(path)
        if os.path.lexists(stage):
            if stage.is_symlink() or not stage.is_dir():
                raise DatastoreError(f"{stage} is not a directory of knnlm's; remove it, then run again", param="out")
            try:
                old = read_header(stage)
                if old is not None and not old.complete:
                    check_entries(stage, old)
                    cls._check_resumable(path, old, header, resume_keys)
                    logger.info("continuing the interrupted overwrite in %s", stage)
                    return cls(stage, old, fresh=False, lock_fd=lock_fd, target=path)
            except DatastoreError:
                pass  # other settings, or not resumable: start the new datastore over
            shutil.rmtree(stage)
        stage.mkdir()
        header.generation = new_generation()
        header.write(stage)
        return cls(stage, header, fresh=True, lock_fd=lock_fd, target=path)

    @classmethod
    def follow(cls, path: str | os.PathLike) -> DatastoreWriter:
        """A writer of key rows only, for a datastore whose lock another process holds: rank > 0 of
        a sharded build writes its share of ``keys.npy`` and its own progress file, nothing else."""
        path = build_dir(path)
        header = read_header(path)
        if header is None or header.status != "building":
            raise DatastoreError(f"{path}: no datastore waiting for key rows (status "
                                 f"{getattr(header, 'status', None)!r})", param="out")
        return cls(path, header, fresh=False)

    def release(self) -> None:
        """Give up the directory's lock (idempotent)."""
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            _unlock(self._lock_dir, fd)

    @staticmethod
    def _check_resumable(path: Path, old: Header, new: Header, resume_keys: Sequence[str]) -> None:
        diff = old.model.mismatch(new.model)
        if diff:
            raise DatastoreError(f"`out` {path} holds a datastore of another model ({old.model.name_or_path!r}, "
                                 f"{diff[0]} differs); choose another `out`, or pass `overwrite` to replace it",
                                 param="out")
        changed = [k for k in resume_keys if new.build.get(k) != old.build.get(k)]
        if changed:
            k = changed[0]
            raise DatastoreError(f"`{k}` is {new.build.get(k)!r} now, {old.build.get(k)!r} when the build of {path} "
                                 "started; `resume` with the same settings or `overwrite`", param=k)
        if new.corpus.sources != old.corpus.sources:
            raise DatastoreError(f"`data` differs from the input files the build of {path} started with "
                                 "(paths, sizes or hashes); `resume` with the same `data` or `overwrite`", param="data")

    def save_header(self) -> None:
        self.header.write(self.path)

    def discard(self) -> None:
        """Remove what a fresh writer wrote (after a failure before any key was computed) and
        release the lock."""
        fd, self._lock_fd = self._lock_fd, None
        if self.target is not None:  # beside a complete datastore: drop the new one, keep the old
            if self.fresh:
                shutil.rmtree(self.path, ignore_errors=True)
            if fd is not None:
                _unlock(self.target, fd)
            return
        if self.fresh:
            _clear(self.path)
        _let_go(self.path, fd, drop_dir=self.fresh)

    # ---- phase 1: the corpus ------------------------------------------------------------------
    def write_corpus(self, documents: Iterable[tuple[dict, np.ndarray]], progress: bool = True) -> None:
        """``tokens.npy``, ``values.npy``, ``documents.json`` from ``(document, token ids)`` pairs
        (document: ``name``, ``source``, ``sha256``); then status ``building`` with 0 rows."""
        from tqdm.auto import tqdm

        docs, n_tokens, n_rows = [], 0, 0
        tok_raw, val_raw = self.path / (TOKENS + ".part"), self.path / (VALUES + ".part")
        with create_own(tok_raw) as ft, create_own(val_raw) as fv, \
                tqdm(desc="reading corpus", unit="doc", disable=not progress) as bar:
            vocab = self.header.model.vocab_size
            for doc, ids in documents:
                ids = np.asarray(ids, dtype=np.int32)
                if len(ids) and (ids.min() < 0 or ids.max() >= vocab):
                    bad = int(ids[(ids < 0) | (ids >= vocab)][0])
                    raise CorpusError(f"document {doc['name']!r} holds token id {bad} outside the model's "
                                      f"vocabulary [0, {vocab}); the tokenizer does not match the model",
                                      param="data")
                ft.write(ids.tobytes())
                fv.write(ids[1:].tobytes())
                docs.append({"name": doc["name"], "source": doc["source"], "offset": n_tokens,
                             "length": len(ids), "first_row": n_rows, "sha256": doc["sha256"]})
                n_tokens += len(ids)
                n_rows += count_targets(len(ids))
                bar.update(1)
        if n_rows == 0:
            raise CorpusError(f"the corpus has no tokens to predict ({len(docs)} documents, "
                              f"{n_tokens} tokens); check `data` / `globs` / `text_field`", param="data")
        _npy_from_raw(tok_raw, self.path / TOKENS, np.int32, (n_tokens,))
        _npy_from_raw(val_raw, self.path / VALUES, np.int32, (n_rows,))
        write_json_atomic(self.path / DOCUMENTS, docs)
        self.header.status, self.header.count, self.header.total, self.header.tokens = "building", 0, n_rows, n_tokens
        self.header.corpus.documents = len(docs)
        self.save_header()
        logger.info("read %d documents: %d tokens, %d key rows", len(docs), n_tokens, n_rows)

    def documents(self) -> list[dict]:
        return json.loads((self.path / DOCUMENTS).read_text())

    def tokens(self) -> np.ndarray:
        return np.load(self.path / TOKENS, mmap_mode="r")

    # ---- phase 2: the keys --------------------------------------------------------------------
    def prepare_keys(self) -> None:
        """(the lock holder) Allocate ``keys.npy`` at full size (sparse) when no row is final yet;
        before any rank opens it for writing. Once per writer: a second call (``__enter__`` after
        ``start``) must not replace the file other ranks may already be writing into (a new inode:
        their rows would go to the unlinked one)."""
        path, n, dim, dtype = self.path / KEYS, self.header.total, self.header.key.dim, self._dtype
        if self._lock_fd is None:
            raise DatastoreError(f"{self.path}: only the writer holding the lock allocates keys")
        if self._keys_allocated or (path.exists() and self.done_rows()):
            return
        self._keys_allocated = True
        self.header.count = 0
        with create_own(path) as f:
            np.lib.format.write_array_header_2_0(f, {"descr": dtype.str, "fortran_order": False, "shape": (n, dim)})
            f.truncate(f.tell() + n * dim * dtype.itemsize)  # sparse until written

    def __enter__(self) -> DatastoreWriter:
        """Open ``keys.npy`` for writing rows (the lock holder allocates it first if needed)."""
        path = self.path / KEYS
        if self._lock_fd is not None:
            self.prepare_keys()
        with os.fdopen(open_own(path, os.O_RDONLY), "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            read(f)
            self._offset = f.tell()
        self._fd = open_own(path, os.O_WRONLY)
        return self

    def __exit__(self, *exc) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def write_rows(self, row0: int, rows: np.ndarray) -> None:
        """Key rows ``[row0, row0 + len(rows))`` (any float dtype, converted to the key dtype)."""
        with np.errstate(over="ignore", invalid="ignore"):
            arr = np.ascontiguousarray(rows, dtype=self._dtype)
        finite = np.isfinite(arr).reshape(len(arr), -1).all(axis=1)
        if not finite.all():
            bad = row0 + int(np.flatnonzero(~finite)[0])
            k = self.header.key
            fix = ("the hidden states overflow float16: build again with `key_dtype` float32 and `overwrite` (these "
                   "float16 rows cannot be resumed)" if k.dtype != "float32"
                   else "the model computes non-finite hidden states there: check the model and its dtype")
            raise DatastoreError(f"key row {bad} (layer {k.layer}) holds inf or NaN as {self._dtype}; {fix}",
                                 param="key_dtype")
        os.pwrite(self._fd, arr.tobytes(), self._offset + row0 * self._row_bytes)

    def commit(self, rows: int) -> None:
        """Make rows ``[0, rows)`` durable, then record them: the count never runs ahead of the disk."""
        os.fdatasync(self._fd)
        self.header.count = rows
        self.save_header()

    def record(self, rank: int, ranges: Sequence[Sequence[int]]) -> None:
        """Make the rows written so far durable, then record ``ranges`` (``[first, end)``) as final
        in this rank's progress file: a sharded build's ``commit``."""
        os.fdatasync(self._fd)
        write_json_atomic(self.path / PROGRESS_RANK.format(rank), _merge_ranges(ranges))

    def done_rows(self) -> list[list[int]]:
        """The key rows that are final: ``[0, count)`` and every range in the progress files."""
        ranges = [[0, self.header.count]]
        for p in [self.path / PROGRESS, *sorted(self.path.glob(PROGRESS_RANK.format("*")))]:
            if p.exists():
                ranges += json.loads(p.read_text())
        return _merge_ranges(ranges)

    def consolidate(self) -> None:
        """(the lock holder) Fold the ranks' progress files into ``progress.json`` and the final
        prefix into ``count``; once every row is final, only ``count`` remains."""
        done = self.done_rows()
        prefix = done[0][1] if done and done[0][0] == 0 else 0
        rest = [r for r in done if r[0] > 0]
        if rest:
            write_json_atomic(self.path / PROGRESS, rest)
        self.header.count = prefix
        self.save_header()
        if not rest:
            (self.path / PROGRESS).unlink(missing_ok=True)
        for p in self.path.glob(PROGRESS_RANK.format("*")):
            p.unlink()

    def copy_rows(self, keys: np.ndarray, row0: int, progress=None) -> None:
        """Copy a (memory-mapped) key array to rows ``[row0, row0 + len(keys))`` in chunks."""
        for lo in range(0, len(keys), COPY_ROWS):
            hi = min(len(keys), lo + COPY_ROWS)
            self.write_rows(row0 + lo, np.asarray(keys[lo:hi]))
            if progress is not None:
                progress.update(hi - lo)

    # ---- phase 3: the index -------------------------------------------------------------------
    def finalize(self, index: str = "auto", *, storage: str = "auto", seed: int = 0, progress: bool = True,
                 shards: int = 1, index_shards: int = 1) -> Datastore:
        """Train and fill the index over all rows (``build_index``: one implementation
        for every path), mark the datastore complete, open it. With key dtype "none" the spooled
        keys are removed once the header says complete."""
        from knnlm.index import plan_index

        n, dim = self.header.total, self.header.key.dim
        if self.header.count != n:
            raise DatastoreError(f"{self.path}: {self.header.count}/{n} key rows written; cannot build the index yet")
        plan = plan_index(index, n, dim, storage=storage)
        logger.info("%s", plan.describe(n, dim))
        (self.path / IVFDATA).unlink(missing_ok=True)  # a stale one from an interrupted attempt
        record = build_index(self.path / KEYS, n, dim, plan, self.path / INDEX, seed=seed, progress=progress,
                             shards=shards, index_shards=index_shards)
        return self.complete(record)

    def complete(self, index_record: dict) -> Datastore:
        """Record the index written to ``index_record["file"]`` (``index_record``; a distributed
        build writes it with ``train_index`` / ``fill_shard`` / ``merge_index``), mark
        the datastore complete, drop spooled keys when none are kept, release the lock, open it."""
        self.header.index = index_record
        self.header.status = "complete"
        self.save_header()
        if not self.header.has_keys:
            (self.path / KEYS).unlink(missing_ok=True)
        if self.target is not None:  # the new datastore takes the old one's place, then the old goes
            _swap_dirs(self.path, self.target)
            shutil.rmtree(self.path, ignore_errors=True)
            self.path, self.target = self.target, None
        self.release()
        return open_datastore(self.path)


_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_DENIED = {errno.EROFS, errno.EACCES, errno.EPERM}
# what FAISS's C++ writers put in their RuntimeError when the OS refused a write
_FAISS_OS_ERRORS = {os.strerror(e): e for e in (*_FULL, *_DENIED)}


@contextlib.contextmanager
def disk_errors(path: Path, command: str | None = None):
    """Turn a full disk (or a file-size limit), a read-only file system or a denied write while
    writing ``path`` (by Python or by FAISS) into a one-line ``DatastoreError``; what was
    committed stays, and the datastore never opens as valid. ``command``: the command to run
    again (None: a build, continued with ``resume``)."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        code = e.errno if isinstance(e, OSError) else next(
            (c for text, c in _FAISS_OS_ERRORS.items() if text in str(e)), None)
        if code not in _FULL | _DENIED:
            raise
        again = (f"run `knnlm {command}` again" if command else "run the same command with `resume` to continue")
        what = "no space left" if code in _FULL else "cannot write"
        detail = e.strerror if isinstance(e, OSError) and e.strerror else os.strerror(code)
        raise DatastoreError(f"{what} writing {path} ({detail}); "
                             f"{'free space' if code in _FULL else 'make it writable'}, then {again}",
                             param=None if command else "out") from None


def lock_holder(path: str | os.PathLike) -> str:
    """The pid recorded in ``path``'s writer lock (digits only: the file is untrusted), or "?"."""
    try:
        fd = open_own(Path(path) / LOCK, os.O_RDONLY)
    except (OSError, DatastoreError):
        return "?"
    try:
        raw = os.pread(fd, 32, 0).decode("ascii", errors="replace").strip()
    finally:
        os.close(fd)
    return raw if raw.isdigit() else "?"


def _lock_refused(path: Path, code: int) -> DatastoreError:
    """The one-line refusal of a writer whose lock file cannot be created or written."""
    if code in _FULL:
        return DatastoreError(f"no space left in {path} ({os.strerror(code)}), not even for the writer lock "
                              f"{LOCK}; free space, then run the command again")
    return DatastoreError(f"cannot write in {path} ({os.strerror(code)}); a writer needs a writable "
                          "directory: copy the datastore somewhere writable")


def _lock(path: Path) -> int:
    """Take ``path``'s writer lock without waiting; refuse when another writer holds it. The lock
    file is opened without following links and removed by ``_unlock``: a lock taken on a file that
    another writer removed meanwhile (its inode no longer at ``path``) is taken again."""
    for _ in range(100):
        try:
            fd = open_own(path / LOCK, os.O_RDWR | os.O_CREAT)
        except OSError as e:
            if e.errno not in _FULL | _DENIED:
                raise
            raise _lock_refused(path, e.errno) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DatastoreError(f"`out` {path} is being written by another process (pid {lock_holder(path)} holds "
                                 f"{LOCK}); wait for it to finish or choose another `out`", param="out") from None
        try:
            same = os.lstat(path / LOCK).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            except OSError as e:  # a full disk (or a file-size limit): release and remove the lock
                _unlock(path, fd)
                if e.errno not in _FULL | _DENIED:
                    raise
                raise _lock_refused(path, e.errno) from None
            return fd
        os.close(fd)  # the previous holder removed it between our open and our flock: again
    raise DatastoreError(f"`out` {path}: could not take {LOCK} (it keeps being replaced)", param="out")


def _unlock(path: Path, fd: int, *, remove: bool = True) -> None:
    """Release the lock; remove the lock file (while still holding it, so that no other writer
    holds a lock on a file about to vanish) unless ``remove`` is False."""
    if remove:
        with contextlib.suppress(FileNotFoundError):
            if os.lstat(path / LOCK).st_ino == os.fstat(fd).st_ino:
                os.unlink(path / LOCK)
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def _let_go(path: Path, fd: int | None, *, drop_dir: bool) -> None:
    """Release the lock; with ``drop_dir``, remove the directory when nothing else is in it."""
    empty = drop_dir and not _listing(path)
    if fd is not None:
        _unlock(path, fd)
    if empty and not any(path.iterdir()):
        path.rmdir()


def overwrite_dir(path: str | os.PathLike) -> Path:
    """Where ``overwrite`` builds the datastore that replaces the complete one at ``path``."""
    path = Path(path)
    return path.parent / f".{path.name}.overwrite"


def build_dir(out: str | os.PathLike) -> Path:
    """The directory a build into ``out`` writes: ``overwrite_dir(out)`` while an overwrite of a
    complete datastore is under way there, else ``out`` (the other ranks of a sharded build)."""
    out = Path(out)
    stage = overwrite_dir(out)
    if stage.is_dir() and not stage.is_symlink():
        h = read_header(stage)
        if h is not None and not h.complete:
            return stage
    return out


def _swap_dirs(new: Path, old: Path) -> None:
    """Exchange the directories ``new`` and ``old`` (``renameat2(RENAME_EXCHANGE)``: atomic, a
    reader sees one or the other); where the kernel or file system lacks it, three renames."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    at_fdcwd, rename_exchange = -100, 2
    if renameat2 is None or renameat2(at_fdcwd, os.fsencode(new), at_fdcwd, os.fsencode(old), rename_exchange) != 0:
        aside = old.with_name(old.name + ".previous")
        os.rename(old, aside)
        os.rename(new, old)
        os.rename(aside, new)
    _fsync_dir(old.parent)


def check_out(path: str | os.PathLike, *, resume: bool, overwrite: bool) -> Header | None:
    """What a build into ``path`` can be refused for before any model is loaded (and again by the
    writer, under the directory's lock): a non-empty directory that holds no datastore, a
    datastore there without ``resume`` or ``overwrite`` (a complete one: choose another ``out``
    or replace it; an unfinished one: continue it). Returns the header found there, if any."""
    path = Path(path)
    if not path.exists():
        return None
    if not path.is_dir():
        raise DatastoreError(f"`out` {path} is a file, not a directory", param="out")
    old = read_header(path)
    if old is None:
        if _listing(path):  # even with `overwrite`: it only ever replaces a datastore
            raise DatastoreError(f"`out` {path} exists, is not empty and holds no datastore; "
                                 "choose an empty or new directory", param="out")
    elif not (resume or overwrite):
        if old.complete:
            raise DatastoreError(f"`out` {path} already holds a complete datastore ({old.count:,} rows); choose "
                                 "another `out`, or pass `overwrite` to replace it", param="out")
        raise DatastoreError(f"`out` {path} already holds an unfinished datastore (status {old.status!r}, "
                             f"{old.count}/{old.total} rows); pass `resume` to continue it, `overwrite` to "
                             "replace it, or choose another `out`", param="out")
    return old


def _header_files(header: Header | None) -> list[str]:
    """The file names a header names (index, its lists, the gate): bare names, checked by
    ``check_header``."""
    if header is None:
        return []
    names = [header.index_file]
    if header.index and header.index.get("ivfdata"):
        names.append(header.index["ivfdata"])
    if header.gate and header.gate.get("file"):
        names.append(header.gate["file"])
    return names


def check_entries(path: str | os.PathLike, header: Header | None = None) -> None:
    """Refuse a datastore directory holding a symbolic link or a non-regular file where one of its
    own files goes (every name the format uses, the work files' patterns, the files ``header``
    names): nothing is read or written through a link out of a datastore. The index's work
    directories (``.index*.build``, ``.index*.staging``) must be real directories."""
    path = Path(path)
    if not path.is_dir():
        return
    names = {*_OWNED_FILES, LOCK, *_header_files(header)}
    for pattern in _OWNED_GLOBS:
        names.update(p.name for p in path.glob(pattern))
    for name in sorted(names):
        try:
            st = os.lstat(path / name)
        except FileNotFoundError:
            continue
        work_dir = name.startswith(".index") and name.endswith((".build", ".staging"))
        if stat.S_ISLNK(st.st_mode):
            what = "a symbolic link"
        elif stat.S_ISDIR(st.st_mode) and work_dir or stat.S_ISREG(st.st_mode) and not work_dir:
            continue
        else:
            what = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise DatastoreError(f"datastore {path}: {name} is {what}; a datastore's own files must be regular files "
                             "in its directory (never links): refusing it")


def _listing(path: Path) -> list[str]:
    """What ``path`` holds besides the writer lock."""
    return [p.name for p in path.iterdir() if p.name != LOCK]


def _clear(path: Path) -> None:
    for name in _OWNED_FILES:
        (path / name).unlink(missing_ok=True)
    for pattern in _OWNED_GLOBS:
        for p in path.glob(pattern):
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def _merge_ranges(ranges: Iterable[Sequence[int]]) -> list[list[int]]:
    """Sorted, disjoint ``[first, end)`` ranges covering the union of ``ranges``."""
    out: list[list[int]] = []
    for a, b in sorted((int(a), int(b)) for a, b in ranges if b > a):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def _npy_from_raw(raw: Path, dest: Path, dtype, shape: tuple) -> None:
    """Wrap a raw little-endian array file into a .npy file (streamed, constant memory)."""
    tmp = dest.with_name(dest.name + ".tmp")
    with create_own(tmp) as f, os.fdopen(open_own(raw, os.O_RDONLY), "rb") as r:
        np.lib.format.write_array_header_2_0(
            f, {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": shape})
        shutil.copyfileobj(r, f, 1 << 22)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, dest)
    raw.unlink()
