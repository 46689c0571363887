"""SIGKILL a `knnlm build-index` midway, resume it, and byte-compare with an uninterrupted build.

    python -m experiments.kill_resume_check --tokens 40000            # SmolLM2 on the stdlib train split
    python -m experiments.kill_resume_check --model DIR --data FILES  # any model / corpus
    python -m experiments.kill_resume_check --nproc 2 --kill-rank 1   # a torchrun build, one rank killed

Waits until the interrupted build has committed some rows (header count > 0; with ``--nproc``,
until rank ``--kill-rank`` has recorded rows in its progress file), kills it (that rank) with
SIGKILL, checks that the partial datastore does not open as valid, resumes with --resume (with
the same number of ranks), and compares every file with an uninterrupted *one-process* build.
Exits 0 only if they are byte-identical.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import knnlm

FILES = ("keys.npy", "values.npy", "tokens.npy", "documents.json", "index.faiss")


def _count(out: Path) -> tuple[int, int | None]:
    try:
        h = json.loads((out / "header.json").read_text())
        return int(h.get("count") or 0), h.get("total")
    except (OSError, ValueError):
        return 0, None


def _rank_pid(root: int, rank: int) -> int | None:
    """The pid of torchrun worker ``rank`` among the descendants of ``root`` (Linux /proc)."""
    parent = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    for pid in parent:
        p = pid
        while p in parent and p != root:
            p = parent[p]
        if p != root or pid == root:
            continue
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"TORCHELASTIC_RUN_ID" in b"".join(env):
            return pid
    return None


def run(model: str, data: list[str], tokens: int, extra: list[str], workdir: Path, nproc: int = 1,
        kill_rank: int = 0, reference: Path | None = None) -> bool:
    args = ["build-index", "--model", model, "--data", *data, "--max-tokens", str(tokens), "--quiet",
            "--index", "flat", *extra]
    one = [sys.executable, "-m", "knnlm", *args]
    ranks = one if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                     "--nproc-per-node", str(nproc), "-m", "knnlm", *args]
    full, part = reference or workdir / "full", workdir / "part"
    if reference is None:
        t0 = time.time()
        subprocess.run([*one, "--out", str(full)], check=True, stdout=subprocess.DEVNULL)
        print(f"uninterrupted one-process build: {time.time() - t0:.1f} s")
    proc = subprocess.Popen([*ranks, "--out", str(part)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = part / f"progress.rank{kill_rank}.json"
    while proc.poll() is None:
        count, total = _count(part)
        if nproc == 1 and total and 0 < count < total:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            print(f"killed with SIGKILL at {count:,}/{total:,} committed rows")
            break
        if nproc > 1 and progress.exists() and (pid := _rank_pid(proc.pid, kill_rank)):
            rows = sum(b - a for a, b in json.loads(progress.read_text() or "[]"))
            os.kill(pid, signal.SIGKILL)
            proc.wait()  # torchrun stops the other ranks and fails
            print(f"killed rank {kill_rank} of {nproc} with SIGKILL after it recorded {rows:,}/{total:,} rows; "
                  f"torchrun exited {proc.returncode}")
            break
        time.sleep(0.02)
    else:
        print("the build finished before it could be killed; use more --tokens", file=sys.stderr)
        return False
    try:
        knnlm.open_datastore(part)
        print("FAIL: the killed datastore opened as valid", file=sys.stderr)
        return False
    except knnlm.KnnlmError as e:
        print(f"partial datastore refused: {e}")
    subprocess.run([*ranks, "--out", str(part), "--resume"], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL if nproc > 1 else None)
    same = True
    for name in [*FILES, *(["index.ivfdata"] if (full / "index.ivfdata").exists() else [])]:
        eq = (full / name).read_bytes() == (part / name).read_bytes()
        same &= eq
        print(f"{name:15} {'identical' if eq else 'DIFFERENT'} ({(full / name).stat().st_size:,} bytes)")
    return same


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.kill_resume_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--data", nargs="+", default=None, help="default: the stdlib train split")
    p.add_argument("--tokens", type=int, default=40_000)
    p.add_argument("--workdir", default=None, help="keep the two datastores here (default: a temp dir)")
    p.add_argument("--nproc", type=int, default=1, help="ranks of the interrupted build (torchrun, gloo)")
    p.add_argument("--kill-rank", type=int, default=0, help="with --nproc: the rank to SIGKILL")
    p.add_argument("--reference", default=None,
                   help="an uninterrupted one-process build of the same arguments to compare with (default: build it)")
    p.add_argument("extra", nargs="*", help="more build-index options after --, e.g. -- --context 64")
    args = p.parse_args(argv)
    if args.data is None:
        from knnlm.corpora import stdlib_files

        args.data = stdlib_files("train")
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        ok = run(args.model, args.data, args.tokens, args.extra, Path(args.workdir), args.nproc, args.kill_rank,
                     Path(args.reference) if args.reference else None)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            ok = run(args.model, args.data, args.tokens, args.extra, Path(tmp), args.nproc, args.kill_rank,
                     Path(args.reference) if args.reference else None)
    print("byte-identical" if ok else "NOT byte-identical")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
