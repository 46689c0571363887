"""The final code's three runs of each stdlib set pooled: per prompt and mode, the median of all
9 rounds; a set's ratio is the sum of the plain medians over the sum of the speculative ones. The
95 % interval resamples each prompt's rounds (2,000 bootstrap resamples, seed 0): timing noise only,
not the choice of prompts.

    python results/speculative/final/pool.py
"""

import json
import random
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent
SETS = {"datastore": ["datastore_first", "datastore", "datastore_r2"],
        "neardup": ["neardup_first", "neardup", "neardup_r2"]}


def rounds(files: list[str]) -> dict[str, dict[str, list[float]]]:
    """prompt -> mode -> seconds of every round of ``files``."""
    out: dict[str, dict[str, list[float]]] = {}
    for name in files:
        for row in json.loads((HERE / f"{name}.json").read_text())["rows"]:
            per = out.setdefault(row["prompt"], {})
            for mode, secs in row["seconds"].items():
                per.setdefault(mode, []).extend(secs)
    return out


def ratio(data, pick) -> float:
    return sum(pick(d["plain"]) for d in data.values()) / sum(pick(d["spec"]) for d in data.values())


def main() -> None:
    rng = random.Random(0)
    for name, files in SETS.items():
        data = rounds(files)
        point = ratio(data, statistics.median)
        boot = sorted(ratio(data, lambda xs: statistics.median(rng.choices(xs, k=len(xs)))) for _ in range(2000))
        print(f"{name}: {len(data)} prompts x {len(next(iter(data.values()))['plain'])} rounds, "
              f"x plain {point:.2f}, 95 % interval {boot[50]:.2f}-{boot[1949]:.2f}")


if __name__ == "__main__":
    main()
