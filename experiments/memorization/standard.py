"""Memorization across sizes at the standard setting (issue 15): the datastore is the training text.

    python -m experiments.memorization.standard --workdir runs/memorization-std --plan   # stages, status, ETA
    python -m experiments.memorization.standard --workdir runs/memorization-std          # run what is left
    python -m experiments.memorization.standard --workdir /tmp/std --tiny                # seconds, same code

One command runs everything still to do, in order, and can be killed at any time: rerunning it
skips finished stages, resumes an interrupted training from its last checkpoint (model,
optimizer, RNG, data position; bit for bit) and an interrupted datastore build from its last
committed rows, and recomputes only task results whose JSON is missing. The settings are fixed by
the first run (``<workdir>/settings.json``); a rerun with different ones is refused.

Stages (``--plan`` prints each with its status and an estimated CPU time):

``text``            the training text = the documents of the SmolLM2 datastore ``--text-from``
                    (its first 1,100,000 SmolLM2 tokens of the stdlib train split: 236 whole files
                    and the head of a 237th), so that SmolLM2's datastore over exactly that text
                    already exists; the rest of the train split (the "more data" corpus), the
                    held-out stdlib test split, the Python-documentation domain, the control lines;
                    the family tokenizer (byte-level BPE, ``--vocab-size``) trained on the training
                    text, and the training stream (documents joined with EOS).
``train:<model>``   one family model (``<size>-s<seed>``) trained ``--epochs`` whole epochs of the
                    training stream (``experiments.train_family.EpochBatches``).
``eval:<model>``    its datastore over its whole training text (the standard setting), then the
                    tasks: in_domain_ppl, rare_token_ppl, verbatim_recall, control,
                    domain_adaptation, overlap, meta. Each model is evaluated as soon as it is
                    trained, so partial results accumulate.
``more:<model>``    seed-0 models: a datastore over the whole train split (training text + the rest,
                    ``knnlm.merge_datastores``) and in-domain perplexity with it (more data than
                    the model was trained on).
``ref:smollm2``     SmolLM2-135M with its existing datastore ``--text-from`` (same text), same tasks.
``ref:gemma3-270m`` Gemma-3-270M (``<bos>`` in every window: checked), its datastore built over the
                    same training text (``--gemma-max-tokens`` caps it; recorded). Last: slowest.
``summary``         results/summary.json (+ summary.md tables rendered from it, plots); also
                    refreshed after every other stage.

See docs/memorization.md ("The standard setting").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from experiments import train_family as TF  # noqa: E402
from experiments.common import command_line, logger, write_json  # noqa: E402
from experiments.memorization import documents as D  # noqa: E402
from experiments.memorization import tasks as T  # noqa: E402
from knnlm.data import tokenizer_bos  # noqa: E402

__all__ = ["Settings", "Pipeline", "main", "FAMILY_TASKS", "REFERENCE_TEXT"]

MODULE = "experiments.memorization.standard"
REFERENCE_TEXT = "runs/stdlib-1m"  # SmolLM2 datastore over the first 1.1M tokens of the train split
FAMILY_TASKS = ("in_domain_ppl", "rare_token_ppl", "verbatim_recall", "control", "domain_adaptation", "overlap",
                "meta")
log = logger("standard")

# Throughput used by --plan's estimates (2-core CPU, one model at a time). Training: measured on
# this machine at 4,096 tokens per step (0.29M params 4,750 tokens/s, 1.0M 2,790, 1.9M 2,050,
# 4.2M 1,020), fitted as tokens/s = 4,750 (params / 0.29M)^-0.6. Forward passes (datastore
# builds, evals): 3x the training speed for the family; SmolLM2-135M 340 tokens/s building,
# 530 evaluating; Gemma-3-270M ~140 / ~180. kNN search and scoring: ~2 ms per token (assumed;
# replaced by the mean of the finished in-domain evals). Recall: ~0.12 s per greedy step of
# a 16-passage batch plus the forward; control: ~0.08 s per short document per eval.
# Once a model is trained its measured training speed replaces the fit.
SPEED = {"train_tps_0": 4750.0, "train_params_0": 288_928, "train_exponent": -0.6, "forward_factor": 3.0,
         "knn_s_per_token": 2e-3, "smollm2": (340.0, 530.0), "gemma3-270m": (450.0, 90.0),
         "smoke-ref": (20000.0, 20000.0), "ref_bytes_per_token": 3.6,
         "generate_step_s": 0.12, "short_document_s": 0.08}  # measured on the 0.3m preset (shared CPU)
# (build, forward) tokens/s of the references, measured in their stages here: a build stops before the LM head,
# so Gemma's 262,144-token head slows only its evals (90 tok/s; extraction 400-530 tok/s)


# ------------------------------------------------------------------------------------ settings

@dataclass
class Settings:
    """Everything that fixes the results; saved to ``<workdir>/settings.json`` by the first run."""
    tiny: bool = False
    sizes: list = field(default_factory=lambda: ["0.3m", "0.6m", "1.2m", "2.5m", "5m", "10m"])
    extra_seeds: dict = field(default_factory=lambda: {"0.3m": [1], "0.6m": [1]})  # beyond seed 0
    epochs: int = 1
    vocab_size: int = 8192
    text_from: str | None = REFERENCE_TEXT  # None: the leading train-split files up to text_bytes
    text_bytes: int | None = None
    rest_bytes: int | None = None  # cap on the "more data" rest of the train split (None: all of it)
    eval_bytes: int | None = None  # cap on the held-out stdlib test split (None: all 27 files)
    domain: str = "python-doc"
    domain_ds_bytes: int = 500_000
    domain_eval_bytes: int = 150_000
    control_documents: int = 200
    recall_passages: int = 64
    recall_prefix: int = 32
    recall_continuation: int = 32
    recall_lambdas: list = field(default_factory=lambda: [0.25, 0.5, 0.75])
    lambdas: list = field(default_factory=lambda: [0.25, 0.1, 0.5, 0.75])  # the first is the primary
    temperatures: list = field(default_factory=lambda: [1.0, 0.5, 2.0, 5.0])
    context: int = 512  # datastore window, capped by each model's positions
    val_tokens: int = 65_536  # validation curve: leading tokens of the stdlib tune split
    references: list = field(default_factory=lambda: ["smollm2", "gemma3-270m"])
    gemma_max_tokens: int | None = None  # cap on Gemma's datastore (None: the whole training text)
    save_minutes: float = 3.0
    save_every_steps: int | None = None
    bootstrap: int = 1000
    seed: int = 0

    @classmethod
    def tiny_defaults(cls) -> Settings:
        return cls(tiny=True, sizes=["smoke-a", "smoke-b", "smoke-c"],
                   extra_seeds={"smoke-a": [1]}, vocab_size=384, text_from=None,
                   text_bytes=12_000, rest_bytes=6_000, eval_bytes=2_000, domain="auto", domain_ds_bytes=3_000,
                   domain_eval_bytes=1_500, control_documents=6, recall_passages=4, recall_prefix=8,
                   recall_continuation=8, context=64, val_tokens=2_000, references=["smoke-ref"],
                   save_every_steps=2, bootstrap=50)

    def models(self) -> list[tuple[str, str, int]]:
        """(name, size, seed) of every family model, smallest size first, seeds in order."""
        out = []
        for size in sorted(self.sizes, key=_approx_params):
            for seed in [0] + [s for s in self.extra_seeds.get(size, []) if s != 0]:
                out.append((f"{size}-s{seed}", size, seed))
        return out


def _approx_params(size: str) -> int:
    """Parameters of a preset with tied embeddings (exact for Llama without biases)."""
    p = TF.PRESETS[size]
    return p.hidden * (1 + 8192) + p.layers * (4 * p.hidden ** 2 + 3 * p.hidden * p.intermediate + 2 * p.hidden)


# Settings that may still change after the first run, as long as nothing was built with them
# (the path under the workdir that would exist).
LATE_SETTINGS = {"gemma_max_tokens": "ds/gemma3-270m"}


def resolve_settings(workdir: Path, tiny: bool, overrides: dict) -> Settings:
    """The run's settings: saved ones when ``workdir`` has them (explicit options that differ are
    refused, except ``LATE_SETTINGS`` whose work has not started: they are updated), else the
    defaults (``tiny`` or real) with ``overrides``."""
    path = workdir / "settings.json"
    if path.exists():
        saved = json.loads(path.read_text())
        for k, where in LATE_SETTINGS.items():
            if k in overrides and saved.get(k) != overrides[k] and not (workdir / where).exists():
                log(f"{k}: {saved.get(k)!r} -> {overrides[k]!r} (nothing was built with it yet)")
                saved[k] = overrides[k]
                write_json(path, saved)
        differ = {k: (saved.get(k), v) for k, v in overrides.items() if saved.get(k) != v}
        if saved.get("tiny") != tiny:
            differ["tiny"] = (saved.get("tiny"), tiny)
        if differ:
            what = ", ".join(f"{k}: {a!r} in settings.json, {b!r} asked" for k, (a, b) in differ.items())
            raise SystemExit(f"{workdir} was started with other settings ({what}); rerun with the same options "
                             f"(or none), or use another --workdir")
        return Settings(**saved)
    s = Settings.tiny_defaults() if tiny else Settings()
    for k, v in overrides.items():
        setattr(s, k, v)
    unknown = [x for x in s.sizes if x not in TF.PRESETS]
    if unknown:
        raise SystemExit(f"--sizes: unknown preset(s) {', '.join(unknown)}; choose from {', '.join(TF.PRESETS)}")
    if s.epochs < 1:
        raise SystemExit(f"--epochs must be at least 1, got {s.epochs}")
    return s


# ---------------------------------------------------------------------------------- stages

@dataclass
class Stage:
    name: str
    status: Callable[[], str]  # "done" | "partial" | "todo"
    estimate: Callable[[], float]  # seconds of CPU still needed (an estimate)
    run: Callable[[], None]
    note: str = ""


def _fmt_s(s: float) -> str:
    return f"{s / 3600:.2f} h" if s >= 3600 else f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s"


class Pipeline:
    """The stages of one run over ``workdir`` (datastores, checkpoints, texts) writing results
    to ``results``. ``interrupt``: (model name, step): a simulated kill during that model's
    training (tests)."""

    def __init__(self, settings: Settings, workdir: Path, results: Path, *, device: str = "cpu",
                 interrupt: tuple[str, int] | None = None, argv: list[str] | None = None):
        self.s, self.w, self.r, self.device = settings, Path(workdir), Path(results), device
        self.interrupt, self.argv = interrupt, argv
        self.progress = not settings.tiny
        self.text_dir, self.fam_dir, self.ds_dir = self.w / "text", self.w / "family", self.w / "ds"
        self._tok = self._stream = None

    # ----------------------------------------------------------------------- text stage

    def text_done(self) -> bool:
        return (self.text_dir / "text.json").exists() and (self.fam_dir / "data" / "train.npy").exists()

    def _training_documents(self) -> tuple[list[dict], list[dict], dict]:
        """(training documents, the rest of the train split, provenance)."""
        from knnlm.corpora import stdlib_files

        files = [f for f in stdlib_files("train")
                 if not f.replace(os.sep, "/").endswith(TF.EXCLUDED_FROM_TRAINING)]
        if self.s.text_from is None:
            docs = D.read_documents(files)
            train = D.take_bytes(docs, self.s.text_bytes)
            cut = train[-1]["name"].endswith("[:cut]")
            n_whole = len(train) - cut
            rest = ([{"name": docs[n_whole]["name"] + "[rest]",
                      "text": docs[n_whole]["text"][len(train[-1]["text"]):]}] if cut else []) + docs[len(train):]
            return train, D.take_bytes(rest, self.s.rest_bytes), {"source": "leading train-split files",
                                                                  "bytes": self.s.text_bytes}
        return self._documents_of_datastore(Path(self.s.text_from), files)

    def _documents_of_datastore(self, path: Path, files: list[str]) -> tuple[list[dict], list[dict], dict]:
        """The documents of the datastore at ``path`` as text: whole files where it holds the
        whole file, else its tokens decoded (checked to be the file's head and to re-encode to the
        same tokens)."""
        import knnlm.datastore

        ds = knnlm.open_datastore(path, require_index=False)
        sources = ds.header.corpus.sources
        tok = None
        train, cut_at = [], None
        for i, d in enumerate(ds.documents):
            src = sources[d["source"]]
            text = Path(src["path"]).read_text(encoding="utf-8")
            if i == len(ds.documents) - 1 and ds.header.build.get("max_tokens") == ds.header.tokens:
                if tok is None:
                    tok = _reference_tokenizer(ds)
                head = tok.decode(ds.document_tokens(i).tolist())
                if not text.startswith(head) or tok(head, add_special_tokens=False)["input_ids"] != \
                        ds.document_tokens(i).tolist():
                    raise SystemExit(f"{path}: the last document's tokens do not decode to the head of {src['path']}")
                if head != text:
                    cut_at = (src["path"], len(head))
                    text = head
            train.append({"name": d["name"], "text": text})
        names = {d["name"] for d in train}
        rest = []
        if cut_at is not None:
            full = Path(cut_at[0]).read_text(encoding="utf-8")
            rest.append({"name": cut_at[0] + "[rest]", "text": full[cut_at[1]:]})
        rest += [d for d in D.read_documents(files) if d["name"] not in names]
        prov = {"source": "the documents of a SmolLM2 datastore", "datastore": str(path),
                "smollm2_tokens": int(ds.header.tokens), "documents": len(train),
                "last_document_cut": None if cut_at is None else {"file": cut_at[0], "characters": cut_at[1]}}
        return train, D.take_bytes(rest, self.s.rest_bytes), prov

    def run_text(self) -> None:
        from knnlm.corpora import stdlib_files, stdlib_root

        td = self.text_dir
        train, rest, prov = self._training_documents()
        test = D.take_bytes(D.read_documents(stdlib_files("test"), stdlib_root()), self.s.eval_bytes)
        tune = D.read_documents(stdlib_files("tune"), stdlib_root())
        dname, ddocs, dsplit = D.domain_corpus(self.s.domain)
        dtrain, dtest = D.split_documents(ddocs)
        dtrain, dtest = D.take_bytes(dtrain, self.s.domain_ds_bytes), D.take_bytes(dtest, self.s.domain_eval_bytes)
        control = T.control_documents(self.s.control_documents, seed=self.s.seed)
        for name, docs in (("train", train), ("rest", rest), ("eval", test), ("domain_train", dtrain),
                           ("domain_eval", dtest), ("control", control), ("tune", tune)):
            D.write_jsonl(docs, td / f"{name}.jsonl")
        (td / "train.txt").write_text("".join(d["text"] for d in train), encoding="utf-8")
        shutil.rmtree(self.fam_dir / "tokenizer", ignore_errors=True)  # a kill may have left half of one
        self._tok = None
        tok = self.tokenizer(create=True)
        eos = tok.eos_token_id
        ids = [tok(d["text"], add_special_tokens=False)["input_ids"] for d in train]
        stream = np.concatenate([np.asarray(x + [eos], dtype=np.int32) for x in ids])
        val_ids = [i for d in tune for i in tok(d["text"], add_special_tokens=False)["input_ids"] + [eos]]
        data = self.fam_dir / "data"
        data.mkdir(parents=True, exist_ok=True)
        np.save(data / "val.npy", np.asarray(val_ids[: self.s.val_tokens], dtype=np.int32))
        np.save(data / "train.npy.tmp.npy", stream)
        os.replace(data / "train.npy.tmp.npy", data / "train.npy")
        info = {"training_text": {**prov, "documents": len(train), "bytes": D.nbytes(train),
                                  "family_tokens": int(len(stream) - len(train)),
                                  "family_stream_tokens": int(len(stream))},
                "rest": {"documents": len(rest), "bytes": D.nbytes(rest)},
                "eval": {"split": "stdlib test", "documents": len(test), "bytes": D.nbytes(test)},
                "domain": {"name": dname, "split": dsplit, "datastore_documents": len(dtrain),
                           "datastore_bytes": D.nbytes(dtrain), "eval_documents": len(dtest),
                           "eval_bytes": D.nbytes(dtest)},
                "control": {"documents": len(control), "answer_bytes": sum(len(d["answer"].encode()) for d in control)},
                "validation": {"split": "stdlib tune", "tokens": min(len(val_ids), self.s.val_tokens)}}
        write_json(td / "text.json", info)

    def docs(self, name: str) -> list[dict]:
        path = self.text_dir / f"{name}.jsonl"
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]

    def tokenizer(self, create: bool = False):
        if self._tok is None:
            tdir = self.fam_dir / "tokenizer"
            if not (tdir / "tokenizer.json").exists():
                if not create:
                    raise SystemExit(f"{tdir} is missing: run the text stage first")
                TF.train_tokenizer([str(self.text_dir / "train.txt")], self.s.vocab_size, tdir)
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(tdir, local_files_only=True)
        return self._tok

    def stream(self) -> tuple[np.ndarray, np.ndarray]:
        if self._stream is None:
            d = self.fam_dir / "data"
            self._stream = (np.load(d / "train.npy"), np.load(d / "val.npy"))
        return self._stream

    def text_info(self) -> dict:
        p = self.text_dir / "text.json"
        return json.loads(p.read_text()) if p.exists() else {}

    # ---------------------------------------------------------------------- training

    def batches(self, size: str, seed: int) -> TF.EpochBatches:
        p = TF.PRESETS[size]
        return TF.EpochBatches(self.stream()[0], p.context, p.batch, self.s.epochs, seed)

    def trained(self, name: str) -> dict | None:
        return TF._finished(self.fam_dir / name)

    def run_train(self, name: str, size: str, seed: int) -> None:
        import torch

        train, val = self.stream()
        stop = self.interrupt[1] if self.interrupt and self.interrupt[0] == name else None
        TF.train_one(name, TF.PRESETS[size], self.tokenizer(), train, val, self.fam_dir, tokens=0, max_minutes=None,
                     seed=seed, device=torch.device(self.device), eval_every=5 if self.s.tiny else 100,
                     save_minutes=self.s.save_minutes, progress=self.progress, batches=self.batches(size, seed),
                     save_every_steps=self.s.save_every_steps, stop_after_steps=stop,
                     extra_info={"size": size, "validation": "stdlib tune split (leading tokens)"})

    def train_status(self, name: str) -> str:
        if self.trained(name):
            return "done"
        return "partial" if (self.fam_dir / name / "resume.pt").exists() else "todo"

    def train_tps(self, size: str, name: str | None = None) -> float:
        info = self.trained(name) if name else None
        if info:
            return float(info["tokens_per_second"])
        return SPEED["train_tps_0"] * (_approx_params(size) / SPEED["train_params_0"]) ** SPEED["train_exponent"]

    def stream_tokens(self) -> int:
        info = self.text_info().get("training_text")
        if info:
            return int(info["family_stream_tokens"])
        return int((self.s.text_bytes or 3_900_000) / 3.6)  # before the text stage: ~3.6 bytes per family token

    def train_estimate(self, name: str, size: str) -> float:
        if self.trained(name):
            return 0.0
        total = self.s.epochs * self.stream_tokens()
        done = 0.0
        resume = self.fam_dir / name / "resume.pt"
        if resume.exists():
            import torch

            try:
                st = torch.load(resume, map_location="cpu", weights_only=False)
                done = st["step"] / max(1, st["planned"])
            except Exception:  # a checkpoint being written: count it as not started
                done = 0.0
        return total * (1 - done) / self.train_tps(size, name)

    # ------------------------------------------------------------------------- models

    def load(self, name: str):
        """(model, tokenizer, kind, params-note) of a family model or a reference."""
        import knnlm.datastore

        if name in self.s.references:
            if name == "smoke-ref":
                from experiments.memorization.suite import make_smoke_reference

                load = make_smoke_reference(self.w, [str(self.text_dir / "train.txt")])
            elif name == "gemma3-270m":
                from experiments.memorization.suite import gemma_path

                load = gemma_path()
            else:
                load = name
            return knnlm.load_model(load, device=self.device)
        return knnlm.load_model(str(self.fam_dir / name), device=self.device)

    def eval_cfg(self, progress: bool | None = None):
        import knnlm.datastore

        return knnlm.EvalConfig(lambdas=tuple(self.s.lambdas), temperatures=tuple(self.s.temperatures),
                                per_document=True, progress=self.progress if progress is None else progress)

    def datastore(self, model, tok, corpus: str, out: Path, max_tokens: int | None = None):
        """The complete datastore at ``out``, else a (resumed) build over ``text/<corpus>.jsonl``."""
        import knnlm.datastore
        from experiments.memorization.suite import fit_context

        cfg = knnlm.BuildConfig(context=fit_context(model, tok, self.s.context), resume=True,
                                progress=self.progress, max_tokens=max_tokens)
        return knnlm.datastore.open_or_create(out, lambda: knnlm.build_datastore(
            model, tok, [str(self.text_dir / f"{corpus}.jsonl")], out, cfg))

    def train_datastore(self, name: str, model, tok):
        """The model's datastore over the training text: SmolLM2's existing one (``text_from``),
        else built (Gemma capped at ``gemma_max_tokens``)."""
        import knnlm.datastore

        if name == "smollm2" and self.s.text_from:
            ds = knnlm.open_datastore(self.s.text_from)
            return ds
        cap = self.s.gemma_max_tokens if name == "gemma3-270m" else None
        return self.datastore(model, tok, "train", self.ds_dir / name / "train", max_tokens=cap)

    # -------------------------------------------------------------------------- tasks

    def task_path(self, name: str, task: str) -> Path:
        return self.r / name / f"{task}.json"

    def tasks_left(self, name: str, tasks=FAMILY_TASKS) -> list[str]:
        return [t for t in tasks if not self.task_path(name, t).exists()]

    def _timed(self, name: str, task: str, fn) -> dict:
        t0 = time.time()
        res = fn()
        res["seconds"] = round(time.time() - t0, 2)
        res["model"] = name
        write_json(self.task_path(name, task), res)
        log(f"{name}: {task} done in {_fmt_s(res['seconds'])}")
        return res

    def run_eval(self, name: str) -> None:
        """The tasks of a family model or a reference whose JSON is missing. A tokenizer that adds
        ``<bos>`` (Gemma) must have it in front of every datastore and eval window (checked)."""
        left = self.tasks_left(name)
        if not left:
            return
        model, tok = self.load(name)
        model.eval()
        ds = self.train_datastore(name, model, tok)
        bos = tokenizer_bos(tok)
        if bos is not None and ds.header.window.bos != bos:  # Gemma: <bos> in front of every window
            raise SystemExit(f"{name}: its tokenizer adds <bos> {bos} but the datastore's windows have "
                             f"{ds.header.window.bos}; rebuild {ds.path}")
        ev, dev = self.docs("eval"), self.docs("domain_eval")
        cfg = self.eval_cfg()
        cached = self.task_path(name, "in_domain_ppl")
        if "in_domain_ppl" in left or ("rare_token_ppl" in left and not cached.exists()):
            in_dom = self._timed(name, "in_domain_ppl", lambda: T.in_domain_ppl(model, tok, ds, ev, cfg))
            if in_dom["window"]["bos"] != bos:
                raise SystemExit(f"{name}: the eval windows have <bos> {in_dom['window']['bos']}, expected {bos}")
        else:
            in_dom = json.loads(cached.read_text())
        if "rare_token_ppl" in left:
            self._timed(name, "rare_token_ppl", lambda: T.rare_token_ppl(in_dom))
        if "verbatim_recall" in left:
            s = self.s
            self._timed(name, "verbatim_recall", lambda: T.verbatim_recall(
                model, tok, ds, n_passages=s.recall_passages, prefix_tokens=s.recall_prefix,
                continuation_tokens=s.recall_continuation, lambdas=s.recall_lambdas, seed=s.seed, control_docs=ev))
        if "control" in left:
            self._timed(name, "control", lambda: T.control_task(model, tok, ds, self.docs("control"),
                                                                self.eval_cfg(progress=False)))
        dds = None
        if "domain_adaptation" in left or "overlap" in left:
            dds = self.datastore(model, tok, "domain_train", self.ds_dir / name / "domain")
        if "domain_adaptation" in left:
            info = self.text_info()["domain"]
            self._timed(name, "domain_adaptation", lambda: T.domain_adaptation(
                model, tok, dds, dev, cfg, domain=info["name"], split=info["split"]))
        if "overlap" in left:
            sets = {"stdlib_test": ev, "domain_eval": dev, "control": self.docs("control")}
            self._timed(name, "overlap", lambda: {"task": "overlap", "datastores": {
                "train": {k: T.ngram_overlap(ds, tok, v) for k, v in sets.items()},
                "domain": {k: T.ngram_overlap(dds, tok, v) for k, v in sets.items()}}})
        if "meta" in left:
            self._timed(name, "meta", lambda: self.meta(name, model, tok, ds))

    def meta(self, name: str, model, tok, ds) -> dict:
        params = sum(p.numel() for p in model.parameters())
        emb = model.get_input_embeddings().weight.numel()
        out = {"task": "meta", "params": int(params), "non_embedding_params": int(params - emb),
               "tokenizer_bos": tokenizer_bos(tok),
               "vocab_size": len(tok), "model_class": type(model).__name__, "datastore_tokens": int(ds.header.tokens),
               "datastore_keys": len(ds), "datastore_path": str(ds.path),
               "datastore_window": asdict(ds.header.window)}
        info = self.trained(name)
        if info is not None:  # a family model
            train = self.stream()[0]
            text_tokens = np.asarray(train)[np.asarray(train) != tok.eos_token_id]
            stored = np.concatenate([ds.document_tokens(i) for i in range(len(ds.documents))])
            out.update(kind="family", size=info["size"], seed=info["seed"], epochs=info["epochs"],
                       tokens_trained=info["tokens_trained"], tokens_trained_per_epoch=int(len(train) - 1),
                       training_text_tokens=int(len(text_tokens)), steps=info["steps"],
                       final_val_loss=info["final_val_loss"], train_seconds=info["seconds"],
                       train_tokens_per_second=info["tokens_per_second"],
                       datastore_is_training_text=bool(np.array_equal(stored, text_tokens)))
        else:
            out.update(kind="reference", training_text_tokens=None,
                       datastore_capped_at=self.s.gemma_max_tokens if name == "gemma3-270m" else None,
                       bos_in_every_window=ds.header.window.bos is not None)
        return out

    def eval_status(self, name: str, tasks=FAMILY_TASKS) -> str:
        left = self.tasks_left(name, tasks)
        if not left:
            return "done"
        return "partial" if len(left) < len(tasks) or (self.ds_dir / name).exists() else "todo"

    def knn_s_per_token(self) -> float:
        """kNN search + scoring seconds per eval token: measured by the finished in-domain evals
        (their mean), else ``SPEED``'s assumption."""
        rates = []
        for f in self.r.glob("*/in_domain_ppl.json"):
            res = json.loads(f.read_text())
            if res.get("tokens"):
                rates.append(res["timing"]["knn_seconds"] / res["tokens"])
        return float(np.mean(rates)) if rates else SPEED["knn_s_per_token"]

    def _eval_tokens(self) -> tuple[int, int]:
        info = self.text_info()
        return (info.get("eval", {}).get("bytes", 470_000), info.get("domain", {}).get("eval_bytes",
                                                                                     self.s.domain_eval_bytes))

    def eval_estimate(self, name: str, size: str | None) -> float:
        """Forward passes (datastores, evals, recall) at the model's speed, plus the kNN search."""
        left = self.tasks_left(name)
        if not left:
            return 0.0
        if size is not None:
            fwd = build = self.train_tps(size, name) * SPEED["forward_factor"]
            bpt = self.text_info().get("training_text", {}).get("bytes", 3.6e6) / max(1, self.stream_tokens())
        else:
            build, fwd = SPEED.get(name, (150.0, 180.0))
            bpt = SPEED["ref_bytes_per_token"]
        eval_b, dom_b = self._eval_tokens()
        knn = self.knn_s_per_token()
        dom_ds_b = self.text_info().get("domain", {}).get("datastore_bytes", self.s.domain_ds_bytes)
        t = 0.0
        if not (self.ds_dir / name / "train" / "index.faiss").exists() and not (name == "smollm2" and self.s.text_from):
            n = self.stream_tokens() if size else self.text_info().get("training_text", {}).get("bytes", 3.9e6) / bpt
            if name == "gemma3-270m" and self.s.gemma_max_tokens:
                n = min(n, self.s.gemma_max_tokens)
            t += n / build
        if "in_domain_ppl" in left:
            t += eval_b / bpt * (1 / fwd + knn)
        if "verbatim_recall" in left:  # greedy steps of 16 passages, with and without retrieval, 2 sets
            steps = 2 * (1 + len(self.s.recall_lambdas)) * -(-self.s.recall_passages // 16) * self.s.recall_continuation
            t += steps * (SPEED["generate_step_s"] + 16 / fwd)
        if "control" in left:  # two evals of short documents: per-document overhead dominates
            t += 2 * self.s.control_documents * SPEED["short_document_s"]
        if "domain_adaptation" in left:
            t += dom_ds_b / bpt / build + dom_b / bpt * (1 / fwd + knn)
        return t

    # ---------------------------------------------------------------------- more data

    def more_status(self, name: str) -> str:
        if self.task_path(name, "more_data").exists():
            return "done"
        return "partial" if (self.ds_dir / name / "rest").exists() or (self.ds_dir / name / "all").exists() else "todo"

    def run_more(self, name: str) -> None:
        import knnlm.datastore

        if self.task_path(name, "more_data").exists():
            return
        model, tok = self.load(name)
        model.eval()
        train_ds = self.train_datastore(name, model, tok)
        all_path = self.ds_dir / name / "all"
        rest_path = self.ds_dir / name / "rest"

        def merge():
            rest = self.datastore(model, tok, "rest", rest_path)
            return knnlm.merge_datastores([train_ds, rest], all_path, progress=self.progress)

        all_ds = knnlm.datastore.open_or_create(all_path, merge, discard_incomplete=True)
        if rest_path.exists():
            shutil.rmtree(rest_path)  # its rows are in "all"

        def task():
            res = T.in_domain_ppl(model, tok, all_ds, self.docs("eval"), self.eval_cfg())
            sets = {"stdlib_test": self.docs("eval"), "domain_eval": self.docs("domain_eval"),
                    "control": self.docs("control")}
            res.update(task="more_data", training_text_tokens=int(train_ds.header.tokens),
                       overlap={k: T.ngram_overlap(all_ds, tok, v) for k, v in sets.items()})
            return res

        self._timed(name, "more_data", task)

    def more_estimate(self, name: str, size: str) -> float:
        if self.task_path(name, "more_data").exists():
            return 0.0
        fwd = self.train_tps(size, name) * SPEED["forward_factor"]
        info = self.text_info()
        rest_b = info.get("rest", {}).get("bytes", 7_000_000)
        bpt = info.get("training_text", {}).get("bytes", 3.6e6) / max(1, self.stream_tokens())
        eval_b, _ = self._eval_tokens()
        knn = self.knn_s_per_token()
        t = eval_b / bpt * (1 / fwd + knn)
        if not (self.ds_dir / name / "all" / "index.faiss").exists():
            t += rest_b / bpt / fwd
        return t

    # ------------------------------------------------------------------------ summary

    def run_summary(self) -> None:
        from experiments.memorization.standard_report import write_summary

        write_summary(self, command=command_line(MODULE, self.argv))

    # ------------------------------------------------------------------------- stages

    def stages(self) -> list[Stage]:
        st = [Stage("text", lambda: "done" if self.text_done() else "todo", lambda: 0.0 if self.text_done() else 60,
                    self.run_text, "corpora, control lines, family tokenizer, training stream")]
        for name, size, seed in self.s.models():
            st.append(Stage(f"train:{name}", lambda n=name: self.train_status(n),
                            lambda n=name, z=size: self.train_estimate(n, z),
                            lambda n=name, z=size, e=seed: self.run_train(n, z, e),
                            f"{_approx_params(size) / 1e6:.2f}M params, {self.s.epochs} epoch(s), seed {seed}"))
            st.append(Stage(f"eval:{name}", lambda n=name: self.eval_status(n),
                            lambda n=name, z=size: self.eval_estimate(n, z), lambda n=name: self.run_eval(n),
                            "datastore = its training text; " + ", ".join(FAMILY_TASKS)))
        refs = [r for r in self.s.references if r != "gemma3-270m"]
        more = [(name, size) for name, size, seed in self.s.models() if seed == 0]
        for ref in refs + ["more"] + [r for r in self.s.references if r == "gemma3-270m"]:
            if ref == "more":
                for name, size in more:
                    st.append(Stage(f"more:{name}", lambda n=name: self.more_status(n),
                                    lambda n=name, z=size: self.more_estimate(n, z), lambda n=name: self.run_more(n),
                                    "datastore = the whole train split"))
                continue
            note = "existing datastore " + str(self.s.text_from) if ref == "smollm2" and self.s.text_from else \
                "builds its datastore over the training text" + (
                    f" (capped at {self.s.gemma_max_tokens:,} tokens)" if ref == "gemma3-270m" and
                    self.s.gemma_max_tokens else "")
            st.append(Stage(f"ref:{ref}", lambda n=ref: self.eval_status(n), lambda n=ref: self.eval_estimate(n, None),
                            lambda n=ref: self.run_eval(n), note))
        st.append(Stage("summary", lambda: "done" if (self.r / "summary.json").exists() else "todo",
                        lambda: 0.0 if (self.r / "summary.json").exists() else 10, self.run_summary,
                        "summary.json, summary.md, plots (also after every stage)"))
        return st

    def plan(self) -> str:
        rows, total = [], 0.0
        for i, stage in enumerate(self.stages(), 1):
            status, est = stage.status(), stage.estimate()
            total += est
            rows.append(f"{i:3d}  {stage.name:22s} {status:8s} {_fmt_s(est):>10s}   {stage.note}")
        head = (f"workdir {self.w}  results {self.r}  epochs {self.s.epochs}  sizes {','.join(self.s.sizes)}\n"
                f"  #  stage                  status     est. CPU   what")
        return "\n".join([head, *rows, f"     total remaining (estimate): {_fmt_s(total)}"])

    def run(self, only: list[str] | None = None) -> None:
        stages = self.stages()
        if only:
            stages = [x for x in stages if any(x.name.startswith(o) for o in only)]
        t0 = time.time()
        for i, stage in enumerate(stages, 1):
            if stage.status() == "done" and stage.name != "summary":
                continue
            left = sum(x.estimate() for x in stages[i - 1:])
            log(f"stage {i}/{len(stages)} {stage.name}: est. {_fmt_s(stage.estimate())}, all remaining "
                f"est. {_fmt_s(left)} (elapsed {_fmt_s(time.time() - t0)})")
            stage.run()
            if stage.name not in ("text", "summary") and not self.s.tiny:
                self.run_summary()  # partial results accumulate (tiny runs: only at the end)
        log(f"done in {_fmt_s(time.time() - t0)}: {self.r / 'summary.json'}")


def _reference_tokenizer(ds):
    """The tokenizer of the model that built ``ds`` (from its header's model path)."""
    from transformers import AutoTokenizer

    where = Path(ds.header.model.name_or_path)
    ggufs = sorted(where.glob("*.gguf")) if where.is_dir() else []
    kwargs = {"gguf_file": ggufs[0].name} if len(ggufs) == 1 and not (where / "tokenizer.json").exists() else {}
    return AutoTokenizer.from_pretrained(str(where), local_files_only=True, **kwargs)


# --------------------------------------------------------------------------------- CLI

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/memorization-std", help="checkpoints, datastores, texts")
    p.add_argument("--results", default=None, help="results JSON + plots (default results/memorization/standard; "
                   "with --tiny <workdir>/results)")
    p.add_argument("--plan", action="store_true",
                   help="print every stage, its status and estimated CPU time; run nothing")
    p.add_argument("--stage", action="append", default=None,
                   help="run only these stages (a name or a prefix: text, train, eval:0.3m-s0, more, ref, summary); "
                        "repeatable")
    p.add_argument("--tiny", action="store_true", help="tiny models and texts: seconds, the same code paths")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    g = p.add_argument_group("settings (fixed by the first run; saved in <workdir>/settings.json)")
    g.add_argument("--sizes", default=None, help="comma list of train_family presets")
    g.add_argument("--epochs", type=int, default=None, help="training epochs over the training text (default 1)")
    g.add_argument("--text-from", default=None, help=f"datastore whose documents are the training text "
                   f"(default {REFERENCE_TEXT}); 'none': the leading train files up to --text-bytes")
    g.add_argument("--text-bytes", type=int, default=None)
    g.add_argument("--eval-bytes", type=int, default=None, help="cap on the held-out stdlib text (default: all)")
    g.add_argument("--gemma-max-tokens", type=int, default=None,
                   help="cap on Gemma-3-270M's datastore (default: the whole training text)")
    g.add_argument("--references", default=None, help="comma list (default smollm2,gemma3-270m; 'none')")
    return p


def _overrides(args) -> dict:
    o = {}
    if args.sizes:
        o["sizes"] = [x for x in args.sizes.split(",") if x]
    for k in ("epochs", "text_bytes", "eval_bytes", "gemma_max_tokens"):
        if getattr(args, k) is not None:
            o[k] = getattr(args, k)
    if args.text_from is not None:
        o["text_from"] = None if args.text_from == "none" else args.text_from
    if args.references is not None:
        o["references"] = [] if args.references == "none" else [x for x in args.references.split(",") if x]
    return o


def main(argv: list[str] | None = None, *, interrupt: tuple[str, int] | None = None) -> int:
    args = _parser().parse_args(argv)
    workdir = Path(args.workdir)
    results = Path(args.results) if args.results else (workdir / "results" if args.tiny
                                                        else Path("results/memorization/standard"))
    settings = resolve_settings(workdir, args.tiny, _overrides(args))
    if "gemma3-270m" in settings.references and not args.plan:
        from experiments.memorization.suite import gemma_path

        gemma_path()  # fail before hours of work, not after
    pipe = Pipeline(settings, workdir, results, device=args.device, interrupt=interrupt,
                    argv=argv if argv is not None else sys.argv[1:])
    if args.plan:
        print(pipe.plan())
        return 0
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    elif settings.tiny:
        torch.set_num_threads(1)
    workdir.mkdir(parents=True, exist_ok=True)
    if not (workdir / "settings.json").exists():
        write_json(workdir / "settings.json", asdict(settings))
    pipe.run(args.stage)
    return 0


if __name__ == "__main__":
    sys.exit(main())
