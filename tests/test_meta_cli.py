"""`learned-optim meta-train`: writes loadable weights whose JSON records the command and a
held-out evaluation, and a rerun resumes from the checkpoint instead of starting over."""

from __future__ import annotations

import json
import shlex

import torch

from learned_optim import LSTMOptimizer
from learned_optim.cli import main

ARGS = ["meta-train", "--rule", "lstm-gac", "--task", "quadratic", "--rule-config", '{"hidden_size": 6}',
        "--episodes", "3", "--tasks-per-step", "8", "--horizon", "20", "--truncation", "10",
        "--validation-tasks", "8", "--validate-every", "2", "--checkpoint-every", "1",
        "--eval-seeds", "3", "--device", "cpu", "--no-progress"]


def test_meta_train_writes_weights_with_their_provenance(tmp_path, capsys):
    out = tmp_path / "tiny"
    assert main([*ARGS, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}.json" in printed and "evaluation on quadratic, seeds 0..2 (never meta-trained on), 20 steps" in printed
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["command"].startswith("learned-optim meta-train --rule lstm-gac")
    assert shlex.split(meta["command"]) == ["learned-optim", *ARGS, "--out", str(out)]  # shell-quoted
    assert meta["meta_training"]["episodes"] == 3 and meta["meta_training"]["tasks_per_step"] == 8
    assert meta["evaluation"]["seeds"] == "0..2" and meta["evaluation"]["median_final_loss"] > 0
    assert meta["task"] == {"family": "quadratic", "kwargs": {}}
    log = [json.loads(x) for x in (tmp_path / "tiny.run" / "log.jsonl").read_text().splitlines()]
    assert sum(r["kind"] == "train" for r in log) == 3 * 2
    # The weights load into the drop-in optimizer.
    p = torch.nn.Parameter(torch.ones(4))
    opt = LSTMOptimizer([p], weights=out)
    assert opt.rule.config.hidden_size == 6
    # Running it again resumes at the end: nothing is retrained. The final evaluation can use
    # another family than meta-training (here 5-D quadratics).
    assert main([*ARGS, "--out", str(out), "--eval-task-kwargs", '{"dim": 5}']) == 0
    printed = capsys.readouterr().out
    assert "resumed from" in printed and 'evaluation on quadratic {"dim": 5}' in printed
    assert json.loads(out.with_suffix(".json").read_text())["evaluation"]["family_kwargs"] == {"dim": 5}
    log_again = [json.loads(x) for x in (tmp_path / "tiny.run" / "log.jsonl").read_text().splitlines()]
    assert log_again == log


def test_the_checkpoint_records_each_meta_train_command_and_export_passes_them_on(tmp_path, capsys):
    out, workdir = tmp_path / "tiny", tmp_path / "tiny.run"
    first = [*ARGS[:ARGS.index("--episodes") + 1], "2", *ARGS[ARGS.index("--episodes") + 2:], "--out", str(out)]
    assert main(first) == 0
    assert main([*ARGS, "--out", str(out)]) == 0  # more episodes: resumes at episode 2
    capsys.readouterr()
    recorded = json.loads(torch.load(workdir / "checkpoint.pt", weights_only=True)["commands"])
    assert recorded == [{"command": shlex.join(["learned-optim", *first]), "from_episode": 0},
                        {"command": shlex.join(["learned-optim", *ARGS, "--out", str(out)]), "from_episode": 2}]
    assert json.loads(out.with_suffix(".json").read_text())["meta_training"]["commands"] == recorded
    assert main(["export", "--workdir", str(workdir), "--out", str(tmp_path / "exported")]) == 0
    meta = json.loads((tmp_path / "exported.json").read_text())
    assert meta["meta_training"]["commands"] == recorded


def test_export_writes_a_checkpoints_best_weights_loadable_by_the_optimizer(tmp_path, capsys):
    import pytest

    out = tmp_path / "tiny"
    assert main([*ARGS, "--out", str(out)]) == 0
    capsys.readouterr()
    exported = tmp_path / "exported"
    assert main(["export", "--workdir", str(tmp_path / "tiny.run"), "--out", str(exported)]) == 0
    assert "the weights validated best" in capsys.readouterr().out
    final = LSTMOptimizer([torch.nn.Parameter(torch.ones(4))], weights=out)
    again = LSTMOptimizer([torch.nn.Parameter(torch.ones(4))], weights=exported)
    for a, b in zip(final.rule.state_dict().values(), again.rule.state_dict().values()):
        assert torch.equal(a, b)  # the same best φ the finished run wrote
    meta = json.loads(exported.with_suffix(".json").read_text())
    assert meta["meta_training"]["episodes"] == 3 and meta["command"].startswith("learned-optim export")
    checkpoint = torch.load(tmp_path / "tiny.run" / "checkpoint.pt", weights_only=True)
    checkpoint["rule"] = {k: v + 0.5 for k, v in checkpoint["rule"].items()}  # a run that moved on since its best
    (tmp_path / "moved.run").mkdir()
    torch.save(checkpoint, tmp_path / "moved.run" / "checkpoint.pt")
    for flags, expected, printed in ((["--latest"], checkpoint["rule"], "the latest weights (episode 3"),
                                     ([], checkpoint["best_rule"], "the weights validated best")):
        assert main(["export", "--workdir", str(tmp_path / "moved.run"), "--out", str(tmp_path / "w"), *flags]) == 0
        assert printed in capsys.readouterr().out
        held = LSTMOptimizer([torch.nn.Parameter(torch.ones(4))], weights=tmp_path / "w").rule.state_dict()
        assert all(torch.equal(held[k], expected[k]) for k in held)
    with pytest.raises(SystemExit):
        main(["export", "--workdir", str(tmp_path / "nowhere"), "--out", str(exported)])
    assert "no checkpoint at" in capsys.readouterr().err


def test_meta_train_trains_only_the_named_part_and_records_it(tmp_path):
    """--trainable reaches the run's settings and the weights' metadata; the rest of φ stays as
    the warm start had it (here a fresh rule's seed-0 φ: --init-weights is not needed)."""
    from learned_optim.rules import LSTMGACConfig, LSTMGACRule, load_rule

    out = tmp_path / "part"
    assert main([*ARGS, "--episodes", "1", "--out", str(out), "--trainable", "core.weights.0[0:2]"]) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["meta_training"]["trainable"] == ["core.weights.0[0:2]"]
    trained, _ = load_rule(str(out))
    fresh = LSTMGACRule(LSTMGACConfig(hidden_size=6), seed=0)
    for (name, a), b in zip(trained.named_parameters(), fresh.parameters()):
        rows = a[2:] if name == "core.weights.0" else a
        assert torch.equal(rows, b[2:] if name == "core.weights.0" else b), name
