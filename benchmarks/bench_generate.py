"""Greedy decoding throughput: ``model.generate`` vs ``KNNLM.generate``, measured side by side.

    python benchmarks/bench_generate.py --datastore runs/stdlib-1m --flat --max-new-tokens 32
    python benchmarks/bench_generate.py --tiny          # self-contained: tiny random model, seconds

For each batch size (left-padded prompts cut from the held-out stdlib files), it runs a warm-up,
then ``--repeats`` rounds of plain-then-kNN greedy generation of exactly ``--max-new-tokens``
tokens (``min_new_tokens`` = ``max_new_tokens`` on both sides, so EOS cannot end a run early),
and prints the median generated tokens/s of each side and the ratio kNN / plain.

``--flat`` searches an exact in-memory ``IndexFlatL2`` over the datastore's keys (the first
``--max-keys`` rows) instead of the datastore's own index; the neighbours' values are the same
rows'. ``--json`` saves the measurements.

``--draft-tokens N``: speculative decoding instead (batch 1, one prompt at a time): for each of
``--prompts`` prompts of ``--prompt-set`` (``heldout``: held-out stdlib files, many with
near-duplicates in a stdlib datastore; ``datastore``: the datastore's own documents; ``prose``:
English text from a file, ``--prose FILE``), plain ``model.generate``, plain kNN-LM greedy and
kNN-LM greedy with drafts of up to N tokens run back to back, in ``--repeats`` rounds; it prints
the tokens/s of each (all tokens over the sum of each prompt's median time), the speculative /
plain ratios, how many prompts gave token-identical output to plain kNN-LM greedy (in every
round), tokens per model forward, acceptance and searches per token::

    python benchmarks/bench_generate.py --datastore runs/stdlib-1m --draft-tokens 16 --prompt-set heldout
    python benchmarks/bench_generate.py --datastore runs/stdlib-1m --draft-tokens 16 --prompt-set prose \
        --prose handbook.txt
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY_FILES = ["bisect.py", "colorsys.py", "keyword.py", "fnmatch.py", "heapq.py", "textwrap.py"]


def _tiny_setup(workdir: Path):
    """A tiny BPE tokenizer and random Llama, and a flat datastore over a few stdlib files."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from knnlm.build import build_datastore
    from knnlm.config import BuildConfig
    from knnlm.corpora import stdlib_root

    files = [str(stdlib_root() / f) for f in TINY_FILES]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train(files, trainers.BpeTrainer(vocab_size=512, special_tokens=["<pad>", "<s>", "</s>"],
                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
                                   pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ds = build_datastore(model, tok, files, workdir / "ds", BuildConfig(context=128, index="flat", progress=False))
    return model, tok, ds


def _prompts(tok, n: int, max_tokens: int) -> list[str]:
    """``n`` prompts of different lengths (<= max_tokens tokens) from the held-out stdlib files."""
    from knnlm.corpora import stdlib_files

    out = []
    for path in stdlib_files("test"):
        text = Path(path).read_text(encoding="utf-8", errors="replace")
        ids = tok(text)["input_ids"]
        if len(ids) < max_tokens:
            continue
        out.append(tok.decode(ids[: max_tokens - 8 * (len(out) % 4)]))
        if len(out) == n:
            return out
    raise SystemExit(f"not enough held-out stdlib files with {max_tokens} tokens")


def _flat_index(ds, max_keys: int | None):
    import faiss
    import numpy as np

    n = len(ds) if max_keys is None else min(max_keys, len(ds))
    index = faiss.IndexFlatL2(ds.dim)
    for lo in range(0, n, 1 << 16):
        index.add(np.ascontiguousarray(ds.keys[lo: min(n, lo + (1 << 16))], dtype=np.float32))
    return index


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datastore", help="datastore directory (not with --tiny)")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="model weights dtype, as knnlm's --dtype (default: %(default)s: float32 on CPU)")
    p.add_argument("--tiny", action="store_true", help="tiny random model + tiny flat datastore, built on the fly")
    p.add_argument("--batch-sizes", default="1,8", help="comma list (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=64, help="longest prompt, in tokens (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--k", type=int, default=None, help="neighbours (default: 1024 capped at the datastore size)")
    p.add_argument("--nprobe", type=int, default=None)
    p.add_argument("--lambda", dest="lam", default="0.25",
                   help="a fixed lambda, or 'adaptive' (the datastore's tuned gate) (default: %(default)s)")
    p.add_argument("--flat", action="store_true", help="exact in-memory flat index over the datastore's keys")
    p.add_argument("--max-keys", type=int, default=None, help="with --flat: index only the first N keys")
    p.add_argument("--threads", type=int, default=None, help="torch / FAISS threads (default: torch's)")
    p.add_argument("--json", default=None, help="write the measurements here")
    p.add_argument("--draft-tokens", type=int, default=0, help="speculative decoding mode (see above)")
    p.add_argument("--prompt-set", choices=["heldout", "datastore", "prose"], default="heldout")
    p.add_argument("--draft-from", choices=["both", "datastore", "sequence"], default="both",
                   help="speculative mode, an ablation: draft only from the datastore's neighbours or only from "
                        "the sequence itself (default: %(default)s, as the library does)")
    p.add_argument("--prompts", type=int, default=8, help="speculative mode: prompts (default: %(default)s)")
    p.add_argument("--prompt-offset", type=int, default=256,
                   help="speculative mode: where in each document a prompt starts, in tokens (default: %(default)s)")
    p.add_argument("--prose", default=None, help="--prompt-set prose: a text file to cut the prompts from")
    p.add_argument("--prompt-files", nargs="+", default=None,
                   help="--prompt-set heldout: these files instead of the first held-out stdlib files")
    p.add_argument("--prompts-per-file", type=int, default=1,
                   help="--prompt-set heldout: prompts from each file, evenly spaced after --prompt-offset")
    args = p.parse_args(argv)
    from knnlm.config import parse_lambda

    args.lam = parse_lambda(args.lam, "--lambda")
    if args.tiny == bool(args.datastore):
        p.error("give --datastore DIR, or --tiny")

    import torch

    from knnlm.model import KNNLM

    if args.threads:
        import faiss

        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    tmp = None
    if args.tiny:
        tmp = tempfile.TemporaryDirectory(prefix="bench-generate-")
        model, tok, ds = _tiny_setup(Path(tmp.name))
        what = f"tiny random Llama, {len(ds):,}-key datastore over {len(TINY_FILES)} stdlib files"
    else:
        from knnlm.datastore import open_datastore
        from knnlm.loading import load_model

        ds = open_datastore(args.datastore)
        model, tok = load_model(args.model, dtype=args.dtype)
        what = f"{args.model} ({next(model.parameters()).dtype}), datastore {args.datastore} ({len(ds):,} keys)"
    knn = KNNLM(model, ds, tok, lam=args.lam, k=args.k, nprobe=args.nprobe)
    if args.flat:
        knn.retriever.index = _flat_index(ds, args.max_keys)
    index_desc = f"{type(knn.retriever.index).__name__} ({knn.retriever.index.ntotal:,} vectors)"
    tok.padding_side = "left"
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if args.draft_tokens:
        return _speculative(args, model, tok, knn, ds, what, index_desc, pad)
    batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
    prompts = _prompts(tok, max(batch_sizes), args.prompt_tokens)
    n_new = args.max_new_tokens

    def timed(fn, enc, n):
        t0 = time.perf_counter()
        out = fn(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad)
        dt = time.perf_counter() - t0
        assert out.shape[1] == enc["input_ids"].shape[1] + n
        return dt

    print(f"{what}; index {index_desc}, k {knn.k}, lambda {args.lam}; greedy, {n_new} new tokens, "
          f"prompts <= {args.prompt_tokens} tokens, {torch.get_num_threads()} torch threads")
    print(f"{'batch':>5} {'plain tok/s':>12} {'kNN tok/s':>10} {'ratio':>7}")
    rows = []
    for b in batch_sizes:
        enc = tok(prompts[:b], return_tensors="pt", padding=True).to(model.device)
        for fn in (model.generate, knn.generate):  # warm-up (and the fused op's first load)
            timed(fn, enc, 2)
        plain, knn_t = [], []
        for _ in range(args.repeats):
            plain.append(timed(model.generate, enc, n_new))
            knn_t.append(timed(knn.generate, enc, n_new))
        tps_plain = b * n_new / statistics.median(plain)
        tps_knn = b * n_new / statistics.median(knn_t)
        rows.append({"batch": b, "plain_tokens_per_second": round(tps_plain, 2),
                     "knn_tokens_per_second": round(tps_knn, 2), "ratio": round(tps_knn / tps_plain, 3),
                     "plain_seconds": plain, "knn_seconds": knn_t})
        print(f"{b:>5} {tps_plain:>12.1f} {tps_knn:>10.1f} {tps_knn / tps_plain:>6.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"setup": what, "index": index_desc, "k": knn.k, "lambda": args.lam, "new_tokens": n_new,
                       "rows": rows, "command": " ".join(sys.argv)}, f, indent=1)
    if tmp is not None:
        tmp.cleanup()
    return 0


def _spec_prompts(args, tok, ds) -> list[tuple[str, list[int]]]:
    """(name, prompt ids) of ``--prompt-set``: ``--prompt-tokens`` tokens from ``--prompt-offset``."""
    from knnlm.corpora import stdlib_files

    want, off, n = args.prompt_tokens, args.prompt_offset, args.prompts
    if args.prompt_set == "prose":
        if not args.prose:
            raise SystemExit("--prompt-set prose needs --prose FILE")
        ids = tok(Path(args.prose).read_text(encoding="utf-8", errors="replace"))["input_ids"]
        step = max(want + args.max_new_tokens, len(ids) // (n + 1))
        return [(f"{args.prose}@{i * step}", ids[i * step: i * step + want]) for i in range(n)
                if len(ids) >= i * step + want]
    if args.prompt_set == "datastore":
        docs = sorted(range(len(ds.documents)), key=lambda i: -ds.documents[i]["length"])[: 4 * n]
        out = [(ds.documents[i]["name"], ds.document_tokens(i)[off: off + want].tolist()) for i in docs[::4]]
        return out[:n]
    out = []
    for path in args.prompt_files or stdlib_files("test"):
        ids = tok(Path(path).read_text(encoding="utf-8", errors="replace"))["input_ids"]
        span = want + args.max_new_tokens
        if len(ids) < off + span:
            continue
        step = max(span, (len(ids) - off - span) // max(args.prompts_per_file, 1))
        for at in range(off, len(ids) - span + 1, step)[: args.prompts_per_file]:
            out.append((f"{path}@{at}", ids[at: at + want]))
        if len(out) >= n:
            break
    return out[:n]


def _speculative(args, model, tok, knn, ds, what, index_desc, pad) -> int:
    import torch

    from knnlm.generate import DatastoreDrafter, KNNLogitsProcessor, draft_summary

    if args.draft_from != "both":
        DatastoreDrafter.SOURCES = (args.draft_from,)
    n_new = args.max_new_tokens
    prompts = _spec_prompts(args, tok, ds)
    kw = dict(max_new_tokens=n_new, do_sample=False, pad_token_id=pad)
    print(f"{what}; index {index_desc}, k {knn.k}, lambda {args.lam}; greedy, batch 1, {n_new} new tokens, "
          f"median of {max(args.repeats, 1)} rounds, {len(prompts)} prompts of {args.prompt_tokens} tokens "
          f"({args.prompt_set}), drafts <= {args.draft_tokens}, {torch.get_num_threads()} torch threads, "
          f"drafts from {args.draft_from}")
    enc0 = torch.tensor([prompts[0][1]])
    model.generate(enc0, max_new_tokens=2, pad_token_id=pad)  # warm-up
    knn.generate(enc0, max_new_tokens=2, pad_token_id=pad, draft_tokens=args.draft_tokens)
    tot = {"plain": [0, 0.0], "knn": [0, 0.0], "spec": [0, 0.0]}
    rows, same, agg = [], 0, {"forwards": 0, "tokens": 0, "drafted": 0, "accepted": 0, "searches": 0,
                              "from_datastore": 0, "from_sequence": 0}
    print(f"{'prompt':<44} {'plain':>7} {'kNN':>7} {'spec':>7} {'x plain':>8} {'tok/fwd':>8} {'same':>5}")
    reps = max(args.repeats, 1)
    for name, ids in prompts:
        enc = torch.tensor([ids])
        secs, outs = {m: [] for m in tot}, {m: [] for m in tot}
        for _ in range(reps):  # rounds of the three modes back to back: a slow spell hits all three
            for mode in ("plain", "knn", "spec"):
                t0 = time.perf_counter()
                if mode == "plain":
                    out = model.generate(enc, attention_mask=torch.ones_like(enc), **kw)
                elif mode == "knn":
                    out = knn.generate(enc, attention_mask=torch.ones_like(enc), **kw)
                else:
                    proc = KNNLogitsProcessor(knn)
                    out = knn.generate(enc, attention_mask=torch.ones_like(enc), processor=proc,
                                       draft_tokens=args.draft_tokens, **kw)
                secs[mode].append(time.perf_counter() - t0)
                outs[mode].append(out[0, enc.shape[1]:].tolist())
        med = {m: statistics.median(secs[m]) for m in tot}
        count = {m: len(outs[m][0]) for m in tot}  # tokens generated (the first round's)
        for mode in tot:
            tot[mode][0] += count[mode]
            tot[mode][1] += med[mode]
        d = draft_summary(proc)
        for k in agg:
            agg[k] += d[k]
        ok = all(o == outs["knn"][0] for o in outs["knn"] + outs["spec"])  # every round's
        same += ok
        tps = {m: count[m] / med[m] for m in tot}
        rows.append({"prompt": name, "tokens_per_second": tps, "seconds": secs, "identical_to_knn": ok, "draft": d,
                     "tokens": count})
        print(f"{name[-44:]:<44} {tps['plain']:>7.1f} {tps['knn']:>7.1f} {tps['spec']:>7.1f} "
              f"{tps['spec'] / tps['plain']:>7.2f}x {d['tokens_per_forward']:>8.2f} {'yes' if ok else 'NO':>5}")
    t = {m: tot[m][0] / tot[m][1] for m in tot}
    summary = {"plain_tokens_per_second": t["plain"], "knn_tokens_per_second": t["knn"],
               "speculative_tokens_per_second": t["spec"], "speculative_vs_plain": t["spec"] / t["plain"],
               "speculative_vs_knn": t["spec"] / t["knn"], "identical_prompts": same, "prompts": len(prompts),
               "tokens_per_forward": agg["tokens"] / max(agg["forwards"], 1),
               "acceptance": agg["accepted"] / agg["drafted"] if agg["drafted"] else None,
               "searches_per_token": agg["searches"] / max(agg["tokens"], 1),
               "drafts_from_datastore": agg["from_datastore"], "drafts_from_sequence": agg["from_sequence"]}
    print(f"all: plain {t['plain']:.1f} tok/s, kNN-LM {t['knn']:.1f}, speculative {t['spec']:.1f} = "
          f"{summary['speculative_vs_plain']:.2f}x plain, {summary['speculative_vs_knn']:.2f}x kNN-LM; identical to "
          f"kNN-LM greedy on {same}/{len(prompts)} prompts; {summary['tokens_per_forward']:.2f} tokens per forward, "
          f"acceptance {summary['acceptance'] or 0:.2f}, {summary['searches_per_token']:.2f} searches per token; "
          f"drafts from the datastore {agg['from_datastore']}, from the sequence itself {agg['from_sequence']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"setup": what, "index": index_desc, "k": knn.k, "lambda": args.lam, "new_tokens": n_new,
                       "draft_tokens": args.draft_tokens, "draft_from": args.draft_from, "repeats": reps,
                       "prompt_set": args.prompt_set, "summary": summary, "rows": rows,
                       "command": " ".join(sys.argv)}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
