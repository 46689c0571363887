"""kNN-LM eval throughput vs the plain LM eval on the same tokens, measured side by side.

    python benchmarks/bench_eval.py --datastore runs/stdlib-1m --tokens 20000 --nprobe 8,16,32
    # the adaptive kNN-LM (gate from `knnlm tune`) searching half of the tokens, vs the plain LM
    python benchmarks/bench_eval.py --datastore runs/stdlib-1m --tokens 16000 --lambda adaptive --retrieve-fraction 0.5

Runs plain, then kNN-LM (once per --nprobe), then plain again, on the first --tokens tokens of the
held-out stdlib files, and prints tokens/s, the ratio kNN / plain (plain = mean of the two
bracketing runs, to cancel drift on a shared machine) and both perplexities. ``--json`` saves it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datastore", required=True)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--tokens", type=int, default=20_000, help="held-out tokens to score (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--k", type=int, default=None, help="neighbours (default: 1024 capped at the datastore size)")
    p.add_argument("--nprobe", default=None, help="comma list of nprobe values to measure (default: the datastore's)")
    p.add_argument("--lambda", dest="lam", default="0.25", help="a number in [0, 1] or 'adaptive' (needs `knnlm tune`)")
    p.add_argument("--retrieve-fraction", type=float, default=None, help="search only this fraction of tokens")
    p.add_argument("--pointers", action="store_true", help="RetoMaton-style pointers")
    p.add_argument("--rerank", action="store_true", help="also measure --rerank (exact distances from keys.npy)")
    p.add_argument("--min-pointers", type=int, default=None)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--sweep", action="store_true",
                   help="also time a 48-setting sweep (lambda 4 x T 4 x k 3) against the single-setting kNN run")
    p.add_argument("--json", default=None, help="write the measurements here")
    args = p.parse_args(argv)

    from knnlm import evaluate
    from knnlm.config import EvalConfig
    from knnlm.corpora import stdlib_files
    from knnlm.datastore import open_datastore
    from knnlm.loading import load_model

    model, tok = load_model(args.model)
    ds = open_datastore(args.datastore)
    data = stdlib_files("test")
    common = dict(max_tokens=args.tokens, batch_size=args.batch_size, progress=False, lambdas=[args.lam],
                  temperatures=[args.temperature], ks=[args.k])
    knn_only = dict(retrieve_fraction=args.retrieve_fraction, pointers=args.pointers, min_pointers=args.min_pointers)
    nprobes = [None] if args.nprobe is None else [int(x) for x in args.nprobe.split(",")]

    def plain():
        return evaluate(model, tok, None, data, EvalConfig(**common))

    evaluate(model, tok, None, data, EvalConfig(**dict(common, max_tokens=2000)))  # warm-up
    runs = {"plain_before": plain()}
    for npb in nprobes:
        runs[f"knn_nprobe{npb}"] = evaluate(model, tok, ds, data, EvalConfig(**common), nprobe=npb, **knn_only)
    if args.rerank:
        runs[f"knn_rerank{nprobes[0]}"] = evaluate(model, tok, ds, data, EvalConfig(**common), nprobe=nprobes[0],
                                                   rerank=True, **knn_only)
    if args.sweep:
        runs["knn_sweep48"] = evaluate(model, tok, ds, data, EvalConfig(**dict(
            common, lambdas=[args.lam, 0.1, 0.5, 0.75], temperatures=[args.temperature, 0.5, 2, 5],
            ks=[args.k, 16, 128])), nprobe=nprobes[0])
    runs["plain_after"] = plain()
    base_tps = (runs["plain_before"]["timing"]["tokens_per_second"]
                + runs["plain_after"]["timing"]["tokens_per_second"]) / 2
    idx = ds.header.index
    n_eval = runs['plain_before']['tokens']
    print(f"datastore {args.datastore}: {len(ds):,} keys, index {idx['factory']}; eval {n_eval:,} "
          f"held-out tokens, batch {args.batch_size}, lambda {args.lam}, T {args.temperature}, "
          f"retrieve fraction {args.retrieve_fraction}, pointers {args.pointers}")
    print(f"{'run':>16} {'nprobe':>7} {'k':>6} {'tok/s':>9} {'ratio':>7} {'ppl base':>9} {'ppl kNN':>9}")
    rows = []
    for name, r in runs.items():
        tps = r["timing"]["tokens_per_second"]
        knn = "ppl_knn" in r
        row = {"run": name, "nprobe": r["retrieval"]["nprobe"] if knn else None,
               "k": r["retrieval"]["k"] if knn else None,
               "tokens_per_second": tps, "ratio_vs_plain": round(tps / base_tps, 3), "ppl_base": r["ppl_base"],
               "ppl_knn": r.get("ppl_knn"),
               "searched_fraction": r["retrieval"]["searched_fraction"] if knn else None}
        rows.append(row)
        print(f"{name:>16} {str(row['nprobe'] or '-'):>7} {str(row['k'] or '-'):>6} {tps:>9.1f} "
              f"{row['ratio_vs_plain']:>6.2f}x {r['ppl_base']:>9.3f} {(r.get('ppl_knn') or float('nan')):>9.3f}")
    if args.sweep:
        single = runs[f"knn_nprobe{nprobes[0]}"]["timing"]["wall_seconds"]
        sweep = runs["knn_sweep48"]["timing"]["wall_seconds"]
        print(f"sweep of {len(runs['knn_sweep48']['grid'])} settings: {sweep:.1f} s wall vs {single:.1f} s for one "
              f"setting ({sweep / single:.2f}x); its primary ppl {runs['knn_sweep48']['ppl_knn']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"datastore": args.datastore, "rows": len(ds), "index": idx,
                       "tokens": runs["plain_before"]["tokens"],
                       "runs": rows, "command": " ".join(sys.argv)}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
