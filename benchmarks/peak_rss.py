"""Run a command and report its peak anonymous memory (RssAnon) and peak resident set (VmHWM).

    python benchmarks/peak_rss.py -- knnlm eval --datastore runs/stdlib-1m --data ... --quiet

``RssAnon`` is the process's own memory (heap, tensors, an index read into RAM); pages of
memory-mapped files (keys.npy, an on-disk index's inverted lists) are ``RssFile``: the OS can drop
them, so they do not count. ``/usr/bin/time -v`` reports the peak of both together. The child's
/proc/PID/status is sampled every ``--interval`` seconds (Linux only); the last line printed is
JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def _status(pid: int) -> dict:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("RssAnon", "RssFile", "VmHWM"):
                    out[k] = int(v.split()[0]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--interval", type=float, default=0.1)
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = p.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        p.error("give a command after --")
    t0 = time.time()
    child = subprocess.Popen(cmd)
    peak = {"RssAnon": 0.0, "RssFile": 0.0, "VmHWM": 0.0}
    while child.poll() is None:
        for k, v in _status(child.pid).items():
            peak[k] = max(peak[k], v)
        time.sleep(args.interval)
    print(json.dumps({"command": cmd, "returncode": child.returncode, "wall_s": round(time.time() - t0, 1),
                      "peak_rss_anon_mib": round(peak["RssAnon"], 1), "peak_rss_file_mib": round(peak["RssFile"], 1),
                      "vm_hwm_mib": round(peak["VmHWM"], 1)}), flush=True)
    return child.returncode


if __name__ == "__main__":
    sys.exit(main())
