"""Record, for draft-selection simulations, the kNN-LM's greedy output and every candidate draft
at every step, on tune-split prompts (not the sets reported in ../final/):

- ``datastore_tune``: 12 long stdlib datastore documents from token 256 (``docs[2::4]`` of the 64
  longest; the reported set is ``docs[::4]`` of the 32 longest);
- ``neardup_tune``: 4 prompts each from the held-out ``encodings/iso8859_6.py`` and ``iso8859_3.py``
  (the reported set uses ``cp874.py`` and ``kz1048.py``).

A candidate is what ``DatastoreDrafter`` looks at after step i (the kNN-LM chose token y_i): each
earlier occurrence of y_i in the sequence and each neighbour of step i whose value is y_i, with its
match length, its rank, its next 16 tokens and a distance (the neighbour's search distance; for the
sequence, the squared distance between the query key of step i and the key that predicted the
earlier occurrence).

    python results/speculative/selection/record.py /work/runs/stdlib-1m /work/runs/selection.json
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from knnlm import KNNLM, load_model, open_datastore  # noqa: E402
from knnlm.capture import capture_keys  # noqa: E402
from knnlm.corpora import stdlib_root  # noqa: E402
from knnlm.generate import DatastoreDrafter, KNNLogitsProcessor  # noqa: E402
from knnlm.retrieval import agreeing_run  # noqa: E402

PROMPT, NEW, AHEAD = 64, 64, 16


def prompts(ds, tok) -> dict[str, list[list[int]]]:
    docs = sorted(range(len(ds.documents)), key=lambda i: -ds.documents[i]["length"])[:64]
    out = {"datastore_tune": [ds.document_tokens(i)[256:256 + PROMPT].tolist() for i in docs[2::4]][:12]}
    near = []
    for f in ("encodings/iso8859_6.py", "encodings/iso8859_3.py"):
        ids = tok((stdlib_root() / f).read_text(encoding="utf-8"))["input_ids"]
        span = PROMPT + NEW
        step = max(span, (len(ids) - 256 - span) // 4)
        near += [ids[at:at + PROMPT] for at in range(256, len(ids) - span + 1, step)[:4]]
    out["neardup_tune"] = near
    return out


def candidates(knn, keys, seq, dists, rows) -> list:
    """(source, match, rank, next tokens, distance) of every candidate after ``seq``."""
    r = knn.retriever
    token, m = seq[-1], min(DatastoreDrafter.MATCH, seq.numel() - 1)
    recent = seq[seq.numel() - 1 - m: -1].flip(0)
    out = []
    at = (seq[:-1] == token).nonzero().squeeze(1)
    if at.numel():
        idx = at[:, None] - torch.arange(1, m + 1)
        run = 1 + agreeing_run(seq[idx.clamp(min=0)], idx >= 0, recent)
        kd = ((keys[(at - 1).clamp(min=0)] - keys[seq.numel() - 2]) ** 2).sum(-1)
        out += [("s", int(run[j]), -j, seq[int(at[j]) + 1: int(at[j]) + 1 + AHEAD].tolist(), float(kd[j]))
                for j in range(at.numel())]
    values = r._values[rows.clamp(min=0)]
    hit = ((rows >= 0) & (values == token)).nonzero().squeeze(1)
    if hit.numel():
        run = r.match_before(rows[hit], recent)
        out += [("d", int(run[j]), j, r.continuation(int(rows[hit[j]]), AHEAD).tolist(), float(dists[hit[j]]))
                for j in range(hit.numel())]
    return out


def main(datastore: str, dest: str) -> None:
    model, tok = load_model("smollm2")
    knn = KNNLM(model, open_datastore(datastore), tok, lam="adaptive", k=1024)
    out = {}
    for name, ps in prompts(knn.datastore, tok).items():
        out[name] = []
        for p in ps:
            proc = KNNLogitsProcessor(knn, record=NEW)
            seq = knn.generate(torch.tensor([p]), processor=proc, max_new_tokens=NEW, do_sample=False,
                               pad_token_id=0)[0]
            with torch.no_grad(), capture_keys(model, knn.key_layer) as cap:
                model(seq[None])
                keys = cap.pop()[0].float()  # (T, D)
            steps = [candidates(knn, keys, seq[:PROMPT + i + 1], d[0], rows[0])
                     for i, (d, rows) in enumerate(proc.records)]
            out[name].append({"y": seq[PROMPT:].tolist(), "steps": steps})
            print(name, len(out[name]), flush=True)
    Path(dest).write_text(json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:3])
