"""benchmarks/ship_weights.py: weights copied under a name with their whole command chain and
the suite's scores of that very file, refused when either is missing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from benchmark_scripts import load_script

from learned_optim.rules import load_rule

ROOT = Path(__file__).resolve().parents[1]



set_config, ship_weights = load_script("set_config"), load_script("ship_weights")


def _suite_file(path: Path, label: str) -> Path:
    """A suite.json as benchmarks/suite.py writes it (the keys the shipper reads), two tasks."""
    summary = {label: {"tasks": {"conv": {"median": 0.5, "ratio": 0.8}, "gru": {"median": 2.0, "ratio": 1.25}},
                       "geomean_ratio": 1.0, "beaten": 1, "compared": 2, "divergences": 0}}
    path.write_text(json.dumps({"command": f"python benchmarks/suite.py --optimizers adam,{label}", "summary": summary}))
    return path


def test_ship_weights_records_the_command_chain_and_the_suite_scores(tmp_path, capsys):
    variant = tmp_path / "trust"
    assert set_config.main(["--weights", "ntm-bfgs-lstm-controller", "--set", "trust_ratio=50", "--out", str(variant)]) == 0
    suite = _suite_file(tmp_path / "suite.json", f"ntm-bfgs:{variant}")
    into = tmp_path / "pretrained"
    rows = [{"task": "transformer", "optimizer": f"ntm-bfgs:{variant}", "seed": seed, "at_tenth": 2.0, "final": final,
             "falling": final < 2.0} for seed, final in ((0, 1.5), (1, 1.7), (2, 2.5))]
    horizon = tmp_path / "long_horizon.json"
    horizon.write_text(json.dumps({"command": "python benchmarks/long_horizon.py --steps 20000", "rows": rows}))
    argv = ["--weights", str(variant), "--name", "ntm-bfgs-test", "--suite", str(suite), "--note", "a test",
            "--into", str(into), "--long-horizon", str(horizon)]
    assert ship_weights.main(argv) == 0
    rule, meta = load_rule(into / "ntm-bfgs-test")  # the hash still matches the copied tensors
    source = json.loads((ROOT / "pretrained" / "ntm-bfgs-lstm-controller.json").read_text())
    assert meta["name"] == "ntm-bfgs-test" and rule.config.trust_ratio == 50.0
    chain = meta["command"].split(" && ")
    assert meta["command"].startswith(source["command"] + " && python benchmarks/set_config.py")
    assert "learned-optim meta-train" in chain[0] and chain[-1].startswith("python benchmarks/ship_weights.py")
    assert "--note '<provenance_note>'" in chain[-1]  # the note itself is the provenance_note key
    evaluation = meta["evaluation"]
    assert evaluation["per_task_median_final_loss"] == {"conv": 0.5, "gru": 2.0}
    assert evaluation["median_final_loss"] == 1.25 and evaluation["beaten"] == "1/2" and evaluation["diverged"] == 0
    assert str(variant) in evaluation["suite"] and meta["provenance_note"] == "a test"
    (horizons,) = evaluation["long_horizon"]
    assert horizons["transformer"] == {"seeds": [0, 1, 2], "falling": "2/3", "median_at_tenth": 2.0, "median_final": 1.7}
    for name, tensor in load_rule("ntm-bfgs-lstm-controller")[0].state_dict().items():
        assert torch.equal(rule.state_dict()[name], tensor)
    with pytest.raises(SystemExit):  # the name is taken now
        ship_weights.main(argv)
    assert "exists; pass --replace" in capsys.readouterr().err
    assert ship_weights.main([*argv, "--replace"]) == 0


def test_ship_weights_refuses_weights_the_suite_did_not_score(tmp_path, capsys):
    variant = tmp_path / "trust"
    assert set_config.main(["--weights", "ntm-bfgs-lstm-controller", "--set", "trust_ratio=50", "--out", str(variant)]) == 0
    suite = _suite_file(tmp_path / "suite.json", "ntm-bfgs:runs/something-else")
    with pytest.raises(SystemExit):
        ship_weights.main(["--weights", str(variant), "--name", "x", "--suite", str(suite), "--note", "n",
                           "--into", str(tmp_path / "pretrained")])
    assert f"exactly one optimizer row for the weights '{variant}'" in capsys.readouterr().err
    assert not (tmp_path / "pretrained").exists()
