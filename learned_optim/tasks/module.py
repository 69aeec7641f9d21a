"""Task families from ordinary ``nn.Module``s: a model factory, a loss and a minibatch sampler.

This is how the benchmark harness and the meta-trainer reach the models people train, and
how a user meta-trains an optimizer for their own model::

    family = ModuleFamily(lambda seed: MyNet(), lambda model, xy: F.cross_entropy(model(xy[0]), xy[1]),
                          lambda gen, b: sample_minibatch(gen, b), batch_size=64, name="mynet")

The module is never trained in place: a task's parameters are copies of the module's, and
the loss calls the module through ``torch.func.functional_call`` on whatever tensors the
optimizer (or the meta-trainer's differentiable unroll) holds. Buffers (batch-norm
statistics) are the task's own copies, updated in place by the module's forward as usual,
and reset to the module's values when a run starts (:meth:`Task.init_params`).

``stack(seeds)`` vectorizes: tasks whose modules have the same structure (``repr``) and
tensor shapes have their tensors stacked (as ``torch.func.stack_module_state`` would) and their losses taken in
one ``torch.func.vmap``; a module torch cannot vmap (``nn.GRU`` has no batching rule) falls
back to one call per task.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_map

from .base import Batch, Task, TaskFamily, TaskStack

__all__ = ["ModuleFamily", "BoundModule", "ModelFactory", "ModuleLoss", "BatchSampler"]

ModelFactory = Callable[[int], nn.Module]
BatchSampler = Callable[[torch.Generator, int], Batch]
#: ``loss(model, batch) -> scalar``: ``model`` is called like the module (a :class:`BoundModule`).
ModuleLoss = Callable[[Any, Batch], Tensor]

VECTORIZE = (True, False, "auto")


class BoundModule:
    """A module called on given tensors: ``bound(x) == functional_call(module, tensors, (x,))``.

    What a family's loss receives as its ``model``; other attributes are the module's, so a
    loss may read ``model.config`` or call ``model.encode(x)`` as with the module itself.
    """

    def __init__(self, module: nn.Module, tensors: dict[str, Tensor]) -> None:
        self.module, self.tensors = module, tensors

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self.module, self.tensors, args, kwargs)

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.module, name)
        if callable(attribute) and not isinstance(attribute, nn.Module):  # a method: run it on the tensors
            def call(*args: Any, **kwargs: Any) -> Any:
                from torch.nn.utils.stateless import _reparametrize_module

                with _reparametrize_module(self.module, self.tensors):
                    return attribute(*args, **kwargs)

            return call
        return attribute


def _to(batch: Batch, device: torch.device | str | None) -> Batch:
    if device is None:
        return batch
    return tree_map(lambda x: x.to(device) if isinstance(x, Tensor) else x, batch)


def _stack_batches(batches: Sequence[Batch]) -> Batch:
    """One batch of stacked leaves (leading dimension: the task) from K same-shaped batches."""
    return tree_map(lambda *leaves: torch.stack(leaves), batches[0], *batches[1:])


class ModuleFamily(TaskFamily):
    """Tasks from ``model(seed) -> nn.Module``, ``loss(model, batch) -> scalar`` and
    ``batches(generator, batch_size) -> batch``.

    Task ``seed`` trains the module ``model(seed)`` returns (built under ``torch.manual_seed(seed)``,
    the global generator restored afterwards, so a factory that ignores its seed is still
    reproducible) on minibatches of ``batch_size`` drawn from the task's own stream.
    ``vectorize``: True stacks same-structured tasks under ``vmap``, False loops over tasks,
    "auto" tries ``vmap`` once per stack and loops if torch cannot vmap the module.
    """

    def __init__(self, model: ModelFactory, loss: ModuleLoss, batches: BatchSampler, batch_size: int,
                 name: str = "module", vectorize: bool | str = "auto") -> None:
        for what, value in (("model", model), ("loss", loss), ("batches", batches)):
            if not callable(value):
                raise TypeError(f"ModuleFamily: {what} must be callable, got {type(value).__name__}")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"ModuleFamily: batch_size must be a positive integer, got {batch_size!r}")
        if vectorize not in VECTORIZE:
            raise ValueError(f"ModuleFamily: vectorize must be one of {VECTORIZE}, got {vectorize!r}")
        self.model, self.loss_of, self.batches = model, loss, batches
        self.batch_size, self.name, self.vectorize = batch_size, name, vectorize
        self._vmappable: dict[tuple, bool] = {}

    def module(self, seed: int) -> nn.Module:
        """The module of task ``seed`` (in training mode)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = self.model(seed)
        if not isinstance(module, nn.Module):
            raise TypeError(f"{self.name}: the model factory must return an nn.Module, got {type(module).__name__}")
        return module.train()

    def sample(self, seed: int) -> Task:
        return self._task(seed, self.module(seed), None)

    def _task(self, seed: int, module: nn.Module, device: torch.device | str | None) -> Task:
        names = [n for n, _ in module.named_parameters()]
        if not names:
            raise ValueError(f"{self.name}: the module of seed {seed} has no parameters to train")
        params = [p.detach().to(device).clone() for _, p in module.named_parameters()]
        initial_buffers = {n: b.detach().to(device).clone() for n, b in module.named_buffers()}
        buffers = {n: b.clone() for n, b in initial_buffers.items()}
        loss_of, batches = self.loss_of, self.batches

        def loss(ps: Sequence[Tensor], batch: Batch) -> Tensor:
            return loss_of(BoundModule(module, {**dict(zip(names, ps)), **buffers}), batch)

        def reset() -> None:
            for n, b in buffers.items():
                b.copy_(initial_buffers[n])

        def batch(gen: torch.Generator, b: int) -> Batch:
            return _to(batches(gen, b), device)

        return Task(params, loss, batch, self.batch_size, seed,
                    info={"module": module, "names": names, "buffers": buffers}, reset_fn=reset)

    @staticmethod
    def structure(module: nn.Module) -> tuple:
        """What must agree for two tasks to share one vmapped call: the module's class and
        repr (layers and their settings) and every tensor's name, shape and dtype."""
        tensors = [*module.named_parameters(), *module.named_buffers()]
        return (type(module), repr(module), tuple((n, tuple(t.shape), t.dtype) for n, t in tensors))

    def stack(self, seeds: Sequence[int], device: torch.device | str | None = None) -> TaskStack:
        """K tasks; same-structured ones in one vmapped call each. Task k equals ``sample(seeds[k])``,
        minibatch stream included. Runs on ``device`` (tasks' tensors and minibatches moved there)."""
        seeds = list(seeds)
        modules = [self.module(s) for s in seeds]
        tasks = [self._task(s, m, device) for s, m in zip(seeds, modules)]
        if self.vectorize is False:
            return _looped_stack(tasks)
        groups: dict[tuple, list[int]] = {}
        for k, module in enumerate(modules):
            groups.setdefault(self.structure(module), []).append(k)
        stack = _vmapped_stack(tasks, list(groups.values()), self.loss_of)
        if self.vectorize == "auto":
            key = (frozenset(groups), torch.device(device or "cpu").type)  # tried once per set of structures
            if key not in self._vmappable:
                self._vmappable[key] = _vmap_works(stack, tasks)
            if not self._vmappable[key]:
                return _looped_stack(tasks)
        return stack

    def __repr__(self) -> str:
        return f"ModuleFamily({self.name!r}, batch_size={self.batch_size})"


def _looped_stack(tasks: list[Task]) -> TaskStack:
    """The generic stack: one loss call per task (on the tasks' device)."""
    return TaskStack.of(tasks)


def _vmapped_stack(tasks: list[Task], groups: list[list[int]], loss_of: ModuleLoss) -> TaskStack:
    """Each group's params stacked (leading dimension: the group's tasks), its losses one vmap."""
    initial: list[Tensor] = []
    owners: list[int | None | tuple[int, ...]] = []
    plans = []  # per group: (task indices, param slice, names, stacked buffers, base module)
    for members in groups:
        first = tasks[members[0]]
        names = first.info["names"]
        start = len(initial)
        for j in range(len(names)):
            initial.append(torch.stack([tasks[k].initial_params[j] for k in members]))
        owners += [None if len(groups) == 1 else tuple(members)] * len(names)
        buffers = {n: torch.stack([tasks[k].info["buffers"][n] for k in members]) for n in first.info["buffers"]}
        plans.append((members, slice(start, len(initial)), names, buffers, first.info["module"]))
    order = torch.tensor([k for members, *_ in plans for k in members])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order))
    initial_buffers = [{n: b.clone() for n, b in plan[3].items()} for plan in plans]

    def losses(params: Sequence[Tensor], batches: list[Batch]) -> Tensor:
        out = []
        for members, span, names, buffers, module in plans:
            def one(ps: dict[str, Tensor], bs: dict[str, Tensor], batch: Batch, module: nn.Module = module) -> Tensor:
                return loss_of(BoundModule(module, {**ps, **bs}), batch)

            batch = _stack_batches([batches[k] for k in members])
            with sdpa_kernel(SDPBackend.MATH):  # the fused attention kernels have no vmap rule; math does
                out.append(vmap(one, randomness="different")(dict(zip(names, params[span])), buffers, batch))
        return torch.cat(out)[inverse.to(out[0].device)]

    def reset() -> None:
        for plan, saved in zip(plans, initial_buffers):
            for n, b in plan[3].items():
                b.copy_(saved[n])

    return TaskStack(initial, losses, owners, len(tasks),
                     lambda: [t.batch_generator() for t in tasks],
                     lambda gens: [t.sample_batch(g) for t, g in zip(tasks, gens)], reset_fn=reset)


def _vmap_works(stack: TaskStack, tasks: list[Task]) -> bool:
    """Whether torch can vmap these modules' forward and backward (one trial on a throwaway
    minibatch; the tasks' streams and buffers are left as they were)."""
    gens = [torch.Generator().manual_seed(0) for _ in tasks]
    batches = [t.sample_batch(g) for t, g in zip(tasks, gens)]
    params = stack.init_params()
    try:
        with torch.enable_grad():
            loss = stack.losses(params, batches).sum()
            torch.autograd.grad(loss, params, allow_unused=True)
    except (RuntimeError, NotImplementedError) as error:
        if "atching rule" not in str(error) and "vmap" not in str(error):
            raise
        return False
    finally:
        stack.reset()
    return True
