"""The suite's four plots, drawn from summary.json's content (``make_plots``).

Figures are made with ``matplotlib.figure.Figure`` (no pyplot, no global backend): saving a PNG
needs no display.
"""

from __future__ import annotations

import math
from pathlib import Path

__all__ = ["PLOTS", "make_plots"]

PLOTS = ("ppl_vs_params.png", "gain_vs_size.png", "recall_vs_size.png", "datastore_scaling.png")
REF_MARKERS = ["*", "D", "P", "X"]


def _si(x: float) -> str:
    """1.5e6 -> '1.5M', 2e4 -> '20k'."""
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:g}{suffix}"
    return f"{x:g}"


def _pct(x):
    return None if x is None else 100 * x


def _get(r: dict, task: str, key: str):
    return (r.get(task) or {}).get(key)


def _figure(ncols: int, figsize: tuple[float, float]):
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(1, ncols)


def _family_line(ax, fam: list[dict], task: str, key: str, **kw) -> None:
    pts = [(r["params"], _get(r, task, key)) for r in fam if _get(r, task, key) is not None]
    if pts:
        ax.plot(*zip(*pts, strict=True), **kw)


def _ref_points(ax, refs: list[dict], task: str, key: str, color: str, label_fmt: str, hollow: bool = False) -> None:
    for i, r in enumerate(refs):
        v = _get(r, task, key)
        if v is not None:
            ax.plot([r["params"]], [v], marker=REF_MARKERS[i % len(REF_MARKERS)], ls="", ms=10, color=color,
                    mfc="none" if hollow else color, label=label_fmt.format(r["name"]))


def _params_axis(ax) -> None:
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: _si(x)))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("parameters (count, log scale)")


# ------------------------------------------------------------------ 1. perplexity vs parameters

def _ppl_panel(ax, fam: list[dict], pm: dict | None) -> None:
    """Family token perplexity with and without the datastore, the power-law fit and the
    parameter multiple of each size."""
    _family_line(ax, fam, "in_domain_ppl", "ppl_base", marker="o", color="C0", label="stdlib, no datastore")
    _family_line(ax, fam, "in_domain_ppl", "ppl_knn", marker="o", ls="--", color="C0", label="stdlib, kNN-LM")
    _family_line(ax, fam, "domain_adaptation", "ppl_base", marker="s", color="C1", label="domain, no datastore")
    _family_line(ax, fam, "domain_adaptation", "ppl_knn", marker="s", ls="--", color="C1", label="domain, kNN-LM")
    if pm and fam:
        xs = [fam[0]["params"] / 1.5, fam[-1]["params"] * 4]
        ax.plot(xs, [math.exp(pm["fit"]["a"] + pm["fit"]["b"] * math.log(x)) for x in xs], color="grey", lw=0.8,
                ls=":", label="stdlib, power-law fit (no datastore)")
        for row in pm["rows"]:
            mult = row["multiple_interp"] or row["multiple_fit"]
            if mult:
                ax.annotate(f"≈{mult:.2f}× params" + ("" if row["multiple_interp"] else " (fit)"),
                            (row["params"], row["ppl_knn"]), textcoords="offset points", xytext=(-6, -11), fontsize=6,
                            color="C0")
    ax.set_yscale("log")
    ax.set_ylabel("family token perplexity (own tokenizer)")
    ax.set_title("family (one tokenizer): perplexity per token; reference models: right panel", fontsize=9)
    _params_axis(ax)
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo, hi * 6)  # room for the legend above the curves
    ax.legend(fontsize=6, loc="upper center", ncol=2)


def _bpb_panel(ax, fam: list[dict], refs: list[dict]) -> None:
    """Bits per byte of every model, family and references, with and without the datastore."""
    for task, color, label in (("in_domain_ppl", "C0", "stdlib"), ("domain_adaptation", "C1", "domain")):
        _family_line(ax, fam, task, "bpb_base", marker="o", color=color, label=f"{label}, no datastore")
        _family_line(ax, fam, task, "bpb_knn", marker="o", ls="--", color=color, label=f"{label}, kNN-LM")
        _ref_points(ax, refs, task, "bpb_base", color, "{} " + label + ", no datastore")
        _ref_points(ax, refs, task, "bpb_knn", color, "{} " + label + ", kNN-LM", hollow=True)
    _params_axis(ax)
    ax.set_ylabel("held-out bits per UTF-8 byte")
    ax.set_title("all models: bits per byte (tokenizer-independent)", fontsize=9)
    ax.legend(fontsize=6)


def plot_ppl_vs_params(summary: dict, fam: list[dict], refs: list[dict]):
    fig, axes = _figure(2, (10, 3.8))
    _ppl_panel(axes[0], fam, (summary.get("param_multiples") or {}).get("in_domain_ppl"))
    _bpb_panel(axes[1], fam, refs)
    return fig


# ------------------------------------------------------------------------- 2. gain vs size

def plot_gain_vs_size(summary: dict, fam: list[dict], refs: list[dict]):
    fig, ax = _figure(1, (5.5, 3.8))
    for task, color, label in (("in_domain_ppl", "C0", "stdlib (in-domain)"),
                               ("domain_adaptation", "C1", "new domain")):
        _family_line(ax, fam, task, "gain_pct", marker="o", color=color, label=f"family, {label}")
        _ref_points(ax, refs, task, "gain_pct", color, "{}, " + label)
    ax.axhline(0, color="grey", lw=0.8)
    _params_axis(ax)
    ax.set_ylabel("perplexity reduction by kNN-LM (%)")
    ax.set_title("kNN-LM gain at the primary setting", fontsize=9)
    ax.legend(fontsize=6)
    return fig


# ----------------------------------------------------------------------- 3. recall vs size

def _recall(r: dict, which, key: str):
    """Recall ``key`` of datastore passages, in %: ``which`` = "base" or a kNN-LM lambda."""
    rec = (r.get("verbatim_recall") or {}).get("datastore") or {}
    if which == "base":
        return _pct((rec.get("base") or {}).get(key))
    for x in rec.get("knn") or []:
        if x["lambda"] == which:
            return _pct(x.get(key))
    return None


def _recall_panel(ax, fam: list[dict], refs: list[dict], key: str, ylabel: str) -> None:
    lams = sorted({x["lambda"] for r in fam + refs
                   for x in ((r.get("verbatim_recall") or {}).get("datastore") or {}).get("knn") or []})
    for j, which in enumerate(["base"] + lams):
        label = "no retrieval" if which == "base" else f"kNN-LM λ={which:g}"
        pts = [(r["params"], _recall(r, which, key)) for r in fam if _recall(r, which, key) is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", color=f"C{j}", ls="-" if which == "base" else "--",
                    label=f"family, {label}")
        for i, r in enumerate(refs):
            v = _recall(r, which, key)
            if v is not None:
                ax.plot([r["params"]], [v], marker=REF_MARKERS[i % len(REF_MARKERS)], ls="", ms=10,
                        color=f"C{j}", label=f"{r['name']}, {label}")
    _params_axis(ax)
    ax.set_ylabel(ylabel)
    ax.set_ylim(-2, 102)
    ax.set_title(f"verbatim recall of datastore passages: {key.replace('_', ' ')}", fontsize=9)
    # two columns in the empty top-left corner once there are several reference models, so
    # the legend does not cover their markers (recall stays well below 80 % in practice)
    ax.legend(fontsize=6, **({"ncol": 2, "loc": "upper left"} if len(refs) > 1 else {}))


def plot_recall_vs_size(summary: dict, fam: list[dict], refs: list[dict]):
    fig, axes = _figure(2, (10, 3.8))
    _recall_panel(axes[0], fam, refs, "exact_match", "exact-match rate (%)")
    _recall_panel(axes[1], fam, refs, "token_accuracy", "token accuracy (%)")
    return fig


# --------------------------------------------------------------------- 4. datastore scaling

def _datastore_axis(ax, ylabel: str) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _si(v)))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("datastore size (tokens of that model's tokenizer, log scale)")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=6)


def plot_datastore_scaling(summary: dict, fam: list[dict], refs: list[dict]):
    fig, axes = _figure(2, (10, 3.8))
    for i, r in enumerate([r for r in fam + refs if r.get("datastore_scaling")]):
        pts = [p for p in r["datastore_scaling"]["points"] if "skipped" not in p]
        if not pts:
            continue
        x = [p["datastore_tokens"] for p in pts]
        style = dict(marker="o" if r["kind"] == "family" else "*", color=f"C{i}", label=r["name"])
        saved = [p["bpb_base"] - p["bpb_knn"] for p in pts if p.get("bpb_base") is not None]
        if len(saved) == len(pts):
            axes[0].plot(x, saved, **style)
        axes[1].plot(x, [p["gain_pct"] for p in pts], **style)
    _datastore_axis(axes[0], "bits per byte saved (base − kNN-LM)")
    _datastore_axis(axes[1], "perplexity reduction (%)")
    axes[0].set_title("stdlib held-out: bits per byte saved vs datastore size", fontsize=9)
    axes[1].set_title("kNN-LM gain vs datastore size", fontsize=9)
    return fig


_MAKERS = (plot_ppl_vs_params, plot_gain_vs_size, plot_recall_vs_size, plot_datastore_scaling)


def make_plots(summary: dict, out: Path) -> list[str]:
    """Draw the four ``PLOTS`` into ``out`` (PNG, 90 dpi); returns the file names written. The
    family is drawn as lines over parameters, the reference models as single markers."""
    fam = sorted([r for r in summary["models"] if r["kind"] == "family" and r.get("params")],
                 key=lambda r: r["params"])
    refs = [r for r in summary["models"] if r["kind"] == "reference" and r.get("params")]
    written = []
    for name, draw in zip(PLOTS, _MAKERS, strict=True):
        fig = draw(summary, fam, refs)
        fig.tight_layout()
        fig.savefig(Path(out) / name, dpi=90)
        written.append(name)
    return written
