"""kNN-LM quality on held-out CPython stdlib files vs datastore size, with SmolLM2-135M.

    knnlm build-index --data $(python -m knnlm.corpora stdlib-train) --max-tokens 1100000 --out runs/stdlib-1m
    python -m experiments.stdlib_quality --datastore runs/stdlib-1m --sizes 150000,400000 --nprobe 8

Smaller datastores are the leading whole documents of the big one (``knnlm.subset_datastore``:
same keys, their own index), cached beside it as ``<datastore>-sub<size>``. Each size is evaluated
on the same held-out tokens with one sweep; the primary setting is lambda 0.25, T 1, k 1024.
Writes results/stdlib_quality.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import knnlm.datastore  # noqa: E402
from experiments.common import command_line, floats  # noqa: E402

MODULE = "experiments.stdlib_quality"
TABLE_HEAD = ("| datastore tokens | keys | index | base ppl | kNN-LM ppl (λ=0.25, T=1) | change | best (λ, T) "
              "| best ppl | tok/s kNN / LM-only |\n|---:|---:|---|---:|---:|---:|---|---:|---:|")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datastore", required=True, help="the largest datastore (built over the stdlib train split)")
    p.add_argument("--sizes", default="150000,400000", help="smaller datastore sizes in corpus tokens")
    p.add_argument("--eval-tokens", type=int, default=0, help="held-out tokens to score (default 0: all)")
    p.add_argument("--lambdas", default="0.25,0.1,0.5,0.75")
    p.add_argument("--temperatures", default="1,0.5,2,5")
    p.add_argument("--nprobe", type=int, default=None, help="IVF probes (default: each datastore's)")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--out", default="results/stdlib_quality.json")
    return p.parse_args(argv)


def datastores(path: str, sizes: list[int]) -> list:
    """The subsets of the datastore at ``path`` with ``sizes`` corpus tokens (made once, then
    opened), smallest first, and the datastore itself last."""
    big = knnlm.open_datastore(path)
    stores = []
    for size in sorted(sizes):
        sub = Path(path).with_name(f"{Path(path).name}-sub{size}")
        stores.append(knnlm.datastore.open_or_create(sub, lambda sub=sub, size=size: knnlm.subset_datastore(
            big, sub, size, progress=False), discard_incomplete=True))
    return stores + [big]


def row(ds, res: dict) -> dict:
    """One datastore's line of the results JSON."""
    return {"datastore": str(ds.path), "corpus_tokens": int(ds.header.tokens), "keys": len(ds),
            "index": ds.header.index["factory"], "nprobe": res["retrieval"]["nprobe"],
            "eval_tokens": res["tokens"], "ppl_base": res["ppl_base"], "ppl_knn": res["ppl_knn"],
            "primary": res["primary"], "best": res["best"],
            "tokens_per_second": res["timing"]["tokens_per_second"],
            "lm_tokens_per_second": res["timing"]["lm_tokens_per_second"],
            "buckets": res["buckets"], "grid": res["grid"]}


def table_line(r: dict) -> str:
    b = r["best"]
    change = 100 * (r["ppl_knn"] / r["ppl_base"] - 1)
    return (f"| {r['corpus_tokens']:,} | {r['keys']:,} | {r['index']} (nprobe {r['nprobe']}) | {r['ppl_base']:.3f} | "
            f"{r['ppl_knn']:.3f} | {change:+.1f}% | ({b['lambda']}, {b['temperature']}) | "
            f"{b['ppl']:.3f} | {r['tokens_per_second']:.0f} / {r['lm_tokens_per_second']:.0f} |")


def main(argv=None) -> int:
    args = parse_args(argv)
    from knnlm.corpora import stdlib_files

    model, tok = knnlm.load_model(args.model)
    cfg = knnlm.EvalConfig(lambdas=floats(args.lambdas), temperatures=floats(args.temperatures),
                           max_tokens=args.eval_tokens or None, nprobe=args.nprobe, progress=False)
    rows = []
    for ds in datastores(args.datastore, [int(s) for s in args.sizes.split(",") if s]):
        res = knnlm.evaluate(model, tok, ds, stdlib_files("test"), cfg)
        print(knnlm.format_results(res), flush=True)
        print(flush=True)
        rows.append(row(ds, res))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"command": command_line(MODULE, argv), "model": args.model, "rows": rows}, f, indent=1)
    print(TABLE_HEAD)
    for r in rows:
        print(table_line(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
