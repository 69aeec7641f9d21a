"""The benchmark harness and the command line."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from learned_optim import benchmark
from learned_optim.cli import main
from learned_optim.optim.ntm import NTM_DEFAULT_WEIGHTS
from learned_optim.tasks import get_family


def test_half_decade_grid():
    grid = benchmark.half_decade_grid(1e-2, 1.0)
    assert grid == pytest.approx([0.01, 0.0316227766, 0.1, 0.316227766, 1.0])


def test_train_records_losses_and_marks_divergence():
    task = get_family("quadratic").sample(0)
    good = benchmark.train(task, lambda p: torch.optim.SGD(p, lr=1e-3), 50)
    assert torch.isfinite(good).all() and good[-1] < good[0]
    bad = benchmark.train(task, lambda p: torch.optim.SGD(p, lr=10.0), 50)
    assert math.isinf(benchmark.final_loss(bad))
    # The package's optimizers refuse the non-finite gradient; the harness records divergence.
    spec = benchmark.package_optimizers(["conjugate-momentum-sgd"])["conjugate-momentum-sgd"]
    refused = benchmark.run_seed(get_family("quadratic"), spec, 10.0, 0, 50)
    assert math.isinf(benchmark.final_loss(refused))


def test_tune_lr_picks_the_grid_point_with_the_lowest_median():
    family = get_family("quadratic")
    spec = benchmark.baselines()["sgd"]
    best, scores = benchmark.tune_lr(family, spec, seeds=[101, 102], steps=30)
    assert scores[best] == min(scores.values())
    assert math.isinf(scores[10.0])  # SGD at lr 10 diverges on the paper's quadratics


def test_package_optimizers_get_the_tasks_batch_size_and_matched_momentum():
    spec = benchmark.package_optimizers(["conjugate-momentum-sgd"])["conjugate-momentum-sgd"]
    task = get_family("mlp", batch_size=64).sample(0)
    opt = spec.factory(task.init_params(), 0.01, task)
    assert opt.param_groups[0]["batch_size"] == 64
    assert opt.derived_hyperparameters()["momentum"] == pytest.approx(0.9)


def test_package_optimizers_run_a_learned_optimizer_with_named_weights():
    specs = benchmark.package_optimizers(["ntm-bfgs", "ntm-bfgs:ntm-bfgs-mnist", "lstm-gac:quadratic"])
    task = get_family("quadratic").sample(0)
    made = {name: spec.factory(task.init_params(), 1.0, task) for name, spec in specs.items()}
    assert made["ntm-bfgs"].weights_metadata["name"] == NTM_DEFAULT_WEIGHTS
    assert made["ntm-bfgs:ntm-bfgs-mnist"].weights_metadata["name"] == "ntm-bfgs-mnist"
    assert made["lstm-gac:quadratic"].weights_metadata["name"] == "quadratic"
    assert specs["ntm-bfgs:ntm-bfgs-mnist"].lr_grid == (1.0,)
    with pytest.raises(KeyError, match="no optimizer named 'sgd-like'"):
        benchmark.package_optimizers(["sgd-like:mnist"])
    with pytest.raises(ValueError, match="'conjugate-adam' takes no weights"):
        benchmark.package_optimizers(["conjugate-adam:mnist"])


def _tiny(jobs: int):
    tasks = {"quadratic": (get_family("quadratic"), 20), "rosenbrock": (get_family("rosenbrock"), 20)}
    specs = {**benchmark.baselines(), **benchmark.package_optimizers(["conjugate-momentum-sgd"])}
    specs = {k: benchmark.OptimizerSpec(v.name, v.factory, [1e-3, 1e-2]) for k, v in specs.items()}
    return benchmark.run_benchmark(tasks, specs, eval_seeds=[0, 1, 2], tune_seeds=[50], jobs=jobs)


def test_run_benchmark_table_files_and_parallel_equals_serial(tmp_path):
    serial = _tiny(1)
    parallel = _tiny(2)
    assert [(r.task, r.optimizer, r.lr) for r in serial] == [(r.task, r.optimizer, r.lr) for r in parallel]
    for a, b in zip(serial, parallel):
        assert torch.equal(a.curves, b.curves)
    assert len(serial) == 2 * 5 and serial[0].curves.shape == (3, 20)
    table = benchmark.format_table(serial)
    assert table.count("\n") == 2 + 10 - 1 and "| quadratic | nag |" in table
    out = benchmark.save_results(serial, tmp_path, header="hdr")
    assert (out / "benchmark.md").read_text().startswith("hdr")
    rows = json.loads((out / "benchmark.json").read_text())
    assert {r["optimizer"] for r in rows} == {"sgd", "nag", "rmsprop", "adam", "conjugate-momentum-sgd"}
    assert all(r["q25"] <= r["median"] <= r["q75"] for r in rows)
    pytest.importorskip("matplotlib")
    png = benchmark.plot_results(serial, tmp_path / "plot.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_overlapping_seeds_are_refused():
    with pytest.raises(ValueError, match="overlap"):
        benchmark.run_benchmark({}, {}, eval_seeds=[1, 2], tune_seeds=[2])


def test_cli_benchmark_writes_its_table(tmp_path, capsys):
    code = main(
        ["benchmark", "--tasks", "quadratic", "--optimizers", "sgd,conjugate-adam", "--steps", "15",
         "--seeds", "2", "--tune-seeds", "1", "--jobs", "1", "--out", str(tmp_path)]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "| quadratic | conjugate-adam |" in printed and "| quadratic | sgd |" in printed
    assert "learned-optim benchmark --tasks quadratic" in (tmp_path / "benchmark.md").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--optimizers", "bogus"], "no optimizer named 'bogus'; available: "),
    (["--tasks", "nosuch"], "no task family named 'nosuch'; available: "),
    (["--tasks", "nosuchmodule:family"], "task path 'nosuchmodule:family': cannot import module 'nosuchmodule'"),
    (["--seeds", "0"], "--seeds must be a positive integer"),
])
def test_cli_reports_a_bad_argument_in_one_line_with_status_2(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["benchmark", *argv, "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"learned-optim benchmark: error: {message}" in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())  # nothing ran


def test_python_dash_m_runs_the_cli():
    done = subprocess.run([sys.executable, "-m", "learned_optim", "list"], capture_output=True, text=True, check=True)
    assert "conjugate-momentum-sgd" in done.stdout and "quadratic" in done.stdout
