"""Sharded checkpoints of the torch engine under FSDP2 (``checkpoint_format: "sharded"``).

Every rank writes its shards of the model and of the optimizer state into one
``torch.distributed.checkpoint`` folder (``<step>/dcp/``), and any number of ranks can read it
back: each tensor is saved as a DTensor laid out like its parameter, so DCP re-shards on load.

What is saved, by parameter name: the weights (for ``adamw_master`` the fp32 masters instead of
the bf16 compute weights) under ``model``; the optimizer's per-parameter state (moments, step) under
``optim``; the numeric settings of each optimizer group (e.g. ``adamw_bf16``'s rounding-call
counter) under ``groups``. Only tensors are saved, so nothing is unpickled on load.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch

from fm9g.training.optimizers import AdamWBF16, AdamWMaster
from fm9g.training.parallelize import local_view

if TYPE_CHECKING:
    from fm9g.training.torch_engine import TorchEngine

__all__ = ["save_sharded", "load_sharded"]


def _wrap(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``local`` (this rank's piece, not copied) as a DTensor laid out like the parameter ``like``;
    as it is for a parameter every rank keeps whole (DCP saves it once and loads it on every rank)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(like, DTensor):
        return local
    return DTensor.from_local(local, like.device_mesh, like.placements, shape=like.shape, stride=like.stride(),
                              run_check=False)


def _optimizer_states(engine: TorchEngine) -> list[dict[str, torch.Tensor]]:
    """The optimizer's state of each trained parameter in the engine's order (created when the
    optimizer has not stepped yet, so a fresh engine can be loaded into)."""
    opt = engine.optimizer
    if isinstance(opt, AdamWBF16):
        for buckets in opt._buckets:
            for bucket in buckets:
                opt._state_views(bucket)
    elif not opt.state:
        _init_state(opt)
    return [opt.state[p] for g in opt.param_groups for p in g["params"]]


@torch.no_grad()
def _init_state(opt: torch.optim.Optimizer) -> None:
    """Create the state of an optimizer that has not stepped (moments 0, step 0) by one step with
    zero gradients at learning rate 0; the gradients are dropped again. (The local shards it
    updates do not require grad, so every parameter gets one here.)"""
    params = [p for g in opt.param_groups for p in g["params"]]
    for p in params:
        p.grad = torch.zeros_like(p)
    lrs = [g["lr"] for g in opt.param_groups]
    for g in opt.param_groups:
        g["lr"] = 0.0
    opt.step()
    for g, lr in zip(opt.param_groups, lrs):
        g["lr"] = lr
    for st in opt.state.values():
        if isinstance(st.get("step"), torch.Tensor):
            st["step"].zero_()
    for p in params:
        p.grad = None


def _template(engine: TorchEngine, *, model_only: bool) -> dict[str, Any]:
    """The DCP state of ``engine``: every tensor aliases the engine's own (a load fills them in place)."""
    named = dict(engine.model.named_parameters())
    model = {n: p.detach() for n, p in named.items()}
    model.update({n: b for n, b in engine.model.named_buffers() if b is not None})
    if isinstance(engine.optimizer, AdamWMaster):
        masters = engine.optimizer.master_state(named.items())
        model.update({n: _wrap(m, named[n]) for n, m in masters.items()})
    state: dict[str, Any] = {"model": model}
    if model_only:
        return state
    names = [n for g in engine.groups for n in g["names"]]
    optim = {}
    for name, st in zip(names, _optimizer_states(engine)):
        optim[name] = {k: (_wrap(v, named[name]) if isinstance(v, torch.Tensor) and v.dim() > 0 else v)
                       for k, v in st.items() if isinstance(v, torch.Tensor)}
    groups = {str(i): {k: torch.tensor(float(v)) for k, v in g.items() if isinstance(v, (int, float))
                       and not isinstance(v, bool) and k not in ("lr",)}
              for i, g in enumerate(engine.optimizer.param_groups)}
    state.update(optim=optim, groups=groups)
    return state


def save_sharded(engine: TorchEngine, folder: str | os.PathLike) -> None:
    """Every rank writes its shards of the model and optimizer into ``folder`` (collective)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_template(engine, model_only=False), checkpoint_id=str(folder))


def load_sharded(engine: TorchEngine, folder: str | os.PathLike, *, model_only: bool = False) -> None:
    """Load what :func:`save_sharded` wrote (on any number of ranks) into ``engine`` (collective)."""
    import torch.distributed.checkpoint as dcp

    state = _template(engine, model_only=model_only)
    dcp.load(state, checkpoint_id=str(folder))
    opt = engine.optimizer
    if isinstance(opt, AdamWMaster):  # compute weights = the loaded fp32 masters, rounded (first: with
        named = dict(engine.model.named_parameters())  # fp32 compute weights the masters ARE the flat weights)
        with torch.no_grad():
            for n, m in opt.master_state(named.items()).items():
                local_view(named[n]).copy_(m)
    if isinstance(opt, AdamWBF16) and opt.external:
        opt.reload_weights()  # the flat copies take the loaded shards
    for i, g in enumerate(opt.param_groups):
        for k, v in state.get("groups", {}).get(str(i), {}).items():
            g[k] = type(g[k])(v.item()) if k in g else v.item()
