"""Parallelism as functions applied to a built model (torchtitan's ``parallelize`` pattern).

The torch engine (:class:`~fm9g.training.torch_engine.TorchEngine`) has one training step; what
changes between one process and many is only what these functions did to the model before the
engine took it:

- :func:`apply_activation_checkpointing` — recompute each decoder layer in backward;
- :func:`apply_compile` — ``torch.compile`` each decoder layer (optionally replayed as CUDA graphs);
- :func:`apply_fsdp` — PyTorch FSDP2: every decoder layer one ``fully_shard`` unit and the root
  (embedding, final norm, lm_head) another, over a 1-D mesh (``"fsdp"``) or a 2-D
  ``(replicate, shard)`` mesh (``"hybrid"``).

:func:`data_parallel_mode` decides, in one place, which of ``"none"``, ``"fsdp"`` and ``"hybrid"`` a
run uses (``TrainConfig.data_parallel``; ``"auto"`` = FSDP2 under torchrun). FSDP2 runs the same
way on one GPU as on N (no world-size-1 shortcut skips ``fully_shard``).

Parameters sharded by FSDP2 are DTensors; the engine's optimizer works on each rank's local piece
(:func:`local_view`), and full tensors go in and out through :func:`local_slice` /
:func:`gather_full` (:func:`load_full_state_into_shards` reads only a rank's own rows of a
memory-mapped checkpoint).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from fm9g._io import ConfigError, state_dict_mismatch

__all__ = ["DATA_PARALLEL", "data_parallel_mode", "decoder_layers", "apply_activation_checkpointing",
           "apply_compile", "apply_fsdp", "replicated_params", "stays_whole", "share_shard_storage", "local_view", "local_slice", "gather_full", "is_sharded",
           "load_full_state_into_shards"]

DATA_PARALLEL = ("auto", "none", "fsdp", "hybrid")


def data_parallel_mode(value: str, world_size: int, *, shard: str = "full") -> str:
    """The data parallelism a run uses: ``"none"`` (one process), ``"fsdp"`` or ``"hybrid"``.

    Args:
        value: ``TrainConfig.data_parallel``: ``"auto"`` (FSDP2 when ``world_size > 1``; hybrid
            when ``shard == "hybrid"``), ``"none"``, ``"fsdp"``, ``"hybrid"``.
        world_size: processes of the launch (``WORLD_SIZE``; 1 without torchrun).
        shard: ``TrainConfig.data_parallel_shard`` (``"full"`` | ``"hybrid"``), read by ``"auto"``.
    Raises:
        ConfigError: ``"none"`` with several processes, or an unknown value.
    """
    if value not in DATA_PARALLEL:
        raise ConfigError(f"data_parallel={value!r}: expected one of {', '.join(DATA_PARALLEL)}")
    if value == "auto":
        if world_size <= 1:
            return "none"
        return "hybrid" if shard == "hybrid" else "fsdp"
    if value == "none" and world_size > 1:
        raise ConfigError(f"data_parallel='none' but torchrun started {world_size} processes: each would train "
                          "alone on its own data; set data_parallel to \"fsdp\" or \"hybrid\" (or \"auto\")")
    return value


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """``model.encoder.layers`` as a list ([] for a model without them)."""
    layers = getattr(getattr(model, "encoder", None), "layers", None)
    return list(layers) if layers is not None else []


def apply_activation_checkpointing(model: nn.Module, enabled: bool | float | None) -> None:
    """Switch activation checkpointing of the decoder layers: on, off, or a share of them (a
    fraction; :func:`fm9g.models.fm9g.checkpointed_layers`). None leaves the model's setting."""
    if enabled is not None and hasattr(model, "set_activation_checkpointing"):
        model.set_activation_checkpointing(enabled)


def apply_compile(model: nn.Module, *, cuda_graphs: bool = False) -> None:
    """``torch.compile`` each decoder layer in place (the whole model when it has none). With
    ``cuda_graphs`` (one CUDA device, FM9GModel) each layer's forward and backward are recorded
    once per packing shape and replayed with one launch (``mode="reduce-overhead"``; the model pads
    its layout to a few shapes, :func:`fm9g.models.fm9g.static_layout`)."""
    layers = decoder_layers(model)
    if not layers:
        model.compile()
        return
    kw = {"mode": "reduce-overhead"} if cuda_graphs else {}
    if cuda_graphs:
        model.graphed_layers = True
    for layer in layers:
        layer.compile(**kw)


def apply_fsdp(model: nn.Module, mesh: Any, *, param_dtype: torch.dtype | None, reduce_dtype: torch.dtype | None,
               reshard_after_forward: bool = True) -> None:
    """Shard ``model`` with FSDP2 in place: each decoder layer one unit, the root another.

    The one-dimensional parameters (norms, biases: :func:`replicated_params`) stay whole on every
    rank, outside FSDP2 (its ``ignored_params``), as ZeRO-3 keeps small parameters persistent: FSDP2's
    host work is per parameter at every gather, reshard and reduction, and these are 5 of a decoder
    layer's 12 parameters but 0.02 % of its weights. The engine sums their gradients over the ranks
    (:meth:`~fm9g.training.torch_engine.TorchEngine`); they are never cast for the gather.

    Args:
        mesh: a 1-D ``("shard",)`` or 2-D ``("replicate", "shard")`` DeviceMesh.
        param_dtype: the dtype weights are gathered in (None: their own).
        reduce_dtype: the dtype gradients are reduced in (None: the gathered one).
        reshard_after_forward: free each layer's gathered weights after its forward (re-gathered
            for backward): less memory, more communication. The root is never resharded.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    layers = decoder_layers(model)
    kw = {"ignored_params": replicated_params(model)} if _fsdp_ignores_params() else {}
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward, **kw)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False, **kw)
    for module in [*layers, model]:
        # gradients are SUMMED over ranks: the loss is already divided by the step's global label
        # count. Over one rank the default factor (None) is that sum already, and a factor of 1.0
        # would cost a division and a copy of every gradient per step (torch 2.11 at one rank:
        # ``reduce_output.copy_(reduce_scatter_input / factor)``; 4 ms of an H100's W1 step)
        if mesh.size() > 1:
            module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM)


def stays_whole(p: torch.Tensor) -> bool:
    """Whether FSDP2 leaves the parameter ``p`` whole on every rank (:func:`apply_fsdp`): the
    one-dimensional ones (norms, biases). The flat optimizers bucket these apart by the same rule."""
    return p.dim() < 2


def replicated_params(model: nn.Module) -> set[nn.Parameter]:
    """The parameters FSDP2 leaves whole on every rank (:func:`stays_whole`)."""
    return {p for p in model.parameters() if stays_whole(p)}


def _fsdp_ignores_params() -> bool:
    """Whether this torch's ``fully_shard`` takes ``ignored_params`` (torch 2.7 on)."""
    import inspect

    from torch.distributed.fsdp import fully_shard

    try:
        return "ignored_params" in inspect.signature(fully_shard).parameters
    except (TypeError, ValueError):  # a wrapped callable without a signature
        return False


def share_shard_storage(model: nn.Module, storage: Mapping[torch.Tensor, torch.Tensor]) -> int:
    """Let FSDP2 keep each given parameter's shard in ``storage[param]`` instead of its own copy.

    ``storage`` maps sharded parameters to tensors of their local shape, dtype and device: an
    optimizer's views into its flat weight buffer. The update then writes the very weights FSDP2
    gathers, with no copy back after each step. A shard FSDP2 pads (rows that do not divide by the
    ranks) or keeps on the host keeps its own storage; so does every shard where this torch's
    FSDP2 lacks the fields used here (``FSDPParam.sharded_param``, ``_sharded_param_data``,
    ``padded_sharded_param_size``). Call before the first forward or after a step, not between a
    forward and its backward. Returns how many shards now live in ``storage``.
    """
    from torch.distributed.fsdp import FSDPModule

    shared = 0
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        state = module._get_fsdp_state()
        groups = getattr(state, "_fsdp_param_groups", None)
        if groups is None:
            group = getattr(state, "_fsdp_param_group", None)
            groups = [group] if group is not None else []
        for fsdp_param in (fp for g in groups for fp in getattr(g, "fsdp_params", ())):
            param = getattr(fsdp_param, "sharded_param", None)
            view = storage.get(param) if param is not None else None
            data = getattr(fsdp_param, "_sharded_param_data", None)
            if view is None or data is None or getattr(fsdp_param, "offload_to_cpu", False):
                continue
            local = param._local_tensor
            if (tuple(getattr(fsdp_param, "padded_sharded_param_size", ())) != tuple(local.shape)
                    or view.shape != local.shape or view.dtype != local.dtype or view.device != local.device
                    or data.numel() != view.numel() or not view.is_contiguous()):
                continue
            if view.data_ptr() != local.data_ptr():
                with torch.no_grad():
                    view.copy_(local)
            fsdp_param._sharded_param_data = view.view(-1)
            param._local_tensor = view
            shared += 1
    return shared


def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a DTensor (a parameter or gradient sharded by FSDP2)."""
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local_view(t: torch.Tensor) -> torch.Tensor:
    """This rank's piece of a DTensor (the plain tensor FSDP2 gathers from and the optimizer
    updates in place); a plain tensor as it is."""
    return t._local_tensor if is_sharded(t) else t


def local_slice(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The part of the full tensor ``full`` that this rank holds of the DTensor ``like`` (its
    rows; no copy, no communication); ``full`` itself when ``like`` is not sharded."""
    if not is_sharded(like):
        return full
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(full.shape, like.device_mesh, like.placements)
    return full[tuple(slice(o, o + n) for o, n in zip(offset, shape))]


def shard_rows(full: torch.Tensor, rank: int, shards: int) -> torch.Tensor:
    """The rows of ``full`` that rank ``rank`` of ``shards`` will hold once :func:`apply_fsdp` shards
    it (FSDP2 splits dim 0 as ``torch.chunk`` does; a parameter that :func:`stays_whole` whole), as a
    view: what :func:`local_slice` gives after sharding, known before it."""
    if shards <= 1 or stays_whole(full):
        return full
    step = -(-full.shape[0] // shards)
    return full[min(rank * step, full.shape[0]):min((rank + 1) * step, full.shape[0])]


def gather_full(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The full tensor whose local pieces (``local`` on this rank) are laid out like the DTensor
    ``like`` (collective: every rank calls it); ``local`` itself when ``like`` is not sharded."""
    if not is_sharded(like):
        return local
    from torch.distributed.tensor import DTensor

    local = local.to(like.to_local().device)  # a master kept in host memory (offload) joins its shard's device
    return DTensor.from_local(local, like.device_mesh, like.placements, shape=like.shape, stride=like.stride(),
                              run_check=False).full_tensor()


def load_full_state_into_shards(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str = "checkpoint",
                                names: list[str] | None = None) -> None:
    """Copy each rank's slice of a full state (original names; may be memory-mapped) into the
    model's parameters and persistent buffers, sharded or not.

    Only the rows a rank owns are read from ``state``, so a memory-mapped ``.pt`` never comes
    into memory whole. Strict: missing / unexpected keys or other shapes raise ``ValueError``.

    Args:
        names: the keys to load (default: every parameter and buffer of the model).
    """
    own: dict[str, torch.Tensor] = dict(model.named_parameters())
    own.update(dict(model.named_buffers()))
    wanted = list(own) if names is None else list(names)
    expected = {k: tuple(own[k].shape) for k in wanted}
    got = {k: tuple(v.shape) for k, v in state.items() if names is None or k in names}
    problem = state_dict_mismatch(expected, got, source=source)
    if problem:
        raise ValueError(
            f"the {source} does not fit the model ({problem}); check that the model config "
            "(dims, layers, vocab, tie_lm_head, qkv_bias) is the one the weights were trained with")
    with torch.no_grad():
        for name in wanted:
            local_view(own[name]).copy_(local_slice(state[name], own[name]))
