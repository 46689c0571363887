"""summary.json: every model's task results in one place, and what a datastore is worth in
parameters (``param_multiples``)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

__all__ = ["collect", "param_multiples", "power_law_fit"]


def collect(out: Path, models: list[dict], tasks: Sequence[str]) -> dict:
    """``{"models": [...]}``: per model its kind, parameter counts (from meta.json), training
    summary and the result of every task whose JSON is under ``out/<model>/``."""
    rows = []
    for m in models:
        d = out / m["name"]
        row = {}
        for t in tasks:
            f = d / f"{t}.json"
            if f.exists():
                row[t] = json.loads(f.read_text())
        meta = row.pop("meta", {})
        rows.append({"name": m["name"], "kind": m["kind"], "params": meta.get("params"),
                     "non_embedding_params": meta.get("non_embedding_params"), "vocab_size": meta.get("vocab_size"),
                     "train": m.get("train"), **row})
    return {"models": rows}


def power_law_fit(xs: list[float], ys: list[float]) -> dict:
    """Least squares ``y = a + b x`` (here x = ln params, y = ln ppl) with its R²."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    a = my - b * mx
    ss_res = sum((y - (a + b * x)) ** 2 for x, y in zip(xs, ys, strict=True))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return {"a": a, "b": b, "r2": 1 - ss_res / ss_tot if ss_tot else None, "formula": "ln ppl_base = a + b ln params"}


def _equivalent_params(ppl: float, xs: list[float], ys: list[float], a: float, b: float,
                       monotone: bool) -> tuple[float | None, float | None, bool]:
    """(interpolated, power-law-fit, extrapolated): the parameter count at which the no-datastore
    curve (``xs`` = ln params, ``ys`` = ln ppl, ascending params) reaches ``ppl``."""
    t = math.log(ppl)
    interp = None
    if monotone and ys[-1] <= t <= ys[0]:
        for i in range(len(xs) - 1):
            if ys[i + 1] <= t <= ys[i]:
                f = (ys[i] - t) / (ys[i] - ys[i + 1]) if ys[i] != ys[i + 1] else 0.0
                interp = math.exp(xs[i] + f * (xs[i + 1] - xs[i]))
                break
    return interp, (math.exp((t - a) / b) if b < 0 else None), not (ys[-1] <= t <= ys[0])


def _multiple_row(r: dict, task: str, xs: list[float], ys: list[float], fit: dict, monotone: bool) -> dict:
    """One family size's equivalent parameters at the primary setting and at the sweep's best."""
    a, b = fit["a"], fit["b"]
    interp, fitted, extrapolated = _equivalent_params(r[task]["ppl_knn"], xs, ys, a, b, monotone)
    row = {"name": r["name"], "params": r["params"], "ppl_base": r[task]["ppl_base"],
           "ppl_knn": r[task]["ppl_knn"], "gain_pct": r[task].get("gain_pct"),
           "equivalent_params_interp": interp, "multiple_interp": interp / r["params"] if interp else None,
           "equivalent_params_fit": fitted, "multiple_fit": fitted / r["params"] if fitted else None,
           "extrapolated": extrapolated}
    best = (r[task].get("best") or {}).get("ppl")
    if best:  # the sweep's best setting, chosen on the eval text itself: an optimistic oracle
        bi, bf, bx = _equivalent_params(best, xs, ys, a, b, monotone)
        row.update(ppl_best=best, best_setting={k: v for k, v in r[task]["best"].items() if k != "ppl"},
                   multiple_best_interp=bi / r["params"] if bi else None,
                   multiple_best_fit=bf / r["params"] if bf else None, best_extrapolated=bx)
    return row


def param_multiples(summary: dict) -> dict:
    """The parameter multiple a datastore is worth, per family size and task: the parameter count
    at which the family's no-datastore perplexity curve reaches the kNN-LM perplexity of that
    size, divided by the size. ``interp``: piecewise-linear in log(params) / log(ppl) between
    measured family sizes (None outside the measured range or where the curve is not
    decreasing). ``fit``: a least-squares power law log ppl = a + b log params through the
    no-datastore points (``extrapolated`` when the target lies outside the measured range).
    ``*_best*``: the same for the sweep's best setting (chosen on the eval text: optimistic).
    Family only: its sizes share the tokenizer, the training data and the token budget."""
    fam = sorted([r for r in summary["models"] if r["kind"] == "family" and r.get("params")],
                 key=lambda r: r["params"])
    out = {}
    for task in ("in_domain_ppl", "domain_adaptation"):
        rows = [r for r in fam if (r.get(task) or {}).get("ppl_base") and (r.get(task) or {}).get("ppl_knn")]
        if len(rows) < 2:
            continue
        xs = [math.log(r["params"]) for r in rows]
        ys = [math.log(r[task]["ppl_base"]) for r in rows]
        fit = power_law_fit(xs, ys)
        monotone = all(ys[i + 1] < ys[i] for i in range(len(ys) - 1))
        out[task] = {"fit": fit, "base_curve_decreasing": monotone,
                     "rows": [_multiple_row(r, task, xs, ys, fit, monotone) for r in rows]}
    return out
