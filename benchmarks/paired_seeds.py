"""Two optimizers' final losses compared seed by seed, from ``learned-optim benchmark`` outputs.

A median over seeds can sit above another optimizer's while most seeds end below it (a wider spread
either way). ``learned-optim benchmark`` evaluates seeds 0..N−1 in order, so the ``finals`` of two
runs with the same ``--seeds N`` pair by index:

    python benchmarks/paired_seeds.py results/A/benchmark.json:lstm-gac results/B/benchmark.json:adam

prints, per task both files hold for the named optimizers: the seeds, both medians, the fraction of
seeds on which the first ends below the second, and the median of the per-seed ratio first/second.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def finals_of(spec: str) -> dict[str, list[float]]:
    """``FILE.json:OPTIMIZER`` → {task: final losses in seed order} for that optimizer's rows (the
    optimizer's own name may hold a colon: ``lstm-gac:runs/x``)."""
    path, sep, optimizer = spec.partition(".json:")
    if not sep or not path or not optimizer:
        raise ValueError(f"expected FILE.json:OPTIMIZER, got {spec!r}")
    path += ".json"
    rows = json.loads(Path(path).read_text())
    found = {row["task"]: [float(f) for f in row["finals"]] for row in rows if row["optimizer"] == optimizer}
    if not found:
        names = sorted({row["optimizer"] for row in rows})
        raise ValueError(f"{path} has no rows for {optimizer!r}; it has {names}")
    return found


def paired(first: list[float], second: list[float]) -> dict[str, float]:
    """Medians, the fraction of seeds where ``first`` < ``second`` and the median ratio first/second."""
    if len(first) != len(second) or not first:
        raise ValueError(f"the runs must cover the same seeds: {len(first)} against {len(second)} finals")
    ratios = [a / b if b > 0 else float("inf") if a > 0 else 1.0 for a, b in zip(first, second)]
    return {"seeds": len(first), "first_median": statistics.median(first), "second_median": statistics.median(second),
            "first_below": sum(a < b for a, b in zip(first, second)) / len(first),
            "median_ratio": statistics.median(ratios)}


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("first", help="FILE:OPTIMIZER, e.g. results/x/benchmark.json:lstm-gac")
    parser.add_argument("second", help="FILE:OPTIMIZER to compare against")
    args = parser.parse_args(argv)
    first, second = finals_of(args.first), finals_of(args.second)
    tasks = [t for t in first if t in second]
    if not tasks:
        raise SystemExit(f"no task in both: {sorted(first)} against {sorted(second)}")
    print(f"`{args.first}` against `{args.second}`\n")
    print("| task | seeds | median (first) | median (second) | seeds where first < second | median ratio first/second |")
    print("|---|---:|---:|---:|---:|---:|")
    out = []
    for task in tasks:
        row = paired(first[task], second[task])
        print(f"| {task} | {row['seeds']} | {row['first_median']:.4g} | {row['second_median']:.4g} | "
              f"{row['first_below']:.1%} | {row['median_ratio']:.3g} |")
        out.append({"task": task, **row})
    return out


if __name__ == "__main__":
    main()
