"""Search memory of an on-disk IVF index with its coarse quantizer read into RAM (FAISS's own
``read_index``) vs memory-mapped (``knnlm.index.load_index``), each in a fresh process.

    python benchmarks/quantizer_memory.py INDEX.faiss --n 16000000 --nprobe 135 \\
        --queries runs/scale-bench/queries.npy

Prints one JSON line per mode: RssAnon / RssFile / VmRSS / VmHWM (MiB, ``bench_scale.proc_status``)
before loading, loaded and after searching every query at k = 1024, ms per query, and a checksum
of the first 64 queries' ids (the same in both modes: the mapping changes where the quantizer
lives, not what it returns).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def _child(args) -> None:
    import faiss
    import numpy as np

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_scale import proc_status as _status

    q = np.load(args.queries)
    before = _status()
    if args.mode == "map":
        from knnlm.datastore import ivfdata_name
        from knnlm.index import load_index

        lists = Path(args.index).parent / ivfdata_name(Path(args.index).name)
        index = load_index(args.index, n=args.n, dim=q.shape[1], nprobe=args.nprobe, storage="disk",
                           ivfdata=lists, ivfdata_bytes=lists.stat().st_size, use_gpu=False)
    else:
        index = faiss.read_index(args.index, faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)
        faiss.extract_index_ivf(index).nprobe = args.nprobe
    loaded = _status()
    index.search(q[:256], args.k)  # warm-up
    t = time.time()
    _, ids = index.search(q, args.k)
    ms = (time.time() - t) * 1000 / len(q)
    print(json.dumps({"mode": args.mode, "before": before, "loaded": loaded, "searching": _status(),
                      "ms_per_query": round(ms, 3), "checksum": int(ids[:64].sum())}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("index")
    p.add_argument("--n", type=int, required=True, help="vectors in the index")
    p.add_argument("--nprobe", type=int, required=True)
    p.add_argument("--queries", required=True, help=".npy of fp32 queries (Q, D)")
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--mode", choices=["ram", "map"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.mode:
        _child(args)
        return 0
    for mode in ("ram", "map"):
        out = subprocess.run([sys.executable, __file__, *(argv or sys.argv[1:]), "--mode", mode],
                             capture_output=True, text=True, check=True)
        print(out.stdout.strip().splitlines()[-1], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
