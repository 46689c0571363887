"""Build throughput vs a plain forward pass over the same tokens and batches, side by side.

    python benchmarks/bench_build.py --tokens 30000

Plain = the full model forward (logits included) over exactly the windows and batches the
builder uses, timed before and after the build (mean of the two, to cancel drift on a shared
machine). Build = `build_datastore`'s key-extraction phase (hook, stop after the key layer, fp16
conversion, pwrite + fdatasync), read from the datastore header. Also prints the build's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--tokens", type=int, default=30_000, help="corpus tokens (stdlib train split prefix)")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import torch

    from knnlm.build import build_datastore
    from knnlm.config import BuildConfig
    from knnlm.corpora import stdlib_files
    from knnlm.data import batch_inputs, iter_batches
    from knnlm.loading import load_model

    model, tok = load_model(args.model)
    def config(max_tokens):
        return BuildConfig(context=args.context, batch_size=args.batch_size, max_tokens=max_tokens, index="flat",
                           progress=False)

    cfg = config(args.tokens)
    train = stdlib_files("train")
    with tempfile.TemporaryDirectory() as tmp:
        def plain_forward(ds):
            docs = ds.documents
            t0, rows = time.time(), 0
            with torch.inference_mode():
                for _, batch in iter_batches(docs, cfg.context, cfg.stride, cfg.batch_size):
                    ids, _, _ = batch_inputs(batch, ds.document_tokens, ds.header.window.bos)  # the builder's
                    model(input_ids=torch.from_numpy(ids), use_cache=False)
                    rows += sum(w.end - w.first for w in batch)
            return rows / (time.time() - t0)

        plain_forward(build_datastore(model, tok, train, os.path.join(tmp, "warm"), config(4000)))  # warm-up
        ds = build_datastore(model, tok, train, os.path.join(tmp, "ds"), cfg)
        before = plain_forward(ds)
        st = ds.header.build["stats"]
        build_tps = st["tokens_per_second"]
        ds2 = build_datastore(model, tok, train, os.path.join(tmp, "ds2"), cfg)
        build_tps2 = ds2.header.build["stats"]["tokens_per_second"]
        after = plain_forward(ds)
    plain_tps = (before + after) / 2
    build_mean = (build_tps + build_tps2) / 2
    print(f"{len(ds):,} key rows ({args.tokens:,} corpus tokens), context {cfg.context}, batch {cfg.batch_size}")
    print(f"plain forward  {before:8.1f} / {after:8.1f} tok/s (before / after)")
    print(f"build extract  {build_tps:8.1f} / {build_tps2:8.1f} tok/s (two builds)")
    print(f"ratio build / plain forward: {build_mean / plain_tps:.3f}x")
    print(f"peak RSS of the process after the builds: {st['peak_rss_mib_after_extract']} MiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": len(ds), "tokens": args.tokens, "plain_tps": [before, after],
                       "build_tps": [build_tps, build_tps2], "ratio": build_mean / plain_tps,
                       "command": " ".join(sys.argv)}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
