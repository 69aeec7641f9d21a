"""Every registered optimizer under DistributedDataParallel (2 CPU processes, gloo) gives the
parameters a single process gets on the same global batch, and so it does under FSDP2
(parameters sharded across the 2 processes, one tensor unevenly): LSTM+GAC's averages and
NTM-BFGS's memory reads and inner products are all-reduced across the shards. NTM-BFGS's
dense memory cannot be sharded and is refused by name."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import learned_optim

NAMES = learned_optim.available()
STEPS = 12
WORLD = 2

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def _make(name: str, params, **overrides) -> torch.optim.Optimizer:
    return learned_optim.create(name, params, **{**dict(learned_optim.info(name).example_kwargs), **overrides})


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(16, 4, generator=g, dtype=torch.float64)
    return x, torch.sin(x @ torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(4, 3))


def _train(name: str, model: nn.Module, shard: tuple[int, int] | None = None,
           record: dict | None = None, **overrides) -> list[torch.Tensor]:
    """STEPS steps of ``name`` (with ``overrides`` of its arguments) on the global batches, or on
    shard (rank, world) of each; ``record`` gets AdaptiveBatchSGD's suggested batch size."""
    optimizer = _make(name, model.parameters(), **overrides)
    for step in range(STEPS):
        x, y = _global_batch(step)
        if shard is not None:
            x, y = x.chunk(shard[1])[shard[0]], y.chunk(shard[1])[shard[0]]
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()  # DDP averages the ranks' gradients
        optimizer.step()
    if record is not None and hasattr(optimizer, "suggested_batch_size"):
        record[name] = optimizer.suggested_batch_size()
    return [p.detach().clone() for p in model.parameters()]


def _leave_together() -> None:
    """On success, wait for every rank before destroying the group: a rank that tears gloo down
    while its peer is still in the last collective can abort the peer (SIGABRT, "terminate called
    without an active exception"; seen once in CI). A failing rank skips it, so it fails, not hangs."""
    dist.barrier()


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = {}
        for name in NAMES:
            model = _model()
            results[name] = _train(name, DistributedDataParallel(model), shard=(rank, world))
        torch.save(results, Path(out) / f"rank{rank}.pt")
        _leave_together()
    finally:
        dist.destroy_process_group()


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import fully_shard
        except ImportError:
            return None
    return fully_shard


SHARDED = NAMES
#: Sharded, NTM-BFGS's memory="auto" takes the limited form, which is the only one that shards;
#: a single process would take the dense one for this small model, so both are told "limited".
FSDP_OVERRIDES = {"ntm-bfgs": {"memory": "limited"}}


def _fsdp_worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world,))
        results: dict = {}
        for name in SHARDED:
            model = _model()
            _fully_shard()(model, mesh=mesh)
            _train(name, model, shard=(rank, world), record=results.setdefault("suggested", {}),
                   **FSDP_OVERRIDES.get(name, {}))
            results[name] = [p.full_tensor().detach().clone() for p in model.parameters()]
        # A NaN in one rank's shard only: both ranks refuse the step (no rank is left waiting
        # in an all-reduce), naming the same parameter, and nothing changes.
        model = _model()
        _fully_shard()(model, mesh=mesh)
        optimizer = _make("lstm-gac", model.parameters())
        x, y = _global_batch(0)
        nn.functional.mse_loss(model(x.chunk(world)[rank]), y.chunk(world)[rank]).backward()
        if rank == 1:
            weight = next(model.parameters())
            weight.grad.to_local()[0, 0] = float("nan")
        before = [p.full_tensor().clone() for p in model.parameters()]
        try:
            optimizer.step()
        except ValueError as error:
            results["nan-error"] = str(error)
        results["nan-unchanged"] = all(torch.equal(b, p.full_tensor()) for b, p in zip(before, model.parameters()))
        model = _model()
        _fully_shard()(model, mesh=mesh)
        optimizer = learned_optim.NTMBFGS(model.parameters())  # memory="auto" (the default weights')
        nn.functional.mse_loss(model(x.chunk(world)[rank]), y.chunk(world)[rank]).backward()
        optimizer.step()
        results["ntm-bfgs-auto-memory"] = [tuple(state["memory"].shape) for state in optimizer.state.values()
                                           if "memory" in state]
        try:
            learned_optim.NTMBFGS(model.parameters(), memory="dense")
        except ValueError as error:
            results["ntm-bfgs-error"] = str(error)
        torch.save(results, Path(out) / f"rank{rank}.pt")
        _leave_together()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory) -> list[dict[str, list[torch.Tensor]]]:
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_ddp_worker, args=(WORLD, _free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("name", NAMES)
def test_ddp_matches_a_single_process_on_the_global_batch(name, ddp_results):
    single = _train(name, _model())
    for rank, results in enumerate(ddp_results):
        for p, q in zip(results[name], single):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-9, msg=lambda m, rank=rank: f"rank {rank}: {m}")
    moved = any(not torch.equal(p, q) for p, q in zip(single, _model().parameters()))
    assert moved  # the comparison is of trained parameters, not of the initialization


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory) -> list[dict]:
    if _fully_shard() is None:
        pytest.skip("needs FSDP2 (torch.distributed.fsdp.fully_shard)")
    out = tmp_path_factory.mktemp("fsdp")
    mp.spawn(_fsdp_worker, args=(WORLD, _free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("name", SHARDED)
def test_fsdp_matches_a_single_process_on_the_global_batch(name, fsdp_results):
    """Float64 params; the learned rules compute in float32, where summing their averages and
    inner products shard by shard rounds differently, hence their looser tolerance (float32's)."""
    single = _train(name, _model(), **FSDP_OVERRIDES.get(name, {}))
    tolerance = dict(rtol=1e-5, atol=1e-6) if name in ("lstm-gac", "ntm-bfgs") else dict(rtol=1e-6, atol=1e-9)
    for rank, results in enumerate(fsdp_results):
        for p, q in zip(results[name], single):
            torch.testing.assert_close(p, q, **tolerance, msg=lambda m, rank=rank: f"rank {rank}: {m}")


def test_ntm_bfgs_auto_memory_takes_the_limited_form_on_sharded_parameters(fsdp_results):
    """The default weights' memory="auto" would take the dense form for this 67-coordinate model in
    one process; sharded, it takes the limited one, (groups, 2, K, this rank's coordinates)."""
    capacity = learned_optim.NTMBFGS([torch.nn.Parameter(torch.zeros(1))]).rule.config.memory_capacity
    for rank, results in enumerate(fsdp_results):
        (shape,) = results["ntm-bfgs-auto-memory"]
        assert shape[1:3] == (2, capacity) and len(shape) == 4, (rank, shape)


def test_ntm_bfgs_refuses_a_dense_memory_on_sharded_parameters_by_name(fsdp_results):
    for results in fsdp_results:
        assert "dense memory (n × n) cannot be sharded" in results["ntm-bfgs-error"]


def test_a_nan_in_one_shard_is_refused_on_every_rank(fsdp_results):
    messages = [results.get("nan-error", "") for results in fsdp_results]
    assert all("contains NaN or inf" in m and "parameter 0 of param group 0" in m for m in messages), messages
    assert all(results["nan-unchanged"] for results in fsdp_results)


def test_the_suggested_batch_size_is_the_whole_models_on_every_rank(fsdp_results):
    expected: dict = {}
    _train("adaptive-batch-sgd", _model(), record=expected)
    assert expected["adaptive-batch-sgd"] is not None
    for results in fsdp_results:
        assert results["suggested"]["adaptive-batch-sgd"] == pytest.approx(expected["adaptive-batch-sgd"], rel=1e-9)


# ---------------------------------------------------------------- data-parallel meta-training

def _meta_config(**overrides):
    from learned_optim.meta import MetaTrainConfig

    base = dict(rule_config={"hidden_size": 8}, task="quadratic", horizon=20, truncation=10, tasks_per_step=8,
                episodes=6, validate_every=3, validation_tasks=8, checkpoint_every=2, meta_lr=3e-3,
                device="cpu", seed=3)
    base.update(overrides)
    return MetaTrainConfig(**base)


def _meta_worker(rank: int, world: int, port: int, out: str) -> None:
    from learned_optim.meta import MetaTrainer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        trainer = MetaTrainer(_meta_config(), Path(out) / "run", progress=False, log=None)
        assert trainer._episode_seeds(0) == [1_000_000_000 + 3 * 10**8 + i for i in range(4 * rank, 4 * rank + 4)]
        summary = trainer.train()
        torch.save({"rule": trainer.rule.state_dict(), "summary": summary,
                    "current": {k: v.clone() for k, v in trainer.optimizer.state_dict()["state"][0].items()}},
                   Path(out) / f"meta{rank}.pt")
        _leave_together()
    finally:
        dist.destroy_process_group()


def test_data_parallel_meta_training_matches_one_process_drawing_the_same_tasks(tmp_path):
    from learned_optim.meta import MetaTrainer

    mp.spawn(_meta_worker, args=(WORLD, _free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    single = MetaTrainer(_meta_config(), tmp_path / "single", progress=False, log=None)
    summary = single.train()
    ranks = [torch.load(tmp_path / f"meta{r}.pt", weights_only=False) for r in range(WORLD)]
    for rank in ranks:  # every rank holds the same φ, the single process's up to float rounding
        for key, value in single.rule.state_dict().items():
            torch.testing.assert_close(rank["rule"][key], value, rtol=1e-4, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")
        assert rank["summary"]["best_validation"]["episode"] == summary["best_validation"]["episode"]
        assert rank["summary"]["episodes"] == summary["episodes"] == 6
    torch.testing.assert_close(ranks[0]["rule"], ranks[1]["rule"], rtol=0, atol=0)  # identical across ranks
    # rank 0 alone wrote the log: one record per meta-step and validation, as the single process
    logged = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert len(logged) == len((tmp_path / "single" / "log.jsonl").read_text().splitlines())
    assert (tmp_path / "run" / "checkpoint.pt").exists()


def _burn_in_worker(rank: int, world: int, port: int, out: str) -> None:
    from datetime import timedelta

    from learned_optim.meta import MetaTrainer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))  # a rank left waiting fails the test, not hangs it
    try:
        # Only rank 1's burn-ins count as exploded (any loss above 1e-9 × the initial one).
        config = _meta_config(burn_in=5, episodes=2, validate_every=10, explode_ratio=1e-9 if rank == 1 else 1e4)
        trainer = MetaTrainer(config, Path(out) / f"run{rank}", progress=False, log=None)
        assert all(trainer.episode_burn_in(e) > 0 for e in range(2))  # (a draw of 0 runs no burn-in)
        before = {k: v.clone() for k, v in trainer.rule.state_dict().items()}
        summary = trainer.train()
        torch.save({"skipped": trainer.skipped, "episodes": summary["episodes"], "moved": any(
            not torch.equal(v, before[k]) for k, v in trainer.rule.state_dict().items())}, Path(out) / f"burn{rank}.pt")
        _leave_together()
    finally:
        dist.destroy_process_group()


def test_a_burn_in_that_explodes_on_one_rank_skips_the_episode_on_every_rank(tmp_path):
    mp.spawn(_burn_in_worker, args=(WORLD, _free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"burn{r}.pt") for r in range(WORLD)]
    for rank in ranks:  # rank 0's own burn-ins were fine, yet it skipped with rank 1 instead of waiting for it
        assert rank == {"skipped": 2, "episodes": 2, "moved": False}
