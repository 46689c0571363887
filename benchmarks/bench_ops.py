"""Benchmark the fused kNN-LM interpolation op against the eager torch reference.

For each (B, V, K) it times, side by side in one run on the same inputs:
  * fused   : torch.ops.knnlm.knn_interpolate (knnlm/csrc kernel)
  * eager   : knnlm.scoring.reference_interpolate (the torch reference)
  * lsm     : torch.log_softmax(logits.float(), -1) alone (a lower bound for any full-row op)
and prints the ratios eager/fused and fused/lsm plus the fused op's achieved GB/s, counting one
read of the B x V logits and one write of the B x V fp32 output. On CUDA it also prints the
fraction of peak memory bandwidth. Times are medians of repeated runs after warmup; compare
ratios, not absolute seconds, across machines. Neighbours vote for at most 500 distinct tokens,
except in the "dup" cases (column `tok`), where K neighbours share 3 tokens (the grouping worst
case for the CUDA kernel's duplicate handling).

    python benchmarks/bench_ops.py --quick            # a subset
    python benchmarks/bench_ops.py                    # the full grid
    python benchmarks/bench_ops.py --device cuda --peak-gbps 3350
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial

import torch

from knnlm import ops, scoring

FULL_B = (1, 8, 64)
FULL_V = (32000, 50257, 151936, 262144)
FULL_K = (16, 1024)
QUICK = [(1, 50257, 1024), (8, 50257, 16), (8, 50257, 1024), (8, 151936, 1024), (64, 32000, 1024),
         (8, 50257, 2048, 3), (64, 32000, 1024, 3)]
DEFAULT_TOKENS = 500  # distinct neighbour tokens (at most) when a case does not say


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _log_softmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1)


def median_time(fn, device: torch.device, *, min_reps: int, min_time: float, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < min_time and len(times) < 1000):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_bandwidth_gbps(device: torch.device, override: float | None) -> float | None:
    """Peak DRAM bandwidth in GB/s: --peak-gbps, else from the device properties when possible."""
    if override:
        return override
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    for attr in ("memory_bandwidth", "peak_memory_bandwidth"):  # not in current torch; future-proof
        val = getattr(props, attr, None)
        if val:
            return float(val) / 1e9 if val > 1e6 else float(val)
    clock_khz = getattr(props, "memory_clock_rate", None)
    bus_bits = getattr(props, "memory_bus_width", None)
    if clock_khz and bus_bits:
        return 2.0 * clock_khz * 1e3 * (bus_bits / 8) / 1e9  # double data rate
    return None


def make_inputs(B: int, V: int, K: int, dtype: torch.dtype, device: torch.device, seed: int = 0,
                n_tokens: int = DEFAULT_TOKENS):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, V, generator=g) * 4).to(dtype).to(device)
    dists = (torch.rand(B, K, generator=g) * 50).to(device)
    # realistic duplicates: neighbours vote for a few hundred distinct tokens
    values = torch.randint(0, min(V, n_tokens), (B, K), generator=g).to(device)
    return logits, dists, values


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="run a small subset of the grid")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--lam", type=float, default=0.25)
    ap.add_argument("--temperature", type=float, default=10.0)
    ap.add_argument("--min-reps", type=int, default=10)
    ap.add_argument("--min-time", type=float, default=0.3, help="seconds of timing per case")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (CPU); default: torch's own choice")
    ap.add_argument("--peak-gbps", type=float, default=None, help="peak memory bandwidth (GB/s)")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    op = ops.get_op("knn_interpolate", device)
    if op is None:
        print(f"fused op unavailable on {device}: {ops.unavailable_reason()}", file=sys.stderr)
        return 1
    peak = peak_bandwidth_gbps(device, args.peak_gbps)
    cases = QUICK if args.quick else [(b, v, k) for b in FULL_B for v in FULL_V for k in FULL_K]

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device={device} ({name}) threads={torch.get_num_threads()} logits={args.dtype} "
          f"lam={args.lam} T={args.temperature} torch={torch.__version__}")
    cols = f"{'B':>3} {'V':>7} {'K':>5} {'tok':>4} {'fused ms':>9} {'eager ms':>9} {'lsm ms':>8} " \
           f"{'eager/fused':>11} {'fused/lsm':>9} {'GB/s':>7}"
    if peak:
        cols += f" {'%peak':>6}"
    print(cols)
    print("-" * len(cols))
    for case in cases:
        B, V, K = case[:3]
        n_tokens = case[3] if len(case) > 3 else DEFAULT_TOKENS
        logits, dists, values = make_inputs(B, V, K, dtype, device, n_tokens=n_tokens)
        lam, T = args.lam, args.temperature
        # sanity: same answer before timing
        ref = scoring.reference_interpolate(logits, dists, values, lam, T)
        torch.testing.assert_close(op(logits, dists, values, lam, T), ref, rtol=1e-4, atol=1e-4)
        del ref
        kw = dict(min_reps=args.min_reps, min_time=args.min_time, warmup=args.warmup)
        t_fused = median_time(partial(op, logits, dists, values, lam, T), device, **kw)
        t_eager = median_time(partial(scoring.reference_interpolate, logits, dists, values, lam, T),
                              device, **kw)
        t_lsm = median_time(partial(_log_softmax, logits), device, **kw)
        nbytes = B * V * (logits.element_size() + 4)
        gbps = nbytes / t_fused / 1e9
        tok = "dup" if n_tokens < DEFAULT_TOKENS else "-"
        row = (f"{B:>3} {V:>7} {K:>5} {tok:>4} {t_fused * 1e3:>9.3f} {t_eager * 1e3:>9.3f} {t_lsm * 1e3:>8.3f} "
               f"{t_eager / t_fused:>10.2f}x {t_fused / t_lsm:>8.2f}x {gbps:>7.1f}")
        if peak:
            row += f" {gbps / peak:>6.1%}"
        print(row, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
