"""Write corpus documents as the JSON lines an lm-evaluation-harness task reads.

    python examples/harness/make_jsonl.py $(python -m knnlm.corpora stdlib-test) --out runs/harness/stdlib_test.jsonl

One line per document, ``{"name": ..., "text": ...}``, read by knnlm's own corpus reader
(``knnlm.data``): the same documents, in the same order, with the same names and the same text as
``knnlm eval --data <the same paths>`` scores (text files, directories, .jsonl[.gz|.zst], Parquet).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from knnlm.data import iter_documents, resolve_sources
from knnlm.errors import KnnlmError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", nargs="+", help="what `knnlm eval --data` takes")
    p.add_argument("--out", required=True, help="the .jsonl file to write (its directory is created)")
    p.add_argument("--text-field", default="text", help="the text field of .jsonl / Parquet inputs")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    try:
        sources = resolve_sources(args.data)
        with open(out, "w", encoding="utf-8") as f:
            for doc in iter_documents(sources, args.text_field):
                f.write(json.dumps({"name": doc.name, "text": doc.text}, ensure_ascii=False) + "\n")
                n += 1
    except KnnlmError as e:
        print(f"make_jsonl: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"{n} documents -> {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
