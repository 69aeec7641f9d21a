"""What every optimizer of the package shares: input validation before any mutation,
float32 working copies for low-precision parameters, and the batch-size hook.

A subclass implements ``_check_group`` (hyperparameter validation) and ``_update_group``
(the update on already-validated parameters and gradients); ``step`` does the rest, so a
refused step never touches parameters or state.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.optim import Optimizer

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

__all__ = ["PackageOptimizer", "BatchSizeMixin", "check_batch_size", "check_positive", "working_dtype",
           "local_tensor", "shard_group"]

_LOW_PRECISION = (torch.bfloat16, torch.float16)


_DTENSOR: list[type[DTensor] | None] = []  # [DTensor class or None], filled on first use


def _dtensor_class() -> type[DTensor] | None:
    if not _DTENSOR:
        dtensor: type[DTensor] | None
        try:
            from torch.distributed.tensor import DTensor as dtensor
        except ImportError:  # torch without distributed, or before DTensor was public
            dtensor = None
        _DTENSOR.append(dtensor)
    return _DTENSOR[0]


def local_tensor(t: Tensor) -> Tensor:
    """This rank's part of ``t``: the local shard of a DTensor (FSDP2), else ``t`` itself."""
    dtensor = _dtensor_class()
    return t.to_local() if dtensor is not None and isinstance(t, dtensor) else t


def shard_group(param: Tensor) -> Any:
    """The process group ``param`` is sharded across (a DTensor sharded on one mesh dimension,
    as FSDP2 makes), or None for an ordinary or replicated tensor."""
    dtensor = _dtensor_class()
    if dtensor is None or not isinstance(param, dtensor):
        return None
    from torch.distributed.tensor import Shard

    dims = [d for d, placement in enumerate(param.placements) if isinstance(placement, Shard)]
    if not dims:
        return None
    if len(dims) > 1:
        raise ValueError(f"parameters sharded over more than one mesh dimension are not supported "
                         f"(placements {param.placements})")
    return param.device_mesh.get_group(dims[0])


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype updates are computed in: float32 for bfloat16/float16 params, else the param's."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def _describe(group_index: int, group: dict[str, Any], index: int, param: Tensor) -> str:
    names = group.get("param_names")
    if names is not None:
        return f"parameter '{names[index]}' (param group {group_index}, shape {tuple(param.shape)})"
    return (
        f"parameter {index} of param group {group_index} "
        f"(shape {tuple(param.shape)}, dtype {param.dtype})"
    )


class PackageOptimizer(Optimizer):
    """Base of the package's optimizers: a thin ``Optimizer`` over a functional update.

    ``step`` validates every hyperparameter and gradient first and raises a ``ValueError``
    naming the offending parameter, leaving parameters and state exactly as they were.
    Parameters in bfloat16/float16 are updated through a float32 working copy, and their
    state is kept in float32.
    """

    def _check_group(self, group: dict[str, Any]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _update_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        states: list[dict],
        originals: list[Tensor],
    ) -> None:  # pragma: no cover - abstract
        """Update ``params`` (working copies of ``originals``) in place from ``grads``."""
        raise NotImplementedError

    def _init_state(self, group: dict[str, Any], param: Tensor, state: dict) -> None:
        """Fill a parameter's empty state at its first step (lazy state)."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._check_group(self.param_groups[-1])

    def _state_dtype(self, param: Tensor, key: str) -> torch.dtype:
        """The dtype state entry ``key`` of ``param`` is kept in (float32 for low precision)."""
        return working_dtype(param.dtype)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load as ``Optimizer`` does, then restore state kept in another dtype than the param's.

        ``Optimizer.load_state_dict`` casts floating state to the param's dtype, which would
        round the float32 state of bfloat16/float16 params; such state is re-read from
        ``state_dict`` in the dtype ``_state_dtype`` names.
        """
        super().load_state_dict(state_dict)
        for group in self.param_groups:  # fills options a state from an older version lacks (their defaults)
            self._check_group(group)
        saved = state_dict["state"]
        ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(ids, params):
            if pid not in saved:
                continue
            for key, value in saved[pid].items():
                if key == "step" or not isinstance(value, Tensor) or not value.is_floating_point():
                    continue
                dtype = self._state_dtype(p, key)
                if dtype != p.dtype:
                    self.state[p][key] = value.to(device=p.device, dtype=dtype, copy=True)

    def _validated_grads(self) -> list[tuple[dict[str, Any], list[Tensor], list[Tensor]]]:
        """Each group with its params that have a grad, after checking every group and grad."""
        selected = []
        checked: list[tuple[Tensor, int, dict, int, Tensor]] = []  # (grad, group index, group, index, param)
        for gi, group in enumerate(self.param_groups):
            self._check_group(group)
            params, grads = [], []
            for i, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse or g.layout != torch.strided:
                    raise ValueError(
                        f"{type(self).__name__} does not support sparse gradients: "
                        f"{_describe(gi, group, i, p)} has a {g.layout} gradient"
                    )
                if p.is_complex() or g.is_complex():
                    raise ValueError(
                        f"{type(self).__name__} does not support complex tensors: "
                        f"{_describe(gi, group, i, p)} is {p.dtype} with a {g.dtype} gradient"
                    )
                if not p.is_floating_point():
                    raise ValueError(
                        f"{type(self).__name__} needs floating-point parameters: "
                        f"{_describe(gi, group, i, p)} is {p.dtype}"
                    )
                if g.shape != p.shape:
                    raise ValueError(
                        f"gradient of {_describe(gi, group, i, p)} has shape {tuple(g.shape)}"
                    )
                if group.get("check_finite", True) and g.numel() > 0:
                    checked.append((g, gi, group, i, p))
                params.append(p)
                grads.append(g)
            selected.append((group, params, grads))
        if checked:
            # min and max of g are both finite exactly when g holds no NaN or inf: one pass
            # per tensor without temporaries, and a single host sync for the whole step.
            extremes = [_extremes(local_tensor(c[0])) for c in checked]
            if len({e.device for e in extremes}) > 1:
                extremes = [e.cpu() for e in extremes]
            finite = torch.isfinite(torch.stack(extremes)).all(dim=1)
            shards = self._shard_group_of(c[4] for c in checked)
            if shards is not None:  # sharded grads: every rank must reach the same verdict
                import torch.distributed as dist

                verdict = finite.to(torch.int32)
                dist.all_reduce(verdict, op=dist.ReduceOp.MIN, group=shards)
                finite = verdict.bool()
            finite = finite.cpu()
            if bool(finite.all()):
                return selected
            for ok, (_, gi, group, i, p) in zip(finite.tolist(), checked):
                if not ok:
                    raise ValueError(
                        f"{type(self).__name__}: the gradient of {_describe(gi, group, i, p)} "
                        "contains NaN or inf; no parameter or state was changed. (Under mixed "
                        "precision, step through torch.amp.GradScaler, which skips such steps.)"
                    )
        return selected

    @staticmethod
    def _shard_group_of(params: Any) -> Any:
        """The one process group the sharded ones among ``params`` share (None if none is sharded)."""
        groups = {id(g): g for g in (shard_group(p) for p in params) if g is not None}
        if len(groups) > 1:
            raise ValueError("parameters sharded across different process groups cannot share an optimizer")
        return next(iter(groups.values()), None)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group, params, grads in self._validated_grads():
            if not params:
                continue
            work_params, work_grads, states = [], [], []
            for p, g in zip(params, grads):
                state = self.state[p]
                wdtype = working_dtype(p.dtype)
                local, local_grad = local_tensor(p), local_tensor(g)  # a sharded param: this rank's shard
                work = local if local.dtype == wdtype else local.to(wdtype)
                if not state:
                    self._init_state(group, work, state)
                work_params.append(work)
                work_grads.append(local_grad if local_grad.dtype == wdtype else local_grad.to(wdtype))
                states.append(state)
            self._update_group(group, work_params, work_grads, states, params)
            for p, work in zip(params, work_params):
                local = local_tensor(p)
                if work is not local:
                    local.copy_(work)
        return loss


def _extremes(g: Tensor) -> Tensor:
    """(min, max) of g in float32; (0, 0) for an empty tensor (a rank's empty shard)."""
    if g.numel() == 0:
        return torch.zeros(2, dtype=torch.float32, device=g.device)
    return torch.stack(torch.aminmax(g)).to(torch.float32)


def _positive_int(value: Any, name: str) -> int:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and math.isfinite(value) and value == int(value) and 1 <= value < 2**63
    if not ok:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_positive(value: Any, name: str, *, allow_zero: bool = False) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is a finite positive number."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be a finite {bound} number, got {value!r}")


class BatchSizeMixin:
    """Optimizers whose update depends on the minibatch size B (a param group key)."""

    param_groups: list[dict[str, Any]]

    def set_batch_size(self, batch_size: int) -> None:
        """Tell the optimizer the minibatch size of the coming steps; derived rates follow.

        State (momentum buffers, running averages) is kept; only quantities derived from B
        change.
        """
        batch_size = _positive_int(batch_size, "batch_size")
        for group in self.param_groups:
            group["batch_size"] = batch_size

    @property
    def batch_size(self) -> int:
        """The batch size of the first param group."""
        return self.param_groups[0]["batch_size"]


def check_batch_size(group: dict[str, Any]) -> None:
    _positive_int(group["batch_size"], "batch_size")

