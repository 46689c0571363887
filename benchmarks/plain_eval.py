"""The plain LM's eval (no datastore, no index loaded): the baseline of eval memory and speed.

    python benchmarks/peak_rss.py -- python benchmarks/plain_eval.py --data $(python -m knnlm.corpora stdlib-test)

Scores the same windows as ``knnlm eval`` (the same ``EvalConfig`` defaults) with the model alone and
prints its perplexity and tokens/s as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--data", nargs="+", required=True)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args(argv)

    from knnlm import evaluate
    from knnlm.config import EvalConfig
    from knnlm.loading import load_model

    model, tok = load_model(args.model)
    r = evaluate(model, tok, None, args.data,
                 EvalConfig(max_tokens=args.max_tokens, batch_size=args.batch_size, progress=False))
    print(json.dumps({"tokens": r["tokens"], "ppl_base": r["ppl_base"],
                      "tokens_per_second": r["timing"]["tokens_per_second"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
