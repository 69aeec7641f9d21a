"""Step-time report for ``benchmarks/test_step_time.py``.

With ``--benchmark-enable``, the terminal summary ends with a markdown table: optimizer ×
parameter count → median step time and its ratio to ``torch.optim.Adam``'s median at the same
size; ``--step-time-report PATH`` also writes that table to PATH. With benchmarks disabled
(this repository's default) nothing is measured and nothing extra is printed.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from pathlib import Path

import pytest

_RESULTS = pytest.StashKey[dict[tuple[str, int], float]]()
BASELINE = "adam-foreach"  # matches test_step_time.BASELINE


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.getgroup("step time").addoption(
        "--step-time-report",
        metavar="PATH",
        default=None,
        help="also write the step-time ratio table (markdown) to PATH; needs --benchmark-enable",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_RESULTS] = {}


@pytest.fixture
def record_step_time(request: pytest.FixtureRequest) -> Callable[[str, int, float], None]:
    """``record(optimizer, n_params, median_seconds)``: one cell of the report."""
    results = request.config.stash[_RESULTS]

    def record(name: str, n: int, median: float) -> None:
        results[(name, n)] = median

    return record


def _format_time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def step_time_table(results: dict[tuple[str, int], float]) -> str:
    import torch

    threads = torch.get_num_threads()
    sizes = sorted({n for _, n in results})
    names = sorted({name for name, _ in results}, key=lambda s: (s != BASELINE, not s.startswith("adam"), s))
    lines = [
        f"Optimizer step time, median; ratio to torch.optim.Adam(foreach=True) ({BASELINE}) "
        f"at the same size. torch {torch.__version__}, {threads} thread{'s' * (threads != 1)}, "
        f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}.",
        "",
        "| optimizer | " + " | ".join(f"{n:.0e} params" for n in sizes) + " |",
        "|---|" + "---:|" * len(sizes),
    ]
    for name in names:
        cells = []
        for n in sizes:
            t = results.get((name, n))
            base = results.get((BASELINE, n))
            if t is None:
                cells.append("—")
            elif base:
                cells.append(f"{_format_time(t)} ({t / base:.2f}×)")
            else:
                cells.append(_format_time(t))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    results = config.stash.get(_RESULTS, {})
    path = config.getoption("step_time_report", None)
    if not results:
        if path:
            terminalreporter.write_line(
                f"step-time report: nothing measured (benchmarks disabled?); {path} not written"
            )
        return
    table = step_time_table(results)
    terminalreporter.section("step time relative to Adam")
    terminalreporter.write(table)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(table, encoding="utf-8")
        terminalreporter.write_line(f"step-time report written to {path}")
