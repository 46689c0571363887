"""SIGKILL a `knnlm build-index` midway, resume it, and byte-compare with an uninterrupted build.

    python -m experiments.kill_resume_check --tokens 40000            # SmolLM2 on the stdlib train split
    python -m experiments.kill_resume_check --model DIR --data FILES  # any model / corpus

Waits until the interrupted build has committed some rows (header count > 0), kills it with
SIGKILL, checks that the partial datastore does not open as valid, resumes with --resume, and
compares every file of the two datastores. Exits 0 only if they are byte-identical.
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


def run(model: str, data: list[str], tokens: int, extra: list[str], workdir: Path) -> bool:
    base = [sys.executable, "-m", "knnlm.cli", "build-index", "--model", model, "--data", *data,
            "--max-tokens", str(tokens), "--quiet", "--index", "flat", *extra]
    full, part = workdir / "full", workdir / "part"
    t0 = time.time()
    subprocess.run([*base, "--out", str(full)], check=True, stdout=subprocess.DEVNULL)
    print(f"uninterrupted build: {time.time() - t0:.1f} s")
    proc = subprocess.Popen([*base, "--out", str(part)], stdout=subprocess.DEVNULL)
    while proc.poll() is None:
        count, total = _count(part)
        if total and 0 < count < total:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            print(f"killed with SIGKILL at {count:,}/{total:,} committed rows")
            break
        time.sleep(0.05)
    else:
        print("the build finished before it could be killed; use more --tokens", file=sys.stderr)
        return False
    try:
        knnlm.open_datastore(part)
        print("FAIL: the killed datastore opened as valid", file=sys.stderr)
        return False
    except knnlm.KnnlmError as e:
        print(f"partial datastore refused: {e}")
    subprocess.run([*base, "--out", str(part), "--resume"], check=True, stdout=subprocess.DEVNULL)
    same = True
    for name in FILES:
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
    p.add_argument("extra", nargs="*", help="more build-index options after --, e.g. -- --context 64")
    args = p.parse_args(argv)
    if args.data is None:
        from knnlm.corpora import stdlib_files

        args.data = stdlib_files("train")
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        ok = run(args.model, args.data, args.tokens, args.extra, Path(args.workdir))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            ok = run(args.model, args.data, args.tokens, args.extra, Path(tmp))
    print("byte-identical" if ok else "NOT byte-identical")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
