"""Adaptive kNN-LM on held-out stdlib: fixed λ vs a tuned per-token λ vs searching a fraction of
tokens vs RetoMaton-style pointers, all on the same tokens, from one forward pass per batch.

    python -m experiments.adaptive --datastore runs/stdlib-1m            # tune on stdlib-tune, eval all of stdlib-test
    python -m experiments.adaptive --datastore runs/base-150k --tune-tokens 3000 --eval-tokens 3000   # a smoke run

1. Tune the gate on the stdlib tuning split (``knnlm tune``: documents in neither the datastore
   nor the test split; files that an older datastore holds are skipped): one tuning pass, one
   gate per ``--max-unseen-loss`` entry (a bound, ``none``, or ``keep``: a gate fitted for the
   keep-unseen mixture, ``knnlm tune --keep-unseen``). The first is saved into the datastore (gate.json + a
   header entry), as ``knnlm tune`` does, the others next to ``--out``. A rerun (e.g. after an
   interruption) reuses them when all are there, each fitted with its bound (``--retune`` refits).
2. Score the test split once with the LM (an ``LMCache`` keeps the query hidden states, log p_lm
   and LM features of every batch in RAM), then every variant from that cache:
   fixed λ (``--lambda``) and adaptive with a full search; adaptive (and the fixed λ) searching a
   fraction F of tokens (``--retrieve-fractions``); pointers (``--min-pointers``), fixed and
   adaptive λ.
3. Print a markdown table (perplexity, the "never seen" bucket = target tokens with datastore
   frequency 0, fraction of tokens searched, tokens/s counting the LM time of the one forward
   pass plus each variant's kNN time) and write everything to ``--out``.

Throughput side by side with the plain LM is measured separately by ``benchmarks/bench_eval.py``
(``--lambda adaptive --retrieve-fraction 0.5``), since here the LM pass is shared.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from experiments.common import command_line, floats, logger, write_json  # noqa: E402

MODULE = "experiments.adaptive"
log = logger("adaptive")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datastore", required=True, help="a datastore built over the stdlib train split")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--tune-tokens", type=int, default=0, help="tuning tokens (default 0: the whole tune split)")
    p.add_argument("--eval-tokens", type=int, default=0, help="held-out tokens (default 0: all 121,673)")
    p.add_argument("--lambda", dest="lam", type=float, default=0.25, help="the fixed λ to compare with")
    p.add_argument("--nprobe", type=int, default=None, help="IVF probes (default: the datastore's)")
    p.add_argument("--retrieve-fractions", default="0.5", help="comma list of F for --retrieve-fraction")
    p.add_argument("--min-pointers", default="16,64,256", help="--min-pointers values (empty: none)")
    p.add_argument("--retune", action="store_true",
                   help="fit new gates even if an earlier run saved one for every bound")
    p.add_argument("--kind", default="auto", choices=["auto", "linear", "mlp"])
    p.add_argument("--max-unseen-loss", default="none",
                   help="comma list of knnlm tune's bounds on never-seen tuning targets ('none': no bound; 'keep': "
                        "no bound, fitted for the keep-unseen mixture, scored with the fixed λ too): one tuning "
                        "pass, one gate per entry; the first is saved into the datastore, the others next to "
                        "--out, and each is scored with a full search and every --retrieve-fractions F")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", default=None, help="JSON (default: results/adaptive_<datastore name>.json)")
    return p.parse_args(argv)


KEEP = "keep"  # a --max-unseen-loss entry: the keep-unseen gate


def _label(bound: float | str | None) -> str:
    """A never-seen bound (or ``keep``) as the labels and file names show it."""
    return "none" if bound is None else bound if bound == KEEP else f"{bound:g}"


def _parse_bound(text: str) -> float | str | None:
    t = text.strip().lower()
    return None if t == "none" else KEEP if t == KEEP else float(t)


def summary(name: str, res: dict, setting) -> dict:
    """One row of the table: the grid entry with λ ``setting``, its never-seen bucket, speed."""
    gi = next(i for i, r in enumerate(res["grid"]) if r["lambda"] == setting)
    never = next((b for b in res["buckets"] if b["frequency"] == "0"), None)
    t = res["timing"]
    return {
        "variant": name, "lambda": setting, "ppl": res["grid"][gi]["ppl"], "ppl_base": res["ppl_base"],
        "never_seen": None if never is None else {
            "tokens": never["tokens"], "ppl_base": never["ppl_base"], "ppl": never["ppl_grid"][gi]},
        "searched_fraction": res["retrieval"]["searched_fraction"],
        "pointer_fraction": res["retrieval"]["pointer_fraction"],
        "tokens_per_second": t["tokens_per_second"], "lm_tokens_per_second": t["lm_tokens_per_second"],
        "knn_seconds": t["knn_seconds"],
    }


def _gate_path(out: str, bound: float | None) -> Path:
    """Where a gate beyond the first (the one saved into the datastore) is written, next to ``out``."""
    return Path(out).with_suffix(f".gate_unseen{_label(bound)}.json")


def _bound_of(gate) -> float | str | None:
    return KEEP if gate.keep_unseen else (gate.report.get("unseen") or {}).get("max_loss")


def _saved_gates(ds, bounds: list, out: str) -> list | None:
    """The gates an earlier run of this command saved (the first in the datastore, the others next
    to ``out``), one per bound, when every one is there and was fitted with its bound; else None
    (tune again), so that a rerun after an interruption skips the tuning pass but never scores a
    gate fitted with another bound."""
    from knnlm.gate import load_gate

    if not ds.header.gate:
        return None
    paths = [None] + [_gate_path(out, b) for b in bounds[1:]]
    if not all(p is None or p.is_file() for p in paths):
        return None
    gates = [load_gate(ds, p) for p in paths]
    if any(_bound_of(g) != b for g, b in zip(gates, bounds)):
        return None
    return gates


def main(argv=None) -> int:
    args = parse_args(argv)
    import knnlm
    from knnlm.config import check_max_unseen_loss
    from knnlm.corpora import stdlib_files
    from knnlm.evaluation import LMCache
    from knnlm.gate import format_report

    ds = knnlm.open_datastore(args.datastore)
    bounds = [_parse_bound(b) for b in args.max_unseen_loss.split(",") if b.strip()]
    for b in bounds:  # before the model and the tuning pass
        if b != KEEP:
            check_max_unseen_loss(b)
    model, tok = knnlm.load_model(args.model)
    knn = knnlm.KNNLM(model, ds, tok, lam=args.lam, nprobe=args.nprobe)
    inside = {d["name"] for d in ds.documents}
    tune_files = [f for f in stdlib_files("tune") if f not in inside]
    skipped = len(stdlib_files("tune")) - len(tune_files)
    out = args.out or f"results/adaptive_{Path(args.datastore).name}.json"
    t0 = time.time()
    extra_gates = []  # (bound, gate) beyond the first
    saved = None if args.retune else _saved_gates(ds, bounds, out)
    if saved is not None:
        gate, extra_gates = saved[0], list(zip(bounds[1:], saved[1:]))
        log(f"reusing the gates of an earlier run: {', '.join(str(g.path) for g in saved)} (--retune to refit)")
    else:
        from knnlm.config import EvalConfig
        from knnlm.evaluation import collect_tuning
        from knnlm.gate import fit_gate, save_gate

        log(f"tuning on {len(tune_files)} stdlib-tune files ({skipped} skipped: in the datastore), "
            f"{args.tune_tokens or 'all'} tokens; bounds on never-seen targets: {bounds}")
        data = collect_tuning(knn, tune_files, EvalConfig(max_tokens=args.tune_tokens or None,
                                                          batch_size=args.batch_size, progress=True))
        gates = [fit_gate(data, ds.identity(), knn.k, knn.temperature, kind=args.kind,
                          max_unseen_loss=None if b == KEEP else b, keep_unseen=b == KEEP) for b in bounds]
        gate = gates[0]
        save_gate(gate, ds)  # as `knnlm tune --max-unseen-loss <first>` does
        for b, g in zip(bounds[1:], gates[1:]):
            save_gate(g, ds, _gate_path(out, b))
            extra_gates.append((b, g))
    tune_seconds = time.time() - t0
    print(format_report(gate))
    for b, g in extra_gates:
        what = "fitted for the keep-unseen mixture" if b == KEEP else f"with never-seen bound {_label(b)}"
        print(f"\n--- gate {what} (written to {g.path}) ---\n{format_report(g)}")
    knn = knn.replace(gate=gate)

    test = stdlib_files("test")
    cache = LMCache()
    common = dict(max_tokens=args.eval_tokens or None, batch_size=args.batch_size, progress=True)
    rows, raw = [], {}

    def variant(name: str, lambdas, gate=None, **kw):
        log(f"scoring {name}")
        res = (knn if gate is None else knn.replace(gate=gate)).evaluate(test, lambdas=lambdas, lm_cache=cache,
                                                                          **common, **kw)
        raw[name] = res
        rows.extend(summary(name, res, lam) for lam in lambdas)
        return res

    variant("full search", [args.lam, "adaptive"])
    for f in floats(args.retrieve_fractions):
        variant(f"retrieve fraction {f:g}", ["adaptive", args.lam], retrieve_fraction=f)
    for b, g in extra_gates:
        name, lambdas = ("keep unseen", ["adaptive", args.lam]) if b == KEEP else (f"gate bound {_label(b)}",
                                                                                   ["adaptive"])
        variant(f"full search, {name}", lambdas, gate=g)
        for f in floats(args.retrieve_fractions):
            variant(f"retrieve fraction {f:g}, {name}", ["adaptive"], gate=g, retrieve_fraction=f)
    for m in [int(x) for x in args.min_pointers.split(",") if x.strip()]:
        variant(f"pointers (min {m})", [args.lam, "adaptive"], pointers=True, min_pointers=m)

    first = raw["full search"]
    print(f"\ndatastore {ds.path} ({len(ds):,} keys, {ds.header.index['factory']}), {first['tokens']:,} held-out "
          f"tokens; base LM ppl {first['ppl_base']:.3f}; gate: {gate.net['kind']} on {len(gate.features)} features, "
          f"tuned on {sum(d['tokens'] for d in gate.tuned_on):,} tokens\n")
    print("| variant | λ | ppl | change vs base | never seen: base → this | searched | tok/s |")
    print("|---|---|---:|---:|---|---:|---:|")
    for r in rows:
        ns = r["never_seen"]
        ns_s = f"{ns['ppl_base']:.1f} → {ns['ppl']:.1f} ({ns['tokens']} tokens)" if ns and ns["ppl"] else ""
        lam = r["lambda"] if isinstance(r["lambda"], str) else f"{r['lambda']:g}"
        print(f"| {r['variant']} | {lam} | "
              f"{r['ppl']:.3f} | {100 * (r['ppl'] / r['ppl_base'] - 1):+.1f}% | {ns_s} | "
              f"{100 * r['searched_fraction']:.1f}% | {r['tokens_per_second']:.0f} |")
    write_json(out, {"command": command_line(MODULE, argv), "datastore": str(ds.path), "keys": len(ds),
                     "tune_seconds": round(tune_seconds, 1), "gate": gate.to_json(),
                     "extra_gates": {_label(b): g.to_json() for b, g in extra_gates}, "rows": rows, "runs": raw})
    log(f"results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
