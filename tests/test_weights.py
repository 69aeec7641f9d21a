"""Weights on disk: save/load round trip, shipped weights, and every bad-file case."""

from __future__ import annotations

import hashlib
import json
import pickle

import pytest
import torch

import learned_optim
from learned_optim import LSTMOptimizer
from learned_optim.rules import LSTMGACConfig, LSTMGACRule, Segments, WeightsError, load_rule, save_rule


def _outputs(rule):
    torch.manual_seed(0)
    grad = torch.randn(12) * 5
    return rule(grad, rule.init_state(12), Segments.from_sizes([5, 7]))


@pytest.fixture
def saved(tmp_path):
    rule = LSTMGACRule(LSTMGACConfig(hidden_size=12, gac_cells=3, gac_scope="group"), seed=4)
    path = save_rule(rule, tmp_path / "mine", {"evaluation": {"median_final_loss": 0.5}})
    assert path.exists()
    return rule, tmp_path / "mine"


def test_round_trip_gives_the_same_rule_and_metadata(saved):
    rule, stem = saved
    for name in (stem, f"{stem}.safetensors", f"{stem}.json"):
        loaded, meta = load_rule(name)
        assert loaded.config == rule.config
        for a, b in zip(_outputs(rule), _outputs(loaded)):
            assert torch.equal(a, b)
    assert meta["rule"] == "lstm-gac" and meta["evaluation"]["median_final_loss"] == 0.5
    assert meta["torch_version"] == torch.__version__ and len(meta["tensors_sha256"]) == 64


def test_lstm_optimizer_loads_weights_from_a_path(saved):
    rule, stem = saved
    p = torch.nn.Parameter(torch.ones(3))
    opt = LSTMOptimizer([p], weights=f"{stem}.safetensors")
    assert opt.rule.config == rule.config


def test_truncated_file_is_refused(saved):
    _, stem = saved
    path = stem.with_suffix(".safetensors")
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(WeightsError, match="mine.safetensors does not match its description.*truncated"):
        load_rule(stem)


def test_altered_file_is_refused(saved):
    _, stem = saved
    path = stem.with_suffix(".safetensors")
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="sha256.*altered"):
        load_rule(stem)


def _edit_json(stem, edit):
    meta_path = stem.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    edit(meta)
    meta_path.write_text(json.dumps(meta))


def test_config_that_does_not_fit_the_tensors_is_refused(saved):
    _, stem = saved
    _edit_json(stem, lambda meta: meta["config"].update(hidden_size=20))
    with pytest.raises(WeightsError, match="does not fit rule 'lstm-gac'.*wrong shape: .*core.weights.0"):
        load_rule(stem)


def test_bad_config_values_are_named(saved):
    _, stem = saved
    _edit_json(stem, lambda meta: meta["config"].update(gac_scope="layer"))
    with pytest.raises(WeightsError, match="bad config.*gac_scope"):
        load_rule(stem)


def test_weights_of_another_rule_are_refused(saved):
    _, stem = saved
    with pytest.raises(WeightsError, match="rule 'lstm-gac', not 'ntm-bfgs'"):
        load_rule(stem, expected_rule="ntm-bfgs")


def test_missing_and_non_json_files_are_refused(saved, tmp_path):
    _, stem = saved
    with pytest.raises(WeightsError, match="nothing.json does not exist"):
        load_rule(tmp_path / "nothing")
    stem.with_suffix(".json").write_text("{not json")
    with pytest.raises(WeightsError, match="not valid JSON"):
        load_rule(stem)
    with pytest.raises(WeightsError, match="no shipped weights named 'nonexistent'"):
        load_rule("nonexistent")


def test_a_pickle_is_never_unpickled(saved):
    """A pickle posing as a tensor file, with a matching hash, fails as not-safetensors."""
    _, stem = saved

    class Boom:
        def __reduce__(self):
            return (pytest.fail, ("unpickled!",))

    blob = pickle.dumps(Boom())
    stem.with_suffix(".safetensors").write_bytes(blob)
    _edit_json(stem, lambda meta: meta.update(tensors_sha256=hashlib.sha256(blob).hexdigest()))
    with pytest.raises(WeightsError, match="not a valid safetensors file"):
        load_rule(stem)


def test_shipped_weights_are_listed_and_load_with_their_hash_checked():
    shipped = learned_optim.available_weights()
    assert "quadratic" in shipped
    for name, meta in shipped.items():
        rule, loaded_meta = load_rule(name)
        assert loaded_meta["tensors_sha256"] == meta["tensors_sha256"]
        assert "learned-optim meta-train" in meta["command"]
        assert meta["evaluation"]["median_final_loss"] > 0


def test_state_of_an_optimizer_with_other_weights_is_refused():
    p = torch.nn.Parameter(torch.ones(3))
    a = LSTMOptimizer([p], weights=None, seed=0)
    p.grad = torch.ones(3)
    a.step()
    b = LSTMOptimizer([p], weights=None, seed=1)
    with pytest.raises(ValueError, match="saved by an LSTMOptimizer with other weights"):
        b.load_state_dict(a.state_dict())
