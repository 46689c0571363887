"""The parameter multiple a datastore is worth, with its uncertainty: the one place of that formula.

For a family of models of one architecture and tokenizer, a metric ``m`` measured without a
datastore at every size is fitted by least squares as ``m = a + b ln(params)`` (``fit_line``).
At a size with ``params`` parameters whose kNN-LM reaches ``m_knn``, the equivalent model is the
one whose fitted no-datastore metric equals ``m_knn``: ``exp((m_knn - a) / b)`` parameters, and the
**parameter multiple** is that divided by ``params`` (``equivalent_params``). The metric is a ratio
of sums over units (documents, passages): ``sum(num) / sum(den)``, e.g. the log-perplexity
(NLL / tokens: the fit is then ln ppl vs ln params) or the recall token accuracy (right tokens /
tokens). ``lower_is_better`` says which way the metric improves; a fitted curve that does not
improve with size gives no multiple (None).

Uncertainty (``multiples``): a paired bootstrap. Each replicate resamples the units with
replacement (the same indices for every model: they were all scored on the same text) and, at
sizes with several seeds, draws one seed per size; it refits the curve and recomputes every
multiple. The point estimate uses every unit and the mean over seeds at each size; the interval
is the replicates' percentile interval (``level``, default 90 %). Without units (e.g. per-bucket
numbers) only the seeds are resampled (``"resampled": "seeds"``).

The fit is only as good as the family's curve: where the no-datastore metric stops improving with
size (a data-limited family), multiples read off the line are extrapolations. Each row therefore
also carries the model-free readout ``matched_by``: the smallest measured size whose no-datastore
metric (mean over seeds) is at least as good as this size's kNN-LM, or None when no measured size
is (the kNN-LM beats the whole family without a datastore); and the fit records ``best_size``,
the size with the best no-datastore metric.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["fit_line", "equivalent_params", "multiples"]


def fit_line(x: Sequence[float], y: Sequence[float]) -> tuple[float, float, float | None]:
    """Least squares ``y = a + b x``: (a, b, R²) (R² None when y is constant)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    mx, my = x.mean(), y.mean()
    sxx = ((x - mx) ** 2).sum()
    b = float(((x - mx) * (y - my)).sum() / sxx) if sxx > 0 else 0.0
    a = float(my - b * mx)
    ss_tot = float(((y - my) ** 2).sum())
    r2 = 1 - float(((y - (a + b * x)) ** 2).sum()) / ss_tot if ss_tot > 0 else None
    return a, b, r2


def equivalent_params(m: float, a: float, b: float, lower_is_better: bool = True) -> float | None:
    """The parameter count at which the fitted no-datastore curve ``a + b ln p`` reaches ``m``;
    None when the curve does not improve with size."""
    if (lower_is_better and b >= 0) or (not lower_is_better and b <= 0):
        return None
    z = (m - a) / b
    return math.exp(z) if z < 700 else math.inf


def _ratio(num: np.ndarray, den: np.ndarray, idx: np.ndarray | None) -> float:
    if idx is None:
        return float(num.sum() / den.sum())
    return float(num[idx].sum() / den[idx].sum())


def _compute(sizes: list[dict], pick: list[int] | None, idx: np.ndarray | None, lower: bool) -> list | None:
    """Multiples at every size for one resample (``pick``: the seed index per size, None = mean
    over seeds; ``idx``: the unit indices, None = all units)."""
    base, knn = [], []
    for i, s in enumerate(sizes):
        runs = s["runs"] if pick is None else [s["runs"][pick[i]]]
        b, k = [], []
        for r in runs:
            u = r.get("units")
            if u is not None:
                b.append(_ratio(u["base"], u["den"], idx))
                k.append(_ratio(u["knn"], u["den"], idx))
            else:
                b.append(r["base"])
                k.append(r["knn"])
        base.append(float(np.mean(b)))
        knn.append(float(np.mean(k)))
    x = [math.log(s["params"]) for s in sizes]
    a, b_, r2 = fit_line(x, base)
    out = []
    for s, mb, mk in zip(sizes, base, knn, strict=True):
        eq = equivalent_params(mk, a, b_, lower)
        out.append({"base": mb, "knn": mk, "equivalent_params": eq,
                    "multiple": None if eq is None else eq / s["params"]})
    return [out, (a, b_, r2), base]


def multiples(runs: Sequence[dict], *, lower_is_better: bool = True, n_boot: int = 1000, level: float = 0.9,
              seed: int = 0) -> dict | None:
    """The parameter multiple of each family size, with a bootstrap interval.

    ``runs``: one dict per trained model: ``size`` (the preset name), ``params``, ``seed``,
    ``base`` and ``knn`` (the metric without / with the datastore) and optionally ``units``:
    ``{"base": (U,), "knn": (U,), "den": (U,)}`` arrays of per-unit numerators and denominators
    (the same U units, in the same order, for every run). Returns None with fewer than two sizes.
    """
    by_size: dict[str, dict] = {}
    for r in runs:
        s = by_size.setdefault(r["size"], {"size": r["size"], "params": r["params"], "runs": []})
        u = r.get("units")
        if u is not None:
            u = {k: np.asarray(u[k], dtype=np.float64) for k in ("base", "knn", "den")}
        s["runs"].append({**r, "units": u})
    sizes = sorted(by_size.values(), key=lambda s: s["params"])
    if len(sizes) < 2:
        return None
    n_units = {len(r["units"]["den"]) for s in sizes for r in s["runs"] if r["units"] is not None}
    with_units = all(r["units"] is not None for s in sizes for r in s["runs"]) and len(n_units) == 1
    rows, (a, b, r2), base_curve = _compute(sizes, None, None, lower_is_better)
    rng = np.random.default_rng(seed)
    boots = []
    multi_seed = any(len(s["runs"]) > 1 for s in sizes)
    if with_units or multi_seed:
        U = n_units.pop() if with_units else 0
        for _ in range(n_boot):
            pick = [int(rng.integers(len(s["runs"]))) for s in sizes]
            idx = rng.integers(0, U, U) if with_units else None
            boots.append(_compute(sizes, pick, idx, lower_is_better)[0])
    lo_q, hi_q = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    lo_m, hi_m = min(base_curve), max(base_curve)

    def as_good(base: float, knn: float) -> bool:
        return base <= knn if lower_is_better else base >= knn

    best = (min if lower_is_better else max)(range(len(sizes)), key=lambda i: base_curve[i])
    out_rows = []
    for i, (s, row) in enumerate(zip(sizes, rows, strict=True)):
        reps = [b[i]["multiple"] for b in boots]
        finite = np.asarray([m for m in reps if m is not None and math.isfinite(m)], dtype=np.float64)
        ci = [float(np.percentile(finite, lo_q)), float(np.percentile(finite, hi_q))] if len(finite) else None
        gain = [b[i]["knn"] - b[i]["base"] for b in boots]
        out_rows.append({
            "size": s["size"], "params": s["params"], "seeds": [r["seed"] for r in s["runs"]],
            "base": row["base"], "knn": row["knn"],
            "per_seed": [{"seed": r["seed"], "base": r["base"], "knn": r["knn"]} for r in s["runs"]],
            "equivalent_params": row["equivalent_params"], "multiple": row["multiple"],
            "multiple_ci": ci, "replicates_without_multiple": len(reps) - len(finite),
            "difference_ci": ([float(np.percentile(gain, lo_q)), float(np.percentile(gain, hi_q))]
                              if gain else None),
            "extrapolated": not (min(lo_m, hi_m) <= row["knn"] <= max(lo_m, hi_m)),
            "matched_by": next((t["size"] for t, mb in zip(sizes, base_curve, strict=True)
                                if as_good(mb, row["knn"])), None),
        })
    return {"fit": {"a": a, "b": b, "r2": r2, "formula": "metric_base = a + b ln params",
                    "best_size": sizes[best]["size"], "best_params": sizes[best]["params"],
                    "best_base": base_curve[best], "largest_size": sizes[-1]["size"]},
            "lower_is_better": lower_is_better, "level": level, "replicates": len(boots),
            "resampled": ("units and seeds" if multi_seed else "units") if with_units else
                         ("seeds" if multi_seed else "nothing"),
            "rows": out_rows}
