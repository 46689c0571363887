"""Issue #32's check of an index split over rows: for real held-out queries, the neighbours of a
datastore whose index is split in shards (``knnlm reindex --index-shards N --keep-training``)
against those of the unsharded index it was split from (the same trained quantizer and PQ).

The queries are the model's keys (the datastore's key layer) over held-out text, the first
``--queries`` positions of the files in order, in windows of the datastore's context. Both
indexes are searched in one process at the datastore's nprobe (or ``--nprobe``) with ``--k``
neighbours; equal means equal distances and equal row ids wherever a distance is not tied with
the k-th one (ties at the cut may keep either row).

    knnlm reindex runs/stdlib-1m-s2 --index-shards 2 --keep-training --index-storage disk
    python -m experiments.shard_check --unsharded runs/stdlib-1m --sharded runs/stdlib-1m-s2 \\
        --data $(python -m knnlm.corpora stdlib-test) --queries 12000 --out results/shards/stdlib-1m.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def held_out_queries(model_name: str, paths, n: int, context: int, layer: str | None) -> np.ndarray:
    """The keys of the first ``n`` positions of ``paths`` (in order), (n, D) float32."""
    from knnlm.capture import capture_keys
    from knnlm.loading import load_model

    model, tok = load_model(model_name, device="cpu", progress=False)
    out, have = [], 0
    with torch.inference_mode(), capture_keys(model, layer, stop_after=True) as cap:
        for p in paths:
            ids = tok(Path(p).read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
            for s in range(0, len(ids), context):
                chunk = torch.tensor([ids[s:s + context]])  # (1, T)
                out.append(cap.keys_of(chunk)[0].float().numpy())  # (T, D)
                have += chunk.shape[1]
                if have >= n:
                    return np.concatenate(out)[:n]
    return np.concatenate(out)


def compare(a, b) -> dict:
    """How far the neighbours (d, i) of ``b`` are from those of ``a`` (both (Q, k))."""
    (da, ia), (db, ib) = a, b
    below = da < da[:, -1:]  # not tied with the k-th distance
    same_d = (da == db).all(1)
    same_i = (np.where(below, ia, -2) == np.where(below, ib, -2)).all(1)
    return {"queries": int(len(da)), "same_distances": int(same_d.sum()), "same_ids_untied": int(same_i.sum()),
            "same_ids_all": int((ia == ib).all(1).sum()), "identical": int((same_d & same_i).sum()),
            "max_abs_distance_diff": float(np.abs(da - db).max()), "no_neighbour": int((ia < 0).sum())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--unsharded", required=True)
    ap.add_argument("--sharded", required=True)
    ap.add_argument("--data", nargs="+", required=True)
    ap.add_argument("--queries", type=int, default=12000)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--nprobe", type=int, default=None)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--model", default="smollm2", help="the datastore's model (default: %(default)s)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    from knnlm.datastore import open_datastore
    from knnlm.index import set_nprobe
    from knnlm.sharding import merge_topk

    one, split = open_datastore(args.unsharded), open_datastore(args.sharded)
    h1, h2 = one.header.index, split.header.index
    assert split.index_shard_count > 1 and one.index_shard_count == 1, "--sharded must be split, --unsharded not"
    nprobe = args.nprobe or h1["nprobe"]
    set_nprobe(one.index, nprobe)
    for part in split.index.parts:
        set_nprobe(part, nprobe)
    t0 = time.time()
    q = held_out_queries(args.model, args.data, args.queries, one.header.window.context,
                         one.header.key.layer)
    t_model = time.time() - t0
    res, secs = {"unsharded": [], "sharded": []}, {"unsharded": 0.0, "sharded": 0.0}
    for s in range(0, len(q), args.batch):
        x = np.ascontiguousarray(q[s:s + args.batch])
        for name, index in (("unsharded", one.index), ("sharded", split.index)):
            t = time.time()
            d, i = index.search(x, args.k)
            secs[name] += time.time() - t
            res[name].append(merge_topk([(d, i)], args.k) if name == "unsharded" else (d, i))
    a = tuple(np.concatenate([r[j] for r in res["unsharded"]]) for j in (0, 1))
    b = tuple(np.concatenate([r[j] for r in res["sharded"]]) for j in (0, 1))
    report = {"unsharded": str(args.unsharded), "sharded": str(args.sharded), "keys": len(one),
              "factory": h1["factory"], "nprobe": nprobe, "k": args.k,
              "shards": [s["rows"] for s in h2["shards"]], "storage": [h1["storage"], h2["storage"]],
              "data": [str(p) for p in args.data], "query_seconds_model": round(t_model, 1),
              "search_seconds": {k: round(v, 1) for k, v in secs.items()}, **compare(a, b)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    return 0 if report["identical"] == report["queries"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
