"""benchmarks/gpu_check.py's harness and benchmarks/meta_speed.py: what they report when a part
fails or is cut off, and the settings they accept. (The GPU sections themselves run on a GPU; the
whole script runs on the CPU under TRITON_INTERPRET=1 with --device cpu.)"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

import pytest
import torch
from benchmark_scripts import load_script

ROOT = Path(__file__).resolve().parents[1]



gpu_check = load_script("gpu_check")
meta_speed = load_script("meta_speed")


def test_a_timed_out_subprocess_keeps_its_output_and_has_not_passed():
    code = "import time; print('first line', flush=True); time.sleep(30)"
    passed, status, tail = gpu_check.run_logged([sys.executable, "-c", code], timeout=2)
    assert not passed and "timeout" in status and "first line" in tail
    passed, status, tail = gpu_check.run_logged([sys.executable, "-c", "import sys; print('x'); sys.exit(3)"], 20)
    assert not passed and status == "exit status 3" and tail == "x"


def test_a_section_whose_check_fails_is_reported_failed_and_the_rest_still_run(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "SECTIONS", [
        ("fails", lambda args: gpu_check.checked(False, "exit status 1: boom")),
        ("raises", lambda args: 1 / 0),
        ("passes", lambda args: gpu_check.checked(True, "all fine")),
    ])
    assert gpu_check.main(["--device", "cpu", "--out", str(tmp_path)]) == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {k: v["status"] for k, v in summary.items()} == {"fails": "failed", "raises": "failed", "passes": "ok"}
    report = (tmp_path / "report.md").read_text()
    assert "## 1. fails (0 s, FAILED)\n\nexit status 1: boom" in report
    assert "ZeroDivisionError" in report and "## 3. passes (0 s)\n\nall fine" in report


def test_step_time_is_per_step_not_per_sync():
    """A step that takes 2 ms is timed at about 2 ms, with many steps between two syncs."""
    class Sleeper(torch.optim.Optimizer):
        def __init__(self):
            super().__init__([torch.zeros(1, requires_grad=True)], {})
            self.calls = 0

        def step(self, closure=None):
            self.calls += 1
            time.sleep(0.002)

    opt = Sleeper()
    seconds = gpu_check.time_steps(opt, torch.device("cpu"), budget=0.1, rounds=2)
    assert 0.0019 < seconds < 0.006
    assert opt.calls > 2 * 5  # several steps per round


def test_meta_speed_refuses_unknown_settings_and_says_which_need_data(capsys, tmp_path):
    with pytest.raises(SystemExit) as exited:
        meta_speed.main(["--settings", "suite-mix-pes", "--out", str(tmp_path)])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "unknown setting(s) ['suite-mix-pes']" in err and "need --data" in err


def test_meta_speed_times_one_setting_and_writes_its_row(tmp_path):
    assert meta_speed.main(["--settings", "quadratic", "--episodes", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "meta_speed.json").read_text())["rows"]
    assert [(r["setting"], r["estimator"], r["precision"]) for r in rows] == [("quadratic", "truncated-bptt", "float32")]
    assert rows[0]["meta_steps_per_second"] > 0 and rows[0]["skipped"] == 0
    assert "| quadratic | lstm-gac | 128 | first-order | truncated-bptt | float32 |" in (tmp_path / "meta_speed.md").read_text()


def test_meta_speed_suite_settings_are_the_default_weights_recipes(mnist_dir):
    """The suite settings start from the shipped defaults and train what their recipes trained."""
    from learned_optim.optim.lstm import DEFAULT_WEIGHTS
    from learned_optim.optim.ntm import NTM_DEFAULT_WEIGHTS

    found = meta_speed.settings(str(mnist_dir))
    assert found["suite-mix-relative"]["init_weights"] == DEFAULT_WEIGHTS
    assert found["suite-mix-pes"]["init_weights"] == "suite-steps-t500"
    assert found["ntm-bfgs-suite-mix-pes"]["init_weights"] == NTM_DEFAULT_WEIGHTS
    recorded = json.loads((ROOT / "pretrained" / f"{DEFAULT_WEIGHTS}.json").read_text())["command"]
    last_stage = [c for c in recorded.split(" && ") if c.startswith("learned-optim meta-train")][-1]
    assert "--estimator" not in last_stage and "--trainable" not in last_stage  # truncated BPTT on the whole rule
    extra = json.loads(shlex.split(last_stage)[shlex.split(last_stage).index("--task-kwargs") + 1])["extra"]
    relative = found["suite-mix-relative"]
    assert [e if isinstance(e, str) else e[0] for e in relative["task_kwargs"]["extra"]] == \
        [e if isinstance(e, str) else e[0] for e in extra]
    assert relative.get("estimator", "truncated-bptt") == "truncated-bptt" and "trainable" not in relative
    recorded = json.loads((ROOT / "pretrained" / "suite-steps-t500.json").read_text())["command"]
    assert "--trainable momentum_weight momentum_bias" in recorded and "--pes-pairs 4" in recorded
    assert found["suite-mix-pes"]["trainable"] == ["momentum_weight", "momentum_bias"]
