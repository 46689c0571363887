"""The cost of going wide: one process vs N torchrun ranks, each rank holding one shard of an
index split with ``--index-shards N`` (issue #32).

Per configuration it measures, in fresh processes: queries/s of the search alone (every query
answered by every shard and merged, ``knnlm.sharding.ShardRounds``), each rank's ``RssAnon`` /
``VmRSS`` after opening its share of the index and searching, the bytes each rank sent per query,
and whether the merged neighbours equal the one-process ones (every process on one intra-op
thread, as torchrun runs each rank); with ``--data`` also ``knnlm eval``'s tokens/s with 1
process (torch's default threads) and N ranks (data-parallel, and data-parallel with
``--shard-search``).

    knnlm reindex runs/big --index ivfpq --index-storage disk --index-shards 2
    python benchmarks/bench_ranks.py --datastore runs/big --nproc 2 --queries 4096 --k 1024 \\
        --data $(python -m knnlm.corpora stdlib-test) --max-tokens 16000

Results: a table and ``--json`` (default results/bench_ranks.json). Ranks run on this machine (gloo
on CPU), so the ranks share its cores: tokens/s over N ranks is a lower bound for N machines.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def proc_status() -> dict:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("RssAnon", "RssFile", "VmRSS", "VmHWM"):
            out[name] = int(rest.split()[0]) // 1024  # MiB
    return out


def queries_of(ds, n: int, seed: int) -> np.ndarray:
    """Stored keys plus Gaussian noise (0.1 x each dimension's std): near the data, not on it."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(ds), min(n, len(ds)), replace=False))
    x = np.asarray(ds.keys[rows], dtype=np.float32)
    return x + rng.normal(0, 0.1, x.shape).astype(np.float32) * x.std(0, keepdims=True)


def child(args) -> int:
    """One rank (or the one process): open the index share, search, report a JSON line."""
    from knnlm.datastore import open_datastore
    from knnlm.distributed import init_world, shutdown
    from knnlm.index import set_nprobe
    from knnlm.sharding import ShardRounds, merge_topk

    world = init_world()
    ds = open_datastore(args.datastore)
    before = proc_status()
    shards = ds.header.index.get("shards") or [ds.header.index]
    if world.distributed:
        index = ds.index_shards([world.rank], world)
        share = shards[world.rank]["bytes"]
    else:
        index = ds.index
        share = sum(s["bytes"] for s in shards)
    parts = getattr(index, "parts", [index])
    for p in parts:
        set_nprobe(p, args.nprobe or ds.header.nprobe)
    q = queries_of(ds, args.queries, args.seed)
    mine = np.array_split(np.arange(len(q)), world.size)[world.rank]  # this rank's queries
    rounds = ShardRounds(world, lambda x, k, _: merge_topk([p.search(x, k) for p in parts], k)) \
        if world.distributed else None
    t0 = time.time()
    out_d, out_i = [], []
    for lo in range(0, len(mine), args.batch):
        x = np.ascontiguousarray(q[mine[lo: lo + args.batch]])
        d, i = rounds.search(x, args.k) if rounds else merge_topk([p.search(x, args.k) for p in parts], args.k)
        out_d.append(d)
        out_i.append(i)
    if rounds:
        rounds.finish()
    seconds = time.time() - t0
    ids = np.concatenate(out_i) if out_i else np.zeros((0, args.k), dtype=np.int64)
    dists = np.concatenate(out_d) if out_d else np.zeros((0, args.k), dtype=np.float32)
    np.save(Path(args.out) / f"ids.{world.size}.{world.rank}.npy", ids)
    np.save(Path(args.out) / f"dists.{world.size}.{world.rank}.npy", dists)
    rec = {"world_size": world.size, "rank": world.rank, "queries": int(len(mine)), "seconds": round(seconds, 3),
           "shard_rows": int(sum(p.ntotal for p in parts)), "share_bytes": int(share), "status_before_mib": before,
           "status_after_mib": proc_status(),
           "bytes_sent_per_query": round(rounds.bytes_sent / max(len(q), 1), 1) if rounds else 0}
    print("RESULT " + json.dumps(rec), flush=True)
    shutdown(world)
    return 0


def _run(cmd: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    """``cmd`` with this checkout's knnlm first on the path (a script's own directory comes first otherwise)."""
    path = os.pathsep.join(x for x in (str(ROOT), os.environ.get("PYTHONPATH")) if x)
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=path, **(env or {})))
    if res.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{res.stderr[-3000:]}")
    return res


def _launch(nproc: int) -> list[str]:
    return [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                "--nproc-per-node", str(nproc)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datastore", required=True, help="a datastore whose index has --nproc shards")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--queries", type=int, default=4096)
    p.add_argument("--batch", type=int, default=256, help="queries per search round")
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--nprobe", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", nargs="+", default=None, help="eval text: also knnlm eval tokens/s, 1 vs N ranks")
    p.add_argument("--max-tokens", type=int, default=16000)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--json", default="results/bench_ranks.json")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    result = {"datastore": args.datastore, "k": args.k, "queries": args.queries, "search": {}, "eval": {}}
    with tempfile.TemporaryDirectory() as tmp:
        base = [str(Path(__file__).resolve()), "--child", "--out", tmp, "--datastore", args.datastore,
                "--queries", str(args.queries), "--batch", str(args.batch), "--k", str(args.k),
                "--seed", str(args.seed), *(["--nprobe", str(args.nprobe)] if args.nprobe else [])]
        for n in (1, args.nproc):
            # one intra-op thread in the one process too, as torchrun gives each rank: FAISS computes
            # its IVF-PQ precomputed tables with BLAS over its threads, and their rounding (~1e-6 of a
            # distance) reorders near-tied neighbours; with one thread on both sides they are identical
            res = _run([*_launch(n), *base], env={"OMP_NUM_THREADS": "1"})
            result["search"][n] = [json.loads(ln.split("RESULT ", 1)[1]) for ln in res.stdout.splitlines()
                                   if "RESULT " in ln]
        one, wide = ({what: np.concatenate([np.load(Path(tmp) / f"{what}.{n}.{r}.npy") for r in range(n)])
                      for what in ("ids", "dists")} for n in (1, args.nproc))
        result["identical_ids_fraction"] = float((one["ids"] == wide["ids"]).all(1).mean())
        result["identical_dists_fraction"] = float((one["dists"] == wide["dists"]).all(1).mean())
    if args.data:
        with tempfile.TemporaryDirectory() as tmp:
            for name, n, extra in (("1 process", 1, []), (f"{args.nproc} ranks", args.nproc, []),
                                   (f"{args.nproc} ranks, --shard-search", args.nproc, ["--shard-search"])):
                out = Path(tmp) / "res.json"
                _run([*_launch(n), "-m", "knnlm", "eval", "--model", args.model, "--datastore", args.datastore,
                      "--data", *args.data, "--max-tokens", str(args.max_tokens), "--output", str(out), "--quiet",
                      *extra])
                res = json.loads(out.read_text())
                result["eval"][name] = {"ppl_knn": res["ppl_knn"], "tokens": res["tokens"], **res["timing"]}
    for n, ranks in result["search"].items():
        for r in ranks:
            print(f"{n} rank(s), rank {r['rank']}: {r['queries']} queries in {r['seconds']} s "
                  f"({r['queries'] / max(r['seconds'], 1e-9):.0f} q/s), shard {r['shard_rows']:,} rows "
                  f"({r['share_bytes'] / 2**20:.1f} MiB of index files), RssAnon "
                  f"{r['status_after_mib'].get('RssAnon')} MiB, VmRSS {r['status_after_mib'].get('VmRSS')} MiB, "
                  f"{r['bytes_sent_per_query']} B sent / query")
    print(f"identical neighbour ids: {100 * result['identical_ids_fraction']:.2f}% of queries, identical distances: "
          f"{100 * result['identical_dists_fraction']:.2f}%")
    for name, e in result["eval"].items():
        print(f"eval {name}: ppl {e['ppl_knn']:.4f}, {e['tokens_per_second']} tok/s")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
