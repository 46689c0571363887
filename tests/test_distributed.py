"""Sharded builds under torchrun (gloo on CPU): the same bytes as one process, resumable after a
rank is killed, refused when the ranks disagree."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from knnlm.distributed import SINGLE, World, agree, on_main, shard_range, world_from_env
from knnlm.errors import DistributedError

REPO = Path(__file__).resolve().parent.parent
FILES = ("keys.npy", "values.npy", "tokens.npy", "documents.json", "index.faiss")


# ------------------------------------------------------------------------------ pure functions

@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_shard_range_tiles_the_items_in_order_and_balances_the_weight(size):
    weights = [31, 31, 7, 31, 31, 31, 2, 31, 31, 12, 31]
    parts = [shard_range(weights, World(rank=r, size=size)) for r in range(size)]
    assert parts[0][0] == 0 and parts[-1][1] == len(weights)
    assert all(parts[i][1] == parts[i + 1][0] for i in range(size - 1))  # contiguous, no overlap, no gap
    share = sum(weights) / size
    for lo, hi in parts:
        assert abs(sum(weights[lo:hi]) - share) <= max(weights)  # balanced to one item


def test_shard_range_with_more_ranks_than_items_leaves_some_empty():
    parts = [shard_range([5, 5], World(rank=r, size=4)) for r in range(4)]
    assert sorted(i for lo, hi in parts for i in range(lo, hi)) == [0, 1]


def test_world_from_env():
    assert world_from_env({}) == SINGLE
    assert world_from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == World(1, 2, 1)
    with pytest.raises(DistributedError, match="RANK=2, WORLD_SIZE=2"):
        world_from_env({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(DistributedError, match="bad torchrun environment"):
        world_from_env({"WORLD_SIZE": "two"})


def test_a_world_of_one_needs_no_process_group():
    agree(SINGLE, {"anything": object()})  # nothing to compare with
    assert on_main(SINGLE, lambda: 42) == 42


# ------------------------------------------------------------------------------ torchrun builds

def _why(res: subprocess.CompletedProcess) -> str:
    """A failed torchrun's reason: every rank's error lines (torchrun prefixes them ``[rankN]:``),
    then the end of stderr (a failing rank's lines can be far from the end of it)."""
    lines = [ln for ln in res.stderr.splitlines() if re.match(r"\[rank\d+\]:", ln) and
             ("error" in ln.lower() or "Error" in ln)]
    return "\n".join(lines[-20:]) + "\n...\n" + res.stderr[-2000:]


def _build(args: list[str], nproc: int, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "knnlm", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", **(env or {})))


def test_two_ranks_build_the_same_bytes_as_one_and_a_killed_rank_resumes_to_them(
        tmp_path, slow_model_dir, corpus_dir):
    files = sorted(str(p) for p in corpus_dir.iterdir())
    # a trained, compressed index with on-disk lists: trained once by rank 0, filled by both ranks
    index = ["--index", "IVF16,PQ8", "--index-storage", "disk"]
    args = ["build-index", "--model", str(slow_model_dir), "--data", *files, "--max-tokens", "6000", "--quiet",
            "--context", "32", "--batch-size", "2", *index]
    one, two = tmp_path / "one", tmp_path / "two"
    # The one-process reference runs on one intra-op thread, as each torchrun rank does (torchrun sets
    # OMP_NUM_THREADS=1): a matmul's reduction order, and so the last bit of a fp16 key, can depend on
    # the thread count on some CPUs (seen on a Xeon with AMX: 1 ULP at one key with 2 threads vs 1).
    ref = subprocess.run([sys.executable, "-m", "knnlm", *args, "--out", str(one)], capture_output=True, text=True,
                         timeout=600, cwd=REPO, env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    assert ref.returncode == 0, ref.stderr[-3000:]
    res = _build([*args, "--out", str(two)], nproc=2)
    assert res.returncode == 0, _why(res)
    for name in (*FILES, "index.ivfdata"):
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    assert not list(two.glob("progress*")), "progress files are gone once every row is final"
    assert not list(two.glob(".index*")), "the index's work files are gone"
    assert res.stdout.count("datastore ") == 1, "only rank 0 prints the summary"

    # SIGKILL rank 1 midway; torchrun stops rank 0; `--resume` with two ranks finishes the same bytes
    res = subprocess.run([sys.executable, "-m", "experiments.kill_resume_check", "--model", str(slow_model_dir),
                          "--data", *files, "--tokens", "6000", "--nproc", "2", "--kill-rank", "1",
                          "--reference", str(one), "--workdir", str(tmp_path / "killed"),
                          "--", "--context", "32", "--batch-size", "2", *index],
                         capture_output=True, text=True, timeout=600, cwd=REPO,
                         env=dict(os.environ, HF_HUB_OFFLINE="1", KNNLM_COMMIT_SECONDS="0"))
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    assert re.search(r"killed rank 1 of 2 with SIGKILL after it recorded [0-9,]+/[0-9,]+ rows", res.stdout)
    assert "partial datastore refused" in res.stdout
    lines = res.stdout.splitlines()
    for name in (*FILES, "index.ivfdata"):
        assert any(re.fullmatch(rf"{re.escape(name)}\s+identical \([0-9,]+ bytes\)", ln) for ln in lines), name
    assert lines[-1] == "byte-identical"


def test_ranks_that_disagree_on_the_arguments_are_refused_before_anything_is_written(
        tmp_path, tiny_model_dir, corpus_dir):
    """Rank 1 gets another --batch-size (through a per-rank wrapper): every rank exits non-zero
    with the one-line reason, and --out is not created."""
    files = sorted(str(p) for p in corpus_dir.iterdir())
    wrapper = tmp_path / "per_rank.py"
    wrapper.write_text(
        "import os, sys\n"
        "from knnlm.cli import main\n"
        "argv = sys.argv[1:]\n"
        "if os.environ['RANK'] == '1':\n"
        "    argv[argv.index('--batch-size') + 1] = '4'\n"
        "sys.exit(main(argv))\n")
    out = tmp_path / "ds"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(wrapper),
           "build-index", "--model", str(tiny_model_dir), "--data", *files, "--out", str(out), "--index", "flat",
           "--batch-size", "2", "--quiet"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO,
                         env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert res.returncode != 0
    assert re.search(r"knnlm build-index: error: the ranks disagree on --batch-size: rank [01] has [24], rank [01] "
                     r"has [24]; start every rank with the same arguments", res.stderr), res.stderr[-3000:]
    assert not out.exists()


def test_commands_other_than_build_eval_and_tune_refuse_to_run_under_torchrun(tmp_path):
    res = subprocess.run([sys.executable, "-m", "knnlm", "info", str(tmp_path)], capture_output=True, text=True,
                         env=dict(os.environ, WORLD_SIZE="2", RANK="0"))
    assert res.returncode == 2
    assert "only build-index, eval, tune run over torchrun ranks" in res.stderr


# ------------------------------------------------------------------------------ resume with holes

def test_one_process_resumes_a_sharded_build_with_holes_to_the_same_bytes(tiny_model, tiny_tokenizer, corpus_dir,
                                                                          tmp_path, monkeypatch):
    """A sharded build killed midway leaves final rows that are not a prefix (rank 1's range
    recorded in its progress file). Resumed by one process, only the missing batches are
    computed, and the bytes equal an uninterrupted build."""
    import numpy as np

    from knnlm import build as build_mod
    from knnlm.build import build_datastore
    from knnlm.config import BuildConfig
    from knnlm.datastore import PROGRESS_RANK, DatastoreWriter, read_header

    cfg = dict(context=32, batch_size=2, index="flat", progress=False, max_tokens=3000)  # ~50 batches
    ref = build_datastore(tiny_model, tiny_tokenizer, [corpus_dir], tmp_path / "ref", BuildConfig(**cfg))

    # a build that stops after tokenizing; then "rank 1" has finished rows [a, b) of the middle
    part = tmp_path / "part"
    calls = []
    monkeypatch.setattr(build_mod, "_extract", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        build_datastore(tiny_model, tiny_tokenizer, [corpus_dir], part, BuildConfig(**cfg))
    except KeyboardInterrupt:
        pass
    monkeypatch.undo()
    follower = DatastoreWriter.follow(part)
    todo = build_mod._todo(follower.documents(), follower.done_rows(), read_header(part), 2)
    a, b = todo[3][0], todo[7][0]  # batches 3..6
    w = DatastoreWriter.follow(part)
    with w:
        w.write_rows(a, ref.keys[a:b].astype(np.float32))
        w.record(1, [[a, b]])
    assert (part / PROGRESS_RANK.format(1)).exists()

    real_batch_inputs = build_mod.batch_inputs

    def counting(batch, *args):
        calls.append(batch)
        return real_batch_inputs(batch, *args)

    monkeypatch.setattr(build_mod, "batch_inputs", counting)
    ds = build_datastore(tiny_model, tiny_tokenizer, [corpus_dir], part, BuildConfig(resume=True, **cfg))
    assert len(calls) == len(todo) - 4, "the four recorded batches are not recomputed"
    for name in FILES:
        assert (ref.path / name).read_bytes() == (ds.path / name).read_bytes(), name
    assert not list(part.glob("progress*"))
