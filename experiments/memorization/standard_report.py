"""The standard-setting run's summary: ``summary.json`` (every number), ``summary.md`` (the tables
for the README and docs/memorization.md, rendered from that JSON only) and two plots.

    python -m experiments.memorization.standard --workdir runs/memorization-std --stage summary

The parameter multiples come from ``experiments.memorization.multiples`` (the formula and its
bootstrap live there); the bits-per-byte conversion from ``tasks.bits_per_byte`` via
``tasks.summarize_eval``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from experiments.common import write_json
from experiments.memorization.multiples import multiples

__all__ = ["collect", "family_multiples", "render_markdown", "write_summary", "PLOTS"]

PLOTS = ("std_bpb_vs_params.png", "std_multiples.png")
# Published kNN-LM perplexity reductions at the standard setting (datastore = the training data),
# for the comparison table: (source, model, parameters, ppl without -> with the datastore).
PUBLISHED = (
    ("Khandelwal et al. 2020, WikiText-103", "Transformer LM", 247_000_000, 18.65, 16.12),
    ("knn-transformers, WikiText-103, as cited in issue #15", "distilGPT-2", 82_000_000, None, None, -17.6),
    ("knn-transformers, WikiText-103, as cited in issue #15", "GPT-2", 124_000_000, None, None, -15.3),
    ("knn-transformers, WikiText-103, as cited in issue #15", "GPT-2 medium", 355_000_000, None, None, -8.3),
)
_HEADLINE = ("tokens", "documents", "ppl_base", "ppl_knn", "gain_pct", "gain_best_pct", "bpb_base", "bpb_knn",
             "bpb_best", "eval_bytes", "primary", "best", "window", "datastore", "seconds")


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _headline(res: dict | None) -> dict | None:
    return None if res is None else {k: res.get(k) for k in _HEADLINE if k in res}


def collect(pipe) -> list[dict]:
    """One row per model (family models, then references) with the headline numbers of every
    task whose JSON exists."""
    rows = []
    names = [(n, "family", size, seed) for n, size, seed in pipe.s.models()]
    names += [(r, "reference", None, None) for r in pipe.s.references]
    for name, kind, size, seed in names:
        d = pipe.r / name
        meta = _read(d / "meta.json") or {}
        row = {"name": name, "kind": kind, "size": size, "seed": seed, "params": meta.get("params"), "meta": meta}
        for task in ("in_domain_ppl", "domain_adaptation", "more_data"):
            row[task] = _headline(_read(d / f"{task}.json"))
        more = _read(d / "more_data.json")
        if more:
            row["more_data"]["overlap"] = more.get("overlap")
            row["more_data"]["training_text_tokens"] = more.get("training_text_tokens")
        rare = _read(d / "rare_token_ppl.json")
        row["rare_token_ppl"] = None if rare is None else rare["buckets"]
        rec = _read(d / "verbatim_recall.json")
        if rec:
            row["verbatim_recall"] = {
                w: {"base": {k: v for k, v in rec[w]["base"].items() if k != "per_passage_correct"},
                    "knn": [{k: v for k, v in x.items() if k != "per_passage_correct"} for x in rec[w]["knn"]]}
                for w in ("datastore", "control") if w in rec and "base" in rec[w]}
        ctl = _read(d / "control.json")
        row["control"] = None if ctl is None else {k: v for k, v in ctl.items() if k != "per_document"}
        row["overlap"] = (_read(d / "overlap.json") or {}).get("datastores")
        rows.append(row)
    return rows


MOSTLY_SHARED = 0.5  # an eval document with more than this share of its 13-grams in the datastore


def _clean_documents(pipe, rows: list[dict]) -> list[int] | None:
    """Indices of the held-out stdlib documents with at most ``MOSTLY_SHARED`` of their 13-grams
    in the family's training datastore (the same text and tokenizer for every family model)."""
    for r in rows:
        ov = ((r.get("overlap") or {}).get("train") or {}).get("stdlib_test") if r["kind"] == "family" else None
        if ov and "per_document_fraction" in ov:
            return [i for i, f in enumerate(ov["per_document_fraction"]) if f <= MOSTLY_SHARED]
    return None


def _ppl_runs(pipe, rows: list[dict], task: str, base_task: str | None = None,
              keep: list[int] | None = None) -> list[dict]:
    """Per family model: log-perplexity (NLL per token) without / with the datastore of ``task``,
    with per-document units (the same eval documents for every model; only ``keep`` when given)."""
    out = []
    for r in rows:
        if r["kind"] != "family" or not r["params"]:
            continue
        res = _read(pipe.r / r["name"] / f"{task}.json")
        base = _read(pipe.r / r["name"] / f"{base_task or task}.json")
        if not res or not base or not res.get("per_document") or not base.get("per_document"):
            continue
        pk, pb = res["per_document"], base["per_document"]
        if keep is not None:
            pk, pb = [pk[i] for i in keep], [pb[i] for i in keep]
        units = {"base": [d["nll_base"] for d in pb], "knn": [d["nll_knn"] for d in pk],
                 "den": [d["tokens"] for d in pb]}
        out.append({"size": r["size"], "params": r["params"], "seed": r["seed"],
                    "base": sum(units["base"]) / sum(units["den"]), "knn": sum(units["knn"]) / sum(units["den"]),
                    "units": units})
    return out


def _recall_runs(pipe, rows: list[dict], lam: float) -> list[dict]:
    out = []
    for r in rows:
        rec = _read(pipe.r / r["name"] / "verbatim_recall.json") if r["kind"] == "family" else None
        ds = (rec or {}).get("datastore") or {}
        knn = [x for x in ds.get("knn") or [] if x["lambda"] == lam]
        if not r["params"] or not knn or "per_passage_correct" not in ds.get("base", {}):
            continue
        n = rec["continuation_tokens"]
        units = {"base": ds["base"]["per_passage_correct"], "knn": knn[0]["per_passage_correct"],
                 "den": [n] * len(ds["base"]["per_passage_correct"])}
        out.append({"size": r["size"], "params": r["params"], "seed": r["seed"],
                    "base": ds["base"]["token_accuracy"], "knn": knn[0]["token_accuracy"], "units": units})
    return out


def _bucket_runs(rows: list[dict], bucket: str) -> list[dict]:
    out = []
    for r in rows:
        b = [x for x in (r.get("rare_token_ppl") or []) if x["frequency"] == bucket]
        if r["kind"] == "family" and r["params"] and b and b[0]["ppl_base"] and b[0]["ppl_knn"]:
            out.append({"size": r["size"], "params": r["params"], "seed": r["seed"],
                        "base": math.log(b[0]["ppl_base"]), "knn": math.log(b[0]["ppl_knn"])})
    return out


def family_multiples(pipe, rows: list[dict]) -> dict:
    """Every parameter-multiple table: in-domain, more data, new domain, control (log-perplexity
    per token), verbatim recall (token accuracy, per λ), rare tokens (log-perplexity per bucket)."""
    n, seed = pipe.s.bootstrap, pipe.s.seed
    out = {
        "in_domain": multiples(_ppl_runs(pipe, rows, "in_domain_ppl"), n_boot=n, seed=seed),
        "in_domain_low_overlap": None,
        "more_data": multiples(_ppl_runs(pipe, rows, "more_data", "in_domain_ppl"), n_boot=n, seed=seed),
        "new_domain": multiples(_ppl_runs(pipe, rows, "domain_adaptation"), n_boot=n, seed=seed),
        "control": multiples(_ppl_runs(pipe, rows, "control"), n_boot=n, seed=seed),
    }
    clean = _clean_documents(pipe, rows)
    if clean:  # the held-out documents that are not mostly in the training text
        out["in_domain_low_overlap"] = multiples(_ppl_runs(pipe, rows, "in_domain_ppl", keep=clean), n_boot=n,
                                                 seed=seed)
        if out["in_domain_low_overlap"]:
            out["in_domain_low_overlap"]["documents"] = clean
    for lam in pipe.s.recall_lambdas:
        out[f"recall_lambda_{lam:g}"] = multiples(_recall_runs(pipe, rows, lam), lower_is_better=False, n_boot=n,
                                                  seed=seed)
    buckets = sorted({b["frequency"] for r in rows for b in (r.get("rare_token_ppl") or [])},
                     key=lambda s: [b["frequency"] for r in rows for b in (r.get("rare_token_ppl") or [])].index(s))
    out["rare_tokens"] = {b: multiples(_bucket_runs(rows, b), n_boot=n, seed=seed) for b in buckets}
    return out


# --------------------------------------------------------------------------- markdown

def _f(x, fmt: str = ".3f") -> str:
    return "–" if x is None else format(x, fmt)


def _x(m: float) -> str:
    """A multiple for the tables: two decimals below 100, whole numbers below 10,000, then a power of
    ten with two significant figures (``3.2e9``)."""
    if not math.isfinite(m):
        return "∞"
    if m >= 1e4:
        mant, exp = f"{m:.1e}".split("e")
        return f"{mant}e{int(exp)}"
    return f"{m:,.0f}" if m >= 100 else f"{m:.2f}"


def _mult(row: dict) -> str:
    m, ci = row.get("multiple"), row.get("multiple_ci")
    if m is None:
        return "–"
    s = f"{_x(m)}×" + (f" [{_x(ci[0])}, {_x(ci[1])}]" if ci else "")
    return s + (" (extrapolated)" if row.get("extrapolated") else "")


def _matched(row: dict, largest: str) -> str:
    """The model-free readout: the smallest no-datastore size as good as this kNN-LM."""
    if "matched_by" not in row:
        return "–"
    return f"none up to {largest}" if row["matched_by"] is None else row["matched_by"]


def _by_size(pm: dict) -> dict:
    """Every multiples table but the rare-token buckets, as {table: {size: row}}."""
    return {k: {r["size"]: r for r in (v or {}).get("rows", [])} for k, v in pm.items() if k != "rare_tokens"}


def _gain_pct(r: dict, task: str) -> str:
    """A model's perplexity reduction (%) in ``task``, as its JSON gives it (references: no interval)."""
    g = (r.get(task) or {}).get("gain_pct")
    return "–" if g is None else f"{g:+.1f} %"


def _gain(row: dict) -> str:
    """Perplexity reduction (%) from a multiples row's log-perplexity difference and its interval."""
    d, ci = row["knn"] - row["base"], row.get("difference_ci")
    s = f"{100 * (1 - math.exp(d)):+.1f} %"
    return s + (f" [{100 * (1 - math.exp(ci[1])):+.1f}, {100 * (1 - math.exp(ci[0])):+.1f}]" if ci else "")


def render_markdown(summary: dict) -> str:
    """The tables, from ``summary`` only (so README numbers are generated, not typed)."""
    lines = [f"<!-- generated by {summary['generator']} from summary.json; do not edit by hand -->", ""]
    t = summary.get("text") or {}
    tt = t.get("training_text") or {}
    lines += [f"Training text: {tt.get('documents', '–')} documents, {tt.get('bytes', 0):,} bytes, "
              f"{tt.get('family_tokens', 0):,} family tokens ({tt.get('source', '–')}); held-out: "
              f"{(t.get('eval') or {}).get('documents', '–')} stdlib test files, "
              f"{(t.get('eval') or {}).get('bytes', 0):,} bytes.", ""]
    lines += ["| model | params | seed | epochs | tokens trained (all epochs, with EOS separators) | datastore tokens "
              "| datastore = training text |",
              "|---|---:|---:|---:|---:|---:|---|"]
    for r in summary["models"]:
        m = r["meta"]
        if not m:
            continue
        same = m.get("datastore_is_training_text", "same text" if r["kind"] == "reference" else "–")
        if m.get("datastore_capped_at"):
            same = f"first {m['datastore_capped_at']:,} tokens of it"
        cells = [r["name"], f"{m['params']:,}", "–" if m.get("seed") is None else str(m["seed"]),
                 str(m.get("epochs", "–")), _f(m.get("tokens_trained"), ","), f"{m['datastore_tokens']:,}", str(same)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Bits per byte on the same held-out text (λ, T = the primary setting), no datastore → kNN-LM:", "",
              "| model | params | stdlib test | + whole train split | python-doc (new domain) | control answers |",
              "|---|---:|---:|---:|---:|---:|"]
    for r in summary["models"]:
        cells = []
        for key in ("in_domain_ppl", "more_data", "domain_adaptation", "control"):
            x = r.get(key)
            cells.append(f"{_f(x.get('bpb_base'))} → {_f(x.get('bpb_knn'))}" if x else "–")
        lines.append(f"| {r['name']} | {_f(r['params'], ',') if r['params'] else '–'} | " + " | ".join(cells) + " |")
    pm = summary.get("multiples") or {}
    lines += ["", f"Parameter multiple a datastore is worth (fitted no-datastore curve, metric = a + b ln params; "
              f"[{int(100 * summary['level'])} % bootstrap interval over documents/passages and seeds]):", "",
              "| size | params | in-domain | in-domain, low-overlap documents | more data | new domain | control | "
              f"recall λ {summary['recall_lambdas'][0]:g} (token acc.) |", "|---|---:|---|---|---|---|---|---|"]
    first = f"recall_lambda_{summary['recall_lambdas'][0]:g}"
    by = _by_size(pm)
    sizes = [r for r in (pm.get("in_domain") or {}).get("rows", [])]
    for s in sizes:
        cells = [_mult(by[k][s["size"]]) if s["size"] in by.get(k, {}) else "–"
                 for k in ("in_domain", "in_domain_low_overlap", "more_data", "new_domain", "control", first)]
        lines.append(f"| {s['size']} | {s['params']:,} | " + " | ".join(cells) + " |")
    ind = pm.get("in_domain") or {}
    if ind.get("rows") and "best_size" in ind.get("fit", {}):
        fit, largest = ind["fit"], ind["fit"]["largest_size"]
        lines += ["", "Measured, no fit: the smallest family size whose no-datastore metric is as good as each "
                  "size's kNN-LM (\"none up to\": the kNN-LM beats every size without a datastore):", "",
                  "| size | in-domain | more data | new domain | control |", "|---|---|---|---|---|"]
        for s in sizes:
            cells = [_matched(by[k][s["size"]], pm[k]["fit"].get("largest_size", largest))
                     if s["size"] in by.get(k, {}) else "–"
                     for k in ("in_domain", "more_data", "new_domain", "control")]
            lines.append(f"| {s['size']} | " + " | ".join(cells) + " |")
        if fit["best_size"] != largest:
            lines.append(f"\nThe in-domain no-datastore curve is not monotonic: it is best at {fit['best_size']} "
                         f"(ln ppl {fit['best_base']:.3f}) and worse at the larger sizes, so the fitted line (R² "
                         f"{_f(fit['r2'])}) describes the family only roughly, and multiples read off it past "
                         f"{fit['best_size']} are extrapolations of a curve those models do not follow.")
    low = pm.get("in_domain_low_overlap")
    if low:
        lines.append(f"\nLow-overlap documents: {len(low['documents'])} of the held-out stdlib documents have at most "
                     f"{MOSTLY_SHARED:.0%} of their 13-grams in the training text.")
    for k in ("in_domain", "new_domain", first):
        fit = (pm.get(k) or {}).get("fit")
        if fit:
            lines.append(f"\n`{k}` fit: a = {fit['a']:.4f}, b = {fit['b']:.4f}, R² = {_f(fit['r2'])}")
    lines += ["", "Perplexity reduction by the datastore, 1 − ppl(kNN-LM) / ppl(none), at the primary setting "
              "(family: mean over seeds, [90 % bootstrap interval]); published figures for comparison:", "",
              "| model | params | in-domain | more data | new domain | control |", "|---|---:|---|---|---|---|"]
    for s in sizes:
        cells = [_gain(by[k][s["size"]]) if s["size"] in by.get(k, {}) else "–"
                 for k in ("in_domain", "more_data", "new_domain", "control")]
        lines.append(f"| {s['size']} | {s['params']:,} | " + " | ".join(cells) + " |")
    for r in summary["models"]:
        if r["kind"] == "reference" and r["params"]:
            cells = [_gain_pct(r, k) for k in ("in_domain_ppl", "more_data", "domain_adaptation", "control")]
            lines.append(f"| {r['name']} | {r['params']:,} | " + " | ".join(cells) + " |")
    for src, model, params, *ppl in PUBLISHED:
        gain = 100 * (1 - ppl[1] / ppl[0]) if ppl[0] else -ppl[2]
        what = f"{ppl[0]} → {ppl[1]}, " if ppl[0] else ""
        lines.append(f"| {model} ({src}) | {params:,} | {what}{gain:+.1f} % | – | – | – |")
    rare = pm.get("rare_tokens") or {}
    if rare:
        lines += ["", "Rare tokens (target frequency in the datastore corpus; seeds only resampled):", "",
                  "| size | " + " | ".join(rare) + " |", "|---|" + "---|" * len(rare)]
        rows = {b: {r["size"]: r for r in (v or {}).get("rows", [])} for b, v in rare.items()}
        for s in sizes:
            lines.append(f"| {s['size']} | " + " | ".join(_mult(rows[b][s['size']]) if s["size"] in rows[b] else "–"
                                                          for b in rare) + " |")
    lines += _recall_table(summary) + _rare_table(summary) + _readme_table(summary)
    lines += ["", "13-gram overlap of each eval set with each datastore (share of the eval set's 13-grams, "
              "per model's tokenizer):", "", "| model | datastore | stdlib test | python-doc eval | control |",
              "|---|---|---:|---:|---:|"]
    for r in summary["models"]:
        ov = dict(r.get("overlap") or {})
        if r.get("more_data") and r["more_data"].get("overlap"):
            ov["whole train split"] = r["more_data"]["overlap"]
        for dsname, sets in ov.items():
            cells = [_f((sets.get(k) or {}).get("fraction"), ".4f") for k in ("stdlib_test", "domain_eval", "control")]
            lines.append(f"| {r['name']} | {dsname} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _mean(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _readme_table(summary: dict) -> list[str]:
    """The compact table of the README: one row per family size (mean over seeds) and reference."""
    pm = summary.get("multiples") or {}
    by = _by_size(pm)
    lam = summary["recall_lambdas"][-1]
    largest = ((pm.get("in_domain") or {}).get("fit") or {}).get("largest_size", "–")

    def recall(rs):
        xs = [next((x["exact_match"] for x in r["verbatim_recall"]["datastore"]["knn"] if x["lambda"] == lam), None)
              for r in rs if (r.get("verbatim_recall") or {}).get("datastore")]
        return _pct(_mean(xs))

    out = ["", f"README table (family: mean over seeds; gains with their 90 % bootstrap interval; recall: exact match "
           f"of 32-token continuations at λ {lam:g}, %):", "",
           "| model | params | stdlib bits/byte: none → kNN-LM | in-domain gain | datastore worth (fitted curve) "
           "| matched without a datastore by | + rest of the train split | python-doc (new domain) | control | "
           "verbatim recall |", "|---|---:|---|---|---|---|---|---|---|---|"]
    groups: dict = {}
    for r in summary["models"]:
        if r["params"]:
            groups.setdefault(r["size"] or r["name"], []).append(r)
    for name, rs in groups.items():
        r0 = rs[0]
        bb = _mean([(r.get("in_domain_ppl") or {}).get("bpb_base") for r in rs])
        bk = _mean([(r.get("in_domain_ppl") or {}).get("bpb_knn") for r in rs])
        bpb = f"{_f(bb)} → {_f(bk)}"
        if r0["kind"] == "family":
            cells = [fn(by[k][name]) if name in by.get(k, {}) else "–"
                     for k, fn in (("in_domain", _gain), ("in_domain", _mult),
                                   ("in_domain", lambda x: _matched(x, largest)), ("more_data", _gain),
                                   ("new_domain", _gain), ("control", _gain))]
        else:
            cells = [_gain_pct(r0, "in_domain_ppl"), "–", "–", _gain_pct(r0, "more_data"),
                     _gain_pct(r0, "domain_adaptation"), _gain_pct(r0, "control")]
        out.append(f"| {name} | {r0['params']:,} | {bpb} | " + " | ".join(cells) + f" | {recall(rs)} |")
    return out


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _recall_table(summary: dict) -> list[str]:
    """Verbatim recall per model: exact match and token accuracy without retrieval and at each λ,
    on datastore passages and on held-out control passages."""
    lams = summary["recall_lambdas"]
    rows = [r for r in summary["models"] if (r.get("verbatim_recall") or {}).get("datastore")]
    if not rows:
        return []
    head = " / ".join(["none"] + [f"λ {x:g}" for x in lams])
    out = ["", "Verbatim recall (greedy continuation of datastore passages; control: held-out passages), %, "
           f"{head}:", "", "| model | exact match | token accuracy | control: exact match | control: token accuracy |",
           "|---|---|---|---|---|"]
    for r in rows:
        cells = []
        for w in ("datastore", "control"):
            rec = r["verbatim_recall"].get(w)
            for key in ("exact_match", "token_accuracy"):
                if not rec:
                    cells.append("–")
                    continue
                by = {x["lambda"]: x[key] for x in rec["knn"]}
                cells.append(" / ".join([_pct(rec["base"][key])] + [_pct(by.get(x)) for x in lams]))
        out.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return out


def _rare_table(summary: dict) -> list[str]:
    """Perplexity reduction by the datastore per target-frequency bucket, every model."""
    rows = [r for r in summary["models"] if r.get("rare_token_ppl")]
    if not rows:
        return []
    buckets = [b["frequency"] for b in rows[0]["rare_token_ppl"]]
    out = ["", "Perplexity reduction by the datastore per bucket of target frequency in the datastore corpus "
           "(primary setting; tokens in the bucket):", "", "| model | " + " | ".join(buckets) + " |",
           "|---|" + "---:|" * len(buckets)]
    for r in rows:
        by = {b["frequency"]: b for b in r["rare_token_ppl"]}
        cells = [f"{by[k]['gain_pct']:+.1f} % ({by[k]['tokens']:,})" if k in by and by[k].get("gain_pct") is not None
                 else "–" for k in buckets]
        out.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return out


# ------------------------------------------------------------------------------ plots

def _plots(summary: dict, out: Path) -> list[str]:
    from matplotlib.figure import Figure

    from experiments.memorization.plots import REF_MARKERS, _params_axis

    fam = [r for r in summary["models"] if r["kind"] == "family" and r["params"]]
    refs = [r for r in summary["models"] if r["kind"] == "reference" and r["params"]]
    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    for task, color, label in (("in_domain_ppl", "C0", "stdlib"), ("more_data", "C2", "stdlib, whole-split datastore"),
                               ("domain_adaptation", "C1", "python-doc")):
        for key, ls, what in (("bpb_base", "", "no datastore"), ("bpb_knn", "--", "kNN-LM")):
            if task == "more_data" and key == "bpb_base":
                continue
            pts = sorted((r["params"], r[task][key]) for r in fam if r.get(task) and r[task].get(key) is not None)
            if pts:  # the line through the mean over seeds; every seed as a dot
                xs = sorted({p for p, _ in pts})
                ax.plot(xs, [sum(v for p, v in pts if p == x) / sum(1 for p, _ in pts if p == x) for x in xs],
                        ls=ls or "-", color=color, label=f"{label}, {what}", alpha=0.8)
                ax.plot(*zip(*pts, strict=True), marker="o", ms=4, ls="", color=color, alpha=0.8)
            for i, r in enumerate(refs):
                if r.get(task) and r[task].get(key) is not None:
                    ax.plot([r["params"]], [r[task][key]], marker=REF_MARKERS[i % 4], ms=10, ls="", color=color,
                            mfc=color if key == "bpb_base" else "none")
    fit = ((summary.get("multiples") or {}).get("in_domain") or {}).get("fit")
    ind = [r["in_domain_ppl"] for r in fam if r.get("in_domain_ppl") and r["in_domain_ppl"].get("eval_bytes")]
    if fit and ind:  # the fitted no-datastore line (ln ppl per token), in bits per byte: x tokens / bytes / ln 2
        per = ind[0]["tokens"] / ind[0]["eval_bytes"] / math.log(2)
        xs = [min(r["params"] for r in fam), max(r["params"] for r in fam)]
        ax.plot(xs, [(fit["a"] + fit["b"] * math.log(x)) * per for x in xs], ls=":", color="C0", lw=1,
                label=f"stdlib, fitted no-datastore line (R² {_f(fit['r2'], '.2f')})")
    _params_axis(ax)
    ax.set_ylabel("held-out bits per UTF-8 byte")
    ax.set_title("family (dots) and references (SmolLM2 ★, Gemma ◆): filled = no datastore", fontsize=8)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / PLOTS[0], dpi=90)

    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    for j, key in enumerate(("in_domain", "more_data", "new_domain", "control",
                             f"recall_lambda_{summary['recall_lambdas'][0]:g}")):
        rows = [r for r in ((summary.get("multiples") or {}).get(key) or {}).get("rows", []) if r["multiple"]]
        if not rows:
            continue
        x = [r["params"] * (1 + 0.04 * j) for r in rows]
        y = [r["multiple"] for r in rows]
        err = [[max(0.0, r["multiple"] - r["multiple_ci"][0]) if r["multiple_ci"] else 0 for r in rows],
               [max(0.0, r["multiple_ci"][1] - r["multiple"]) if r["multiple_ci"] else 0 for r in rows]]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, color=f"C{j}", label=key.replace("_", " "), mfc="none")
        inside = [(xi, yi) for xi, yi, r in zip(x, y, rows, strict=True) if not r["extrapolated"]]
        if inside:  # filled: the kNN-LM metric lies within the measured no-datastore curve
            ax.plot(*zip(*inside, strict=True), marker="o", ls="", color=f"C{j}")
    fam_params = sorted(r["params"] for r in summary["models"] if r["kind"] == "family" and r["params"])
    if fam_params:
        ax.plot(fam_params, [fam_params[-1] / p for p in fam_params], ls=":", color="grey", lw=1,
                label="largest family size / size")
    ax.set_title("filled: within the measured no-datastore curve; hollow: extrapolated", fontsize=8)
    ax.axhline(1, color="grey", lw=0.8)
    ax.set_yscale("log")
    _params_axis(ax)
    ax.set_ylabel("parameter multiple the datastore is worth")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / PLOTS[1], dpi=90)
    return list(PLOTS)


def write_summary(pipe, command: str = "") -> dict:
    """Write ``summary.json``, ``summary.md`` and the plots under ``pipe.r``; returns the summary."""
    pipe.r.mkdir(parents=True, exist_ok=True)
    rows = collect(pipe)
    from dataclasses import asdict

    summary = {"generator": "experiments.memorization.standard_report", "command": command,
               "settings": asdict(pipe.s), "text": pipe.text_info(), "level": 0.9,
               "recall_lambdas": list(pipe.s.recall_lambdas),
               "stages": {st.name: st.status() for st in pipe.stages() if st.name != "summary"}, "models": rows}
    summary["multiples"] = family_multiples(pipe, rows)
    summary["plots"] = _plots(summary, pipe.r)
    write_json(pipe.r / "summary.json", summary)
    (pipe.r / "summary.md").write_text(render_markdown(summary), encoding="utf-8")
    return summary
