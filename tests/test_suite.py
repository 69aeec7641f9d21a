"""The evaluation suite's scores, worked by hand on tiny cases, its tuning walk, and the stored
learning rates' guard against stale task definitions."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from learned_optim import suite
from learned_optim.suite import SuiteResult, diverged, final_loss, speedup, steps_to_reach, summarize

ROOT = Path(__file__).resolve().parents[1]


def test_final_loss_is_the_mean_of_the_last_tenth():
    curve = list(range(20, 0, -1))  # 20 steps: the last 2 are 2 and 1
    assert final_loss(curve) == 1.5
    assert final_loss([5.0, 4.0, 3.0]) == 3.0  # at least one step
    assert final_loss([3.0, float("nan"), 1.0]) == 1.0  # only the tail counts
    assert final_loss([3.0, 2.0, float("inf")]) == math.inf


def test_diverged_means_non_finite_or_ending_above_the_start():
    assert not diverged([2.0, 1.0, 1.5, 1.9])
    assert diverged([2.0, 1.0, 2.5, 2.1])  # final 2.1 > initial 2.0
    assert diverged([2.0, float("nan"), 1.0, 1.0])  # non-finite anywhere
    assert diverged([2.0, 1.0, 1.0, math.inf])


def test_steps_to_reach_uses_the_trailing_window():
    reference = [10.0, 8.0, 6.0, 4.0, 2.0]
    assert steps_to_reach(reference, 6.0, window=1) == 3
    # window 2: trailing means 10, 9, 7, 5, 3
    assert steps_to_reach(reference, 6.0, window=2) == 4
    assert steps_to_reach(reference, 3.0, window=2) == 5
    assert steps_to_reach(reference, 2.5, window=2) is None
    assert steps_to_reach(reference, math.inf, window=2) is None


def test_speedup_worked_by_hand():
    # Adam's median over 3 seeds, per step, for a 10-step run (window = 1 step):
    adam = torch.tensor([[10.0, 9, 8, 7, 6, 5, 4, 3, 2, 1],
                         [12.0, 10, 9, 8, 7, 6, 5, 4, 3, 2],  # the median row
                         [14.0, 11, 10, 9, 8, 7, 6, 5, 4, 3]])
    # an optimizer whose final loss, 6, Adam's median reaches at step 6, in a 10-step run: 0.6
    assert speedup(adam, 6.0, 10) == (0.6, True)
    # the same final in a 5-step run: Adam needed 6 steps, speedup 1.2
    assert speedup(adam, 6.0, 5) == (1.2, True)
    # a loss Adam never reaches: only the bound 10/10 = 1 (shown "> 1")
    assert speedup(adam, 1.0, 10) == (1.0, False)


def _result(task, opt, finals, steps=10, step_ms=1.0):
    # curves whose last 10% (one step) is the final loss, starting above it
    curves = torch.tensor([[f + 10.0] * (steps - 1) + [f] for f in finals], dtype=torch.float64)
    return SuiteResult(task, opt, None, curves, step_ms, step_ms / 2)


def test_summary_geomean_tasks_beaten_and_divergences_by_hand():
    results = [
        _result("a", "adam", [1.0, 2.0, 3.0]), _result("b", "adam", [4.0, 4.0, 4.0]),
        _result("a", "mine", [0.5, 1.0, 2.0], step_ms=3.0),  # median 1 vs 2: ratio 0.5, beaten
        _result("b", "mine", [8.0, 8.0, 8.0]),  # ratio 2, not beaten
    ]
    s = summarize(results)
    assert s["mine"]["tasks"]["a"]["ratio"] == 0.5 and s["mine"]["tasks"]["b"]["ratio"] == 2.0
    assert s["mine"]["geomean_ratio"] == pytest.approx(1.0)  # √(0.5·2)
    assert s["mine"]["beaten"] == 1 and s["mine"]["compared"] == 2
    assert s["mine"]["tasks"]["a"]["step_time_ratio"] == 3.0
    assert s["adam"]["geomean_ratio"] == 1.0 and s["adam"]["beaten"] == 0
    diverging = _result("a", "bad", [1.0, 1.0, 1.0])
    diverging.curves[0, -1] = math.inf  # one seed non-finite
    diverging.curves[1, -1] = 50.0  # one seed above its start
    s = summarize([*results, diverging])
    assert s["bad"]["divergences"] == 2 and s["bad"]["tasks"]["a"]["median"] == 50.0
    report = suite.format_report([*results, diverging])
    assert "| mine | 1 | 1/2 | 0/6 |" in report and "| bad | 25 | 0/1 | 2/3 |" in report


def test_tune_walks_past_an_edge_until_the_best_rate_is_interior(monkeypatch):
    asked = []

    def fake_run(family, spec, lr, seed, steps, timing=None):
        asked.append(lr)
        score = (math.log10(lr) + 2.0) ** 2 + 1.0  # best at 1e-2
        return torch.tensor([100.0] * (steps - 1) + [score], dtype=torch.float64)

    monkeypatch.setattr(suite, "run_seed", fake_run)
    lr, scores = suite.tune(None, None, seeds=[1, 2], steps=10, window=(1.0, 10.0))
    assert lr == pytest.approx(1e-2)
    tried = sorted(scores)
    assert tried[0] == pytest.approx(10 ** -2.5) and tried[-1] == pytest.approx(10.0)  # one point past the best
    assert len(asked) == 2 * len(scores)  # each rate run once per seed


def test_tune_treats_a_diverged_run_as_worst(monkeypatch):
    def fake_run(family, spec, lr, seed, steps, timing=None):
        final = 0.1 if lr > 0.5 else 1.0
        start = 0.05 if lr > 0.5 else 5.0  # the large rates end above where they started
        return torch.tensor([start] * (steps - 1) + [final], dtype=torch.float64)

    monkeypatch.setattr(suite, "run_seed", fake_run)
    lr, scores = suite.tune(None, None, seeds=[1], steps=10, window=(0.1, 3.0))
    assert lr < 0.5 and scores[1.0] == math.inf


def test_stored_rates_are_refused_when_a_task_changed(tmp_path):
    task = suite.SuiteTask("q", "quadratic", {"dim": 3}, 10, "tiny", needs_data=False)
    tasks = {"q": (task, task.build())}
    tuned = {"q": {"definition": task.definition(tasks["q"][1]), "adam": {"lr": 0.1, "scores": {}}}}
    path = suite.save_tuned(tmp_path / "lrs.json", tuned, "python benchmarks/suite.py --retune")
    assert suite.load_tuned(path, tasks, ["adam", "lstm-gac"]) == {"q": {"adam": 0.1}}
    assert json.loads(path.read_text())["command"] == "python benchmarks/suite.py --retune"
    changed = suite.SuiteTask("q", "quadratic", {"dim": 4}, 10, "tiny", needs_data=False)
    with pytest.raises(ValueError, match="task 'q' changed since it was tuned"):
        suite.load_tuned(path, {"q": (changed, changed.build())}, ["adam"])
    with pytest.raises(ValueError, match="no tuned rate of 'sgd' on task 'q'"):
        suite.load_tuned(path, tasks, ["sgd"])


def test_suite_runs_on_one_small_task_and_writes_its_report(tmp_path, monkeypatch):
    task = suite.SuiteTask("q", "quadratic", {"dim": 3}, 20, "tiny", needs_data=False)
    tasks = {"q": (task, task.build())}
    tuned = suite.tune_suite(tasks, ["adam"], seeds=(10_000,), jobs=1)
    results = suite.evaluate_suite(tasks, ["adam", "adam-1e-3", "lstm-gac"], {"q": {"adam": tuned["q"]["adam"]["lr"]}},
                                   seeds=[0, 1], jobs=1)
    assert [r.optimizer for r in results] == ["adam", "adam-1e-3", "lstm-gac"]
    assert all(r.curves.shape == (2, 20) and r.step_ms > 0 for r in results)
    assert results[2].lr is None and results[1].lr == 1e-3
    assert "**q**" in suite.format_report(results)
    # rows of an earlier run (through its JSON) are reused, not run again; others still run
    earlier = [suite.SuiteResult.from_json(json.loads(json.dumps(r.to_json()))) for r in results[:2]]
    ran = []
    real_job = suite._evaluate_job
    monkeypatch.setattr(suite, "_evaluate_job", lambda t, o: ran.append(o) or real_job(t, o))
    again = suite.evaluate_suite(tasks, ["adam", "adam-1e-3", "lstm-gac"], {"q": {"adam": tuned["q"]["adam"]["lr"]}},
                                 seeds=[0, 1], jobs=1, reuse=earlier)
    assert ran == ["lstm-gac"] and [r.optimizer for r in again] == ["adam", "adam-1e-3", "lstm-gac"]
    assert torch.equal(again[0].curves, results[0].curves)
    other_lr = suite.evaluate_suite(tasks, ["adam"], {"q": {"adam": 0.5}}, seeds=[0, 1], jobs=1, reuse=earlier)
    assert ran[-1] == "adam" and other_lr[0].lr == 0.5  # a stored row of another lr is not reused


def test_suite_script_refuses_bad_names_in_one_line():
    for argv, message in ((["--tasks", "transformer", "--optimizers", "lstm-gac:no-such-weights"], "no shipped weights named 'no-such-weights'"),
                          (["--tasks", "transformer", "--optimizers", "adagrad"], "no optimizer named 'adagrad'"),
                          (["--tasks", "resnet"], "no suite task named 'resnet'")):
        done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "suite.py"), *argv], capture_output=True,
                              text=True, cwd=ROOT)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


def test_a_bf16_suffix_runs_a_learned_optimizer_with_bfloat16_state():
    opt = suite.learned_spec("lstm-gac:mnist@bf16").factory([torch.zeros(3, requires_grad=True)], 1.0, None)
    assert opt.state_dtype == torch.bfloat16 and opt.weights_metadata["name"] == "mnist"
    with pytest.raises(ValueError, match="@fp8"):
        suite.learned_spec("lstm-gac@fp8")
    ntm = suite.learned_spec("ntm-bfgs@bf16").factory([torch.zeros(3, requires_grad=True)], 1.0, None)
    assert ntm.state_dtype == torch.bfloat16


def test_an_lr_suffix_passes_the_users_lr_and_labels_the_report():
    opt = suite.learned_spec("lstm-gac:mnist@lr=0.5").factory([torch.zeros(3, requires_grad=True)], 1.0, None)
    assert opt.defaults["lr"] == 0.5 and opt.weights_metadata["name"] == "mnist"
    both = suite.learned_spec("ntm-bfgs@bf16@lr=0.25").factory([torch.zeros(3, requires_grad=True)], 1.0, None)
    assert both.defaults["lr"] == 0.25 and both.state_dtype == torch.bfloat16
    for bad in ("lstm-gac@lr=0", "lstm-gac@lr=-1", "lstm-gac@lr=fast", "lstm-gac@lr=nan"):
        with pytest.raises(ValueError, match="@lr= needs a positive number"):
            suite.learned_spec(bad)
    assert suite.lr_label("lstm-gac@lr=0.5", None) == "0.5"
    assert suite.lr_label("lstm-gac:suite", None) == suite.lr_label("ntm-bfgs@bf16", 1.0) == "default"
    assert suite.lr_label("adam", 0.0316) == "0.0316"


def test_reports_name_the_cpu_their_numbers_came_from():
    """Float rounding differs between CPUs and long runs amplify it, so a report's environment
    line names the CPU model (from /proc/cpuinfo on Linux)."""
    model = suite.cpu_model()
    assert model and "\n" not in model
    assert suite.environment().endswith(", " + model)
