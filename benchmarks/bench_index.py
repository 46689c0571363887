"""Index choice for a datastore: search time at k and recall against exact search, side by side.

    python benchmarks/bench_index.py --datastore runs/stdlib-1m \
        --factories "IVF1024,SQfp16;IVF1024,SQ8;IVF1024,PQ64" --nprobe 4,8,16,32

Queries are real: the key hidden states of the first --queries held-out stdlib tokens under the
datastore's model. For each factory (built from the datastore's keys into --workdir, reused when
present) and nprobe it prints the search time per 1,000 queries at --k and the recall of the exact
k nearest neighbours (exact = a flat search over the fp32 keys, on --exact-queries of them).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def held_out_queries(ds, model_name: str, n: int):
    import numpy as np
    import torch

    from knnlm.capture import capture_keys
    from knnlm.corpora import stdlib_files
    from knnlm.data import iter_documents, resolve_sources, tokenize_documents
    from knnlm.loading import load_model

    model, tok = load_model(model_name)
    ctx = ds.header.window.context
    out, have = [], 0
    docs = tokenize_documents(tok, iter_documents(resolve_sources(stdlib_files("test"))), n + 64)
    with torch.inference_mode(), capture_keys(model, ds.header.key.layer, stop_after=True) as cap:
        for _, ids in docs:
            for lo in range(0, len(ids) - 1, ctx):
                chunk = torch.from_numpy(ids[lo: lo + ctx].astype(np.int64))[None]
                out.append(cap.keys_of(chunk)[0, :-1].float().numpy())
                have += out[-1].shape[0]
            if have >= n:
                break
    return np.ascontiguousarray(np.concatenate(out)[:n], dtype=np.float32)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datastore", required=True)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--factories", default="IVF1024,SQfp16;IVF1024,SQ8;IVF1024,PQ64")
    p.add_argument("--nprobe", default="4,8,16,32")
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--queries", type=int, default=4096)
    p.add_argument("--exact-queries", type=int, default=128)
    p.add_argument("--workdir", default="runs/index-bench")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import faiss
    import numpy as np

    from knnlm.datastore import build_index, open_datastore
    from knnlm.index import plan_index, set_nprobe

    ds = open_datastore(args.datastore)
    n, d = len(ds), ds.dim
    q = held_out_queries(ds, args.model, args.queries)
    qe = q[: args.exact_queries]
    t0 = time.time()
    exact = faiss.IndexFlatL2(d)
    for lo in range(0, n, 1 << 16):
        exact.add(np.asarray(ds.keys[lo: lo + (1 << 16)], dtype=np.float32))
    _, gt = exact.search(qe, args.k)
    del exact
    print(f"{n:,} keys of dim {d}; {len(q):,} held-out queries; exact search of {len(qe)} queries "
          f"took {time.time() - t0:.1f} s")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"{'factory':>18} {'nprobe':>6} {'ms/1k queries':>14} {'recall@k':>9}")
    for factory in [f for f in args.factories.split(";") if f]:
        path = work / (factory.replace(",", "_") + ".faiss")
        if not path.exists():
            plan = plan_index(factory, n, d)
            t0 = time.time()
            build_index(ds.path / "keys.npy", n, d, plan, path, progress=False)
            print(f"built {factory} in {time.time() - t0:.1f} s ({path.stat().st_size / 2**20:.0f} MiB)")
        index = faiss.read_index(str(path))
        for npb in [int(x) for x in args.nprobe.split(",")]:
            set_nprobe(index, npb)
            index.search(q[:256], args.k)  # warm-up
            t0 = time.time()
            index.search(q, args.k)
            ms = (time.time() - t0) * 1000 / len(q) * 1000
            _, ids = index.search(qe, args.k)
            recall = float(np.mean([len(np.intersect1d(a, b)) / args.k for a, b in zip(ids, gt)]))
            rows.append({"factory": factory, "nprobe": npb, "ms_per_1k_queries": round(ms, 1),
                         "recall": round(recall, 4)})
            print(f"{factory:>18} {npb:>6} {ms:>14.1f} {recall:>9.3f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"datastore": args.datastore, "keys": n, "k": args.k, "queries": len(q), "rows": rows,
                       "command": " ".join(sys.argv)}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
