"""Issue #31's acceptance: each numbered case of "A datastore is an untrusted file you download"
re-run with the real command line on a crafted datastore (tiny random models, seconds each).

    python -m experiments.untrusted_acceptance --out results/untrusted
    python -m experiments.untrusted_acceptance --only 1a,2a   # some cases

Every case works in its own area: ``ds`` (the datastore, crafted) and ``sentinel`` beside it (a
victim file, the targets of planted links, what a crafted index names). Before and after the
commands, every entry of the area outside ``ds`` (recursively, links not followed) is listed with
its type and SHA-256 (a link: its target), so "outside unchanged" is a comparison of the two
listings. Disk full is a small tmpfs, read-only a read-only bind mount (root, Linux); concurrency
and kills are made deterministic with ``strace -e inject`` (a delay or a SIGKILL at one system
call on one path). Each case writes ``case_<id>.txt`` (commands, exit codes, the last lines of
stderr / stdout, its checks, the listings' digests); ``summary.md`` is the table.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from experiments.common import logger

log = logger("untrusted")
REPO = Path(__file__).resolve().parent.parent
SIGNALS = {-7: "SIGBUS", -9: "SIGKILL", -11: "SIGSEGV", -6: "SIGABRT", 135: "SIGBUS", 139: "SIGSEGV", 134: "SIGABRT"}
CASES: dict[str, tuple[str, Callable]] = {}


def case(cid: str, title: str):
    def deco(fn):
        CASES[cid] = (title, fn)
        return fn
    return deco


# ------------------------------------------------------------------ set-up and evidence


class Env:
    def __init__(self, work: Path):
        from knnlm.corpora import stdlib_root
        from knnlm.testing import copy_corpus, make_tiny_tokenizer, save_tiny_model

        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        tok = make_tiny_tokenizer()
        self.model = work / "model"
        if not (self.model / "config.json").exists():
            save_tiny_model(self.model, tok)
        self.gpt2 = work / "model-gpt2"  # n_positions 256
        if not (self.gpt2 / "config.json").exists():
            save_tiny_model(self.gpt2, tok, arch="gpt2")
        self.overflow = work / "model-fp16-overflow"  # the last FFN's input beyond float16's 65504
        if not (self.overflow / "config.json").exists():
            import torch

            from knnlm.testing import make_tiny_model
            m = make_tiny_model("llama")
            with torch.no_grad():
                m.model.layers[-1].post_attention_layernorm.weight.mul_(1e6)
            m.save_pretrained(self.overflow)
            tok.save_pretrained(self.overflow)
        self.corpus = copy_corpus(work / "corpus")
        self.corpus2 = copy_corpus(work / "corpus2", ["keyword.py", "fnmatch.py"])
        self.texts = {}
        for name, src, chars in (("heldout", "stat.py", 1500), ("tune1", "copyreg.py", 4000),
                                 ("tune2", "glob.py", 4000)):
            d = work / name
            d.mkdir(exist_ok=True)
            (d / f"{name}.py").write_text((stdlib_root() / src).read_text()[:chars])
            self.texts[name] = str(d / f"{name}.py")
        self.base = work / "base" / "ds"
        if not (self.base / "header.json").exists():
            cli("build-index", "--model", self.model, "--data", self.corpus, "--context", "64", "--index", "flat",
                "--quiet", "--out", self.base, check=True)
        self.gated = work / "base-gated" / "ds"
        if not (self.gated / "header.json").exists():
            shutil.rmtree(self.gated.parent, ignore_errors=True)
            self.gated.parent.mkdir(parents=True)
            shutil.copytree(self.base, self.gated)
            cli("tune", "--model", self.model, "--datastore", self.gated, "--data", self.texts["tune1"], "--quiet",
                check=True)
        self.other = work / "base-other" / "ds"  # the same model over other documents (merge)
        if not (self.other / "header.json").exists():
            cli("build-index", "--model", self.model, "--data", copy_corpus(work / "corpus3", ["abc.py", "opcode.py"]),
                "--context", "64", "--index", "flat", "--quiet", "--out", self.other, check=True)
        self.gpt2_ds = work / "base-gpt2" / "ds"
        if not (self.gpt2_ds / "header.json").exists():
            cli("build-index", "--model", self.gpt2, "--data", self.corpus2, "--context", "64", "--index", "flat",
                "--quiet", "--out", self.gpt2_ds, check=True)


def cli(*args, check=False, prefix=(), timeout=300, env=None):
    """``python -m knnlm ARGS`` (optionally under ``prefix``, e.g. strace): (cmd, rc, stdout, stderr)."""
    cmd = [*map(str, prefix), sys.executable, "-m", "knnlm", *map(str, args)]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, timeout=timeout, env=env)
    out, err = p.stdout.decode(errors="backslashreplace"), p.stderr.decode(errors="backslashreplace")
    if check and p.returncode != 0:
        raise RuntimeError(f"{cmd} failed ({p.returncode}): {err[-2000:]}")
    return cmd, p.returncode, out, err, p.stdout + p.stderr


def listing(root: Path, skip: list[Path]) -> dict[str, str]:
    """Every entry under ``root`` except those in ``skip`` (and what is in them): type and SHA-256
    or link target."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        d = Path(dirpath)
        dirnames[:] = [n for n in dirnames if d / n not in skip]
        for name in sorted(dirnames + filenames):
            p = d / name
            if p in skip:
                continue
            st = os.lstat(p)
            rel = str(p.relative_to(root))
            if os.path.islink(p):
                out[rel] = f"link -> {os.readlink(p)}"
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = f"file {st.st_size} {hashlib.sha256(p.read_bytes()).hexdigest()}"
    return out


def digest_dir(path: Path, lock: bool = True) -> dict[str, str]:
    """SHA-256 of each file in ``path``; ``lock`` False: without the writer lock ``.knnlm.lock``
    (a SIGKILLed writer cannot remove it; the kernel releases its flock, the next writer reuses it)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:16] for p in sorted(path.iterdir())
            if p.is_file() and (lock or p.name != ".knnlm.lock")}


class Case:
    """One case's area, commands and checks."""

    def __init__(self, env: Env, cid: str, title: str, out: Path):
        self.env, self.cid, self.title, self.out = env, cid, title, out
        self.area = env.work / "cases" / cid
        with contextlib.suppress(subprocess.CalledProcessError):
            for m in (self.area / "ds", self.area):  # mounts a failed earlier run left
                subprocess.run(["umount", str(m)], capture_output=True)
        shutil.rmtree(self.area, ignore_errors=True)
        self.sentinel = self.area / "sentinel"
        self.sentinel.mkdir(parents=True)
        self.victim = self.sentinel / "victim.txt"
        self.victim.write_text("precious user file\n")
        (self.sentinel / "notes").mkdir()
        (self.sentinel / "notes" / "a.txt").write_text("more user data\n")
        self.ds = self.area / "ds"
        self.outputs = [self.ds]  # the datastore and what the commands create as their output
        self.runs, self.checks, self.notes = [], {}, []
        self.key = None  # the run the summary shows (default: the first refused one, else the first)
        self.before = None

    def copy(self, src: Path | None = None) -> Path:
        shutil.copytree(src or self.env.base, self.ds)
        return self.ds

    def freeze(self) -> None:
        """The listing of everything outside the datastore, before the commands."""
        self.before = listing(self.area, self.outputs)

    def run(self, *args, prefix=(), env=None, label: str | None = None, key: bool = False):
        cmd, rc, out, err, raw = cli(*args, prefix=prefix, env=env)
        shown = " ".join(str(c).replace(sys.executable, "python").replace(str(self.env.work), "$W") for c in cmd)
        self.runs.append({"label": label, "cmd": shown, "rc": rc, "stdout": out, "stderr": err,
                          "esc_bytes": raw.count(b"\x1b")})
        if key:
            self.key = len(self.runs) - 1
        return rc, out, err

    def check(self, name: str, ok: bool) -> None:
        self.checks[name] = bool(ok)

    def one_line_refusal(self, rc: int, err: str, *words: str, name: str = "refused with one line") -> None:
        lines = [x for x in err.splitlines() if x.strip()]
        if self.key is None:
            self.key = len(self.runs) - 1
        self.check(name, rc == 2 and len(lines) == 1 and "error:" in lines[0]
                   and all(w in lines[0] for w in words))

    def finish(self) -> dict:
        after = listing(self.area, self.outputs)
        unchanged = after == self.before
        if not unchanged:
            changed = sorted(k for k in set(after) | set(self.before) if after.get(k) != self.before.get(k))
            self.notes.append(f"outside entries changed: {changed}")
        first = next((i for i, r in enumerate(self.runs) if not (r["label"] or "").startswith("set-up")), 0)
        main = self.runs[self.key if self.key is not None else first] if self.runs else \
            {"cmd": "-", "rc": None, "stderr": "", "stdout": ""}
        for r in self.runs:
            if r["rc"] in SIGNALS and r["label"] != "killed":
                self.check(f"no signal ({r['cmd'][:40]}...)", False)
        lines = [x for x in (main["stderr"] or main["stdout"]).splitlines() if x.strip()]
        res = {"case": self.cid, "title": self.title, "cmd": main["cmd"], "rc": main["rc"],
               "message": lines[-1] if lines else "", "outside_unchanged": unchanged,
               "checks_passed": all(self.checks.values()), "checks": self.checks}
        text = [f"case {self.cid}: {self.title}", ""]
        for r in self.runs:
            text += [f"$ {r['cmd']}" + (f"    # {r['label']}" if r["label"] else ""),
                     f"exit code: {r['rc']}" + (f" ({SIGNALS[r['rc']]})" if r["rc"] in SIGNALS else "")]
            for what in ("stderr", "stdout"):
                tail = [x for x in r[what].splitlines() if x.strip()][-6:]
                if tail:
                    text += [f"{what} (last {len(tail)} lines):"] + [f"  | {x}" for x in tail]
            if r["esc_bytes"]:
                text.append(f"ESC bytes (0x1b) in its output: {r['esc_bytes']}")
            text.append("")
        text += ["checks:"] + [f"  [{'ok' if v else 'FAILED'}] {k}" for k, v in self.checks.items()]
        mine = ", ".join(p.name for p in self.outputs)
        text += ["", f"outside the datastore ({mine}): {len(self.before)} entries before, {len(after)} after, "
                 f"{'identical (type, size, SHA-256 / link target)' if unchanged else 'CHANGED'}"]
        text += [f"  {k}: {v}" for k, v in sorted(after.items())]
        text += [f"note: {n}" for n in self.notes]
        (self.out / f"case_{self.cid}.txt").write_text(
            "\n".join(text).replace(str(self.env.work), "$W") + "\n")
        return res


def _edit_json(path: Path, edit) -> None:
    d = json.loads(path.read_text())
    edit(d)
    path.write_text(json.dumps(d, indent=1))


def _strace(*args: str, log_path: Path | None = None) -> list[str]:
    return ["strace", "-f", "-qq", "-e", "signal=none", "-o", str(log_path or os.devnull), *args]


def _eval(c: Case, ds: Path | None = None, label=None, out_json: Path | None = None):
    extra = ["--output", out_json] if out_json else []
    return c.run("eval", "--model", c.env.model, "--datastore", ds or c.ds, "--data", c.env.texts["heldout"],
                 "--quiet", *extra, label=label)


# ------------------------------------------------------------------ 1. writes through symlinks


def _link_case(c: Case, name: str, command: str):
    c.copy(c.env.gated if command == "tune" else None)
    (c.ds / name).unlink(missing_ok=True)
    (c.ds / name).symlink_to(c.victim)
    c.freeze()
    if command == "reindex":
        rc, _, err = c.run("reindex", c.ds, "--index", "flat", "--quiet")
    else:
        rc, _, err = c.run("tune", "--model", c.env.model, "--datastore", c.ds, "--data", c.env.texts["tune2"],
                           "--quiet")
    c.one_line_refusal(rc, err, "symbolic link", name)
    c.check("victim unchanged", c.victim.read_text() == "precious user file\n")
    c.check(f"{name} still the planted link (not replaced, not followed)", (c.ds / name).is_symlink())


@case("1a", "symlinked lock file (.knnlm.lock -> victim): knnlm reindex")
def c1a(c):
    _link_case(c, ".knnlm.lock", "reindex")


@case("1b", "symlinked temp header (header.json.tmp -> victim): knnlm reindex")
def c1b(c):
    _link_case(c, "header.json.tmp", "reindex")


@case("1c", "symlinked temp gate (gate.r1.json -> victim, the name tune writes next): knnlm tune")
def c1c(c):
    _link_case(c, "gate.r1.json", "tune")


@case("1d", "symlinked gate temp file (gate.json.tmp -> victim): knnlm tune")
def c1d(c):
    _link_case(c, "gate.json.tmp", "tune")


@case("1e", "keys.npy a symlink to a file outside (a copy of the keys): knnlm eval")
def c1e(c):
    c.copy()
    shutil.move(c.ds / "keys.npy", c.sentinel / "keys.npy")
    (c.ds / "keys.npy").symlink_to(c.sentinel / "keys.npy")
    c.freeze()
    rc, _, err = _eval(c)
    c.one_line_refusal(rc, err, "symbolic link")


# ------------------------------------------------------------------ 2. FAISS lists outside


def _ivf_on_disk(keys: np.ndarray, index_path: Path, lists_path: Path, nlist: int = 4) -> None:
    import faiss

    x = np.ascontiguousarray(keys, dtype=np.float32)
    index = faiss.IndexIVFFlat(faiss.IndexFlatL2(x.shape[1]), x.shape[1], nlist)
    index.train(x)
    lists = faiss.OnDiskInvertedLists(nlist, index.code_size, str(lists_path))
    index.replace_invlists(lists, True)
    lists.this.disown()
    index.add(x)
    faiss.write_index(index, str(index_path))


@case("2a", "index.faiss with on-disk lists at an absolute path outside (a 16-byte file), header says RAM: "
             "knnlm eval")
def c2a(c):
    c.copy()
    outside = c.sentinel / "outside.ivfdata"
    _ivf_on_disk(np.load(c.ds / "keys.npy"), c.ds / "index.faiss", outside)
    outside.write_bytes(outside.read_bytes()[:16])  # mapped read-write, reading it would be a SIGBUS
    c.freeze()
    rc, _, err = _eval(c)
    c.one_line_refusal(rc, err, "header says the index is in RAM")


@case("2b", "header says disk with its own index.ivfdata, the index names another file outside: knnlm eval")
def c2b(c):
    c.copy()
    outside = c.sentinel / "outside.ivfdata"
    _ivf_on_disk(np.load(c.ds / "keys.npy"), c.ds / "index.faiss", outside)
    shutil.copy(outside, c.ds / "index.ivfdata")
    size = outside.stat().st_size
    _edit_json(c.ds / "header.json", lambda h: h["index"].update(storage="disk", ivfdata="index.ivfdata",
                                                                 ivfdata_bytes=size))
    outside.write_bytes(b"")
    c.freeze()
    rc, _, err = _eval(c)
    c.one_line_refusal(rc, err, "not the datastore's own")


@case("2c", "on-disk lists, own file, one list's offset crafted beyond the lists file: knnlm eval")
def c2c(c):
    c.copy()
    rc, _, err = c.run("reindex", c.ds, "--index", "IVF4,Flat", "--index-storage", "disk", "--quiet",
                       label="set-up: an honest on-disk index")
    h = json.loads((c.ds / "header.json").read_text())
    idx_path = c.ds / h["index"]["file"]
    raw = bytearray(idx_path.read_bytes())
    # FAISS's "ilod" record: fourcc, nlist, code_size, then the lists vector (count, then size,
    # capacity, offset per list, 8 bytes each): list 1's offset set far beyond the lists file
    at = raw.index(b"ilod") + 4 + 8 + 8 + 8 + 24 * 1 + 16
    old = int.from_bytes(raw[at:at + 8], "little")
    raw[at:at + 8] = (1 << 40).to_bytes(8, "little")
    idx_path.write_bytes(bytes(raw))
    c.notes.append(f"list 1's offset {old} -> {1 << 40} in {idx_path.name}; lists file "
                   f"{(c.ds / h['index']['ivfdata']).stat().st_size} bytes")
    c.freeze()
    rc, _, err = _eval(c)
    c.one_line_refusal(rc, err, "inverted list")


# ------------------------------------------------------------------ 3. a concurrent writer


def _concurrent(c: Case, writer: list[str], words: tuple[str, ...]):
    """The reader (``knnlm eval``) is held on entry to its open of ``index.faiss`` (strace, attached
    to it, delays that call) until the writer has finished; then strace detaches and the reader
    goes on with the header and arrays it opened before."""
    import signal

    c.copy()
    c.freeze()
    trace = c.area.parent / f"{c.cid}.reader.strace"
    trace.unlink(missing_ok=True)
    reader_cmd = [sys.executable, "-m", "knnlm", "eval", "--model", str(c.env.model), "--datastore", str(c.ds),
                  "--data", c.env.texts["heldout"], "--quiet"]
    reader = subprocess.Popen(reader_cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    hold = subprocess.Popen(_strace("-e", "trace=openat", "-P", str(c.ds / "index.faiss"), "-e",
                                    "inject=openat:delay_enter=3600000000:when=1", "-p", str(reader.pid),
                                    log_path=trace), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and reader.poll() is None:
        if trace.exists() and "index.faiss" in trace.read_text():
            break
        time.sleep(0.2)
    c.check("the reader reached its index open (held there)", reader.poll() is None)
    rc_w, _, err_w = c.run(*writer, label="writer, while the reader is held")
    c.check("the writer finished", rc_w == 0)
    c.check("the reader was still held when the writer finished", reader.poll() is None)
    hold.send_signal(signal.SIGINT)  # strace detaches: the held call goes on
    hold.wait(timeout=60)
    out, err = reader.communicate(timeout=600)
    shown = (" ".join(map(str, reader_cmd)) + "    [held by: strace -e inject=openat:delay_enter=... -P "
             "DS/index.faiss -p PID, released after the writer]").replace(sys.executable, "python")
    c.runs.append({"label": "reader, started before the writer", "cmd": shown.replace(str(c.env.work), "$W"),
                   "rc": reader.returncode, "stdout": out.decode(errors="replace"),
                   "stderr": err.decode(errors="replace"), "esc_bytes": 0})
    c.one_line_refusal(reader.returncode, err.decode(errors="replace"), *words,
                       name="reader refused with one line: the datastore changed under it (no mixed perplexity)")
    rc, _, _ = _eval(c, label="a reader after the writer: the new datastore")
    c.check("a fresh reader opens the new datastore", rc == 0)


@case("3a", "knnlm build-index --overwrite while a knnlm eval is between its header and its index")
def c3a(c):
    e = c.env
    _concurrent(c, ["build-index", "--model", e.model, "--data", e.corpus2, "--context", "64", "--index", "flat",
                    "--quiet", "--out", c.area / "ds", "--overwrite"], ("changed while it was being read",))


@case("3b", "knnlm reindex while a knnlm eval is between its header and its index")
def c3b(c):
    _concurrent(c, ["reindex", c.area / "ds", "--index", "flat", "--quiet"], ("changed while it was being read",))


# ------------------------------------------------------------------ 4. keys and values


@case("4a", "a model whose FFN input overflows float16: knnlm build-index (float16 keys)")
def c4a(c):
    c.freeze()
    rc, _, err = c.run("build-index", "--model", c.env.overflow, "--data", c.env.corpus, "--context", "64",
                       "--index", "flat", "--quiet", "--out", c.ds)
    c.one_line_refusal(rc, err, "model.layers.1.mlp", "--key-dtype float32 and --overwrite")
    rc2, _, err2 = _eval(c, label="the refused build is not a datastore")
    c.check("the output does not open as a datastore", rc2 == 2)
    rc3, _, _ = c.run("build-index", "--model", c.env.overflow, "--data", c.env.corpus, "--context", "64",
                      "--index", "flat", "--quiet", "--out", c.ds, "--key-dtype", "float32", "--overwrite")
    c.check("the command the message suggests builds the datastore", rc3 == 0)


@case("4b", "keys.npy with NaN rows (crafted): knnlm reindex --index flat")
def c4b(c):
    c.copy()
    keys = np.load(c.ds / "keys.npy", mmap_mode="r+")
    keys[100:110] = np.nan
    keys.flush()
    del keys
    before = digest_dir(c.ds)
    c.freeze()
    rc, _, err = c.run("reindex", c.ds, "--index", "flat", "--quiet")
    c.one_line_refusal(rc, err, "NaN")
    c.check("the old index still in use (files unchanged)", digest_dir(c.ds) == before)


def _values_case(c: Case, value: int):
    c.copy()
    v = np.load(c.ds / "values.npy")
    v[len(v) // 2] = value
    np.save(c.ds / "values.npy", v)
    c.freeze()
    rc, _, err = _eval(c, label="eval")
    c.one_line_refusal(rc, err, "outside the model's vocabulary", name="eval refused with one line")
    rc, _, err = c.run("generate", "--model", c.env.model, "--datastore", c.ds, "--prompt", "def f(x):",
                       "--max-new-tokens", "8", "--quiet", label="generate")
    c.one_line_refusal(rc, err, "outside the model's vocabulary", name="generate refused with one line")


@case("4c", "values.npy holding a token id >= vocab: knnlm eval, knnlm generate")
def c4c(c):
    _values_case(c, 384)


@case("4d", "values.npy holding a negative token id: knnlm eval, knnlm generate")
def c4d(c):
    _values_case(c, -3)


@case("4e", "tokens.npy holding a token id >= vocab: knnlm eval")
def c4e(c):
    c.copy()
    t = np.load(c.ds / "tokens.npy")
    t[10] = 10 ** 6
    np.save(c.ds / "tokens.npy", t)
    c.freeze()
    rc, _, err = _eval(c)
    c.one_line_refusal(rc, err, "tokens.npy", "outside the model's vocabulary")


@case("4f", "an index whose ids are negative or beyond the rows (crafted IDMap): knnlm eval")
def c4f(c):
    import faiss

    c.copy()
    keys = np.ascontiguousarray(np.load(c.ds / "keys.npy"), dtype=np.float32)
    n = len(keys)
    ids = np.where(np.arange(n) % 2 == 0, -5, np.arange(n) + n).astype(np.int64)
    index = faiss.IndexIDMap(faiss.IndexFlatL2(keys.shape[1]))
    index.add_with_ids(keys, ids)
    faiss.write_index(index, str(c.ds / "index.faiss"))
    c.freeze()
    out_json = c.area.parent / f"{c.cid}.eval.json"
    rc, _, err = _eval(c, out_json=out_json)
    r = json.loads(out_json.read_text())["retrieval"] if out_json.exists() else {}
    c.notes.append(f"eval JSON retrieval: no_neighbour_searches {r.get('no_neighbour_searches')}, "
                   f"no_neighbour_fraction {r.get('no_neighbour_fraction')}")
    c.check("exit 0, searches without a valid neighbour counted in the result",
            rc == 0 and r.get("no_neighbour_fraction") == 1.0)
    c.check("warned on stderr", "found no neighbour" in err)


# ------------------------------------------------------------------ 5. refused builds, dotfiles


def _busy_out(c: Case, *extra):
    busy = c.sentinel / "home"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine\n")
    c.freeze()
    rc, _, err = c.run("build-index", "--model", c.env.model, "--data", c.env.corpus, "--context", "64", "--index",
                       "flat", "--quiet", "--out", busy, *extra)
    c.one_line_refusal(rc, err, "holds no datastore")
    c.check("nothing created in --out (no .knnlm.lock)", sorted(p.name for p in busy.iterdir()) == ["notes.txt"])


@case("5a", "knnlm build-index --out a non-empty directory that holds no datastore")
def c5a(c):
    _busy_out(c)


@case("5b", "knnlm build-index --out a non-empty directory that holds no datastore, --overwrite")
def c5b(c):
    _busy_out(c, "--overwrite")


@case("5c", "a corpus directory holding dotfiles (.knnlm.lock with a PID, .git/HEAD.txt): knnlm build-index")
def c5c(c):
    corpus = c.sentinel / "corpus"
    shutil.copytree(c.env.corpus2, corpus)
    (corpus / ".knnlm.lock").write_text("12345\n")
    (corpus / ".git").mkdir()
    (corpus / ".git" / "HEAD.txt").write_text("ref: refs/heads/main\n")
    c.freeze()
    rc, _, err = c.run("build-index", "--model", c.env.model, "--data", corpus, "--context", "64", "--index", "flat",
                       "--quiet", "--out", c.ds)
    docs = json.loads((c.ds / "documents.json").read_text()) if rc == 0 else []
    names = sorted(Path(d["name"]).name for d in docs)
    c.notes.append(f"documents: {names}")
    c.check("built, documents are the two .py files only", rc == 0 and names == ["fnmatch.py", "keyword.py"])


# ------------------------------------------------------------------ 6. the lower items


@case("6a", "knnlm build-index --overwrite killed (SIGKILL) at the swap: the old datastore stays whole")
def c6a(c):
    c.copy(c.env.gated)
    before = digest_dir(c.ds)
    c.freeze()
    e = c.env
    args = ["build-index", "--model", e.model, "--data", e.corpus2, "--context", "64", "--index", "flat", "--quiet",
            "--out", c.ds, "--overwrite"]
    rc, _, _ = c.run(*args, prefix=_strace("-e", "trace=renameat2,rename", "-P", str(c.ds), "-e",
                                           "inject=renameat2,rename:signal=KILL:when=1"), label="killed")
    c.check("killed by SIGKILL at the swap", rc in (-9, 137))
    c.notes.append(f"old datastore after the kill: {sorted(p.name for p in c.ds.iterdir())}; beside it: "
                   f"{sorted(p.name for p in c.area.iterdir())}")
    c.check("old datastore byte-identical (its files; a stale .knnlm.lock may remain)",
            digest_dir(c.ds, lock=False) == before)
    rc, _, _ = _eval(c, label="the old datastore (and its gate) after the kill")
    c.check("old datastore evaluates", rc == 0)
    rc, _, err = c.run(*args, label="the same command again")
    c.check("re-run finishes the overwrite", rc == 0 and not (c.area / ".ds.overwrite").exists())


def _tmpfs(c: Case, size: int) -> Path:
    mnt = c.area / "ds"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], check=True)
    return mnt


def _umount(path: Path) -> None:
    subprocess.run(["umount", str(path)], check=False)


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def _full_case(c: Case, extra: int, command: list, words=("No space left",), base: Path | None = None,
               filler: bool = False):
    """``command`` on the datastore copied into a tmpfs with about ``extra`` bytes to spare."""
    base = base or c.env.base
    mnt = _tmpfs(c, _du(base) + extra)
    try:
        for p in base.iterdir():
            shutil.copy(p, mnt / p.name)
        if filler:  # eat the rest (a file of the datastore's file system, but not of the datastore)
            with contextlib.suppress(OSError):
                with open(mnt / "filler.bin", "wb") as f:
                    while True:
                        f.write(b"\0" * 4096)
                        f.flush()
        before = digest_dir(c.ds)
        c.freeze()
        rc, _, err = c.run(*command)
        c.one_line_refusal(rc, err, *words)
        c.check("datastore files unchanged", digest_dir(c.ds) == before)
        rc2, _, _ = _eval(c, label="the datastore after it")
        c.check("the datastore still evaluates", rc2 == 0)
    finally:
        _umount(mnt)


@case("6b", "disk full (tmpfs) during knnlm reindex --index-storage disk (FAISS writes its lists through a map)")
def c6b(c):
    _full_case(c, 300_000, ["reindex", c.area / "ds", "--index", "IVF4,Flat", "--index-storage", "disk",
                            "--quiet"])


@case("6c", "disk full (tmpfs) during knnlm reindex --index flat (FAISS fwrite)")
def c6c(c):
    _full_case(c, 300_000, ["reindex", c.area / "ds", "--index", "flat", "--quiet"])


@case("6d", "disk full (tmpfs, filled) during knnlm tune (the gate file)")
def c6d(c):
    _full_case(c, 64_000, ["tune", "--model", c.env.model, "--datastore", c.area / "ds", "--data",
                           c.env.texts["tune2"], "--quiet"], base=c.env.gated, filler=True)


@case("6e", "disk full (tmpfs) for the output of knnlm merge")
def c6e(c):
    mnt = c.area / "merged"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=700000", "tmpfs", str(mnt)], check=True)
    c.outputs.append(mnt)
    try:
        c.copy()
        c.freeze()
        rc, _, err = c.run("merge", c.ds, c.env.other, "--out", mnt / "out", "--index", "flat", "--quiet")
        c.one_line_refusal(rc, err, "No space left")
        left = sorted(p.name for p in mnt.iterdir())
        c.notes.append(f"left on the full file system: {left}")
    finally:
        _umount(mnt)


@case("6f", "a file-size limit (RLIMIT_FSIZE 64 KiB) during knnlm reindex --index-storage disk")
def c6f(c):
    c.copy()
    before = digest_dir(c.ds)
    c.freeze()
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536)); "
            "from knnlm.cli import main; sys.exit(main(sys.argv[1:]))")
    cmd = [sys.executable, "-c", code, "reindex", str(c.ds), "--index", "IVF4,Flat", "--index-storage", "disk",
           "--quiet"]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    shown = " ".join(cmd).replace(sys.executable, "python").replace(str(c.env.work), "$W")
    c.runs.append({"label": None, "cmd": shown, "rc": p.returncode, "stdout": p.stdout, "stderr": p.stderr,
                   "esc_bytes": 0})
    c.one_line_refusal(p.returncode, p.stderr, "knnlm reindex: error:")
    c.check("datastore files unchanged", digest_dir(c.ds) == before)


def _read_only(c: Case):
    c.copy(c.env.gated)
    subprocess.run(["mount", "--bind", str(c.ds), str(c.ds)], check=True)
    subprocess.run(["mount", "-o", "remount,bind,ro", str(c.ds)], check=True)


@case("6g", "a read-only datastore (read-only bind mount): knnlm reindex, knnlm tune, knnlm eval")
def c6g(c):
    _read_only(c)
    try:
        before = digest_dir(c.ds)
        c.freeze()
        rc, _, err = c.run("reindex", c.ds, "--index", "flat", "--quiet", label="reindex")
        c.one_line_refusal(rc, err, "Read-only", name="reindex refused with one line")
        rc, _, err = c.run("tune", "--model", c.env.model, "--datastore", c.ds, "--data", c.env.texts["tune2"],
                           "--quiet", label="tune")
        c.one_line_refusal(rc, err, "Read-only", name="tune refused with one line")
        rc, _, err = _eval(c, label="eval (a reader needs no write access)")
        c.check("eval works on a read-only datastore", rc == 0)
        c.check("datastore files unchanged", digest_dir(c.ds) == before)
    finally:
        _umount(c.ds)


def _header_case(c: Case, edit, words, file="header.json"):
    c.copy()
    if callable(edit):
        _edit_json(c.ds / file, edit)
    else:
        (c.ds / file).write_text(edit)
    c.freeze()
    rc, _, err = c.run("info", c.ds, label="info")
    c.one_line_refusal(rc, err, *words, name="info refused with one line")
    rc, _, err = _eval(c, label="eval")
    c.one_line_refusal(rc, err, *words, name="eval refused with one line")


@case("6h", 'header key.dtype "object"')
def c6h(c):
    _header_case(c, lambda h: h["key"].update(dtype="object"), ("key.dtype",))


@case("6i", "header window.bos 1e6")
def c6i(c):
    _header_case(c, lambda h: h["window"].update(bos=1e6), ("window.bos",))


@case("6j", "documents.json entry without offset")
def c6j(c):
    c.copy()
    _edit_json(c.ds / "documents.json", lambda d: d[1].pop("offset"))
    c.freeze()
    rc, _, err = c.run("info", c.ds, label="info (reads the header only)")
    c.check("info works", rc == 0)
    rc, _, err = _eval(c, label="eval")
    c.one_line_refusal(rc, err, "offset", name="eval refused with one line")


@case("6k", "header.json nested 100,000 deep")
def c6k(c):
    _header_case(c, "[" * 100_000 + "]" * 100_000, ("nested too deeply",))


@case("6l", "the header's gate file name escapes the datastore (../sentinel/victim.txt, its true SHA-256)")
def c6l(c):
    c.copy(c.env.gated)
    digest = hashlib.sha256(c.victim.read_bytes()).hexdigest()
    _edit_json(c.ds / "header.json", lambda h: h["gate"].update(file="../sentinel/victim.txt", sha256=digest))
    c.freeze()
    rc, _, err = _eval(c)
    c.one_line_refusal(rc, err, "gate.file")


@case("6m", "terminal escape codes in stored strings (model name, document names): knnlm info, knnlm generate "
             "--show-neighbours")
def c6m(c):
    c.copy()
    esc = "\x1b]0;pwned\x07\x1b[2J\x1b[31m"
    _edit_json(c.ds / "header.json", lambda h: h["model"].update(name_or_path=f"evil{esc}model"))
    _edit_json(c.ds / "documents.json", lambda d: [x.update(name=f"{esc}{x['name']}") for x in d])
    c.freeze()
    rc, out, _ = c.run("info", c.ds, label="info")
    c.check("info: exit 0, no ESC byte on the terminal", rc == 0 and c.runs[-1]["esc_bytes"] == 0)
    rc, out, _ = c.run("generate", "--model", c.env.model, "--datastore", c.ds, "--prompt", "def f(x):",
                       "--max-new-tokens", "4", "--show-neighbours", "2", "--quiet", label="generate")
    c.check("generate: exit 0, neighbours shown, no ESC byte", rc == 0 and c.runs[-1]["esc_bytes"] == 0
            and "\\x1b" in out)


@case("6n", "knnlm generate past the model's position limit (GPT-2, n_positions 256)")
def c6n(c):
    c.copy(c.env.gpt2_ds)
    c.freeze()
    rc, _, err = c.run("generate", "--model", c.env.gpt2, "--datastore", c.ds, "--prompt", "def f(x):",
                       "--max-new-tokens", "300", "--quiet")
    c.one_line_refusal(rc, err, "256")


@case("6o", "knnlm subset whose last kept document is empty (fnmatch.py, an empty file, keyword.py; "
             "--max-tokens = fnmatch.py's tokens)")
def c6o(c):
    corpus = c.sentinel / "corpus"
    shutil.copytree(c.env.corpus2, corpus)
    (corpus / "g_empty.py").write_text("")  # sorts between fnmatch.py and keyword.py
    c.freeze()
    rc, _, err = c.run("build-index", "--model", c.env.model, "--data", corpus, "--context", "64", "--index",
                       "flat", "--quiet", "--out", c.ds, label="set-up: build")
    docs = json.loads((c.ds / "documents.json").read_text()) if rc == 0 else []
    c.notes.append(f"built documents (name, length, first_row): "
                   f"{[(Path(d['name']).name, d['length'], d['first_row']) for d in docs]}")
    c.check("the build kept the empty file as a document", any(d["length"] == 0 for d in docs))
    sub = c.area / "sub"
    c.outputs.append(sub)
    budget = docs[0]["length"] if docs else 1
    rc, _, err = c.run("subset", c.ds, "--out", sub, "--max-tokens", budget, "--index", "flat", "--quiet")
    c.check("subset exit 0", rc == 0)
    kept = json.loads((sub / "documents.json").read_text()) if rc == 0 else []
    c.notes.append(f"subset documents (name, length, first_row): "
                   f"{[(Path(d['name']).name, d['length'], d['first_row']) for d in kept]}")
    c.check("the subset ends with the empty document", bool(kept) and kept[-1]["length"] == 0)
    rc, _, err = _eval(c, ds=sub, label="the subset")
    c.check("the subset evaluates", rc == 0)


def _interrupted(c: Case, args: list, out: Path):
    c.outputs.append(out)
    c.copy()
    c.freeze()
    rc, _, _ = c.run(*args, prefix=_strace("-e", "trace=rename", "-P", str(out / "header.json"), "-P",
                                           str(out / "header.json.tmp"), "-e", "inject=rename:signal=KILL:when=2"),
                     label="killed")
    c.check("killed (SIGKILL)", rc in (-9, 137))
    rc, _, err = _eval(c, ds=out, label="eval of the interrupted output")
    c.one_line_refusal(rc, err, "run that command again", name="eval: one line, says re-run the command")
    c.check("no `build-index --resume` suggested", "--resume" not in err)
    rc, _, err = c.run(*args, label="the same command again")
    c.check("the re-run finishes", rc == 0)
    rc, _, err = _eval(c, ds=out, label="eval of the re-run's output")
    c.check("its output evaluates", rc == 0)


@case("6p", "knnlm subset killed, then eval on its output and the same command again")
def c6p(c):
    out = c.area / "sub"
    _interrupted(c, ["subset", c.area / "ds", "--out", out, "--max-tokens", "5000", "--index", "flat", "--quiet"],
                 out)


@case("6q", "knnlm merge killed, then eval on its output and the same command again")
def c6q(c):
    out = c.area / "merged"
    _interrupted(c, ["merge", c.area / "ds", c.env.other, "--out", out, "--index", "flat", "--quiet"], out)


@case("6r", "knnlm reindex killed inside its work directory, then the same command again: no orphaned files")
def c6r(c):
    c.copy()
    c.freeze()
    args = ["reindex", c.ds, "--index", "IVF4,Flat", "--index-storage", "disk", "--quiet"]
    work = c.ds / ".index.r1.faiss.build"
    rc, _, _ = c.run(*args, prefix=_strace("-e", "trace=openat", "-P", str(work / "shard00000.faiss"), "-e",
                                           "inject=openat:signal=KILL:when=1"), label="killed")
    c.check("killed (SIGKILL)", rc in (-9, 137))
    left = sorted(p.name for p in c.ds.iterdir())
    c.notes.append(f"after the kill: {left}")
    rc, _, _ = c.run(*args, label="the same command again", key=True)
    left = sorted(p.name for p in c.ds.iterdir())
    c.notes.append(f"after the re-run: {left}")
    c.check("re-run exit 0, no work files or old index left",
            rc == 0 and not any(n.startswith(".index") or n == "index.faiss" for n in left))


@case("6s", "knnlm tune killed between the new gate and the header: the previous gate stays in use")
def c6s(c):
    c.copy(c.env.gated)
    out_json = c.area.parent / f"{c.cid}.before.json"
    rc, _, _ = _eval(c, label="before", out_json=out_json)
    ppl_before = json.loads(out_json.read_text())["primary"]["ppl"]
    before = digest_dir(c.ds)
    c.freeze()
    rc, _, _ = c.run("tune", "--model", c.env.model, "--datastore", c.ds, "--data", c.env.texts["tune2"], "--quiet",
                     prefix=_strace("-e", "trace=rename", "-P", str(c.ds / "header.json.tmp"), "-P",
                                    str(c.ds / "header.json"), "-e", "inject=rename:signal=KILL:when=1"),
                     label="killed", key=True)
    c.check("killed (SIGKILL) at the header's rename", rc in (-9, 137))
    c.notes.append(f"datastore files after the kill: {sorted(p.name for p in c.ds.iterdir())}")
    c.check("header and previous gate unchanged", all(digest_dir(c.ds).get(k) == v for k, v in before.items()))
    out_json2 = c.area.parent / f"{c.cid}.after.json"
    rc, _, _ = _eval(c, label="after the kill", out_json=out_json2)
    ppl_after = json.loads(out_json2.read_text())["primary"]["ppl"] if out_json2.exists() else None
    c.notes.append(f"eval primary ppl before {ppl_before}, after the kill {ppl_after}")
    c.check("same perplexity with the previous gate", rc == 0 and ppl_after == ppl_before)


# ------------------------------------------------------------------ main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results/untrusted")
    ap.add_argument("--work", default="/tmp/knnlm-untrusted")
    ap.add_argument("--only", default=None, help="comma-separated case ids")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = Env(Path(args.work))
    only = set(args.only.split(",")) if args.only else None
    results = []
    summary_path = out / "summary.json"
    old = {r["case"]: r for r in json.loads(summary_path.read_text())} if summary_path.exists() and only else {}
    for cid, (title, fn) in CASES.items():
        if only and cid not in only:
            continue
        c = Case(env, cid, title, out)
        t0 = time.time()
        try:
            fn(c)
        except Exception as e:  # noqa: BLE001 - a case that could not run is recorded as such
            c.notes.append(f"the case itself failed: {type(e).__name__}: {e}")
            c.check("case ran", False)
            if c.before is None:
                c.freeze()
        r = c.finish()
        old[cid] = r
        log(f"{cid}: exit {r['rc']}, outside unchanged {r['outside_unchanged']}, checks "
            f"{'ok' if r['checks_passed'] else 'FAILED ' + str([k for k, v in r['checks'].items() if not v])} "
            f"({time.time() - t0:.0f} s)")
        results.append(r)
    rows = [old[k] for k in sorted(old, key=lambda k: list(CASES).index(k) if k in CASES else 999)]
    summary_path.write_text(json.dumps(rows, indent=1).replace(str(env.work), "$W") + "\n")
    table = ["| case | what | command (last) | exit | one-line message | outside unchanged | checks |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        msg = r["message"].replace("|", "\\|")[:220]
        table.append(f"| {r['case']} | {r['title']} | `{r['cmd'][:140]}` | {r['rc']} | {msg} | "
                     f"{'yes' if r['outside_unchanged'] else 'NO'} | {'ok' if r['checks_passed'] else 'FAILED'} |")
    (out / "summary.md").write_text(("# issue #31 acceptance: crafted datastores through the real CLI\n\n"
                                     "`python -m experiments.untrusted_acceptance --out results/untrusted` "
                                     "(tiny random models; $W is the work directory). One report per case: "
                                     "`case_<id>.txt`.\n\n" + "\n".join(table) + "\n").replace(str(env.work), "$W"))
    return 0 if all(r["checks_passed"] and r["outside_unchanged"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
