"""benchmarks/step_speed.py: interleaved rounds and ratios paired by round."""

from __future__ import annotations

import json
import sys

import pytest
from benchmark_scripts import ROOT, load_script

sys.path.insert(0, str(ROOT / "benchmarks"))  # step_speed imports its sibling test_step_time
step_speed = load_script("step_speed")


def test_paired_ratio_is_the_median_of_per_round_ratios_not_a_ratio_of_medians():
    times = {"a": [1.0, 4.0, 3.0], "b": [1.0, 2.0, 6.0]}  # medians 3 and 2: their ratio would be 1.5
    assert step_speed.paired_ratio(times, "a", "b") == (1.0, 0.5, 2.0)


def test_rounds_time_every_optimizer_each_round_and_pair_with_the_reference(tmp_path, capsys):
    out = tmp_path / "speed"
    assert step_speed.main(["--optimizers", "adam-foreach", "adam-torch-default", "--sizes", "1e3", "--budget", "0",
                            "--rounds", "3", "--paired-with", "adam-torch-default", "--out", str(out)]) == 0
    rows = {r["optimizer"]: r for r in json.loads((out / "step_speed.json").read_text())["rows"]}
    for row in rows.values():
        assert len(row["round_seconds"]) == 3 and all(t > 0 for t in row["round_seconds"])
        ratios = [t / a for t, a in zip(row["round_seconds"], rows["adam-foreach"]["round_seconds"])]
        assert row["ratio_to_adam"] == pytest.approx(sorted(ratios)[1])
    assert rows["adam-torch-default"]["ratio_to_reference"] == 1.0
    assert rows["adam-foreach"]["ratio_to_adam"] == 1.0
    assert "× adam-torch-default" in (out / "step_speed.md").read_text()


@pytest.mark.parametrize("flags, message", [(["--rounds", "0"], "--rounds must be at least 1"),
                                            (["--paired-with", "nadam"], "--paired-with 'nadam' is not one of")])
def test_bad_flags_are_refused_by_name(flags, message, capsys, tmp_path):
    with pytest.raises(SystemExit):
        step_speed.main(["--optimizers", "adam-foreach", "--sizes", "1e3", "--out", str(tmp_path), *flags])
    assert message in capsys.readouterr().err
