"""On-disk IVF-PQ at scale: build time, bytes per key, search memory, ms per query, recall.

    python benchmarks/bench_scale.py --datastore runs/stdlib-1m --sizes 1000000,4000000,16000000 \
        --workdir runs/scale-bench --json results/bench_scale.json
    python benchmarks/bench_scale.py --sizes 20000,40000 --quick       # a smoke run, synthetic keys

Resumable: an interrupted run continues where it stopped when given the same command (each N's
trained index, filled shards, merged index and search result are kept in ``--workdir`` as they
finish; delete the workdir to start over).

For every N the package's own recipe (``--index``, default ``ivfpq``: ``knnlm.index.plan_index``)
is trained once on its seeded sample, filled in ``--shards`` shards and merged with storage
``disk`` (inverted lists memory-mapped), through the same functions a build uses. Keys: the
datastore's real keys for rows below its size; beyond, resampled real keys plus Gaussian noise
(``--noise`` x each dimension's std), generated per 65,536-row block from a seed, never all in RAM.
Without ``--datastore``, Gaussian "real" keys of ``--dim`` stand in.

Search runs in a fresh child process per N (so that the build's memory does not count): it
loads the index from disk, runs every query at k = ``--k`` and the plan's default nprobe in batches
of ``--batch`` (eval searches 8 windows x ~512 tokens at a time), and reports its ``RssAnon`` (anonymous
memory: pages of the memory-mapped lists and coarse quantizer, which the OS can drop, do not count) and ``VmHWM`` (peak
resident, mapped pages included) from /proc/self/status, ms per query, and recall@k against an exact
flat scan over all N keys for the first ``--exact-queries`` queries. Queries: key hidden states of
held-out stdlib tokens under the datastore's model (``--queries model``), or perturbed keys
(``--queries keys``; the default without a datastore).

Then a projection to 100M and 1B keys: the recipe ``plan_index`` picks, disk (codes + ids +
centroids), search RAM (the largest run's anonymous memory, its precomputed PQ tables swapped for
those at that size: the coarse quantizer and the lists are mapped, see ``knnlm.index.load_index``)
and ms per query = per-code cost x codes scanned + per-list cost x lists probed (per code from the
smallest run, per list from the largest: see ``project``). Prints a table and writes JSON (``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BLOCK = 1 << 16  # rows per generated block (the add grid of knnlm.index)


def proc_status() -> dict:
    """RssAnon, RssFile, VmRSS, VmHWM of this process in MiB (Linux /proc/self/status)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("RssAnon", "RssFile", "VmRSS", "VmHWM"):
                out[k] = round(int(v.split()[0]) / 1024, 1)
    return out


class ScaledKeys:
    """A read-only (N, D) float32 key array: rows < len(base) are ``base``'s; beyond, row i is a
    seeded random base row + N(0, (noise * std)^2), generated per BLOCK rows (deterministic)."""

    def __init__(self, base: np.ndarray, n: int, noise: float, seed: int = 0):
        self.base, self.n, self.seed = base, int(n), seed
        nb = len(base)
        sample = np.asarray(base[np.linspace(0, nb - 1, min(nb, 20_000)).astype(np.int64)], dtype=np.float32)
        self.scale = (noise * sample.std(axis=0)).astype(np.float32)  # (D,)
        self.shape = (self.n, base.shape[1])
        self.dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return self.n

    def _block(self, b: int) -> np.ndarray:
        lo, hi = b * BLOCK, min(self.n, (b + 1) * BLOCK)
        nb = len(self.base)
        out = np.empty((hi - lo, self.shape[1]), dtype=np.float32)
        real = min(hi, nb) - lo
        if real > 0:
            out[:real] = self.base[lo:lo + real]
        if real < hi - lo:
            rng = np.random.default_rng([self.seed, b])
            m = hi - lo - max(real, 0)
            rows = np.sort(rng.integers(0, nb, m))
            out[max(real, 0):] = np.asarray(self.base[rows], dtype=np.float32)
            out[max(real, 0):] += rng.standard_normal((m, self.shape[1]), dtype=np.float32) * self.scale
        return out

    def __getitem__(self, idx) -> np.ndarray:
        if isinstance(idx, slice):
            lo, hi, _ = idx.indices(self.n)
            blocks = range(lo // BLOCK, -(-hi // BLOCK))
            parts = [self._block(b) for b in blocks]
            whole = np.concatenate(parts) if len(parts) > 1 else parts[0]
            return whole[lo - blocks[0] * BLOCK: hi - blocks[0] * BLOCK]
        rows = np.asarray(idx, dtype=np.int64)
        out = np.empty((len(rows), self.shape[1]), dtype=np.float32)
        blocks = rows // BLOCK
        for b in np.unique(blocks):
            sel = np.nonzero(blocks == b)[0]
            out[sel] = self._block(int(b))[rows[sel] - b * BLOCK]
        return out


def exact_neighbours(keys, q: np.ndarray, k: int) -> np.ndarray:
    """Exact k nearest rows of ``keys`` for ``q`` (Q, D): a flat scan in blocks."""
    import faiss

    heap = faiss.ResultHeap(len(q), k)
    for lo in range(0, len(keys), BLOCK):
        x = np.ascontiguousarray(keys[lo: lo + BLOCK], dtype=np.float32)
        flat = faiss.IndexFlatL2(x.shape[1])
        flat.add(x)
        d, i = flat.search(q, min(k, len(x)))
        heap.add_result(d, np.where(i >= 0, i + lo, -1))
    heap.finalize()
    return heap.I


def build(keys, spec: str, out: Path, shards: int, seed: int) -> dict:
    """The package's build path, step by step (timed): train once, fill shards, merge onto disk.

    Resumable: each finished step leaves its output and a JSON record in ``out`` (the trained
    index, every filled shard, the merged index), so a killed run continues after the last one."""
    from knnlm.datastore import merge_index
    from knnlm.index import fill_shard, plan_index, train_index

    n, d = keys.shape
    done = out / "build.json"
    if done.exists():
        return json.loads(done.read_text())
    plan = plan_index(spec, n, d, storage="disk")
    out.mkdir(parents=True, exist_ok=True)
    steps_file = out / "steps.json"
    steps = json.loads(steps_file.read_text()) if steps_file.exists() else {}

    def step(name: str, fn) -> None:
        if name not in steps:
            t = time.time()
            fn()
            steps[name] = round(time.time() - t, 1)
            tmp = steps_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(steps))
            os.replace(tmp, steps_file)

    def train() -> None:
        train_index(keys, plan, out / "trained.tmp.faiss", seed=seed)
        os.replace(out / "trained.tmp.faiss", out / "trained.faiss")

    step("train", train)
    bounds = [n * i // shards for i in range(shards + 1)]
    paths = [out / f"shard{i}.faiss" for i in range(shards)]
    for i, p in enumerate(paths):
        def fill(i=i, p=p) -> None:
            tmp = p.with_suffix(".tmp.faiss")
            fill_shard(out / "trained.faiss", keys, bounds[i], bounds[i + 1], tmp)
            os.replace(tmp, p)
        step(f"fill{i}", fill)
    t = time.time()
    rec = merge_index(out / "trained.faiss", paths, out / "index.faiss", storage="disk", ntotal=n)
    steps["merge"] = round(time.time() - t, 1)
    fill_s = sum(v for k, v in steps.items() if k.startswith("fill"))
    rec = {"n": n, "dim": d, "factory": plan.factory, "nprobe": plan.nprobe, "train_rows": plan.train_rows,
           "train_s": steps["train"], "fill_s": round(fill_s, 1), "merge_s": steps["merge"],
           "build_s": round(steps["train"] + fill_s + steps["merge"], 1), "bytes": rec["bytes"],
           "bytes_per_key": round(rec["bytes"] / n, 2), "ivfdata_bytes": rec["ivfdata_bytes"]}
    done.write_text(json.dumps(rec))  # before the inputs go: a run killed after this does not merge again
    for p in paths + [out / "trained.faiss"]:
        p.unlink()
    return rec


def search_child(args) -> int:
    """In a fresh process: load the on-disk index, search, report memory, speed and recall."""
    from knnlm.datastore import ivfdata_name
    from knnlm.index import load_index

    before = proc_status()
    q = np.load(args.queries_file)
    gt = np.load(args.gt_file)
    rec = json.loads(Path(args.record).read_text())
    index = load_index(args.index_path, n=rec["n"], dim=rec["dim"], nprobe=rec["nprobe"], storage="disk",
                       ivfdata=Path(args.index_path).parent / ivfdata_name(Path(args.index_path).name),
                       ivfdata_bytes=rec["ivfdata_bytes"], use_gpu=False)
    loaded = proc_status()
    k = min(args.k, rec["n"])
    index.search(q[: min(len(q), 256)], k)  # warm-up
    t0 = time.time()
    for lo in range(0, len(q), args.batch):
        index.search(q[lo: lo + args.batch], k)
    ms = (time.time() - t0) * 1000 / len(q)
    _, ids = index.search(q[: len(gt)], k)
    recall = float(np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(ids, gt)]))
    after = proc_status()
    print(json.dumps({"ms_per_query": round(ms, 3), "recall_at_k": round(recall, 4), "k": k,
                      "rss_anon_mib_before_load": before["RssAnon"], "rss_anon_mib_loaded": loaded["RssAnon"],
                      "rss_anon_mib_searching": after["RssAnon"], "rss_file_mib": after["RssFile"],
                      "vm_hwm_mib": after["VmHWM"]}))
    return 0


def _structures(factory: str, n: int, dim: int) -> int:
    """Bytes of an on-disk IVF-PQ index's anonymous memory once loaded: FAISS's precomputed IVF-PQ
    residual tables (nlist x M x 256 fp32, built when they fit ``precomputed_table_max_bytes``).
    The coarse quantizer (centroids, HNSW links) is mapped from the index file by ``load_index``
    and the lists from the ivfdata file: page cache, not anonymous memory."""
    import faiss

    index = faiss.index_factory(dim, factory)  # kept alive: ivf below is a view into it
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    b = 0
    if isinstance(ivf, faiss.IndexIVFPQ):
        table = ivf.nlist * ivf.pq.M * 256 * 4
        if table <= getattr(faiss.cvar, "precomputed_table_max_bytes", 2 << 30):
            b += table
    return b


def project(rows: list[dict], spec: str, dim: int, sizes=(100_000_000, 1_000_000_000)) -> list[dict]:
    from knnlm.index import plan_index

    ok = [r for r in rows if "ms_per_query" in r]
    small = min(ok, key=lambda r: r["n"]) if ok else None
    large = max(ok, key=lambda r: r["n"]) if ok else None
    # ms/query ~ per_code * codes scanned + per_list * lists probed. The recipe keeps ~8,192 codes
    # scanned at every measured N, so the two are not separable by a fit: per_code comes from the
    # smallest run (few lists, FAISS's precomputed tables: its time is mostly scanning; an upper
    # bound), per_list from the largest (no tables at 65,536+ lists: each probed list computes its
    # own distance table) after removing its codes at that rate.
    per_code = per_list = None
    if small is not None:
        per_code = small["ms_per_query"] / _scanned(small)
        per_list = max(0.0, (large["ms_per_query"] - per_code * _scanned(large)) / large["nprobe"])
    out = []
    for n in sizes:
        plan = plan_index(spec, n, dim, storage="disk")
        nlist = _nlist_of(plan.factory)
        scanned = plan.nprobe * n / nlist
        est = None if per_code is None else per_code * scanned + per_list * plan.nprobe
        ram = None
        if large is not None:  # the largest run's anonymous memory, its precomputed tables swapped for n's
            ram = large["rss_anon_mib_searching"] + (_structures(plan.factory, n, dim)
                                                    - _structures(large["factory"], large["n"], dim)) / 2**20
        out.append({"n": n, "factory": plan.factory, "nprobe": plan.nprobe, "train_rows": plan.train_rows,
                    "disk_gib": round(plan.bytes_estimate / 2**30, 1),
                    "bytes_per_key": round(plan.bytes_estimate / n, 1),
                    "search_ram_anon_mib_est": None if ram is None else round(ram),
                    "ms_per_query_est": None if est is None else round(est, 2), "codes_scanned": round(scanned)})
    return out


def _scanned(r: dict) -> float:
    """Codes a query of run ``r`` scans on average: nprobe x keys per list."""
    return r["nprobe"] * r["n"] / _nlist_of(r["factory"])


def _nlist_of(factory: str) -> int:
    import re

    return int(re.search(r"IVF(\d+)", factory).group(1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datastore", default=None, help="real keys (and the model for --queries model)")
    p.add_argument("--sizes", default="1000000,4000000,16000000", help="key counts, comma-separated")
    p.add_argument("--index", default="ivfpq", help="index spec as in build-index (default: %(default)s)")
    p.add_argument("--shards", type=int, default=4, help="shards filled then merged (default: %(default)s)")
    p.add_argument("--noise", type=float, default=0.1, help="perturbation of resampled keys, x per-dim std")
    p.add_argument("--queries", choices=["model", "keys"], default=None,
                   help="model: held-out stdlib hidden states (default with --datastore); keys: perturbed keys")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--n-queries", type=int, default=4096)
    p.add_argument("--exact-queries", type=int, default=64, help="queries whose recall is measured")
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4096, help="queries per search call")
    p.add_argument("--dim", type=int, default=576, help="key dim without --datastore")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default="runs/scale-bench")
    p.add_argument("--keep", action="store_true", help="keep the built indexes")
    p.add_argument("--json", default=None, help="results file (default: results/bench_scale[_quick].json)")
    p.add_argument("--quick", action="store_true",
                   help="smoke settings: dim 64, 512 queries, 16 exact, k 64, synthetic keys")
    # the child process
    p.add_argument("--search-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--index-path", help=argparse.SUPPRESS)
    p.add_argument("--queries-file", help=argparse.SUPPRESS)
    p.add_argument("--gt-file", help=argparse.SUPPRESS)
    p.add_argument("--record", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.search_child:
        return search_child(args)
    if args.quick:
        args.dim, args.n_queries, args.exact_queries, args.k = 64, 512, 16, 64
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)

    if args.datastore:
        from knnlm.datastore import open_datastore

        ds = open_datastore(args.datastore, require_index=False)
        ds.require_keys("datastore", "bench_scale needs real keys")
        base = ds.keys  # (N_real, D) memory-mapped
        source = f"{args.datastore} ({len(ds):,} real keys of dim {ds.dim})"
    else:
        ds = None
        rng = np.random.default_rng(args.seed)
        centers = rng.standard_normal((256, args.dim)).astype(np.float32) * 2
        base = (centers[rng.integers(0, 256, min(sizes) // 2)]
                + rng.standard_normal((min(sizes) // 2, args.dim)).astype(np.float32))
        source = f"synthetic Gaussian mixture ({len(base):,} base keys of dim {args.dim})"
    dim = base.shape[1]
    mode = args.queries or ("model" if ds is not None else "keys")
    qfile = work / "queries.npy"
    if qfile.exists():  # a resumed run measures every N on the same queries
        queries = np.load(qfile)
    elif mode == "model":
        sys.path.insert(0, str(Path(__file__).parent))
        from bench_index import held_out_queries

        queries = held_out_queries(ds, args.model, args.n_queries)
    else:
        qrng = np.random.default_rng(args.seed + 1)
        rows = np.sort(qrng.choice(len(base), min(args.n_queries, len(base)), replace=False))
        queries = np.asarray(base[rows], dtype=np.float32)
        queries += qrng.standard_normal(queries.shape, dtype=np.float32) * queries.std(axis=0) * 0.2
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    np.save(qfile, queries)
    print(f"keys: {source}; queries: {len(queries):,} ({mode}); k {args.k}; index {args.index!r}, storage disk")

    rows = []
    for n in sizes:
        keys = ScaledKeys(base, n, args.noise, seed=args.seed)
        out = work / f"n{n}"
        result = out / "result.json"
        if result.exists():  # finished by an earlier (interrupted) run of the same command
            rec = json.loads(result.read_text())
            rows.append(rec)
            print(f"N={n:,}: done earlier ({result})", flush=True)
            continue
        rec = build(keys, args.index, out, args.shards, args.seed)
        if not (out / "gt.npy").exists():
            t0 = time.time()
            gt = exact_neighbours(keys, queries[: args.exact_queries], min(args.k, n))
            rec["exact_s"] = round(time.time() - t0, 1)
            np.save(out / "gt.tmp.npy", gt)
            os.replace(out / "gt.tmp.npy", out / "gt.npy")
        (out / "record.json").write_text(json.dumps(rec))
        child = subprocess.run([sys.executable, __file__, "--search-child", "--index-path", str(out / "index.faiss"),
                                "--queries-file", str(work / "queries.npy"), "--gt-file", str(out / "gt.npy"),
                                "--record", str(out / "record.json"), "--k", str(args.k), "--batch", str(args.batch)],
                               capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if child.returncode != 0:
            print(child.stderr, file=sys.stderr)
            raise SystemExit(f"search child failed for N={n}")
        rec.update(json.loads(child.stdout.strip().splitlines()[-1]))
        rows.append(rec)
        if not args.keep:
            for f in out.iterdir():
                f.unlink()
        result.write_text(json.dumps(rec))
        print(f"N={n:,}: {rec['factory']} nprobe {rec['nprobe']}: build {rec['build_s']} s, "
              f"{rec['bytes_per_key']} B/key, RssAnon {rec['rss_anon_mib_searching']} MiB, "
              f"{rec['ms_per_query']} ms/query, recall@{rec['k']} {rec['recall_at_k']}", flush=True)

    proj = project(rows, args.index, dim)
    print()
    print(f"{'keys':>14} {'index':>26} {'nprobe':>6} {'build s':>8} {'B/key':>6} {'RssAnon MiB':>11} "
          f"{'VmHWM MiB':>9} {'ms/query':>8} {'recall@k':>8}")
    for r in rows:
        print(f"{r['n']:>14,} {r['factory']:>26} {r['nprobe']:>6} {r['build_s']:>8} {r['bytes_per_key']:>6} "
              f"{r['rss_anon_mib_searching']:>11} {r['vm_hwm_mib']:>9} {r['ms_per_query']:>8} {r['recall_at_k']:>8}")
    for r in proj:
        print(f"{r['n']:>14,} {r['factory']:>26} {r['nprobe']:>6} {'(proj.)':>8} {r['bytes_per_key']:>6} "
              f"{r['search_ram_anon_mib_est']!s:>11} {'':>9} {r['ms_per_query_est']!s:>8} {'':>8}")
    print("projected disk: " + ", ".join(f"{r['n']:,} keys {r['disk_gib']} GiB" for r in proj))
    anon = [r["rss_anon_mib_searching"] for r in rows]
    if len(anon) > 1:
        print(f"search RssAnon from {sizes[0]:,} to {sizes[-1]:,} keys: {min(anon)}..{max(anon)} MiB "
              f"(max/min {max(anon) / min(anon):.2f})")
    dest = Path(args.json or f"results/bench_scale{'_quick' if args.quick else ''}.json")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps({"keys": source, "queries": mode, "k": args.k, "index": args.index,
                                "shards": args.shards, "noise": args.noise, "rows": rows, "projection": proj,
                                "command": " ".join(sys.argv)}, indent=1) + "\n")
    print(f"results written to {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
