"""benchmarks/step_scale.py: weights whose step is κ times another's are the optimizer at lr = κ."""

from __future__ import annotations

import json

import torch
from benchmark_scripts import load_script

from learned_optim import LSTMOptimizer

step_scale = load_script("step_scale")


def _trajectory(weights: str, lr: float, steps: int = 6) -> torch.Tensor:
    torch.manual_seed(0)
    target = torch.randn(5, 3)
    theta = torch.zeros(5, 3, requires_grad=True)
    opt = LSTMOptimizer([theta], weights=weights, lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        ((theta - target) ** 2).sum().backward()
        opt.step()
    return theta.detach()


def test_scaled_weights_step_exactly_like_the_source_at_lr_kappa_and_record_their_choice(tmp_path, capsys):
    out = tmp_path / "half"
    assert step_scale.main(["--weights", "suite-time", "--scales", "0.5", "0.25", "--family", "quadratic",
                            "--family-kwargs", "{}", "--validation-tasks", "2", "--horizon", "20",
                            "--select-by", "median_final_loss", "--threads", "1", "--out", str(out)]) == 0
    meta = json.loads(out.with_suffix(".json").read_text())["step_scale"]
    scores = {v["factor"]: v["median_final_loss"] for v in meta["validation"]}
    assert meta["select_by"] == "median_final_loss" and meta["factor"] == min(scores, key=scores.get)
    assert "picked by median_final_loss" in capsys.readouterr().out
    kappa = meta["factor"]
    torch.testing.assert_close(_trajectory(str(out), 1.0), _trajectory("suite-time", kappa), rtol=1e-5, atol=1e-6)
    assert kappa in (0.5, 0.25) and not torch.allclose(_trajectory(str(out), 1.0), _trajectory("suite-time", 1.0))
