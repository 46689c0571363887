"""kNN-LM quality on held-out CPython stdlib files vs datastore size, with SmolLM2-135M.

    knnlm build-index --data $(python -m knnlm.corpora stdlib-train) --max-tokens 1100000 --out runs/stdlib-1m
    python scripts/stdlib_quality.py --datastore runs/stdlib-1m --sizes 150000,400000 --nprobe 8

Smaller datastores are the leading whole documents of the big one (``knnlm.subset_datastore``:
same keys, their own index). Each size is evaluated on the same held-out tokens with one sweep;
the primary setting is lambda 0.25, T 1, k 1024. Writes results/stdlib_quality.json and prints a
markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datastore", required=True, help="the largest datastore (built over the stdlib train split)")
    p.add_argument("--sizes", default="150000,400000", help="smaller datastore sizes in corpus tokens")
    p.add_argument("--eval-tokens", type=int, default=0, help="held-out tokens to score (default 0: all)")
    p.add_argument("--lambdas", default="0.25,0.1,0.5,0.75")
    p.add_argument("--temperatures", default="1,0.5,2,5")
    p.add_argument("--nprobe", type=int, default=None, help="IVF probes (default: each datastore's)")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--out", default="results/stdlib_quality.json")
    args = p.parse_args(argv)

    from knnlm.build import subset_datastore
    from knnlm.config import EvalConfig
    from knnlm.corpora import stdlib_files
    from knnlm.datastore import open_datastore, read_header
    from knnlm.evaluation import evaluate, format_results
    from knnlm.models import load_model

    model, tok = load_model(args.model)
    big = open_datastore(args.datastore)
    stores = []
    for size in sorted(int(s) for s in args.sizes.split(",") if s):
        path = Path(args.datastore).with_name(f"{Path(args.datastore).name}-sub{size}")
        done = (read_header(path) or {}).get("status") == "complete"  # None: no datastore there yet
        stores.append(open_datastore(path) if done else subset_datastore(big, path, size, progress=False))
    stores.append(big)
    cfg = EvalConfig(lambdas=[float(x) for x in args.lambdas.split(",")],
                     temperatures=[float(x) for x in args.temperatures.split(",")],
                     max_tokens=args.eval_tokens or None, nprobe=args.nprobe, progress=False)
    rows = []
    for ds in stores:
        res = evaluate(model, tok, ds, stdlib_files("test"), cfg)
        print(format_results(res), flush=True)
        print(flush=True)
        rows.append({"datastore": str(ds.path), "corpus_tokens": int(ds.header["tokens"]), "keys": len(ds),
                     "index": ds.header["index"]["factory"], "nprobe": res["retrieval"]["nprobe"],
                     "eval_tokens": res["tokens"], "ppl_base": res["ppl_base"], "ppl_knn": res["ppl_knn"],
                     "primary": res["primary"], "best": res["best"],
                     "tokens_per_second": res["timing"]["tokens_per_second"],
                     "lm_tokens_per_second": res["timing"]["lm_tokens_per_second"],
                     "buckets": res["buckets"], "grid": res["grid"]})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"command": " ".join(["python"] + sys.argv), "model": args.model, "rows": rows}, f, indent=1)
    print("| datastore tokens | keys | index | base ppl | kNN-LM ppl (λ=0.25, T=1) | change | best (λ, T) | best ppl | tok/s kNN / LM-only |")
    print("|---:|---:|---|---:|---:|---:|---|---:|---:|")
    for r in rows:
        b = r["best"]
        print(f"| {r['corpus_tokens']:,} | {r['keys']:,} | {r['index']} (nprobe {r['nprobe']}) | {r['ppl_base']:.3f} | "
              f"{r['ppl_knn']:.3f} | {100 * (r['ppl_knn'] / r['ppl_base'] - 1):+.1f}% | ({b['lambda']}, {b['temperature']}) | "
              f"{b['ppl']:.3f} | {r['tokens_per_second']:.0f} / {r['lm_tokens_per_second']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
