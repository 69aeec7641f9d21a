"""benchmarks/ntm_trust.py: the memory's step beside the controller's, per step, with the trust region off."""

from __future__ import annotations

import json

import pytest
from benchmark_scripts import load_script

ntm_trust = load_script("ntm_trust")


def test_ratios_start_at_zero_and_match_the_table(tmp_path):
    """The shipped weights' M₀ is 0 and nothing is written at the first step (s = 0), so the first
    ratio is exactly 0; later ones are positive (the quadratic's pairs are written); the table's
    maximum is the runs'."""
    out = tmp_path / "trust"
    assert ntm_trust.main(["--tasks", "quadratic", "--seeds", "2", "--steps", "25", "--jobs", "1", "--out", str(out)]) == 0
    rows = json.loads((out / "ntm_trust.json").read_text())["rows"]
    assert [r["seed"] for r in rows] == [0, 1] and all(r["steps"] == 25 for r in rows)
    for r in rows:
        assert r["ratios"][0] == 0.0 and max(r["ratios"][1:]) > 0 and r["max"] == max(r["ratios"])
    assert "| quadratic | 0 | 25 |" in (out / "ntm_trust.md").read_text()


def test_unknown_tasks_and_lstm_weights_are_refused_by_name(capsys):
    for argv, message in ((["--tasks", "rosenbrok"], "unknown task 'rosenbrok'"),
                          (["--weights", "suite-steps-t500"], "ntm-bfgs")):
        with pytest.raises(SystemExit):
            ntm_trust.main([*argv, "--jobs", "1"])
        assert message in capsys.readouterr().err
