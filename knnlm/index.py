"""FAISS index creation, training, adding, loading, GPU cloning.

``--index`` takes ``flat`` (exact L2), ``ivfpq`` (IVF + 8-bit product quantization, compact),
``auto`` (the default: exact for small datastores, IVF over fp16 vectors for medium ones, IVF-PQ
for large ones) or any FAISS factory string (``"IVF4096,PQ64"``, ``"HNSW32"``...). Training
uses a seeded sample of the keys; keys are added in chunks read straight from ``keys.npy``, so
memory is the index itself plus one chunk. The index on disk is always a CPU index; a GPU is
used for training / adding / search when ``faiss.get_num_gpus() > 0``.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from knnlm.errors import DatastoreError, IndexSpecError

logger = logging.getLogger(__name__)

__all__ = ["IndexSpecError", "IndexPlan", "check_index_spec", "plan_index", "build_index", "load_index", "set_nprobe",
           "AUTO_FLAT_MAX_ROWS", "AUTO_SQ_MAX_BYTES"]

# `auto`: exact search while the flat scan is cheaper than the LM forward it accompanies
# (a flat scan costs 2*D flops per key and query; 64k keys of dim ~1k is ~0.1 GFLOP/query) ...
AUTO_FLAT_MAX_ROWS = 1 << 16
# ... IVF over fp16 vectors (exact distances inside the probed lists) while the vectors fit
# comfortably in RAM, IVF-PQ beyond that.
AUTO_SQ_MAX_BYTES = 8 << 30
# k-means wants >= 39 points per centroid (FAISS warns below); more than this many brings little.
TRAIN_POINTS_PER_LIST = 64
ADD_CHUNK_ROWS = 1 << 16


@dataclass(frozen=True)
class IndexPlan:
    spec: str  # what the user asked for
    factory: str  # FAISS factory string
    nprobe: int | None  # default probes for IVF indexes
    train_rows: int  # 0 when the index needs no training
    bytes_estimate: int

    def describe(self, n: int, dim: int) -> str:
        return (f"index {self.factory} over {n:,} keys of dim {dim}: ~{_fmt_bytes(self.bytes_estimate)} "
                f"in memory" + (f", trained on {self.train_rows:,} keys" if self.train_rows else "")
                + (f", nprobe {self.nprobe}" if self.nprobe else ""))


def _fmt_bytes(b: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if b < 1024:
            return f"{b:.1f} {unit}"
        b /= 1024
    return f"{b:.1f} PiB"


def _nlist(n: int) -> int:
    """Inverted lists: ~sqrt(n) as a power of two, with enough rows to train each centroid."""
    target = 2 ** round(math.log2(max(math.sqrt(n), 1)))
    return int(max(1, min(target, n // 39, 1 << 16)))


def _pq_m(dim: int) -> int:
    """Sub-quantizers for PQ: a divisor of dim, ~dim/8 bytes per vector, at most 64."""
    for m in range(min(64, dim), 0, -1):
        if dim % m == 0 and dim // m >= 4:
            return m
    return 1


SYNTAX_CHECK_DIM = 40320  # 8!: divisible by every usual PQ / OPQ sub-quantizer count


def check_index_spec(spec: str) -> None:
    """Refuse an index specification FAISS cannot parse, before any model or key exists (the
    dimension is not known yet: a highly divisible one stands in; ``plan_index`` checks again)."""
    plan_index(spec, 1 << 20, SYNTAX_CHECK_DIM)


def plan_index(spec: str, n: int, dim: int) -> IndexPlan:
    """Resolve ``spec`` into a FAISS factory string for ``n`` keys of dimension ``dim``.

    Raises ``IndexSpecError`` for a string FAISS cannot parse or an index that cannot be trained
    on ``n`` keys.
    """
    import faiss

    spec = spec.strip()
    if spec == "auto":
        if n <= AUTO_FLAT_MAX_ROWS:
            factory = "Flat"
        elif n * dim * 2 <= AUTO_SQ_MAX_BYTES:
            factory = f"IVF{_nlist(n)},SQfp16"
        else:
            factory = f"IVF{_nlist(n)},PQ{_pq_m(dim)}"
    elif spec == "flat":
        factory = "Flat"
    elif spec == "ivfpq":
        factory = f"IVF{_nlist(n)},PQ{_pq_m(dim)}"
    else:
        factory = spec
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_L2)
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1].rsplit(": ", 1)[-1] if str(e).strip() else "unparseable"
        for_dim = "" if dim == SYNTAX_CHECK_DIM else f" for key dim {dim}"
        raise IndexSpecError(f"`index` {spec!r} is invalid: FAISS cannot build {factory!r}{for_dim} ({msg}); "
                             "use flat, ivfpq, auto or a valid factory string", param="index") from None
    ivf = _ivf(index)
    nprobe = None
    if ivf is not None:
        nprobe = min(ivf.nlist, 32 if "PQ" in factory else 8)
    train_rows = 0
    if not index.is_trained:
        need = ivf.nlist * TRAIN_POINTS_PER_LIST if ivf is not None else 256 * 39
        if "PQ" in factory:
            need = max(need, 256 * TRAIN_POINTS_PER_LIST)
        train_rows = min(n, need)
        minimum = max(ivf.nlist if ivf is not None else 1, 256 if "PQ" in factory else 1)
        if n < minimum:
            raise IndexSpecError(f"`index` {spec!r} ({factory}) needs at least {minimum} keys to "
                                 f"train, the datastore has {n}; use `index` flat or a smaller IVF", param="index")
    return IndexPlan(spec, factory, nprobe, train_rows, _estimate_bytes(factory, index, n, dim))


def _ivf(index):
    import faiss

    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def _estimate_bytes(factory: str, index, n: int, dim: int) -> int:
    ivf = _ivf(index)
    per_vec = 4 * dim  # flat fp32 by default
    if "SQfp16" in factory or "SQ16" in factory:
        per_vec = 2 * dim
    elif "SQ8" in factory:
        per_vec = dim
    elif "PQ" in factory and ivf is not None and hasattr(ivf, "code_size"):
        per_vec = int(ivf.code_size)
    ids = 8 if ivf is not None else 0
    centroids = ivf.nlist * dim * 4 if ivf is not None else 0
    return n * (per_vec + ids) + centroids


def _gpu_resources():
    import faiss

    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        return None
    return faiss.StandardGpuResources()


def _read_rows(keys_path: Path, rows: np.ndarray | slice, dim: int) -> np.ndarray:
    """fp32 copy of some rows of keys.npy, without mapping the whole file."""
    keys = np.load(keys_path, mmap_mode="r")
    out = np.ascontiguousarray(keys[rows], dtype=np.float32)
    del keys
    return out


def build_index(keys_path: str | os.PathLike, n: int, dim: int, plan: IndexPlan, out_path: str | os.PathLike,
                *, seed: int = 0, progress: bool = True, use_gpu: bool | None = None) -> dict:
    """Train and fill the planned index from ``keys_path``; write it atomically to ``out_path``.

    Returns the index section of the datastore header.
    """
    import faiss
    from tqdm.auto import tqdm

    keys_path, out_path = Path(keys_path), Path(out_path)
    t0 = time.time()
    index = faiss.index_factory(dim, plan.factory, faiss.METRIC_L2)
    res = _gpu_resources() if use_gpu in (None, True) else None
    work = index
    if res is not None:
        try:
            work = faiss.index_cpu_to_gpu(res, 0, index)
            logger.info("building the index on GPU 0")
        except RuntimeError as e:  # not every index type has a GPU version
            logger.warning("index %s has no GPU version (%s); building on CPU", plan.factory, e)
            work = index
    if plan.train_rows:
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(n, size=plan.train_rows, replace=False))
        logger.info("training %s on %d keys", plan.factory, plan.train_rows)
        work.train(_read_rows(keys_path, sample, dim))
    bar = tqdm(total=n, unit="key", desc="adding keys", disable=not progress)
    for lo in range(0, n, ADD_CHUNK_ROWS):
        hi = min(n, lo + ADD_CHUNK_ROWS)
        work.add(_read_rows(keys_path, slice(lo, hi), dim))
        bar.update(hi - lo)
    bar.close()
    if work is not index:
        index = faiss.index_gpu_to_cpu(work)
    tmp = out_path.with_name(out_path.name + ".tmp")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, out_path)
    return {"spec": plan.spec, "factory": plan.factory, "metric": "l2", "nprobe": plan.nprobe,
            "ntotal": int(index.ntotal), "file": out_path.name, "build_seconds": round(time.time() - t0, 2),
            "bytes": out_path.stat().st_size}


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


def load_index(path: str | os.PathLike, *, n: int, dim: int, nprobe: int | None = None,
               use_gpu: bool | None = None):
    """Read the index, check that it holds ``n`` vectors of dimension ``dim``, set its default
    ``nprobe``, clone it to the GPU if FAISS has one."""
    import faiss

    try:
        index = faiss.read_index(str(path))
    except RuntimeError as e:
        raise DatastoreError(f"{path} is not a readable FAISS index ({str(e).strip().splitlines()[-1]}); "
                             "rebuild it with `knnlm build-index --resume`") from None
    if index.ntotal != n or index.d != dim:
        raise DatastoreError(f"{path} holds {index.ntotal} vectors of dim {index.d}, the datastore "
                             f"{n} of dim {dim}; rebuild the index")
    set_nprobe(index, nprobe)
    res = _gpu_resources() if use_gpu in (None, True) else None
    if res is not None:
        try:
            index = faiss.index_cpu_to_gpu(res, 0, index)
            index._knnlm_gpu_res = res  # keep the resources alive with the index
        except RuntimeError as e:
            logger.warning("searching on CPU: %s has no GPU version (%s)", path, e)
    return index
