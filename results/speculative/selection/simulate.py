"""Simulate draft-selection rules on what ``record.py`` saved: replay each prompt's kNN-LM greedy
output, draft by a rule at every forward pass, keep the longest agreeing prefix plus the model's own
token, and charge each pass the measured cost of a forward over its positions (``all_ms`` of
``bench_verify.py``'s JSON, ``both_ms`` in older ones: what drafting runs on the CPU; positions
between those measured are interpolated, past the last one extrapolated) plus ``--step-ms`` per
generated token (the kNN-LM's own step). Prints tokens per forward and tokens/s of each rule, relative to today's rule (the
longest match, the sequence on a tie, its latest occurrence; the nearest neighbour among the
longest; drafts as long as the match, at most 16, none from a 1-token match).

    python results/speculative/selection/simulate.py /work/runs/selection.json \\
        results/speculative/final/verify.json
"""

import argparse
import json
import math


def lcp(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def costs(verify: str) -> dict[int, float]:
    rows = sorted((r["positions"], r.get("all_ms", r.get("both_ms"))) for r in json.load(open(verify))["rows"])
    out = {}
    for p in range(1, 200):
        lo = max((r for r in rows if r[0] <= p), default=rows[0])
        hi = min((r for r in rows if r[0] >= p), default=None)
        if hi is None:  # past the last measured: the slope of the last two
            (p1, c1), (p2, c2) = rows[-2], rows[-1]
            out[p] = c2 + (c2 - c1) / (p2 - p1) * (p - p2)
        else:
            out[p] = lo[1] if hi[0] == lo[0] else lo[1] + (hi[1] - lo[1]) * (p - lo[0]) / (hi[0] - lo[0])
    return out


def today(t):  # the drafter's order: match, then the sequence, its latest / the nearest neighbour
    return (t[1], t[0] == "s", t[2] if t[0] == "s" else -t[2])


def longest(cands, min_match=2, key=today):
    cands = [t for t in cands if t[3] and t[1] >= min_match]
    if not cands:
        return []
    best = max(cands, key=key)
    return [best[3][:min(16, best[1])]]


def vote(cands, weight, min_match=2):
    """The first token by a weighted vote of all candidates, then the longest match among those."""
    cands = [t for t in cands if t[3]]
    top = max((t[1] for t in cands), default=0)
    if top < min_match:
        return []
    score = {}
    for t in cands:
        score[t[3][0]] = score.get(t[3][0], 0.0) + weight(t[1], top)
    first = max(score, key=score.get)
    best = max((t for t in cands if t[3][0] == first), key=today)
    return [best[3][:min(16, best[1])]] if best[1] >= min_match else []


def nearest(cands, within=None, min_match=2):
    """The candidate nearest by distance, among those whose match is at least ``within(top)``."""
    cands = [t for t in cands if t[3] and t[1] >= min_match]
    if not cands:
        return []
    top = max(t[1] for t in cands)
    cands = [t for t in cands if within is None or t[1] >= within(top)]
    best = min(cands, key=lambda t: t[4])
    return [best[3][:min(16, best[1])]]


def tree(cands, branches, min_match=2):
    """The ``branches`` best distinct drafts in today's order, verified together as a tree."""
    out = []
    for t in sorted(cands, key=today, reverse=True):
        if t[1] < min_match:
            break
        d = t[3][:min(16, t[1])]
        if d and d not in out:
            out.append(d)
        if len(out) == branches:
            break
    return out


RULES = {
    "today": longest,
    "1-token matches too": lambda c: longest(c, 1),
    "vote, weight exp(match - top)": lambda c: vote(c, lambda m, top: math.exp(m - top)),
    "vote, weight match^2": lambda c: vote(c, lambda m, top: m ** 2),
    "vote, weight match^4": lambda c: vote(c, lambda m, top: m ** 4),
    "vote among match >= top - 1": lambda c: vote(c, lambda m, top: float(m >= top - 1)),
    "ties by distance": lambda c: longest(c, key=lambda t: (t[1], -t[4])),
    "sequence ties by distance": lambda c: longest(c, key=lambda t: (t[1], t[0] == "s", -t[4])),
    "nearest with match >= 2": nearest,
    "nearest with match >= top / 2": lambda c: nearest(c, lambda top: top / 2),
    "tree of 2": lambda c: tree(c, 2),
    "tree of 3": lambda c: tree(c, 3),
    "tree of 4": lambda c: tree(c, 4),
    "tree of 8": lambda c: tree(c, 8),
}


def simulate(runs, rule, cost, step_ms, oracle=None):
    tokens = forwards = 0
    ms = 0.0
    for run in runs:
        y, steps = run["y"], run["steps"]
        i = 0
        tokens += 1  # the prompt's pass gives the first token, the same under every rule
        while i < len(y) - 1:
            truth = y[i + 1:]
            if oracle == "candidate":  # the candidate the kNN-LM follows furthest, drafted that far
                kept = max((min(16, lcp(t[3], truth)) for t in steps[i]), default=0)
                positions = kept + 1
            else:
                drafts = rule(steps[i])
                kept = max((lcp(d, truth) for d in drafts), default=0)
                if oracle == "length":  # today's candidate, drafted exactly as far as it is kept
                    positions = kept + 1
                else:
                    positions = 1 + len({tuple(d[:j + 1]) for d in drafts for j in range(len(d))})
            gained = min(kept + 1, len(y) - 1 - i)
            tokens += gained
            forwards += 1
            ms += cost[positions] + step_ms * gained
            i += gained
    return tokens / forwards, 1000 * tokens / ms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recorded")
    p.add_argument("verify", help="bench_verify.py --json output")
    p.add_argument("--step-ms", type=float, default=3.9,
                   help="the kNN-LM's own work per generated token (default: %(default)s, measured in place)")
    args = p.parse_args()
    cost = costs(args.verify)
    data = json.load(open(args.recorded))
    for name, runs in data.items():
        _, base = simulate(runs, longest, cost, args.step_ms)
        print(f"{name} ({len(runs)} prompts)")
        rows = [(r, *simulate(runs, f, cost, args.step_ms)) for r, f in RULES.items()]
        rows += [("oracle: today's candidate, exact length", *simulate(runs, longest, cost, args.step_ms, "length")),
                 ("oracle: the best candidate", *simulate(runs, None, cost, args.step_ms, "candidate"))]
        for rule, per_forward, tps in rows:
            print(f"  {rule:<42} {per_forward:5.2f} tokens/forward {tps:6.1f} tok/s  {tps / base - 1:+6.1%}")


if __name__ == "__main__":
    main()
