"""benchmarks/paired_seeds.py: seed-by-seed comparison of two benchmark runs, by hand."""

from __future__ import annotations

import json

import pytest
from benchmark_scripts import load_script

paired_seeds = load_script("paired_seeds")


def test_a_wider_spread_can_lose_the_median_and_win_most_seeds(tmp_path, capsys):
    # first: lower on seeds 0, 1, 3, far higher on seed 2 → median 0.25 > 0.2, below on 3/4 seeds
    first = [{"task": "quadratic", "optimizer": "lstm-gac", "finals": [0.1, 0.2, 9.0, 0.3]}]
    second = [{"task": "quadratic", "optimizer": "adam", "finals": [0.2, 0.25, 0.1, 0.4]},
              {"task": "quadratic", "optimizer": "sgd", "finals": [1.0, 1.0, 1.0, 1.0]}]
    (tmp_path / "a.json").write_text(json.dumps(first))
    (tmp_path / "b.json").write_text(json.dumps(second))
    [row] = paired_seeds.main([f"{tmp_path / 'a.json'}:lstm-gac", f"{tmp_path / 'b.json'}:adam"])
    assert row["first_median"] == pytest.approx(0.25) and row["second_median"] == pytest.approx(0.225)
    assert row["first_below"] == 0.75
    assert row["median_ratio"] == pytest.approx((0.75 + 0.8) / 2)  # ratios 0.5, 0.8, 90, 0.75
    assert "75.0%" in capsys.readouterr().out


def test_unpaired_runs_and_missing_optimizers_are_refused_by_name(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"task": "q", "optimizer": "adam", "finals": [1.0, 2.0]}]))
    (tmp_path / "b.json").write_text(json.dumps([{"task": "q", "optimizer": "adam", "finals": [1.0]}]))
    with pytest.raises(ValueError, match="same seeds: 2 against 1"):
        paired_seeds.main([f"{tmp_path / 'a.json'}:adam", f"{tmp_path / 'b.json'}:adam"])
    with pytest.raises(ValueError, match="no rows for 'nag'; it has \\['adam'\\]"):
        paired_seeds.main([f"{tmp_path / 'a.json'}:nag", f"{tmp_path / 'b.json'}:adam"])
