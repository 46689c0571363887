"""Several runs of each stdlib set pooled: per prompt and mode, the median of all their rounds; a
set's ratio is the sum of the plain medians over the sum of the speculative ones. The 95 % interval
resamples each prompt's rounds (2,000 bootstrap resamples, seed 0): timing noise only, not the
choice of prompts. By default this folder's three runs of the final code (9 rounds); ``--dir`` and
``--set NAME=RUN,RUN`` pool others (``../small``: ``--set datastore=datastore,datastore_r2``).

    python results/speculative/final/pool.py
    python results/speculative/final/pool.py --dir results/speculative/small \
        --set datastore=datastore,datastore_r2 --set neardup=neardup,neardup_r2
"""

import argparse
import json
import random
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent
SETS = {"datastore": ["datastore_first", "datastore", "datastore_r2"],
        "neardup": ["neardup_first", "neardup", "neardup_r2"]}


def rounds(folder: Path, files: list[str]) -> dict[str, dict[str, list[float]]]:
    """prompt -> mode -> seconds of every round of ``files``."""
    out: dict[str, dict[str, list[float]]] = {}
    for name in files:
        for row in json.loads((folder / f"{name}.json").read_text())["rows"]:
            per = out.setdefault(row["prompt"], {})
            for mode, secs in row["seconds"].items():
                per.setdefault(mode, []).extend(secs)
    return out


def ratio(data, pick) -> float:
    return sum(pick(d["plain"]) for d in data.values()) / sum(pick(d["spec"]) for d in data.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, default=HERE, help="the runs' folder (default: this one)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=RUN,RUN",
                   help="a set and its runs (JSON files without .json); default: this folder's")
    args = p.parse_args()
    sets = {k: v.split(",") for k, v in (x.split("=", 1) for x in args.set)} if args.set else SETS
    rng = random.Random(0)
    for name, files in sets.items():
        data = rounds(args.dir, files)
        point = ratio(data, statistics.median)
        boot = sorted(ratio(data, lambda xs: statistics.median(rng.choices(xs, k=len(xs)))) for _ in range(2000))
        print(f"{name}: {len(data)} prompts x {len(next(iter(data.values()))['plain'])} rounds, "
              f"x plain {point:.2f}, 95 % interval {boot[50]:.2f}-{boot[1949]:.2f}")


if __name__ == "__main__":
    main()
