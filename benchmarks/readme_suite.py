"""Put a suite run's summary and ratio matrix into README.md, between the markers
``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` (or at ``<!-- SUITE-TABLES -->`` the first
time), and copy its full report and plot to docs/NAME.md and docs/NAME.png. A block whose
markers are in docs/suite-history.md (the earlier defaults, moved out of the README) is
rewritten there, with its links relative to docs/:

    python benchmarks/readme_suite.py results/suite-v3 suite-default

The numbers are benchmarks/suite.py's, unchanged; this only moves them.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

HISTORY = Path("docs/suite-history.md")


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    src, name = Path(argv[0]), argv[1]
    md = (src / "suite.md").read_text()
    header, rest = md.split("\n\n", 1)
    summary, _, _ = rest.partition("\n\n**")
    Path(f"docs/{name}.md").write_text(md)
    shutil.copy(src / "suite.png", f"docs/{name}.png")
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    target, prefix = Path("README.md"), "docs/"
    if begin not in target.read_text() and HISTORY.exists() and begin in HISTORY.read_text():
        target, prefix = HISTORY, ""  # a page in docs/: its links are relative to docs/
    block = (f"{begin}\n{header}\n\n{summary.strip()}\n\nPer-task tables (median, IQR, ratio, "
             f"speedup, divergences, ms per step against Adam's): [docs/{name}.md]({prefix}{name}.md).\n\n"
             f"![{name}]({prefix}{name}.png)\n{end}")
    text = target.read_text()
    if begin in text:
        a, b = text.index(begin), text.index(end) + len(end)
        text = text[:a] + block + text[b:]
    elif "<!-- SUITE-TABLES -->" in text:
        text = text.replace("<!-- SUITE-TABLES -->", block + "\n\n<!-- SUITE-TABLES -->")
    else:
        print(f"neither README.md nor {HISTORY} has the markers, and README.md has no <!-- SUITE-TABLES -->",
              file=sys.stderr)
        return 1
    target.write_text(text)
    print(f"{target}: {name} block written; docs/{name}.md and .png copied")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
