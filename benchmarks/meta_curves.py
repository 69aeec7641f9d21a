"""Meta-training curves from a run's log: validation meta-loss and median final loss against
training time and episode, and the training meta-loss (a moving average over truncations).

    python benchmarks/meta_curves.py runs/NAME.run/log.jsonl --out docs/meta-NAME.png

Prints a markdown table of the validations (episode, seconds, scores, whether it was the best
so far) and, with --out, writes the plot (needs matplotlib).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_log(path: Path) -> tuple[list[dict], list[dict]]:
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return ([r for r in records if r["kind"] == "validation"], [r for r in records if r["kind"] == "train"])


def moving_average(values: list[float], width: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - width] if i >= width else 0.0)
        out.append(total / min(i + 1, width))
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="benchmarks/meta_curves.py")
    parser.add_argument("log", type=Path, help="a meta-training run's log.jsonl")
    parser.add_argument("--out", type=Path, default=None, help="PNG to write")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    if not args.log.is_file():
        parser.error(f"no log at {args.log}")
    validations, training = read_log(args.log)
    lines = ["| episode | seconds | validation meta-loss | median final loss | best so far |",
             "| ---: | ---: | ---: | ---: | --- |"]
    for r in validations:
        lines.append(f"| {r['episode']} | {r.get('elapsed', 0):.0f} | {r['meta_loss']:.4g} | "
                     f"{r['median_final_loss']:.4g} | {'yes' if r['best'] else ''} |")
    print("\n".join(lines))
    if args.out is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        left.plot([r.get("elapsed", 0) / 60 for r in validations], [r["meta_loss"] for r in validations], "o-")
        left.set_xlabel("meta-training minutes")
        left.set_ylabel("validation meta-loss (mean log loss)")
        applied = [r["meta_loss"] for r in training if "skipped" not in r]
        right.plot(moving_average(applied, 200))
        right.set_xlabel("meta-step (truncation)")
        right.set_ylabel("training meta-loss, moving average of 200")
        fig.suptitle(args.title or str(args.log))
        fig.tight_layout()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.out, dpi=110)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
