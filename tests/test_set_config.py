"""benchmarks/set_config.py: the same tensors under a changed fixed option, with its provenance."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from benchmark_scripts import load_script

from learned_optim import NTMBFGS, LSTMOptimizer
from learned_optim.rules import load_rule

ROOT = Path(__file__).resolve().parents[1]
set_config = load_script("set_config")


def _spike_step(optimizer_class, weights) -> torch.Tensor:
    """The move of the last of 301 steps: 300 quiet gradients (1e-3), then one 1000× larger."""
    theta = torch.zeros(4, requires_grad=True)
    opt = optimizer_class([theta], weights=weights)
    for t in range(301):
        before = theta.detach().clone()
        theta.grad = torch.full((4,), 1e-3 if t < 300 else 1.0)
        opt.step()
    return theta.detach() - before


@pytest.mark.parametrize(("optimizer_class", "source", "field"), [
    (LSTMOptimizer, "suite-time-half", "direction_clip"),
    (NTMBFGS, "ntm-bfgs-suite", "controller.direction_clip"),
])
def test_set_config_keeps_the_tensors_changes_the_option_and_records_both(tmp_path, optimizer_class, source, field):
    out = tmp_path / "clipped"
    assert set_config.main(["--weights", source, "--set", f"{field}=0.5", "--out", str(out)]) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    original = json.loads((ROOT / "pretrained" / f"{source}.json").read_text())
    assert meta["tensors_sha256"] == original["tensors_sha256"]
    config = meta["config"]["controller"] if "controller" in field else meta["config"]
    assert config["direction_clip"] == 0.5
    record = meta["set_config"]
    assert record["changes"] == {field: 0.5} and "benchmarks/set_config.py" in record["command"]
    assert record["source"]["command"] == original["command"]  # the meta-training command that made φ
    rule, _ = load_rule(out)
    clipped = {k: v for k, v in rule.state_dict().items()}
    for name, tensor in load_rule(source)[0].state_dict().items():
        assert torch.equal(clipped[name], tensor)
    # the option is in force: after a quiet stretch the spike's move is smaller than the source's
    assert _spike_step(optimizer_class, str(out)).abs().max() < _spike_step(optimizer_class, source).abs().max()


@pytest.mark.parametrize(("assignment", "message"), [
    ("hidden_size=10", "can change only direction_clip"),
    ("memory.direction_clip=1", "can change only"),
    ("direction_clip", "FIELD=VALUE"),
    ("direction_clip=one", "must be JSON"),
])
def test_set_config_refuses_what_it_cannot_change_by_name(assignment, message):
    with pytest.raises(ValueError, match=message):
        set_config.parse_assignment(assignment)


@pytest.mark.parametrize(("source", "assignment", "message"), [
    ("suite-time-half", "direction_clip=-1", "direction_clip must be a finite positive number"),
    ("suite-time-half", "trust_ratio=10", "unknown LSTMGACConfig fields: \\['trust_ratio'\\]"),  # NTM-BFGS's own
    ("ntm-bfgs-lstm-controller", "trust_ratio=0", "trust_ratio must be a finite positive number"),
    ("ntm-bfgs-trust", 'memory="banana"', "memory must be one of \\('auto', 'dense', 'limited'\\), got 'banana'"),
    ("suite-steps-t500", "momentum_rms_decay=0.98", "must exceed the square of every momentum decay"),
])
def test_set_config_refuses_a_bad_value_through_the_configs_own_check(tmp_path, capsys, source, assignment, message):
    with pytest.raises(SystemExit):
        set_config.main(["--weights", source, "--set", assignment, "--out", str(tmp_path / "x")])
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "x.json").exists()


def _set_keeping_the_tensors(tmp_path, source: str, assignment: str):
    """set_config with one assignment; the written weights must hold the source's tensors exactly."""
    out = tmp_path / "set"
    assert set_config.main(["--weights", source, "--set", assignment, "--out", str(out)]) == 0
    rule, meta = load_rule(out)
    for name, tensor in load_rule(source)[0].state_dict().items():
        assert torch.equal(rule.state_dict()[name], tensor)
    return rule, meta


def test_set_config_sets_ntm_bfgs_trust_ratio_keeping_the_tensors(tmp_path):
    rule, meta = _set_keeping_the_tensors(tmp_path, "ntm-bfgs-lstm-controller", "trust_ratio=50")
    assert rule.config.trust_ratio == 50.0 and meta["set_config"]["changes"] == {"trust_ratio": 50}


def test_set_config_sets_reset_on_backtrack_keeping_the_tensors(tmp_path):
    rule, meta = _set_keeping_the_tensors(tmp_path, "ntm-bfgs-bases", "reset_on_backtrack=true")
    assert rule.config.reset_on_backtrack and meta["set_config"]["changes"] == {"reset_on_backtrack": True}


def test_set_config_sets_the_curvature_eps_keeping_the_tensors(tmp_path):
    """ε of the skip rule lives in the config alone (the heads read it from there each step)."""
    rule, meta = _set_keeping_the_tensors(tmp_path, "ntm-bfgs-bases", "curvature_eps=0.7")
    assert rule.config.curvature_eps == 0.7 and not hasattr(rule.heads, "curvature_eps")
    assert meta["set_config"]["changes"] == {"curvature_eps": 0.7}


def test_set_config_sets_the_limited_memory_capacity_keeping_the_tensors(tmp_path):
    """K = 3 (one step's three BFGS pairs): the limited memory of a group holds exactly that many."""
    rule, meta = _set_keeping_the_tensors(tmp_path, "ntm-bfgs-bases", "memory_capacity=3")
    assert rule.config.memory_capacity == 3 and meta["set_config"]["changes"] == {"memory_capacity": 3}
    assert rule.segments([2000]).memory.capacity == 3


def test_set_config_sets_the_memory_form_keeping_the_tensors(tmp_path):
    """memory="auto": dense memory for groups of up to 1,024 coordinates, the limited form above."""
    rule, meta = _set_keeping_the_tensors(tmp_path, "ntm-bfgs-trust", 'memory="auto"')
    assert rule.config.memory == "auto" and meta["set_config"]["changes"] == {"memory": "auto"}
    assert type(rule.segments([1024]).memory).__name__ == "DenseMemory"
    assert type(rule.segments([1000, 25]).memory).__name__ == "LimitedMemory"


def test_set_config_fixes_the_write_bases_at_bfgs_keeping_the_tensors(tmp_path):
    rule, meta = _set_keeping_the_tensors(tmp_path, "ntm-bfgs-trust", "bfgs_write_bases=true")
    assert rule.config.bfgs_write_bases and rule.heads.bfgs_bases
    assert meta["set_config"]["changes"] == {"bfgs_write_bases": True}


def test_set_config_sets_the_second_moment_decay_keeping_the_tensors(tmp_path):
    """β₂ of v: after gradients 1 then 0, v = β₂·(1−β₂) by hand, so the rule state shows which β₂ ran."""
    rule, meta = _set_keeping_the_tensors(tmp_path, "suite-steps-t500", "momentum_rms_decay=0.99")
    assert rule.config.momentum_rms_decay == 0.99 and meta["set_config"]["changes"] == {"momentum_rms_decay": 0.99}
    theta = torch.zeros(3, requires_grad=True)
    opt = LSTMOptimizer([theta], weights=str(tmp_path / "set"))
    for grad in (1.0, 0.0):
        theta.grad = torch.full((3,), grad)
        opt.step()
    v = opt.state[theta]["rule_state"][-2]  # the rows end with v, then the step count
    torch.testing.assert_close(v, torch.full((3,), 0.99 * 0.01))


def test_set_config_validates_source_and_result_on_held_out_tasks_when_asked(tmp_path, capsys):
    out = tmp_path / "clipped"
    assert set_config.main(["--weights", "suite-time-half", "--set", "direction_clip=0.2", "--out", str(out),
                            "--validation-tasks", "2", "--family", "quadratic", "--family-kwargs", "{}",
                            "--horizon", "30", "--threads", "1"]) == 0
    validation = json.loads(out.with_suffix(".json").read_text())["set_config"]["validation"]
    assert validation["tasks"] == 2 and validation["horizon"] == 30
    source, result = validation["source"], validation["result"]
    # a clamp at 0.2 bites from the first step (d_j = ±1 there), so the two scores differ
    assert source["median_final_loss"] != result["median_final_loss"]
    printed = capsys.readouterr().out
    assert f"{source['median_final_loss']:.4g}" in printed and "direction_clip" in printed
