"""FAISS planning, training, adding, on-disk merge, loading, GPU cloning.

``--index`` takes ``flat`` (exact L2), ``ivfsq`` (IVF over fp16 vectors), ``ivfpq`` (IVF + 8-bit
product quantization, compact), ``auto`` (the default: the first row of ``AUTO_INDEX`` the
datastore fits) or any FAISS factory string (``"IVF4096,PQ64"``, ``"OPQ64,IVF4096,PQ64"``,
``"IVF65536_HNSW32,PQ64"``, ``"HNSW32"``...). ``plan_index`` is the one place recipes live.

FAISS only: every function reads and writes the files its caller names (``knnlm.datastore``
owns the names, the work directory, the staging and the atomic renames, and the header's index
record). An index is built in three steps, each a plain function, so that one process or many (one
per torchrun rank) run the same code:

1. ``train_index``: train once on a seeded sample of the keys -> a trained, empty index file
   (deterministic given the keys and the seed, except HNSW coarse quantizers, whose graph FAISS
   builds with several threads);
2. ``fill_shard``: the trained index + key rows ``[start, stop)`` -> a shard file holding those
   rows with ids = their global row numbers (ranks fill disjoint ranges in parallel). Rows are
   encoded in chunks aligned to a global grid of ``ADD_CHUNK_ROWS`` rows, a chunk cut by a shard
   boundary is encoded whole and only its own rows are kept: every row is computed in exactly the
   batch a one-process build computes it in, so the result does not depend on the shard count;
3. ``merge_shards``: the shards, in row order -> one index file. With storage ``disk`` an IVF
   index keeps its inverted lists in a file next to the index file (``faiss.OnDiskInvertedLists``),
   memory-mapped on load; a flat-codes index (Flat, SQ, PQ without IVF) is memory-mapped whole.
   With ``ram`` the index is read into memory.

``knnlm.datastore.build_index`` chains the three (one shard, or several consecutive ones) for the
single-process paths: ``DatastoreWriter.finalize``, merge, subset, reindex.
Graph indexes (HNSW as the whole index) cannot be filled in shards: their plan says
``shardable=False`` and they are filled in one piece.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from knnlm.config import check_index_storage
from knnlm.errors import DatastoreError, IndexSpecError

logger = logging.getLogger(__name__)

__all__ = ["IndexSpecError", "IndexPlan", "check_index_spec", "plan_index", "load_index", "set_nprobe",
           "train_index", "fill_shard", "merge_shards", "gpu_clone_settings", "search_excluding",
           "AUTO_INDEX", "COARSE_RECIPES", "AUTO_DISK_RAM_FRACTION"]

# ------------------------------------------------------------------------------------ recipes
# `auto`: the first row whose limit (a number of keys; None = no limit) the datastore fits picks
# the recipe. Exact search while a flat scan is cheaper than the LM forward it accompanies (2*D
# flops per key and query: 64k keys of dim ~1k is ~0.1 GFLOP/query); IVF over fp16 vectors for
# small datastores, where PQ's training costs more than it saves; IVF-PQ beyond. Measured with
# SmolLM2 on held-out stdlib (README, "Large datastores"): at 1.1M keys IVF4096,PQ64 (nprobe 32)
# gives a lower perplexity than IVF1024,SQfp16 (nprobe 8) (6.353 vs 6.390) from a 14x smaller
# index, and at 400k keys likewise (6.714 vs 6.758, issue #12). To change `auto`, edit this table
# (and the README's).
AUTO_INDEX: tuple[tuple[int | None, str], ...] = (
    (1 << 16, "flat"),
    (1 << 18, "ivfsq"),
    (None, "ivfpq"),
)
AUTO_FLAT_MAX_ROWS = AUTO_INDEX[0][0]
AUTO_SQ_MAX_ROWS = AUTO_INDEX[1][0]

# `ivfpq`'s coarse quantizer by datastore size, after the FAISS wiki's "Guidelines to choose an
# index": (keys below, nlist, coarse quantizer). nlist None = 4*sqrt(N) rounded to a power of two
# (the low end of the guideline's 4..16*sqrt(N): kNN-LM retrieves k = 1024 neighbours, so lists
# must stay long), k-means on a flat quantizer (4096 lists at 1M keys, the original kNN-LM's
# IVF4096,PQ64). Beyond, a fixed list count with an HNSW graph over the centroids.
COARSE_RECIPES: tuple[tuple[int | None, int | None, str], ...] = (
    (2_000_000, None, "IVF{nlist}"),
    (10_000_000, 65536, "IVF65536_HNSW32"),
    (None, 262144, "IVF262144_HNSW32"),
)
# Default probes: ivfsq 8 (exact distances inside the lists); PQ indexes at least 32 and enough
# lists to see PQ_MIN_CANDIDATES codes on average (8 x k at k = 1024) when lists are short.
SQ_NPROBE = 8
PQ_NPROBE = 32
PQ_MIN_CANDIDATES = 8192
# Training sample: k-means wants >= 39 points per centroid (FAISS warns below); more than 64
# brings little; PQ sub-quantizers (256 centroids each) want 256 * 64. The sample is held in RAM
# as fp32: at most TRAIN_MAX_BYTES of it (FAISS then warns about few points per centroid).
TRAIN_POINTS_PER_LIST = 64
TRAIN_MAX_BYTES = 4 << 30
# Rows per add chunk; also the global grid shards are aligned to (see fill_shard).
ADD_CHUNK_ROWS = 1 << 16
# Storage `auto`: on disk when the index would take more than this fraction of physical RAM.
AUTO_DISK_RAM_FRACTION = 0.25
# Coarse quantizers with at least this many lists are trained with an HNSW assigner on CPU.
HNSW_ASSIGN_MIN_LISTS = 1 << 14


@dataclass(frozen=True)
class IndexPlan:
    spec: str  # what the user asked for
    factory: str  # FAISS factory string
    nprobe: int | None  # default probes for IVF indexes
    train_rows: int  # 0 when the index needs no training
    bytes_estimate: int
    storage: str = "ram"  # ram | disk (resolved from auto)
    shardable: bool = True  # False: the index is filled in one piece (graph indexes)

    def describe(self, n: int, dim: int) -> str:
        where = "on disk (memory-mapped)" if self.storage == "disk" else "in memory"
        return (f"index {self.factory} over {n:,} keys of dim {dim}: ~{_fmt_bytes(self.bytes_estimate)} "
                f"{where}" + (f", trained on {self.train_rows:,} keys" if self.train_rows else "")
                + (f", nprobe {self.nprobe}" if self.nprobe else ""))


def _fmt_bytes(b: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if b < 1024:
            return f"{b:.1f} {unit}"
        b /= 1024
    return f"{b:.1f} PiB"


def _pow2(x: float) -> int:
    return 2 ** round(math.log2(max(x, 1)))


def _nlist(n: int) -> int:
    """Inverted lists of ``ivfsq``: ~sqrt(n) as a power of two, with enough rows to train each centroid."""
    return int(max(1, min(_pow2(math.sqrt(n)), n // 39, 1 << 16)))


def _pq_m(dim: int) -> int:
    """Sub-quantizers for PQ: a divisor of dim, ~dim/8 bytes per vector, at most 64."""
    for m in range(min(64, dim), 0, -1):
        if dim % m == 0 and dim // m >= 4:
            return m
    return 1


def _ivfpq_factory(n: int, dim: int) -> str:
    for limit, nlist, coarse in COARSE_RECIPES:
        if limit is None or n < limit:
            if nlist is None:
                nlist = int(max(1, min(_pow2(4 * math.sqrt(n)), n // 39)))
            return f"{coarse.format(nlist=nlist)},PQ{_pq_m(dim)}"
    raise AssertionError("COARSE_RECIPES must end with a row without limit")


def _auto_spec(n: int, dim: int) -> str:
    for limit, spec in AUTO_INDEX:
        if limit is None or n <= limit:
            return spec
    raise AssertionError("AUTO_INDEX must end with a row without limit")


SYNTAX_CHECK_DIM = 40320  # 8!: divisible by every usual PQ / OPQ sub-quantizer count


def check_index_spec(spec: str, storage: str = "auto") -> None:
    """Refuse an index specification FAISS cannot parse (or a storage it cannot use), before any
    model or key exists (the dimension is not known yet: a highly divisible one stands in;
    ``plan_index`` checks again)."""
    plan_index(spec, 1 << 20, SYNTAX_CHECK_DIM, storage=storage)


def _physical_ram() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 16 << 30


def plan_index(spec: str, n: int, dim: int, *, storage: str = "ram") -> IndexPlan:
    """Resolve ``spec`` into a FAISS factory string for ``n`` keys of dimension ``dim``, and
    ``storage`` (ram | disk | auto) into ram or disk.

    ``auto`` storage is disk when the index would take more than ``AUTO_DISK_RAM_FRACTION`` of
    the machine's physical RAM and FAISS can keep it on disk (IVF and flat-codes indexes).
    Raises ``IndexSpecError`` for a string FAISS cannot parse, an index that cannot be trained on
    ``n`` keys, or storage ``disk`` for an index FAISS cannot memory-map (a graph index).
    """
    import faiss

    check_index_storage(storage)
    spec = spec.strip()
    named = _auto_spec(n, dim) if spec == "auto" else spec
    if named == "flat":
        factory = "Flat"
    elif named == "ivfsq":
        factory = f"IVF{_nlist(n)},SQfp16"
    elif named == "ivfpq":
        factory = _ivfpq_factory(n, dim)
    else:
        factory = spec
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_L2)
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1].rsplit(": ", 1)[-1] if str(e).strip() else "unparseable"
        for_dim = "" if dim == SYNTAX_CHECK_DIM else f" for key dim {dim}"
        raise IndexSpecError(f"`index` {spec!r} is invalid: FAISS cannot build {factory!r}{for_dim} ({msg}); "
                             "use flat, ivfsq, ivfpq, auto or a valid factory string", param="index") from None
    ivf = _ivf(index)
    kind = _kind(index)
    nprobe = None
    if ivf is not None:
        if "PQ" in factory:
            nprobe = min(ivf.nlist, max(PQ_NPROBE, math.ceil(PQ_MIN_CANDIDATES * ivf.nlist / max(n, 1))))
        else:
            nprobe = min(ivf.nlist, SQ_NPROBE)
    train_rows = 0
    if not index.is_trained:
        need = ivf.nlist * TRAIN_POINTS_PER_LIST if ivf is not None else 256 * 39
        if "PQ" in factory:
            need = max(need, 256 * TRAIN_POINTS_PER_LIST)
        need = min(need, max(TRAIN_MAX_BYTES // (4 * dim), ivf.nlist if ivf is not None else 1))
        train_rows = min(n, need)
        minimum = max(ivf.nlist if ivf is not None else 1, 256 if "PQ" in factory else 1)
        if n < minimum:
            raise IndexSpecError(f"`index` {spec!r} ({factory}) needs at least {minimum} keys to "
                                 f"train, the datastore has {n}; use `index` flat or a smaller IVF", param="index")
    estimate = _estimate_bytes(factory, index, n, dim)
    if storage == "auto":
        storage = "disk" if kind != "graph" and estimate > AUTO_DISK_RAM_FRACTION * _physical_ram() else "ram"
    elif storage == "disk" and kind == "graph":
        raise IndexSpecError(f"`index_storage` disk needs an IVF or flat-codes index; FAISS cannot memory-map "
                             f"{factory!r}: use `index_storage` ram or an IVF index", param="index_storage")
    return IndexPlan(spec, factory, nprobe, train_rows, estimate, storage, shardable=kind != "graph")


def _ivf(index):
    import faiss

    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def _inner(index):
    """The index under any pre-transforms (OPQ, PCA...)."""
    import faiss

    while isinstance(index, faiss.IndexPreTransform):
        index = faiss.downcast_index(index.index)
    return index


def _kind(index) -> str:
    """ivf | codes (flat-codes: Flat, SQ, PQ without IVF) | graph (anything else: HNSW, NSG...)."""
    import faiss

    if _ivf(index) is not None:
        return "ivf"
    return "codes" if isinstance(_inner(index), faiss.IndexFlatCodes) else "graph"


def _estimate_bytes(factory: str, index, n: int, dim: int) -> int:
    ivf = _ivf(index)
    per_vec = 4 * dim  # flat fp32 by default
    if "SQfp16" in factory or "SQ16" in factory:
        per_vec = 2 * dim
    elif "SQ8" in factory:
        per_vec = dim
    elif "PQ" in factory and ivf is not None and hasattr(ivf, "code_size"):
        per_vec = int(ivf.code_size)
    elif "PQ" in factory and hasattr(_inner(index), "code_size"):
        per_vec = int(_inner(index).code_size)
    ids = 8 if ivf is not None else 0
    centroids = ivf.nlist * dim * 4 if ivf is not None else 0
    return n * (per_vec + ids) + centroids


# ------------------------------------------------------------------------------------ GPU


def _num_gpus() -> int:
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def gpu_clone_settings(index) -> dict:
    """How ``load_index`` clones ``index`` to the GPUs: sharded over all of them, with fp16
    lookup tables for IVF-PQ codes of 56 bytes and more (FAISS's GPU IVF-PQ keeps the tables in
    shared memory, which fp32 tables of 64-byte codes overflow: faiss#1178)."""
    import faiss

    ivf = _ivf(index)
    ivf = faiss.downcast_index(ivf) if ivf is not None else None
    pq_bytes = int(ivf.code_size) if isinstance(ivf, faiss.IndexIVFPQ) else 0
    return {"shard": True, "useFloat16": pq_bytes >= 56}


def to_gpus(index):
    """``index`` cloned to every GPU FAISS sees (sharded), or None when it cannot be."""
    import faiss

    if _num_gpus() == 0:
        return None
    co = faiss.GpuMultipleClonerOptions()
    for k, v in gpu_clone_settings(index).items():
        setattr(co, k, v)
    try:
        return faiss.index_cpu_to_all_gpus(index, co)
    except RuntimeError as e:  # not every index type has a GPU version
        logger.warning("searching on CPU: %s has no GPU version (%s)", type(index).__name__,
                       str(e).strip().splitlines()[-1])
        return None


# ------------------------------------------------------------------------------------ building


@contextlib.contextmanager
def _faiss_quiet():
    """Silence FAISS's C-level printf to stdout (OnDiskInvertedLists and IO_FLAG_ONDISK_SAME_DIR
    print progress there), so that the CLI's stdout stays its own."""
    import sys

    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)


def check_finite_keys(x: np.ndarray, rows: int | np.ndarray) -> None:
    """Key rows ``x`` (fp32, in memory) all finite: an index over inf / NaN keys silently loses
    those rows (a crafted or corrupt ``keys.npy``). ``rows``: the datastore row of each of them
    (an array), or of the first when they are consecutive (an int)."""
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        i = int(np.flatnonzero(~finite)[0])
        bad = rows + i if isinstance(rows, int) else int(rows[i])
        raise DatastoreError(f"key row {bad} holds inf or NaN; the stored keys are corrupt: rebuild the datastore "
                             "from the corpus (with `key_dtype` float32 if the model's hidden states overflow "
                             "float16)")


def _as_keys(keys) -> np.ndarray:
    """A key array (N, D): an array, or the path of a .npy file (memory-mapped)."""
    if isinstance(keys, (str, os.PathLike)):
        return np.load(keys, mmap_mode="r")
    return keys


def train_index(keys, plan: IndexPlan, out_path: str | os.PathLike, *, seed: int = 0,
                use_gpu: bool | None = None) -> None:
    """Train ``plan``'s index once on a seeded sample of ``keys`` (N, D) (an array or a .npy
    path, memory-mapped) and write the trained, empty index to ``out_path`` (a work file: the
    caller names it and commits what it builds from it, ``knnlm.datastore.build_index``).

    The sample is ``plan.train_rows`` rows drawn without replacement with ``seed``, read in row
    order. A GPU trains the coarse quantizer's k-means when FAISS has one; on CPU, coarse
    quantizers of ``HNSW_ASSIGN_MIN_LISTS`` lists or more use an HNSW graph to assign points."""
    import faiss

    keys = _as_keys(keys)
    n, dim = keys.shape
    index = faiss.index_factory(dim, plan.factory, faiss.METRIC_L2)
    if plan.train_rows:
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(n, size=plan.train_rows, replace=False))
        x = np.ascontiguousarray(keys[sample], dtype=np.float32)  # (train_rows, D)
        check_finite_keys(x, sample)
        ivf = _ivf(index)
        inner = faiss.downcast_index(ivf) if ivf is not None else _inner(index)
        if hasattr(inner, "do_polysemous_training"):
            # FAISS's factory turns on polysemous training for 8-bit PQ: an annealing that only
            # serves Hamming-filtered search (unused here) and dominates training time.
            inner.do_polysemous_training = False
        if ivf is not None:
            if use_gpu in (None, True) and _num_gpus() > 0:
                ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(ivf.d))
                logger.info("training the coarse quantizer on %d GPU(s)", _num_gpus())
            elif ivf.nlist >= HNSW_ASSIGN_MIN_LISTS:
                ivf.clustering_index = faiss.IndexHNSWFlat(ivf.d, 32)
        logger.info("training %s on %d keys", plan.factory, plan.train_rows)
        t0 = time.time()
        index.train(x)
        if ivf is not None:
            ivf.clustering_index = None
        logger.info("trained in %.1f s", time.time() - t0)
    faiss.write_index(index, str(out_path))


def copy_training(index_path: str | os.PathLike, out_path: str | os.PathLike) -> None:
    """Write the trained, empty index of the IVF index file ``index_path`` (its pre-transforms,
    coarse quantizer and codebooks, no inverted lists) to ``out_path``, as ``train_index`` would
    have: filled again (``fill_shard``) it gives the same codes, without training anew. The file
    is read with ``IO_FLAG_MMAP`` (on-disk lists are not opened)."""
    import faiss

    with _faiss_quiet():
        index = faiss.read_index(str(index_path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    ivf = _ivf(index)
    if ivf is None:
        raise IndexSpecError(f"{index_path} holds a {_factory_name(index)} index, which has no training to keep "
                             "(only IVF indexes do); leave out `keep_training`", param="keep_training")
    empty = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    ivf.replace_invlists(empty, True)
    empty.this.disown()  # the index owns it now
    ivf.ntotal = index.ntotal = 0
    faiss.write_index(index, str(out_path))


def _grid_chunks(start: int, stop: int, n: int):
    """Chunks of the global ADD_CHUNK_ROWS grid meeting [start, stop): (lo, hi, keep_lo, keep_hi)."""
    for g in range(start // ADD_CHUNK_ROWS, -(-stop // ADD_CHUNK_ROWS)):
        lo, hi = g * ADD_CHUNK_ROWS, min(n, (g + 1) * ADD_CHUNK_ROWS)
        yield lo, hi, max(lo, start), min(hi, stop)


def fill_shard(trained_path: str | os.PathLike, keys, start: int, stop: int, out_path: str | os.PathLike, *,
               progress=None) -> int:
    """Add key rows ``[start, stop)`` of ``keys`` (N, D) (array or .npy path, memory-mapped) to
    the trained index at ``trained_path``, ids = global row numbers; write the shard to
    ``out_path`` (a work file). Returns the rows added. ``progress``: a tqdm bar or None.

    Every row is encoded in its chunk of the global ``ADD_CHUNK_ROWS`` grid, so a shard's codes are
    the bytes a one-shard fill computes for those rows."""
    import faiss

    keys = _as_keys(keys)
    n = keys.shape[0]
    if not 0 <= start <= stop <= n:
        raise ValueError(f"fill_shard: rows [{start}, {stop}) are outside the {n} keys")
    index = faiss.read_index(str(trained_path))
    kind = _kind(index)
    if kind == "graph" and (start, stop) != (0, n):
        raise IndexSpecError(f"{_factory_name(index)} is a graph index: it cannot be filled in shards; fill all "
                             f"{n} rows in one shard", param="index")
    target = _inner(index) if kind != "ivf" else _ivf(index)
    for lo, hi, a, b in _grid_chunks(start, stop, n):
        if a >= b:
            continue
        x = np.ascontiguousarray(keys[lo:hi], dtype=np.float32)  # (chunk, D): the whole grid chunk
        check_finite_keys(x[a - lo:b - lo], a)
        if kind == "graph":
            index.add(x[a - lo:b - lo])
        else:
            codes = index.sa_encode(x)  # (chunk, code bytes): through pre-transforms, with list numbers
            ids = np.arange(a, b, dtype=np.int64) if kind == "ivf" else None
            target.add_sa_codes(codes[a - lo:b - lo], ids)
        if progress is not None:
            progress.update(b - a)
    index.ntotal = target.ntotal if kind != "graph" else index.ntotal
    faiss.write_index(index, str(out_path))
    return stop - start


def _factory_name(index) -> str:
    return type(_inner(index)).__name__


def merge_shards(trained_path: str | os.PathLike, shard_paths, out_path: str | os.PathLike, *,
                 ivfdata_path: str | os.PathLike | None = None, storage: str = "ram",
                 ntotal: int | None = None) -> dict:
    """Merge shard files (in row order) into one index written to ``out_path``; returns
    ``{"ntotal", "on_disk"}``. The caller names every file (``knnlm.datastore.merge_index`` stages
    them and renames them into the datastore).

    ``storage`` disk: an IVF index's inverted lists go to ``ivfdata_path`` (next to ``out_path``:
    the index records its bare name, ``faiss.OnDiskInvertedLists``, read back memory-mapped by
    ``load_index``); a flat-codes index is written as usual and memory-mapped on load. ``ram``: a
    normal index."""
    import faiss

    out_path = Path(out_path)
    shard_paths = [Path(p) for p in shard_paths]
    if not shard_paths:
        raise ValueError("merge_shards: no shards")
    index = faiss.read_index(str(trained_path))
    kind = _kind(index)
    on_disk = kind == "ivf" and storage == "disk"
    if on_disk and (ivfdata_path is None or Path(ivfdata_path).parent != out_path.parent):
        raise ValueError("merge_shards: on-disk inverted lists need `ivfdata_path` next to `out_path`")
    if kind == "graph":
        if len(shard_paths) != 1:
            raise IndexSpecError(f"{_factory_name(index)} is a graph index: it cannot be merged from "
                                 f"{len(shard_paths)} shards", param="index")
        index = faiss.read_index(str(shard_paths[0]))
    elif on_disk:
        ivf = _ivf(index)
        shards = []
        with _faiss_quiet():
            for p in shard_paths:
                s = faiss.read_index(str(p), faiss.IO_FLAG_MMAP)  # lists not read into RAM
                shards.append(s)
            lists = faiss.InvertedListsPtrVector()
            for s in shards:
                lists.push_back(_ivf(s).invlists)
            invlists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(ivfdata_path))
            total = invlists.merge_from_multiple(lists.data(), lists.size(), False, False)
        ivf.ntotal = index.ntotal = int(total)
        invlists.filename = Path(ivfdata_path).name  # recorded bare: read back next to the index
        ivf.replace_invlists(invlists, True)
        invlists.this.disown()
        del shards
    else:
        target = _ivf(index) if kind == "ivf" else _inner(index)
        for p in shard_paths:
            s = faiss.read_index(str(p))
            target.merge_from(_ivf(s) if kind == "ivf" else _inner(s), 0)
            del s
        index.ntotal = target.ntotal
    if ntotal is not None and index.ntotal != ntotal:
        raise DatastoreError(f"the shards hold {index.ntotal} keys, expected {ntotal}; refill them")
    faiss.write_index(index, str(out_path))
    return {"ntotal": int(index.ntotal), "on_disk": on_disk}


# ------------------------------------------------------------------------------------ loading


def _map_quantizer(index, path: Path):
    """``index`` (inverted lists on disk) with its coarse quantizer memory-mapped from ``path``
    instead of held in RAM: the quantizer grows with the number of lists, not of keys, but at the
    large-N recipes it is what remains (``IVF262144_HNSW32``: 604 MB of centroids + 70 MB of graph
    at D = 576). A second read of the index file with ``IO_FLAG_MMAP_IFC`` (the quantizer's
    vectors and HNSW links are views of the mapped file, page cache) and without its lists takes
    over the lists of ``index`` (read with ``IO_FLAG_SKIP_PRECOMPUTE_TABLE``: only the mapped
    copy computes FAISS's IVF-PQ residual tables); ``index``'s own quantizer is freed with it."""
    import faiss

    ivf = _ivf(index)
    mapped = faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY | faiss.IO_FLAG_SKIP_IVF_DATA)
    lists = ivf.invlists
    ivf.own_invlists = False  # handed over: freeing ``index`` below must not free them
    _ivf(mapped).replace_invlists(lists, True)
    return mapped


def set_nprobe(index, nprobe: int | None) -> None:
    import faiss

    if nprobe is None:
        return
    try:
        faiss.ParameterSpace().set_index_parameter(index, "nprobe", int(nprobe))
    except RuntimeError:
        ivf = _ivf(index)
        if ivf is not None:
            ivf.nprobe = int(nprobe)


def _params_excluding(index, sel):
    """FAISS search parameters that apply the id selector ``sel`` and keep ``index``'s own nprobe
    (through a pre-transform such as OPQ)."""
    import faiss

    if isinstance(index, faiss.IndexPreTransform):
        params = faiss.SearchParametersPreTransform()
        params.index_params = _params_excluding(faiss.downcast_index(index.index), sel)
        return params
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        return faiss.SearchParametersIVF(sel=sel, nprobe=ivf.nprobe)
    if isinstance(index, faiss.IndexHNSW):
        return faiss.SearchParametersHNSW(sel=sel, efSearch=index.hnsw.efSearch)
    return faiss.SearchParameters(sel=sel)


def search_excluding(index, x: np.ndarray, k: int, lo: int, hi: int):
    """``index.search(x, k)`` (x (Q, D) fp32) never returning the ids ``[lo, hi)``: a FAISS id
    selector, so the k results are the k nearest of the other rows (a CPU index)."""
    import faiss

    sel = faiss.IDSelectorNot(faiss.IDSelectorRange(int(lo), int(hi)))
    return index.search(x, k, params=_params_excluding(index, sel))


# FAISS index types whose file holds no other index (hence no inverted lists): nothing to inspect
_LEAF_FOURCCS = {b"IxF2", b"IxFI", b"IxFl", b"IxPq", b"IxPQ", b"IxPo", b"IxSQ", b"IxSq", b"IxLS"}


def _all_invlists(index, depth: int = 0) -> list:
    """Every inverted-lists object of ``index`` and of the indexes inside it (quantizers,
    pre-transforms, refinements, graph storage)."""
    import faiss

    index = faiss.downcast_index(index)
    found = []
    lists = getattr(index, "invlists", None)
    if lists is not None:
        found.append(faiss.downcast_InvertedLists(lists))
    if depth < 64:
        for attr in ("index", "base_index", "refine_index", "quantizer", "storage"):
            sub = getattr(index, attr, None)
            if isinstance(sub, faiss.Index):
                found += _all_invlists(sub, depth + 1)
    return found


def _check_list_bounds(path: Path, lst) -> None:
    """Every list of the on-disk inverted lists ``lst`` (size, capacity, offset: read from the
    index file, untrusted) inside the ``totsize`` bytes FAISS maps: else a search reads outside
    the map (a SIGSEGV, or another list's bytes)."""
    import faiss

    n = int(lst.lists.size())
    if n != lst.nlist:
        raise DatastoreError(f"{path} describes {n} on-disk inverted lists for {lst.nlist}; rebuild the index "
                             "with `knnlm reindex`")
    if n == 0:
        return
    # the std::vector<OnDiskOneList> as (n, 3) size_t: size, capacity, offset (a copy, read at once)
    raw = faiss.rev_swig_ptr(faiss.cast_integer_to_idx_t_ptr(int(lst.lists.data().this)), 3 * n)
    size, capacity, offset = np.array(raw, dtype=np.int64).reshape(n, 3).view(np.uint64).T
    total, entry = np.uint64(lst.totsize), np.uint64(lst.code_size + 8)  # the codes and an int64 id per slot
    room = (total - np.minimum(offset, total)) // entry  # slots between the offset and the end of the map
    bad = np.flatnonzero((size > capacity) | (offset > total) | (capacity > room))
    if len(bad):
        i = int(bad[0])
        raise DatastoreError(f"{path}: inverted list {i} (offset {offset[i]}, {size[i]}/{capacity[i]} entries of "
                             f"{entry} bytes) lies outside the {total} bytes of its lists file; the index is "
                             "corrupt, rebuild it with `knnlm reindex`")


def check_lists(path: str | os.PathLike, *, storage: str, ivfdata: str | os.PathLike | None) -> None:
    """Inspect the index file ``path`` without letting FAISS map any inverted-lists file it names
    (``IO_FLAG_MMAP`` skips on-disk lists, read-only): on-disk lists are accepted only when the
    caller's header says ``storage`` disk with lists file ``ivfdata`` and the index names exactly
    that file's bare name (read from the index's directory), no larger than it is; an index
    that should keep its lists on disk must. Anything else is a ``DatastoreError``."""
    import faiss

    path = Path(path)
    with open(path, "rb") as f:
        if f.read(4) in _LEAF_FOURCCS:
            return
    try:
        with _faiss_quiet():
            index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError as e:
        raise DatastoreError(f"{path} is not a readable FAISS index ({str(e).strip().splitlines()[-1][:200]}); "
                             "rebuild it with `knnlm reindex`") from None
    # lists FAISS mapped from the index file itself (``IO_FLAG_MMAP``) have no name; on-disk lists do
    named = [lst for lst in _all_invlists(index)
             if isinstance(lst, faiss.OnDiskInvertedLists) and lst.filename]
    own = Path(ivfdata).name if ivfdata is not None else None
    for lst in named:
        name = lst.filename
        if storage != "disk" or own is None:
            raise DatastoreError(f"{path} keeps its inverted lists in a file ({name[:200]!r}) but the header says "
                                 "the index is in RAM; the datastore is corrupt, rebuild the index with "
                                 "`knnlm reindex`")
        if name != own:
            raise DatastoreError(f"{path} names inverted-lists file {name[:200]!r}, not the datastore's own "
                                 f"{own!r}; the datastore is corrupt, rebuild the index with `knnlm reindex`")
        size = Path(ivfdata).stat().st_size
        if lst.totsize > size:
            raise DatastoreError(f"{path} needs {lst.totsize} bytes of inverted lists, {ivfdata} holds {size}; "
                                 "rebuild the index with `knnlm reindex`")
        _check_list_bounds(path, lst)
    if own is not None and not named:
        raise DatastoreError(f"{path} holds its inverted lists itself, but the header says they are in {own}; "
                             "rebuild the index with `knnlm reindex`")


def load_index(path: str | os.PathLike, *, n: int, dim: int, nprobe: int | None = None,
               use_gpu: bool | None = None, storage: str = "ram", ivfdata: str | os.PathLike | None = None,
               ivfdata_bytes: int | None = None):
    """Read the index, check that it holds ``n`` vectors of dimension ``dim``, set its default
    ``nprobe``, clone it to the GPUs if FAISS has some.

    ``storage`` disk: the inverted lists (the file ``ivfdata``, next to the index, of
    ``ivfdata_bytes`` bytes) or the flat codes are memory-mapped, not read, and on CPU so is the
    coarse quantizer of an on-disk IVF index (``_map_quantizer``): search RAM does not grow with
    the datastore (pages of a mapped file are the OS's page cache, not the process's
    anonymous memory)."""
    import faiss

    path = Path(path)
    flags = 0
    if storage == "disk":
        if (ivfdata is None) != (ivfdata_bytes is None):
            raise ValueError("load_index: `ivfdata` and `ivfdata_bytes` go together")
        data = Path(ivfdata) if ivfdata is not None else None
        if ivfdata_bytes is not None:
            size = data.stat().st_size if data.exists() else None
            if size != ivfdata_bytes:
                raise DatastoreError(f"{data} is {'missing' if size is None else f'{size} bytes'}, the header "
                                     f"says {ivfdata_bytes} bytes; rebuild the index with `knnlm reindex`")
            flags = faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY  # mapped read-only
        else:
            flags = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY
    check_lists(path, storage=storage, ivfdata=ivfdata)
    flags |= faiss.IO_FLAG_READ_ONLY
    # on-disk lists on CPU: the coarse quantizer is mapped too (a GPU clone copies it anyway)
    map_quantizer = flags & faiss.IO_FLAG_ONDISK_SAME_DIR and not (use_gpu in (None, True) and _num_gpus() > 0)
    try:
        with _faiss_quiet():
            if map_quantizer:
                index = _map_quantizer(faiss.read_index(str(path), flags | faiss.IO_FLAG_SKIP_PRECOMPUTE_TABLE), path)
            else:
                index = faiss.read_index(str(path), flags)
    except RuntimeError as e:
        raise DatastoreError(f"{path} is not a readable FAISS index ({str(e).strip().splitlines()[-1]}); "
                             "rebuild it with `knnlm reindex`") from None
    if index.ntotal != n or index.d != dim:
        raise DatastoreError(f"{path} holds {index.ntotal} vectors of dim {index.d}, the datastore "
                             f"{n} of dim {dim}; rebuild the index")
    set_nprobe(index, nprobe)
    if use_gpu in (None, True):
        gpu = to_gpus(index)
        if gpu is not None:
            set_nprobe(gpu, nprobe)
            return gpu
    return index
