"""The shipped default weights are worth using: LSTMOptimizer(params), nothing else, trains the
paper's MNIST net on held-out images well below what tuned SGD reaches in the same steps."""

from __future__ import annotations

import pytest
from test_tasks import mnist_root

from learned_optim import LSTMOptimizer
from learned_optim.benchmark import OptimizerSpec, baselines, final_loss, quantile, run_seed
from learned_optim.optim.lstm import DEFAULT_WEIGHTS
from learned_optim.tasks import get_family

needs_mnist = pytest.mark.skipif(mnist_root() is None, reason="MNIST files not found (set LEARNED_OPTIM_DATA)")

STEPS, SEEDS = 100, (0, 1, 2)  # the paper's horizon; evaluation seeds of benchmarks/mnist_figures.py
SGD_LRS = (0.1, 0.316, 1.0, 3.16)  # around SGD's tuned lr on this task


@needs_mnist
def test_default_weights_train_the_base_net_on_held_out_images_well_below_tuned_sgd():
    assert DEFAULT_WEIGHTS == "suite-relative-discount"
    family = get_family("mnist-mlp", root=mnist_root(), part="held-out")  # images never meta-trained on
    default = OptimizerSpec("lstm-gac", lambda params, lr, task: LSTMOptimizer(params))
    learned = quantile([final_loss(run_seed(family, default, 1.0, seed, STEPS)) for seed in SEEDS], 0.5)
    sgd = baselines()["sgd"]
    best_sgd = min(quantile([final_loss(run_seed(family, sgd, lr, seed, STEPS)) for seed in SEEDS], 0.5)
                   for lr in SGD_LRS)
    # Tuned SGD ends near 0.22 here (README table); the default weights must be clearly better.
    assert learned < 0.75 * best_sgd, f"default weights {learned:.4f} vs best SGD {best_sgd:.4f}"


@pytest.mark.parametrize("optimizer", ["LSTMOptimizer", "NTMBFGS"])
def test_default_weights_train_a_held_out_transformer_below_adam_at_its_default_lr(optimizer):
    """Each learned optimizer at its defaults, no argument but the params, on a transformer
    language model it never saw (the suite's family, held-out text, a held-out seed), against
    Adam(lr=1e-3)."""
    import torch

    import learned_optim
    from learned_optim.optim.ntm import NTM_DEFAULT_WEIGHTS

    assert (DEFAULT_WEIGHTS, NTM_DEFAULT_WEIGHTS) == ("suite-relative-discount", "ntm-bfgs-k3-short")
    learned = getattr(learned_optim, optimizer)
    family = get_family("text-transformer", part="held-out")
    finals = {}
    for name, make in (("learned", lambda ps: learned(ps)), ("adam", lambda ps: torch.optim.Adam(ps, lr=1e-3))):
        losses = run_seed(family, OptimizerSpec(name, lambda ps, lr, task, make=make: make(ps)), 1.0, 7, 80)
        finals[name] = final_loss(losses)
    assert finals["learned"] < finals["adam"], finals


@pytest.mark.parametrize("default, source, read", [
    ("suite-decay", "suite-clip", lambda config: config),
    ("ntm-bfgs-decay", "ntm-bfgs-suite", lambda config: config["controller"]),
])
def test_decay_weights_are_their_sources_with_the_step_decay_alone(default, source, read):
    """The decay weights add one fixed option to weights measured before them: the same tensors
    (the hashes the loader checks), the same config but step_decay_after = 2,000 (the horizon past
    which they anneal), so every run of up to 2,000 steps is the source's."""
    from learned_optim import available_weights

    weights = available_weights()
    mine, theirs = weights[default], weights[source]
    assert mine["tensors_sha256"] == theirs["tensors_sha256"]
    assert read(mine["config"])["step_decay_after"] == 2000
    assert read(theirs["config"]).get("step_decay_after") is None
    from learned_optim.rules import LSTMGACConfig

    def without_decay(config: dict) -> LSTMGACConfig:  # fields saved before they existed take their defaults
        return LSTMGACConfig.from_dict(dict(read(config), step_decay_after=None))

    assert without_decay(mine["config"]) == without_decay(theirs["config"])


def test_suite_steps_is_suite_decay_with_only_the_step_sizes_meta_trained():
    """suite-steps was meta-trained from suite-decay with --trainable momentum_weight momentum_bias:
    those two tensors (the u_j and c_j of the step Σ_j (u_jᵀh + c_j)·d_j) moved, every other tensor
    and the whole config are suite-decay's, so the decay past step 2,000 and the clamp carry over."""
    import torch
    from safetensors.torch import load_file

    from learned_optim import available_weights
    from learned_optim.rules.weights import pretrained_dir

    weights = available_weights()
    assert weights["suite-steps"]["config"] == weights["suite-decay"]["config"]
    mine, theirs = (load_file(pretrained_dir() / f"{name}.safetensors") for name in ("suite-steps", "suite-decay"))
    assert mine.keys() == theirs.keys()
    moved = {name for name in mine if not torch.equal(mine[name], theirs[name])}
    assert moved == {"momentum_weight", "momentum_bias"}


def test_the_default_steps_relative_to_each_tensor_whatever_its_parametrization():
    """suite-relative-discount (the LSTMOptimizer default) multiplies its step by s = max(s_0, s_t·m_t/s_0) per
    tensor, s_t = RMS(θ_t) + ε_θ (ε_θ = 0.01), m_t the lowest s so far (relative_floor, shrink_discount), and
    its inputs are normalized per coordinate. So with
    every tensor rescaled, θ_k → c_k·θ_k, and its gradients ∇_k → ∇_k/c_k (the same function,
    reparametrized), the learned direction does not change and tensor k's step is the original's
    times s(c_k·θ_k)/s(θ_k), at every step of a run, by hand from the params."""
    import torch

    from learned_optim import LSTMOptimizer, available_weights

    config = available_weights()[DEFAULT_WEIGHTS]["config"]
    assert config["relative_step"] == 0.01 and config["relative_floor"] is True and config["shrink_discount"] is True
    gen = torch.Generator().manual_seed(0)
    shapes, factors = [(8, 5), (8,), (3, 8)], [0.01, 1.0, 30.0]
    plain = [torch.randn(shape, generator=gen) for shape in shapes]
    scaled = [t * c for t, c in zip(plain, factors)]
    opts = [LSTMOptimizer(plain), LSTMOptimizer(scaled)]
    start = {id(p): p.square().mean().sqrt() + 0.01 for p in plain + scaled}  # s_0
    lowest = dict(start)  # m_t

    def scale(params):
        factors = []
        for p in params:
            s_t = p.square().mean().sqrt() + 0.01
            lowest[id(p)] = torch.minimum(lowest[id(p)], s_t)
            factors.append(torch.maximum(start[id(p)], s_t * lowest[id(p)] / start[id(p)]))
        return factors

    for _ in range(5):
        for p, q, c in zip(plain, scaled, factors):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad / c
        before = [p.clone() for p in plain], [q.clone() for q in scaled]
        ratios = [s / u for s, u in zip(scale(scaled), scale(plain))]
        for opt in opts:
            opt.step()
        for k, ratio in enumerate(ratios):
            step_plain, step_scaled = plain[k] - before[0][k], scaled[k] - before[1][k]
            assert step_plain.abs().min() > 0
            torch.testing.assert_close(step_scaled, step_plain * ratio, rtol=1e-4, atol=0)


def test_suite_relative_discount_is_suite_relative_floor_with_the_discount_alone():
    """suite-relative-discount (the LSTMOptimizer default) is suite-relative-floor's tensors (the hash the
    loader checks) with one config field changed, shrink_discount, set by benchmarks/set_config.py."""
    from learned_optim import available_weights
    from learned_optim.rules import LSTMGACConfig

    weights = available_weights()
    mine, theirs = weights["suite-relative-discount"], weights["suite-relative-floor"]
    assert mine["tensors_sha256"] == theirs["tensors_sha256"]
    discounted, source = (LSTMGACConfig(**w["config"]) for w in (mine, theirs))
    assert (discounted.shrink_discount, source.shrink_discount) == (True, False)
    assert dict(discounted.to_dict(), shrink_discount=None) == dict(source.to_dict(), shrink_discount=None)
    assert theirs["command"] in mine["command"]  # the source's whole chain, then:
    assert "python benchmarks/set_config.py --weights suite-relative-floor --set shrink_discount=true" in mine["command"]


def test_suite_relative_floor_is_suite_relative_offset_with_the_floor_alone():
    """suite-relative-floor (the LSTMOptimizer default before suite-relative-discount) is suite-relative-offset's tensors (the hash the
    loader checks) with one config field changed, relative_floor, set by benchmarks/set_config.py."""
    from learned_optim import available_weights
    from learned_optim.rules import LSTMGACConfig

    weights = available_weights()
    mine, theirs = weights["suite-relative-floor"], weights["suite-relative-offset"]
    assert mine["tensors_sha256"] == theirs["tensors_sha256"]
    floored, source = (LSTMGACConfig(**w["config"]) for w in (mine, theirs))  # (options added since: defaults)
    assert (floored.relative_floor, source.relative_floor) == (True, False)
    assert dict(floored.to_dict(), relative_floor=None) == dict(source.to_dict(), relative_floor=None)
    assert theirs["command"] in mine["command"]  # the source's whole chain, then:
    assert "python benchmarks/set_config.py --weights suite-relative-offset --set relative_floor=true" in mine["command"]


def test_suite_steps_t500_is_suite_steps_with_the_decay_from_step_500():
    """suite-steps-t500 (the LSTMOptimizer default before suite-relative) is suite-steps' tensors (the hash the loader
    checks) with one config field changed: step_decay_after 500 instead of 2,000, so every run of
    up to 500 steps is suite-steps' and past it the step anneals by √(500/t)."""
    from learned_optim import available_weights

    weights = available_weights()
    mine, theirs = weights["suite-steps-t500"], weights["suite-steps"]
    assert mine["tensors_sha256"] == theirs["tensors_sha256"]
    assert (mine["config"]["step_decay_after"], theirs["config"]["step_decay_after"]) == (500, 2000)
    assert dict(mine["config"], step_decay_after=None) == dict(theirs["config"], step_decay_after=None)
    assert "learned-optim meta-train" in mine["command"] and "step_decay_after=500" in mine["command"]


def test_ntm_bfgs_steps_is_ntm_bfgs_decay_clamped_with_only_the_step_sizes_meta_trained():
    """ntm-bfgs-steps was meta-trained from ntm-bfgs-decay with the controller's clamp set
    (direction_clip 3) and --trainable controller.momentum_weight controller.momentum_bias: those
    two tensors moved, every other tensor (heads, memory, the controller's LSTM) and the rest of the
    config are ntm-bfgs-decay's."""
    import torch
    from safetensors.torch import load_file

    from learned_optim import available_weights
    from learned_optim.rules.weights import pretrained_dir

    weights = available_weights()
    mine, theirs = weights["ntm-bfgs-steps"], weights["ntm-bfgs-decay"]
    assert (mine["config"]["controller"]["direction_clip"], theirs["config"]["controller"]["direction_clip"]) == (3, None)
    mine_config = dict(mine["config"], controller=dict(mine["config"]["controller"], direction_clip=None))
    assert mine_config == theirs["config"]
    new, old = (load_file(pretrained_dir() / f"{name}.safetensors") for name in ("ntm-bfgs-steps", "ntm-bfgs-decay"))
    assert new.keys() == old.keys()
    moved = {name for name in new if not torch.equal(new[name], old[name])}
    assert moved == {"controller.momentum_weight", "controller.momentum_bias"}
    assert "learned-optim meta-train" in mine["command"] and "--init-weights ntm-bfgs-decay" in mine["command"]


def test_ntm_bfgs_lstm_controller_is_the_lstm_default_as_controller_with_trained_heads():
    """ntm-bfgs-lstm-controller: the controller is suite-steps-t500 (LSTMOptimizer's default) exactly,
    tensors and config, but for its two memory-input rows; the heads and those rows were meta-trained
    (moved from ntm-bfgs-steps', where they started)."""
    import torch
    from safetensors.torch import load_file

    from learned_optim import available_weights
    from learned_optim.rules.weights import pretrained_dir

    weights = available_weights()
    mine, lstm = weights["ntm-bfgs-lstm-controller"], weights["suite-steps-t500"]
    assert mine["config"]["controller"] == {**lstm["config"], "extra_inputs": 2}
    ntm, controller, start = (load_file(pretrained_dir() / f"{name}.safetensors")
                              for name in ("ntm-bfgs-lstm-controller", "suite-steps-t500", "ntm-bfgs-steps"))
    for name, tensor in controller.items():
        ours = ntm[f"controller.{name}"]
        if name == "core.weights.0":  # rows 7:9 read the memory
            assert ours[7:9].abs().sum() > 0
            ours = torch.cat([ours[:7], ours[9:]])
        assert torch.equal(ours, tensor), name
    moved = {name for name in ntm if name.startswith("heads.") and not torch.equal(ntm[name], start[name])}
    assert moved == {name for name in ntm if name.startswith("heads.")}
    assert "--init-weights ntm-bfgs-steps --init-controller suite-steps-t500" in mine["command"]


def test_ntm_bfgs_trust_is_ntm_bfgs_lstm_controller_with_the_trust_region_alone():
    """ntm-bfgs-trust (NTMBFGS's default before ntm-bfgs-bases) adds one fixed option to ntm-bfgs-lstm-controller: the same
    tensors (the hash the loader checks), the same config but trust_ratio = 1000; its metadata holds
    the whole chain of commands, from the meta-training to the packaging, and the suite's scores."""
    from learned_optim import NTMBFGSConfig, available_weights

    weights = available_weights()
    mine, theirs = weights["ntm-bfgs-trust"], weights["ntm-bfgs-lstm-controller"]
    assert mine["tensors_sha256"] == theirs["tensors_sha256"]
    assert mine["config"]["trust_ratio"] == 1000.0 and theirs["config"].get("trust_ratio") is None
    assert NTMBFGSConfig.from_dict(dict(mine["config"], trust_ratio=None)) == NTMBFGSConfig.from_dict(theirs["config"])
    assert mine["command"].startswith(theirs["command"] + " && python benchmarks/set_config.py")
    assert "--set trust_ratio=1000" in mine["command"] and "benchmarks/ship_weights.py" in mine["command"]
    assert mine["evaluation"]["diverged"] == 0 and mine["evaluation"]["geomean_ratio_to_tuned_adam"] < 0.9


def test_ntm_bfgs_bases_is_ntm_bfgs_trust_with_bfgs_bases_and_its_learned_part_retrained():
    """ntm-bfgs-bases (NTMBFGS's default before ntm-bfgs-k3) is ntm-bfgs-trust with two options set (memory="auto",
    bfgs_write_bases) and, of its tensors, only what the meta-train command named as trainable
    moved (the heads' readout and the controller's two read-input rows); its metadata holds the
    whole chain: ntm-bfgs-trust's commands, set_config, meta-train, export and the packaging."""
    import torch

    from learned_optim import NTMBFGSConfig, available_weights
    from learned_optim.rules import load_rule

    weights = available_weights()
    mine, theirs = weights["ntm-bfgs-bases"], weights["ntm-bfgs-trust"]
    assert NTMBFGSConfig.from_dict(dict(mine["config"], memory="limited", bfgs_write_bases=False)) == \
        NTMBFGSConfig.from_dict(theirs["config"])
    assert mine["config"]["memory"] == "auto" and mine["config"]["bfgs_write_bases"] is True
    assert mine["meta_training"]["trainable"] == ["heads.readout.weight", "heads.readout.bias",
                                                   "controller.core.weights.0[7:9]"]
    ours, start = load_rule("ntm-bfgs-bases")[0].state_dict(), load_rule("ntm-bfgs-trust")[0].state_dict()
    moved = {name for name in ours if not torch.equal(ours[name], start[name])}
    assert moved == {"heads.readout.weight", "heads.readout.bias", "controller.core.weights.0"}
    first = ours["controller.core.weights.0"]
    rows = torch.ones(first.shape[0], dtype=torch.bool)
    rows[7:9] = False
    assert torch.equal(first[rows], start["controller.core.weights.0"][rows])
    steps = mine["command"].split(" && ")
    assert mine["command"].startswith(theirs["command"] + " && python benchmarks/set_config.py --weights ntm-bfgs-trust")
    assert [s.split()[1] for s in steps[-3:]] == ["meta-train", "export", "benchmarks/ship_weights.py"]
    assert mine["evaluation"]["diverged"] == 0 and mine["evaluation"]["geomean_ratio_to_tuned_adam"] < 0.9


def test_ntm_bfgs_k3_is_ntm_bfgs_bases_with_a_faster_v_and_one_steps_write_pairs():
    """ntm-bfgs-k3 (NTMBFGS's default before ntm-bfgs-k3-short) is ntm-bfgs-bases' tensors (the hash the loader checks)
    with two options set and nothing else: the controller's β₂ 0.985 and memory_capacity 3; its
    metadata holds ntm-bfgs-bases' whole chain, both set_config commands and the packaging, and
    the suite's and the 20,000-step runs' scores."""
    from learned_optim import NTMBFGSConfig, available_weights
    from learned_optim.rules import load_rule

    weights = available_weights()
    mine, theirs = weights["ntm-bfgs-k3"], weights["ntm-bfgs-bases"]
    assert mine["tensors_sha256"] == theirs["tensors_sha256"]
    assert mine["config"]["memory_capacity"] == 3 and mine["config"]["controller"]["momentum_rms_decay"] == 0.985
    undone = dict(mine["config"], memory_capacity=theirs["config"]["memory_capacity"],
                  controller=dict(mine["config"]["controller"], momentum_rms_decay=0.999))
    assert NTMBFGSConfig.from_dict(undone) == NTMBFGSConfig.from_dict(theirs["config"])
    steps = mine["command"][len(theirs["command"]):].split(" && ")
    assert mine["command"].startswith(theirs["command"] + " && ")
    assert steps[1:] == [
        "python benchmarks/set_config.py --weights ntm-bfgs-bases --set controller.momentum_rms_decay=0.985 "
        "--out runs/ntm-bases-b985",
        "python benchmarks/set_config.py --weights runs/ntm-bases-b985 --set memory_capacity=3 --out runs/ntm-b985-k3",
        steps[-1]] and steps[-1].startswith("python benchmarks/ship_weights.py --weights runs/ntm-b985-k3")
    rule = load_rule("ntm-bfgs-k3")[0]
    assert rule.segments([2000]).memory.capacity == 3  # a group of 2,000 coordinates takes the limited form
    evaluation = mine["evaluation"]
    assert evaluation["diverged"] == 0 and evaluation["geomean_ratio_to_tuned_adam"] < 0.9
    falling = {task: entry["falling"] for run in evaluation["long_horizon"] for task, entry in run.items()
               if task != "command"}
    assert falling and all(f.split("/")[0] == f.split("/")[1] for f in falling.values()), falling


def test_ntm_bfgs_k3_short_is_the_lstm_default_as_controller_with_only_the_memorys_part_meta_trained():
    """ntm-bfgs-k3-short (NTMBFGS's default) has ntm-bfgs-k3's config and LSTMOptimizer's default
    suite-steps-t500 as its controller, tensor for tensor but the two read-input rows; of the rest,
    only what its one recorded meta-train command named as trainable moved from a fresh rule's warm
    start (the read multiplier η and write modulations δ_w, ``heads.readout``). Its chain is the LSTM
    default's, one set_config (β₂ 0.985, so the controller loads into the same config), that
    meta-train, fixed at 19 episodes (seconds, not hours), and the packaging."""
    import torch

    from learned_optim import NTMBFGSConfig, available_weights
    from learned_optim.rules import load_rule
    from learned_optim.rules.ntm_bfgs import NTMBFGSRule

    weights = available_weights()
    mine, k3, lstm = weights["ntm-bfgs-k3-short"], weights["ntm-bfgs-k3"], weights["suite-steps-t500"]
    assert NTMBFGSConfig.from_dict(mine["config"]) == NTMBFGSConfig.from_dict(k3["config"])
    ours = load_rule("ntm-bfgs-k3-short")[0].state_dict()
    controller = load_rule("suite-steps-t500")[0].state_dict()
    for name, tensor in controller.items():
        theirs = ours[f"controller.{name}"]
        if name == "core.weights.0":  # rows 7:9 read the memory: trained here, from zero
            assert theirs[7:9].abs().sum() > 0
            theirs = torch.cat([theirs[:7], theirs[9:]])
        assert torch.equal(theirs, tensor), name
    fresh = NTMBFGSRule(NTMBFGSConfig.from_dict(mine["config"]), seed=mine["meta_training"]["seed"]).state_dict()
    heads = {name for name in ours if name.startswith("heads.")}
    assert {name for name in heads if not torch.equal(ours[name], fresh[name])} == {
        "heads.readout.weight", "heads.readout.bias"}
    training = mine["meta_training"]
    assert training["trainable"] == ["heads.readout.weight", "heads.readout.bias", "controller.core.weights.0[7:9]"]
    assert training["init_weights"] == "runs/t500-b985" and training["time_limit"] is None
    assert training["episodes"] == 19 and training["train_seconds"] < 536  # 10,800 − the LSTM chain's 10,264
    steps = mine["command"][len(lstm["command"]):].split(" && ")
    assert mine["command"].startswith(lstm["command"] + " && ")
    assert steps[1] == ("python benchmarks/set_config.py --weights suite-steps-t500 --set momentum_rms_decay=0.985 "
                        "--out runs/t500-b985")
    assert [s.split()[1] for s in steps[2:]] == ["meta-train", "benchmarks/ship_weights.py"]
    assert "--episodes 19 " in steps[2] and "--time-limit" not in steps[2]
    evaluation = mine["evaluation"]
    assert evaluation["diverged"] == 0 and evaluation["geomean_ratio_to_tuned_adam"] < 0.9
    falling = {task: entry["falling"] for run in evaluation["long_horizon"] for task, entry in run.items()
               if task != "command"}
    assert set(falling) == {"transformer", "mlp-paper-100"}
    assert all(f.split("/")[0] == f.split("/")[1] == "10" for f in falling.values()), falling


def test_weights_load_from_a_source_checkout_that_is_not_installed(monkeypatch):
    """On PYTHONPATH without `pip install`, learned_optim.pretrained does not exist (pyproject maps
    pretrained/ into the package only when installed): the loader falls back to the checkout's
    pretrained/, so the default weights still load by name (the GPU machine runs the repo this way)."""
    from importlib import resources
    from pathlib import Path

    import learned_optim.rules.weights as weights
    from learned_optim.optim.lstm import DEFAULT_WEIGHTS

    installed = weights.pretrained_dir()

    def not_installed(anchor):
        raise ModuleNotFoundError(f"No module named {anchor!r}")

    monkeypatch.setattr(resources, "files", not_installed)
    checkout = Path(weights.__file__).resolve().parents[2] / "pretrained"
    assert weights.pretrained_dir() == checkout
    assert (checkout / f"{DEFAULT_WEIGHTS}.safetensors").read_bytes() == \
        (installed / f"{DEFAULT_WEIGHTS}.safetensors").read_bytes()
    rule, meta = weights.load_rule(DEFAULT_WEIGHTS)
    assert meta["name"] == DEFAULT_WEIGHTS
