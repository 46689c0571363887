"""The cost of a speculative verification pass: one forward pass over P positions after a KV cache.

For each P (the last token and P - 1 drafted ones) it times, side by side in one run, interleaved
round by round on the same inputs, the model's forward pass over P new positions after a
``--context``-token cache: as it is; with the output layer multiplied by oneDNN from a prepacked
weight (``knnlm.cpu.packed_output_layer``); with the other linear layers through the few-row kernel
(``knnlm.cpu.small_linears``); with grouped-query attention taking the key / value heads uncopied
(``knnlm.cpu.grouped_attention``); and with all three (``knnlm.cpu.verification``, what
``draft_tokens`` uses on the CPU). It prints the median milliseconds of each, all / as is, and the
cost relative to the one-position pass as it is (what plain decoding pays per token): a draft pays
where its kept tokens outnumber that relative cost. It checks the logits against the pass as it is
(max |difference| printed: float32 rounding for the packed layer and the few-row kernel, none
expected for grouped attention). Then the output layer alone, and the other linear layers alone.

    python benchmarks/bench_verify.py                         # SmolLM2-135M, P = 1..17
    python benchmarks/bench_verify.py --positions 1,4,8,17 --repeats 9 --json verify.json
"""

from __future__ import annotations

import argparse
import contextlib
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

    modes = {"as_is": contextlib.nullcontext, "packed": lambda: cpu.packed_output_layer(model),
             "small": lambda: cpu.small_linears(model), "grouped": lambda: cpu.grouped_attention(model),
             "all": lambda: cpu.verification(model)}
    times = {(n, mode): [] for n in positions for mode in modes}
    diff = {(n, mode): 0.0 for n in positions for mode in modes}
    with torch.no_grad():
        for n in positions:  # warm-up (and the packed copy, made once)
            for enter in modes.values():
                with enter():
                    forward(n)
        for _ in range(args.repeats):
            for n in positions:
                for mode, enter in modes.items():
                    with enter():
                        t, got = forward(n)
                    times[(n, mode)].append(t)
                    if mode == "as_is":
                        ref = got
                    diff[(n, mode)] = max(diff[(n, mode)], float((got - ref).abs().max()))
    with cpu.small_linears(model) as small:
        pass
    med = {key: 1000 * statistics.median(v) for key, v in times.items()}
    one = med[(positions[0], "as_is")] if positions[0] == 1 else None
    print(f"{args.model}, {torch.get_num_threads()} threads, float32, {args.context}-token cache, "
          f"median of {args.repeats} rounds; packed: the output layer through oneDNN; small: the other "
          f"linear layers through knnlm.small_linear ({small} layers{'' if small else ': not available here'}, "
          f"{cpu.SMALL_MIN_ROWS}-{cpu.SMALL_MAX_ROWS} rows); grouped: grouped-query attention without "
          f"copied heads; all: the three, what drafting runs")
    print(f"{'P':>3} {'as is ms':>9} {'packed':>7} {'small':>6} {'grouped':>8} {'all':>6} {'all/as is':>10} "
          f"{'as is / P=1':>12} {'all / P=1':>10} {'max |diff| packed, small, grouped, all':>39}")
    rows = []
    for n in positions:
        a, b, sm, g, al = (med[(n, m)] for m in modes)
        rows.append({"positions": n, "as_is_ms": a, "packed_ms": b, "small_ms": sm, "grouped_ms": g, "all_ms": al,
                     **{f"max_abs_diff_{m}": diff[(n, m)] for m in modes if m != "as_is"}})
        rel = (f"{a / one:>12.2f} {al / one:>10.2f}" if one else f"{'':>12} {'':>10}")
        print(f"{n:>3} {a:>9.1f} {b:>7.1f} {sm:>6.1f} {g:>8.1f} {al:>6.1f} {al / a:>10.2f} {rel} "
              f"{'':>7}" + ", ".join(f"{diff[(n, m)]:.1e}" for m in ("packed", "small", "grouped", "all")))
    head_rows = _head_alone(model, positions, args.repeats)
    linear_rows = _linears_alone(model, positions, args.repeats)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "threads": torch.get_num_threads(), "context": args.context,
                       "repeats": args.repeats, "rows": rows, "output_layer": head_rows,
                       "linear_layers": linear_rows}, f, indent=1)
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


def _linears_alone(model, positions: list[int], repeats: int) -> list[dict]:
    """The decoder's linear layers alone, by shape, on P rows: ``F.linear`` against
    ``knnlm.small_linear``, each timed over all the model's layers of that shape in turn (as a
    forward pass reads them: from memory, not from cache), interleaved."""
    import torch
    import torch.nn.functional as F

    from knnlm import cpu

    op = cpu._small_linear_op()
    if op is None:
        print("the decoder's linear layers alone: knnlm.small_linear does not run here")
        return []
    head = model.get_output_embeddings()
    shapes: dict[tuple[int, int], list[torch.nn.Linear]] = {}
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and m is not head:
            shapes.setdefault((m.out_features, m.in_features), []).append(m)
    gen = torch.Generator().manual_seed(2)
    times: dict[tuple, list[float]] = {}
    with torch.no_grad():
        for r in range(repeats + 1):  # the first round warms up
            for (n_out, n_in), layers in shapes.items():
                for n in positions:
                    x = torch.randn(n, n_in, generator=gen)
                    for mode in ("as_is", "small"):
                        t0 = time.perf_counter()
                        for m in layers:
                            F.linear(x, m.weight, m.bias) if mode == "as_is" else op(x, m.weight, m.bias)
                        if r:
                            times.setdefault((n_out, n_in, n, mode), []).append(
                                (time.perf_counter() - t0) / len(layers))
    us = {key: 1e6 * statistics.median(v) for key, v in times.items()}
    print("the decoder's linear layers alone, by shape (us per layer, each shape's layers in turn; "
          "small: knnlm.small_linear, what drafting runs from "
          f"{cpu.SMALL_MIN_ROWS} to {cpu.SMALL_MAX_ROWS} rows; as is / P=1: F.linear's cost over its one-row cost):")
    out = []
    for n_out, n_in in shapes:
        one = us.get((n_out, n_in, 1, "as_is"))
        cells = []
        for n in positions:
            a, b = us[(n_out, n_in, n, "as_is")], us[(n_out, n_in, n, "small")]
            out.append({"out": n_out, "in": n_in, "positions": n, "as_is_us": a, "small_us": b})
            cells.append(f"P{n} {a:.0f}/{b:.0f}" + (f" ({a / one:.1f}x)" if one else ""))
        print(f"  {n_out:>5} x {n_in:<5} as is / small: " + "  ".join(cells))
    return out


if __name__ == "__main__":
    sys.exit(main())
