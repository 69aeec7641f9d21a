"""benchmarks/ship_weights.py: weights copied under a name with their whole command chain and
the suite's scores of that very file, refused when either is missing."""

from __future__ import annotations

import json
import shlex
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


TINY_RUN = ["--task", "quadratic", "--episodes", "1", "--tasks-per-step", "2", "--horizon", "10", "--truncation", "10",
            "--validation-tasks", "2", "--validate-every", "1", "--checkpoint-every", "1", "--eval-seeds", "1",
            "--device", "cpu", "--no-progress"]


def test_an_exported_run_is_chained_through_the_weights_it_started_from(tmp_path, capsys):
    from learned_optim.cli import main as cli

    start = tmp_path / "clip2"
    assert set_config.main(["--weights", "suite-time-half", "--set", "direction_clip=2", "--out", str(start)]) == 0
    run = ["meta-train", "--rule", "lstm-gac", "--init-weights", str(start), *TINY_RUN, "--out", str(tmp_path / "run")]
    assert cli(run) == 0
    exported = tmp_path / "exported"
    export = ["export", "--workdir", str(tmp_path / "run.run"), "--out", str(exported)]
    assert cli(export) == 0
    suite = _suite_file(tmp_path / "suite.json", f"lstm-gac:{exported}")
    argv = ["--weights", str(exported), "--name", "chained", "--suite", str(suite), "--note", "n", "--into", str(tmp_path / "p")]
    assert ship_weights.main(argv) == 0
    source = json.loads((ROOT / "pretrained" / "suite-time-half.json").read_text())["command"]
    made = json.loads((tmp_path / "p" / "chained.json").read_text())["command"]
    set_config_command = load_rule(start)[1]["set_config"]["command"]
    assert made.startswith(" && ".join([source, set_config_command, shlex.join(["learned-optim", *run]),
                                        shlex.join(["learned-optim", *export])]) + " && python benchmarks/ship_weights.py")

    # A checkpoint from before commands were recorded: the meta-train command must be given, and it
    # must be the one whose settings the weights record.
    checkpoint = torch.load(tmp_path / "run.run" / "checkpoint.pt", weights_only=True)
    del checkpoint["commands"]
    torch.save(checkpoint, tmp_path / "run.run" / "checkpoint.pt")
    assert cli(export) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit):
        ship_weights.main([*argv, "--replace"])
    assert "pass the command that started it as --meta-train-command" in capsys.readouterr().err
    other = shlex.join(["learned-optim", *run, "--meta-lr", "0.01"])
    with pytest.raises(SystemExit):
        ship_weights.main([*argv, "--replace", "--meta-train-command", other])
    assert "does not match the settings recorded with the weights: meta_lr" in capsys.readouterr().err
    elsewhere = shlex.join(["learned-optim", *run, "--workdir", str(tmp_path / "other.run")])
    with pytest.raises(SystemExit):
        ship_weights.main([*argv, "--replace", "--meta-train-command", elsewhere])
    assert "but the weights were exported from" in capsys.readouterr().err
    assert ship_weights.main([*argv, "--replace", "--meta-train-command", shlex.join(["learned-optim", *run])]) == 0
    assert json.loads((tmp_path / "p" / "chained.json").read_text())["command"].startswith(made.rsplit(" && ", 1)[0])
    # ...and one resumed since by a recorded command: the given start, then the recorded resume.
    resumed = shlex.join(["learned-optim", *run, "--episodes", "2"])
    checkpoint["commands"] = json.dumps([{"command": resumed, "from_episode": 1}])
    torch.save(checkpoint, tmp_path / "run.run" / "checkpoint.pt")
    assert cli(export) == 0
    with pytest.raises(SystemExit):
        ship_weights.main([*argv, "--replace"])
    assert "--meta-train-command" in capsys.readouterr().err
    assert ship_weights.main([*argv, "--replace", "--meta-train-command", shlex.join(["learned-optim", *run])]) == 0
    steps = json.loads((tmp_path / "p" / "chained.json").read_text())["command"].split(" && ")
    assert steps[-4:-1] == [shlex.join(["learned-optim", *run]), resumed, shlex.join(["learned-optim", *export])]


def test_two_set_config_steps_from_shipped_weights_keep_the_shipped_chain(tmp_path):
    """set_config on set_config's output (neither shipped): the chain is the shipped source's whole
    command, then both set_config commands in order, then the packaging."""
    first, second = tmp_path / "b985", tmp_path / "k3"
    assert set_config.main(["--weights", "ntm-bfgs-lstm-controller", "--set", "controller.momentum_rms_decay=0.985",
                            "--out", str(first)]) == 0
    assert set_config.main(["--weights", str(first), "--set", "memory_capacity=3", "--out", str(second)]) == 0
    suite = _suite_file(tmp_path / "suite.json", f"ntm-bfgs:{second}")
    argv = ["--weights", str(second), "--name", "k3", "--suite", str(suite), "--note", "n", "--into", str(tmp_path / "p")]
    assert ship_weights.main(argv) == 0
    source = json.loads((ROOT / "pretrained" / "ntm-bfgs-lstm-controller.json").read_text())["command"]
    made = json.loads((tmp_path / "p" / "k3.json").read_text())["command"]
    commands = [load_rule(path)[1]["set_config"]["command"] for path in (first, second)]
    assert made.startswith(" && ".join([source, *commands]) + " && python benchmarks/ship_weights.py")
