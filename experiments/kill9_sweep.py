"""kill -9 at every file operation of `knnlm build-index --overwrite`, `knnlm tune` and
`knnlm reindex --index-storage disk` on a tiny datastore (issue #31's acceptance).

    python -m experiments.kill9_sweep --out results/untrusted            # all three commands
    python -m experiments.kill9_sweep --commands reindex --work /tmp/k9  # one

How every file operation is hit: the command is run once under ``strace -f`` (every file system
call, no filter) to find the paths it touches in the datastore's area (the datastore directory,
what is inside it, the ``.NAME.*`` work directories beside it, the parent directory); then once
more with ``-P`` on exactly those paths, which lists the operations in order with their ordinal
per system call (strace counts injections per call and per tracee: every listed operation must
come from one thread, checked). Then, for each operation, a fresh copy of the starting datastore
and the command again under ``strace -e inject=CALL:signal=KILL:when=N -P ...``: SIGKILL on entry
to the N-th CALL on those paths, before it takes effect. System calls, so FAISS's C ``fopen`` /
``fwrite`` are covered like Python's. The calls: open / openat / creat, rename*, unlink*, mkdir*,
rmdir, truncate / ftruncate, fsync / fdatasync, msync, fallocate, link* / symlink*, flock, and
write / pwrite64: of a run of writes to one file, the first and the last (a kill between two
writes into a file is a kill between its open and its fsync / rename, covered by those). Writes
through a memory map (numpy memmaps, FAISS's on-disk lists) are no system call: the kills before
and after them are the ops that bracket them.

After each kill the datastore is opened and ``knnlm eval`` (in this process, ``knnlm.cli.main``,
the same code as the command line) scores a small held-out text; its perplexities (the LM alone,
the kNN-LM, the primary result, every grid cell: the gate's included) must equal those of the
datastore before the command, or those of the finished command's datastore (to 1e-9), with the
generation / index / gate that go with them. Anything else is a failure, printed and recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from experiments.common import logger

log = logger("kill9")
REPO = Path(__file__).resolve().parent.parent
CALLS = ("open,openat,creat,rename,renameat,renameat2,unlink,unlinkat,mkdir,mkdirat,rmdir,truncate,ftruncate,"
         "fsync,fdatasync,msync,fallocate,link,linkat,symlink,symlinkat,flock,write,pwrite64")
EVAL_TEXT_CHARS = 1500


def _py(*args: str) -> list[str]:
    return [sys.executable, "-m", "knnlm", *args]


def setup(work: Path) -> dict:
    """Tiny model, corpora, held-out texts, and the starting datastore (flat index, a gate)."""
    from knnlm.corpora import stdlib_root
    from knnlm.testing import copy_corpus, make_tiny_tokenizer, save_tiny_model

    work.mkdir(parents=True, exist_ok=True)
    model = work / "model"
    if not (model / "config.json").exists():
        save_tiny_model(model, make_tiny_tokenizer())
    copy_corpus(work / "corpus")  # the starting datastore's documents
    copy_corpus(work / "corpus2", ["keyword.py", "fnmatch.py", "bisect.py"])  # what --overwrite builds
    texts = {}
    for name, src, chars in (("heldout", "stat.py", EVAL_TEXT_CHARS), ("tune1", "copyreg.py", 4000),
                             ("tune2", "glob.py", 4000)):
        d = work / name
        d.mkdir(exist_ok=True)
        (d / f"{name}.py").write_text((stdlib_root() / src).read_text()[:chars])
        texts[name] = str(d / f"{name}.py")
    base = work / "base" / "ds"
    if not (base / "header.json").exists():
        shutil.rmtree(base.parent, ignore_errors=True)
        subprocess.run(_py("build-index", "--model", str(model), "--data", str(work / "corpus"), "--context", "64",
                           "--index", "flat", "--quiet", "--out", str(base)), check=True, cwd=REPO)
        subprocess.run(_py("tune", "--model", str(model), "--datastore", str(base), "--data", texts["tune1"],
                           "--quiet"), check=True, cwd=REPO)
    return {"model": str(model), "base": base, "texts": texts, "corpus2": str(work / "corpus2")}


def command(name: str, env: dict, ds: Path) -> list[str]:
    if name == "build-index":
        return _py("build-index", "--model", env["model"], "--data", env["corpus2"], "--context", "64", "--index",
                   "flat", "--quiet", "--out", str(ds), "--overwrite")
    if name == "tune":
        return _py("tune", "--model", env["model"], "--datastore", str(ds), "--data", env["texts"]["tune2"],
                   "--quiet")
    if name == "reindex":
        return _py("reindex", str(ds), "--index", "IVF4,Flat", "--index-storage", "disk", "--quiet")
    raise ValueError(name)


def fresh(env: dict, area: Path) -> Path:
    """A fresh copy of the starting datastore at ``area/ds`` (the area holds nothing else)."""
    shutil.rmtree(area, ignore_errors=True)
    area.mkdir(parents=True)
    shutil.copytree(env["base"], area / "ds")
    return area / "ds"


def state(env: dict, ds: Path, out_json: Path) -> dict:
    """What a reader gets from ``ds`` now: the header's generation / index / gate and ``knnlm
    eval``'s perplexities (or the one-line error, under ``error``)."""
    import contextlib
    import io

    from knnlm.cli import main
    from knnlm.datastore import open_datastore, read_gate

    try:
        d = open_datastore(ds)
        _ = d.index
        if d.header.gate:
            read_gate(d)
        who = {"generation": d.header.generation, "index": (d.header.index or {}).get("file"),
               "gate": (d.header.gate or {}).get("sha256")}
    except Exception as e:  # noqa: BLE001 - recorded as a failure
        return {"error": f"{type(e).__name__}: {e}"}
    out_json.unlink(missing_ok=True)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(["eval", "--model", env["model"], "--datastore", str(ds), "--data", env["texts"]["heldout"],
                   "--quiet", "--output", str(out_json)])
    if rc != 0:
        return {"error": f"eval exit {rc}: {err.getvalue().strip()[-300:]}"}
    return {**who, "ppl": perplexities(json.loads(out_json.read_text()))}


def perplexities(res: dict) -> dict:
    """Every perplexity in an eval result, by its JSON path."""
    out = {}

    def walk(v, where):
        if isinstance(v, dict):
            for k, x in v.items():
                walk(x, f"{where}.{k}" if where else k)
        elif isinstance(v, list):
            for i, x in enumerate(v):
                walk(x, f"{where}[{i}]")
        elif isinstance(v, float) and re.search(r"(^|[._])ppl", where.rsplit(".", 1)[-1]):
            out[where] = v
    walk({k: res[k] for k in ("ppl_base", "ppl_knn", "primary", "best", "grid") if k in res}, "")
    return out


def same(a: dict, b: dict, *, generation: bool = True) -> bool:
    """``a`` is the reader's view ``b``: the same index file and gate, the same perplexities (to
    1e-9), and (``generation``) the same generation id (a finished build or reindex draws a new
    random one each run: the new datastore is compared without it, but must not carry the old
    one; tune keeps the generation)."""
    if "error" in a or "error" in b or a.keys() != b.keys():
        return False
    if (a["index"], a["gate"]) != (b["index"], b["gate"]) or generation and a["generation"] != b["generation"]:
        return False
    pa, pb = a["ppl"], b["ppl"]
    return pa.keys() == pb.keys() and all(abs(pa[k] - pb[k]) <= 1e-9 * max(1.0, abs(pb[k])) for k in pa)


_PATH = re.compile(r'"(/[^"]*)"|<(/[^>]*)>')
_LINE = re.compile(r"^(\d+)\s+(\w+)\(")


def trace(cmd: list[str], log_path: Path, paths: list[str] | None, extra: list[str] = ()) -> int:
    st = ["strace", "-f", "-qq", "-y", "-s", "200", "-o", str(log_path), "-e", f"trace={CALLS}"]
    for p in paths or ():
        st += ["-P", p]
    return subprocess.run([*st, *extra, *cmd], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True).returncode


def operations(log_path: Path, area: Path) -> list[tuple[str, str, str]]:
    """(pid, call, line) of each traced call that names a path in ``area``."""
    ops = []
    for line in log_path.read_text().splitlines():
        m = _LINE.match(line)
        if not m or "resumed>" in line:
            continue
        names = [a or b for a, b in _PATH.findall(line)]
        if any(n == str(area) or n.startswith(str(area) + "/") for n in names):
            ops.append((m.group(1), m.group(2), line))
    return ops


def targets(ops: list[tuple[str, str, str]]) -> list[tuple[str, int, str]]:
    """The kills: (call, ordinal among that call's traced invocations, line) for each operation,
    writes thinned to the first and last of each run into one file."""
    seen, out = Counter(), []
    fd_of = re.compile(r"^\d+\s+\w+\((\d+<[^>]*>)")
    for i, (_, call, line) in enumerate(ops):
        seen[call] += 1
        if call in ("write", "pwrite64"):
            me = fd_of.match(line)
            prev = fd_of.match(ops[i - 1][2]) if i and ops[i - 1][1] in ("write", "pwrite64") else None
            nxt = fd_of.match(ops[i + 1][2]) if i + 1 < len(ops) and ops[i + 1][1] in ("write", "pwrite64") else None
            inner = (prev and me and prev.group(1) == me.group(1)) and (nxt and me and nxt.group(1) == me.group(1))
            if inner:
                continue
        out.append((call, seen[call], line))
    return out


def sweep(name: str, env: dict, work: Path, limit: int | None) -> dict:
    area = work / "area" / name
    result_json = work / f"eval-{name}.json"
    ds = fresh(env, area)
    before = state(env, ds, result_json)
    assert "error" not in before, before
    # 1. every file call of the command, unfiltered: the paths of the datastore's area
    t0 = time.time()
    rc = trace(command(name, env, ds), work / f"{name}.all.strace", None)
    assert rc == 0, f"{name} failed untraced-kill run (exit {rc})"
    ops = operations(work / f"{name}.all.strace", area)
    paths = sorted({n for _, _, line in ops for a, b in _PATH.findall(line) for n in [a or b]
                    if n == str(area) or n.startswith(str(area) + "/")})
    seconds = time.time() - t0
    # 2. the same with -P on those paths: the operations as strace counts them for injection
    ds = fresh(env, area)
    rc = trace(command(name, env, ds), work / f"{name}.P.strace", paths)
    assert rc == 0
    after = state(env, ds, result_json)
    assert "error" not in after, after
    counted = []
    for line in (work / f"{name}.P.strace").read_text().splitlines():
        m = _LINE.match(line)
        if m and "resumed>" not in line:
            counted.append((m.group(1), m.group(2), line))
    pids = Counter(p for p, _, _ in counted)
    kills = targets(counted)
    if limit:
        kills = kills[:limit]
    log(f"{name}: {len(ops)} file operations in its area ({len(counted)} with -P, threads {dict(pids)}), "
        f"{len(kills)} kills, ~{seconds:.1f} s per run")
    rows, failures = [], []
    for i, (call, nth, line) in enumerate(kills):
        ds = fresh(env, area)
        rc = trace(command(name, env, ds), Path(os.devnull), paths,
                   ["-e", f"inject={call}:signal=KILL:when={nth}"])
        got = state(env, ds, result_json)
        kind = "old" if same(got, before) else "new" if same(got, after, generation=False) and (
            after["generation"] == before["generation"] or got["generation"] != before["generation"]) else "FAIL"
        op = re.sub(r"^\d+\s+", "", line)[:160]
        rows.append({"kill": i + 1, "call": call, "nth": nth, "op": op, "exit": rc, "result": kind,
                     **({"got": got} if kind == "FAIL" else {})})
        if kind == "FAIL":
            failures.append(rows[-1])
            log(f"  FAIL kill {i + 1} at {op}: exit {rc}, {got.get('error') or got}")
        elif rc not in (137, -9):
            log(f"  kill {i + 1} at {op}: exit {rc} (no SIGKILL: the call was not reached)")
    counts = Counter(r["result"] for r in rows)
    return {"command": " ".join(command(name, env, Path("DS"))).replace(sys.executable, "python"),
            "file_operations": len(counted), "calls": dict(Counter(c for _, c, _ in counted)),
            "threads": len(pids), "kills": len(rows), "sigkilled": sum(r["exit"] in (137, -9) for r in rows),
            "old_same_ppl": counts["old"], "new_same_ppl": counts["new"], "failures": counts["FAIL"],
            "before": before, "after": after, "rows": rows}


def report(name: str, r: dict) -> str:
    lines = [f"kill -9 sweep: knnlm {name}", f"command: {r['command']}",
             f"file operations on the datastore's paths: {r['file_operations']} {r['calls']} (threads: {r['threads']})",
             f"kills performed: {r['kills']} (killed by SIGKILL: {r['sigkilled']})",
             f"previous datastore opens, same perplexities: {r['old_same_ppl']}",
             f"new datastore opens, same perplexities as the finished command: {r['new_same_ppl']}",
             f"failures: {r['failures']}",
             f"before: generation {r['before']['generation']} index {r['before']['index']} gate "
             f"{(r['before']['gate'] or '-')[:12]} ppl_knn {r['before']['ppl'].get('ppl_knn')} primary "
             f"{r['before']['ppl'].get('primary.ppl')}",
             f"after:  generation {r['after']['generation']} index {r['after']['index']} gate "
             f"{(r['after']['gate'] or '-')[:12]} ppl_knn {r['after']['ppl'].get('ppl_knn')} primary "
             f"{r['after']['ppl'].get('primary.ppl')}", "",
             "kill  call       n  exit  reader sees      operation killed on entry"]
    for row in r["rows"]:
        lines.append(f"{row['kill']:4d}  {row['call']:9s} {row['nth']:3d}  {row['exit']:4d}  "
                     f"{row['result']:15s}  {row['op']}")
        if "got" in row:
            lines.append(f"      -> {row['got']}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results/untrusted")
    ap.add_argument("--work", default="/tmp/knnlm-kill9")
    ap.add_argument("--commands", default="build-index,tune,reindex")
    ap.add_argument("--limit", type=int, default=None, help="at most N kills per command (a smoke run)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = setup(work)
    bad = 0
    for name in args.commands.split(","):
        r = sweep(name, env, work, args.limit)
        (out / f"kill9_{name.replace('-', '_')}.txt").write_text(report(name, r))
        log(f"{name}: {r['kills']} kills: old {r['old_same_ppl']}, new {r['new_same_ppl']}, failures {r['failures']}")
        bad += r["failures"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
