"""Put a suite run's summary and ratio matrix into README.md, between the markers
``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` (or at ``<!-- SUITE-TABLES -->`` the first
time), and copy its full report and plot to docs/NAME.md and docs/NAME.png:

    python benchmarks/readme_suite.py results/suite-v3 suite-default

The numbers are benchmarks/suite.py's, unchanged; this only moves them.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


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
    block = (f"<!-- {name}:begin -->\n{header}\n\n{summary.strip()}\n\nPer-task tables (median, IQR, ratio, "
             f"speedup, divergences, ms per step against Adam's): [docs/{name}.md](docs/{name}.md).\n\n"
             f"![{name}](docs/{name}.png)\n<!-- {name}:end -->")
    readme = Path("README.md").read_text()
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    if begin in readme:
        a, b = readme.index(begin), readme.index(end) + len(end)
        readme = readme[:a] + block + readme[b:]
    elif "<!-- SUITE-TABLES -->" in readme:
        readme = readme.replace("<!-- SUITE-TABLES -->", block + "\n\n<!-- SUITE-TABLES -->")
    else:
        print("README.md has neither the markers nor <!-- SUITE-TABLES -->", file=sys.stderr)
        return 1
    Path("README.md").write_text(readme)
    print(f"README.md: {name} block written; docs/{name}.md and .png copied")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
