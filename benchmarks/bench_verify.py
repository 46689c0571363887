"""The cost of a speculative verification pass: one forward pass over P positions after a KV cache.

For each P (the last token and P - 1 drafted ones) it times, side by side in one run, interleaved
round by round on the same inputs: the model's forward pass over P new positions after a
``--context``-token cache with the output layer as it is (``F.linear``), and with the output layer
multiplied by oneDNN from a prepacked weight (``knnlm.cpu``, what ``draft_tokens`` uses on the
CPU). It prints the median milliseconds of each, their ratio, and each one's cost relative to the
one-position pass of the layer as it is (what plain decoding pays per token): a draft pays where
its kept tokens outnumber that relative cost. It checks that both give the same logits up to
float32 rounding (max |difference| printed). Then the same for the output layer alone.

    python benchmarks/bench_verify.py                         # SmolLM2-135M, P = 1..17
    python benchmarks/bench_verify.py --positions 1,4,8,17 --repeats 9 --json verify.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--positions", default="1,2,3,4,5,6,8,10,12,14,16,17", help="comma list (default: %(default)s)")
    p.add_argument("--context", type=int, default=100, help="tokens in the KV cache first (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=7, help="rounds (default: %(default)s)")
    p.add_argument("--json", default=None, help="write the measurements here")
    args = p.parse_args(argv)

    import torch
    from transformers import DynamicCache

    from knnlm import cpu
    from knnlm.loading import load_model

    if not cpu.available():
        print("this torch has no oneDNN linear ops: nothing to compare", file=sys.stderr)
        return 1
    model, _ = load_model(args.model, dtype="float32")
    positions = [int(x) for x in args.positions.split(",")]
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(100, vocab, (1, args.context + max(positions)), generator=gen)

    def forward(n: int) -> tuple[float, torch.Tensor]:
        cache = DynamicCache()
        model(ids[:, :args.context], past_key_values=cache, use_cache=True)
        t0 = time.perf_counter()
        logits = model(ids[:, args.context:args.context + n], past_key_values=cache, use_cache=True).logits
        return time.perf_counter() - t0, logits

    times = {(n, mode): [] for n in positions for mode in ("as_is", "packed")}
    diff = dict.fromkeys(positions, 0.0)
    with torch.no_grad():
        for n in positions:  # warm-up (and the packed copy, made once)
            forward(n)
            with cpu.packed_output_layer(model):
                forward(n)
        for _ in range(args.repeats):
            for n in positions:
                t, ref = forward(n)
                times[(n, "as_is")].append(t)
                with cpu.packed_output_layer(model):
                    t, got = forward(n)
                times[(n, "packed")].append(t)
                diff[n] = max(diff[n], float((got - ref).abs().max()))
    med = {key: 1000 * statistics.median(v) for key, v in times.items()}
    one = med[(positions[0], "as_is")] if positions[0] == 1 else None
    print(f"{args.model}, {torch.get_num_threads()} threads, float32, {args.context}-token cache, "
          f"median of {args.repeats} rounds")
    print(f"{'P':>3} {'as is ms':>9} {'packed ms':>10} {'packed/as is':>13} {'as is / P=1':>12} "
          f"{'packed / P=1':>13} {'max |diff|':>11}")
    rows = []
    for n in positions:
        a, b = med[(n, "as_is")], med[(n, "packed")]
        rows.append({"positions": n, "as_is_ms": a, "packed_ms": b, "max_abs_diff": diff[n]})
        rel = (f"{a / one:>12.2f} {b / one:>13.2f}" if one else f"{'':>12} {'':>13}")
        print(f"{n:>3} {a:>9.1f} {b:>10.1f} {b / a:>13.2f} {rel} {diff[n]:>11.1e}")
    head_rows = _head_alone(model, positions, args.repeats)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "threads": torch.get_num_threads(), "context": args.context,
                       "repeats": args.repeats, "rows": rows, "output_layer": head_rows}, f, indent=1)
    return 0


def _head_alone(model, positions: list[int], repeats: int) -> list[dict]:
    """The output layer alone on P rows: ``F.linear`` against the packed product, interleaved."""
    import torch
    import torch.nn.functional as F

    from knnlm import cpu

    head = model.get_output_embeddings()
    gen = torch.Generator().manual_seed(1)
    xs = {n: torch.randn(1, n, head.in_features, generator=gen) for n in positions}
    times = {(n, mode): [] for n in positions for mode in ("as_is", "packed")}
    with torch.no_grad(), cpu.packed_output_layer(model):
        for _ in range(repeats + 1):  # the first round warms up
            for n in positions:
                t0 = time.perf_counter()
                F.linear(xs[n], head.weight, head.bias)
                times[(n, "as_is")].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                head(xs[n])
                times[(n, "packed")].append(time.perf_counter() - t0)
    med = {key: 1000 * statistics.median(v[1:]) for key, v in times.items()}
    one = med[(positions[0], "as_is")] if positions[0] == 1 else None
    print(f"the output layer alone ({head.out_features:,} x {head.in_features}; packed: what drafting runs, "
          f"F.linear below {cpu.PACKED_MIN_ROWS} rows):")
    print(f"{'P':>3} {'as is ms':>9} {'packed ms':>10} {'as is / P=1':>12} {'packed / P=1':>13}")
    out = []
    for n in positions:
        a, b = med[(n, "as_is")], med[(n, "packed")]
        out.append({"positions": n, "as_is_ms": a, "packed_ms": b})
        rel = f"{a / one:>12.2f} {b / one:>13.2f}" if one else ""
        print(f"{n:>3} {a:>9.2f} {b:>10.2f} {rel}")
    return out


if __name__ == "__main__":
    sys.exit(main())
