"""Put lm-evaluation-harness perplexities and ``knnlm eval``'s side by side, in the same units.

    python examples/harness/compare.py --data runs/harness/stdlib_test.jsonl --knnlm runs/harness/eval.json \\
        --harness runs/harness/lambda0.25 --harness-base runs/harness/lambda0

lm-eval reports, per task, word_perplexity = exp(NLL / words), byte_perplexity = exp(NLL / bytes)
and bits_per_byte = NLL / (bytes ln 2), with words = len(re.split(r"\\s+", text)) and bytes =
len(text.encode()) summed over the documents; ``knnlm eval`` reports exp(NLL / tokens), tokens =
the scored tokens (every token of a document but its first, unless the tokenizer adds <bos>). NLL,
the total negative log-likelihood in nats, is the common quantity: the ``knnlm`` harness model
scores each document with ``knnlm eval``'s windows, so the two NLLs are the same sum (up to
floating-point summation order). This prints NLL, token perplexity, word perplexity and bits per
byte for each run, all converted from its own report, and the relative NLL differences.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path


def _harness_results(path: str, task: str) -> dict:
    """The task's metrics from lm-eval's ``--output_path`` (a results_*.json file, or the newest
    one under a directory)."""
    p = Path(path)
    if p.is_dir():
        found = sorted(p.rglob("results_*.json"), key=lambda f: f.stat().st_mtime)
        if not found:
            raise SystemExit(f"compare: no results_*.json under {p}")
        p = found[-1]
    res = json.loads(p.read_text())["results"]
    if task not in res:
        raise SystemExit(f"compare: {p} has no task {task!r} (tasks: {', '.join(res)})")
    return res[task]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="the task's jsonl (make_jsonl.py output)")
    ap.add_argument("--knnlm", required=True, help="`knnlm eval ... --output FILE` JSON")
    ap.add_argument("--harness", required=True, help="lm-eval --output_path of the kNN-LM run")
    ap.add_argument("--harness-base", help="lm-eval --output_path of the lambda=0 run")
    ap.add_argument("--task", default="stdlib_test")
    args = ap.parse_args(argv)

    texts = [json.loads(line)["text"] for line in Path(args.data).read_text(encoding="utf-8").splitlines() if line]
    words = sum(len(re.split(r"\s+", t)) for t in texts)
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    ev = json.loads(Path(args.knnlm).read_text())
    tokens = ev["tokens"]
    if ev["documents"] != len(texts):
        print(f"warning: knnlm eval scored {ev['documents']} documents, the jsonl holds {len(texts)}", file=sys.stderr)

    rows = [("knnlm eval, base LM", math.log(ev["ppl_base"]) * tokens)]
    if "ppl_knn" in ev:
        rows.append((f"knnlm eval, kNN-LM (lambda {ev['primary']['lambda']})", math.log(ev["ppl_knn"]) * tokens))
    for name, path in (("harness, lambda=0", args.harness_base), ("harness, kNN-LM", args.harness)):
        if path:
            r = _harness_results(path, args.task)
            nll = r["bits_per_byte,none"] * math.log(2) * nbytes
            via_words = math.log(r["word_perplexity,none"]) * words
            if abs(via_words - nll) > 1e-6 * nll:
                print(f"warning: {name}: word_perplexity implies NLL {via_words:.3f}, bits_per_byte {nll:.3f}",
                      file=sys.stderr)
            rows.append((name, nll))
    print(f"{len(texts)} documents: {tokens:,} scored tokens (knnlm eval), {words:,} words and {nbytes:,} bytes "
          "(lm-eval's counts)")
    print(f"{'':38} {'NLL (nats)':>14} {'token ppl':>10} {'word ppl':>12} {'bits/byte':>10}")
    for name, nll in rows:
        print(f"{name:38} {nll:14.3f} {math.exp(nll / tokens):10.4f} {math.exp(nll / words):12.4f} "
              f"{nll / nbytes / math.log(2):10.5f}")
    pairs = [(rows[0], next((r for r in rows if r[0] == "harness, lambda=0"), None))]
    if len(rows) > 1 and "ppl_knn" in ev:
        pairs.append((rows[1], next((r for r in rows if r[0] == "harness, kNN-LM"), None)))
    for (a, nll_a), other in pairs:
        if other:
            print(f"{other[0]} vs {a}: NLL relative difference {(other[1] - nll_a) / nll_a:+.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
