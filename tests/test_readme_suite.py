"""benchmarks/readme_suite.py: a suite run's tables into the README, or into the history page."""

from __future__ import annotations

from pathlib import Path

from benchmark_scripts import load_script

readme_suite = load_script("readme_suite")

REPORT = ("Command: `python benchmarks/suite.py --out results/x` (1 s).\n\n| optimizer | geo-mean |\n| --- | ---: |\n"
          "| adam | 1 |\n\n**transformer**\n\n| per-task | table |\n")


def _run(tmp_path: Path, monkeypatch, readme: str, history: str | None, name: str) -> int:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "suite.md").write_text(REPORT)
    (tmp_path / "run" / "suite.png").write_bytes(b"png")
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text(readme)
    if history is not None:
        (tmp_path / "docs" / "suite-history.md").write_text(history)
    monkeypatch.chdir(tmp_path)
    return readme_suite.main(["run", name])


def test_a_block_is_rewritten_where_its_markers_are_with_links_relative_to_that_file(tmp_path, monkeypatch):
    readme = "intro\n<!-- new:begin -->\nold\n<!-- new:end -->\ntail\n"
    history = "# history\n<!-- old:begin -->\nstale\n<!-- old:end -->\n"
    assert _run(tmp_path, monkeypatch, readme, history, "old") == 0
    page = (tmp_path / "docs" / "suite-history.md").read_text()
    assert "stale" not in page and "| adam | 1 |" in page and "**transformer**" not in page  # summary only
    assert "](old.md)" in page and "](old.png)" in page and "](docs/" not in page  # relative to docs/
    assert (tmp_path / "README.md").read_text() == readme  # untouched
    assert (tmp_path / "docs" / "old.md").read_text() == REPORT
    assert readme_suite.main(["run", "new"]) == 0  # markers in the README: written there, links into docs/
    text = (tmp_path / "README.md").read_text()
    assert "old\n" not in text and "](docs/new.md)" in text and text.endswith("<!-- new:end -->\ntail\n")


def test_a_new_block_goes_to_the_readme_placeholder_and_no_place_is_an_error(tmp_path, monkeypatch, capsys):
    assert _run(tmp_path, monkeypatch, "a\n<!-- SUITE-TABLES -->\n", None, "first") == 0
    text = (tmp_path / "README.md").read_text()
    assert text.index("<!-- first:end -->") < text.index("<!-- SUITE-TABLES -->")
    (tmp_path / "README.md").write_text("no markers\n")
    assert readme_suite.main(["run", "other"]) == 1
    assert "has no <!-- SUITE-TABLES -->" in capsys.readouterr().err
