"""The bmtrain engine: ZeRO-3 blocks, optimizer offload, one process per GPU (torchrun).

``engine="bmtrain"`` in a TrainConfig builds :class:`BMTrainEngine`, which converts an already
built FM9G model in place (no bmtrain code lives in ``fm9g.models``):

- every decoder layer (``model.encoder.layers[i]``) becomes a ``bmt.Block`` (ZeRO-3: each rank
  keeps 1/world_size of the layer's parameters and gathers the layer for its forward and
  backward; activation checkpointing per block when ``use_checkpoint``), all of them in one
  ``bmt.TransformerBlockList`` (so the layer after the current one is prefetched);
- the modules outside the layers (input embedding, final norm, untied lm_head) keep their
  parameters as ``bmt.DistributedParameter`` shards, gathered on attribute access;
- the optimizer is bmtrain's ``AdamOffloadOptimizer`` (moments and fp32 master weights in host
  memory, the update on the CPU) when ``offload`` is set, else ``AdamOptimizer`` (on the GPU),
  stepped through a ``bmt.optim.OptimManager`` (gradient clipping, stream synchronisation).

Numerics. With ``precision="bf16"`` (the default on GPU) the model's parameters are bf16 and the
optimizer keeps fp32 master weights (bmtrain's scheme); the forward also runs under bf16
autocast, so every op sees the same input dtypes as under the torch engine. The update is AdamW
(decoupled weight decay), as the torch engine's. muP learning-rate groups are kept: each step
sets every group's lr to ``lr * lr_scale`` (bmtrain's lr schedulers would overwrite all groups
with one value and are not used). The loss of a step is the mean over all labelled tokens of the
step across all ranks, as for the torch engine (see docs/training.md).

State. :meth:`model_state_dict` returns the full model in the original names on rank 0, trainable
tensors in fp32 from the optimizer's master weights, so a checkpoint of this engine loads in the
torch engine and back without losing precision. :meth:`optimizer_state_dict` is this rank's
state in torch AdamW's layout (``state`` / ``param_groups``, plain tensors: loads with
``torch.load(weights_only=True)``); with one process it is exactly what the torch engine loads.

bmtrain is an optional dependency built from source for the local GPU: ``bash
scripts/install_bmtrain.sh`` (see docs/install.md).
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import warnings
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from torch import nn

from fm9g._io import state_dict_mismatch
from fm9g.models.fm9g import checkpointed_layers
from fm9g.models.lora import is_lora_name
from fm9g.training import step_math
from fm9g.training.distributed import free_local_port
from fm9g.training.engine import REDUCE_OPS, StepOutput
from fm9g.training.step_math import check_optimizer_state, param_groups

__all__ = ["BMTrainEngine", "require_bmtrain", "INSTALL_HINT"]

INSTALL_HINT = "bash scripts/install_bmtrain.sh"


def require_bmtrain() -> Any:
    """Import bmtrain, or fail with the command that installs it.

    Returns:
        the ``bmtrain`` module.
    Raises:
        RuntimeError: bmtrain is not installed (or its compiled part does not load), or there is
            no CUDA device.
    """
    try:
        import bmtrain as bmt  # noqa: PLC0415 (optional dependency, imported only here)
    except Exception as err:  # ImportError, or its compiled part / NCCL failing to load
        raise RuntimeError(
            f"engine='bmtrain' needs bmtrain, which is not installed or does not load ({err}); build it for "
            f"this GPU with `{INSTALL_HINT}` (see docs/install.md), or use engine='torch'"
        ) from err
    if not torch.cuda.is_available():
        raise RuntimeError("engine='bmtrain' needs a CUDA GPU; use engine='torch' on CPU")
    return bmt


# ------------------------------------------------------------------------------------ set-up


@contextlib.contextmanager
def _process_state_kept() -> Iterator[None]:
    """Undo what ``bmt.init_distributed`` changes besides its own state: the RNG seeds (the
    Trainer has seeded them already), torch's thread count and ``cudnn.enabled``."""
    rng = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
           torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    threads = torch.get_num_threads()
    cudnn = torch.backends.cudnn.enabled
    try:
        yield
    finally:
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        torch.set_rng_state(rng[2])
        if rng[3] is not None:
            torch.cuda.set_rng_state_all(rng[3])
        torch.set_num_threads(threads)
        # init_distributed turns cuDNN off for the whole process; that also disables SDPA's cuDNN
        # attention kernel. Nothing in FM9G needs it off, so the user's setting is kept.
        torch.backends.cudnn.enabled = cudnn


def init_distributed(bmt: Any, seed: int) -> None:
    """``bmt.init_distributed`` once per process: under torchrun (RANK / WORLD_SIZE / LOCAL_RANK
    / MASTER_ADDR / MASTER_PORT set) or as a single process (a free local port is picked)."""
    if bmt.config["initialized"]:
        return
    if "WORLD_SIZE" not in os.environ:
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_local_port()))
    with _process_state_kept():
        bmt.init_distributed(seed=seed)


# ------------------------------------------------------------------------------ model wrapping
def _distributed_class(bmt: Any, cls: type) -> type:
    """``cls`` with bmtrain's DistributedModule first in its MRO: attribute access gathers the
    module's DistributedParameters, so the module's own forward sees full weights."""
    if issubclass(cls, bmt.DistributedModule):
        return cls
    return type(f"Distributed{cls.__name__}", (bmt.DistributedModule, cls), {})


def _convert_params(bmt: Any, module: nn.Module, dtype: torch.dtype, *, recurse: bool) -> None:
    """Replace the parameters of ``module`` (and its children when ``recurse``) by
    DistributedParameters of ``dtype`` (this rank's shard on the GPU)."""
    mods = module.modules() if recurse else [module]
    for m in mods:
        for name, p in list(m._parameters.items()):
            if p is None or isinstance(p, bmt.DistributedParameter):
                continue
            data = p.detach()
            if data.is_floating_point():
                data = data.to(dtype)
            m._parameters[name] = bmt.DistributedParameter(data.cuda(), requires_grad=p.requires_grad)
            del data


def wrap_model(bmt: Any, model: nn.Module, *, dtype: torch.dtype, use_checkpoint: bool | float) -> None:
    """Convert a built FM9G model in place for bmtrain.

    Args:
        bmt: the bmtrain module (initialised).
        model: an ``FM9GModel`` (``encoder.layers`` a list of layers called ``layer(h, cos, sin, ctx)``).
        dtype: parameter dtype on the GPU (bf16 or fp32).
        use_checkpoint: recompute the layers' activations in backward: every layer, none, or a
            share of them (:func:`fm9g.models.fm9g.checkpointed_layers`).
    Raises:
        TypeError: the model has no ``encoder.layers``.
    """
    encoder = getattr(model, "encoder", None)
    layers = getattr(encoder, "layers", None)
    if layers is None or isinstance(layers, bmt.TransformerBlockList):
        raise TypeError("engine='bmtrain' wraps an FM9GModel (model.encoder.layers); got "
                        f"{type(model).__name__} without a plain layer list")
    if hasattr(model, "set_activation_checkpointing"):
        model.set_activation_checkpointing(False)  # the blocks checkpoint themselves
    blocks = []
    recompute = checkpointed_layers(len(layers), use_checkpoint)
    for i in range(len(layers)):
        layer = layers[i]
        _convert_params(bmt, layer, dtype, recurse=True)
        blocks.append(bmt.Block(layer, use_checkpoint=recompute[i], zero_level=3))
        layers[i] = nn.Identity()  # drop the list's reference as we go
        torch.cuda.empty_cache()
    encoder.layers = bmt.TransformerBlockList(blocks)
    # everything outside the layers: embedding, final norm, lm_head
    in_blocks = {id(m) for b in blocks for m in b._module.modules()}
    for m in model.modules():
        if id(m) in in_blocks or isinstance(m, (bmt.Block, bmt.TransformerBlockList)):
            continue
        if any(p is not None for p in m._parameters.values()):
            _convert_params(bmt, m, dtype, recurse=False)
            m.__class__ = _distributed_class(bmt, type(m))


def _partition(p: torch.Tensor) -> tuple[int, int] | None:
    """(start, end) of this rank's shard in the flattened full parameter, or None if empty."""
    if p.numel() == 0:
        return None
    start = getattr(p, "_start_partition", None)
    if start is None:
        return None
    return int(start), int(start) + p.numel()


# ----------------------------------------------------------------------------------- the engine
class BMTrainEngine:
    """The Engine protocol (see fm9g/training/engine.py) on bmtrain.

    Args:
        config: a TrainConfig (lr, weight_decay, adam_betas, adam_eps, clip_grad, precision,
            use_checkpoint, offload, seed, peak_flops are read).
        model: the built FM9G model (any device; converted in place and moved to the GPU).
        lora_only: only LoRA tensors are trained / saved (the base is frozen).
    Raises:
        RuntimeError: bmtrain is not installed (naming ``bash scripts/install_bmtrain.sh``) or no GPU.
    """

    name = "bmtrain"

    def __init__(self, config: Any, model: nn.Module, *, lora_only: bool = False) -> None:
        bmt = require_bmtrain()
        self._bmt = bmt
        init_distributed(bmt, int(config.seed))
        self.rank = int(bmt.rank())
        self.world_size = int(bmt.world_size())
        self.device = torch.device("cuda", torch.cuda.current_device())
        precision = config.precision if config.precision != "auto" else "bf16"
        if precision not in ("bf16", "fp32"):
            raise ValueError(f"engine='bmtrain' supports precision 'bf16' or 'fp32', got {precision!r}")
        self.precision = precision
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.lora_only = lora_only
        self.clip_grad = float(config.clip_grad)
        self.weight_decay = float(config.weight_decay)
        self.offload = bool(config.offload)
        self._peak = config.peak_flops
        if config.compile is True:
            warnings.warn("compile=true is not used by engine='bmtrain' (the layers run eagerly inside bmt.Block)",
                          stacklevel=2)
        if config.cuda_graphs is True:
            warnings.warn("cuda_graphs=true is not used by engine='bmtrain' (the layers run eagerly inside bmt.Block)",
                          stacklevel=2)

        # names and shapes of the model as built: the checkpoint contract
        self._shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        names = [n for n, _ in model.named_parameters()]
        if sorted(names) != sorted(self._shapes):
            raise TypeError("engine='bmtrain' needs a model whose state dict holds only parameters (no buffers); "
                            f"these are not parameters: {sorted(set(self._shapes) - set(names))[:5]}")
        masters = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}  # fp32 originals
        use_ckpt = config.use_checkpoint
        if use_ckpt is None:
            use_ckpt = getattr(model, "gradient_checkpointing", True)
        wrap_model(bmt, model, dtype=self.dtype, use_checkpoint=use_ckpt)
        self.model = model
        self._params = dict(model.named_parameters())
        self._lora_keys = [k for k in self._shapes if is_lora_name(k)]
        self._setup_optimizer(config, masters)

    def _setup_optimizer(self, config: Any, masters: dict[str, torch.Tensor]) -> None:
        """muP groups and bmtrain's Adam (offloaded with ``offload``), its state created now with the
        fp32 masters of the built model (each original is freed as its state is made)."""
        bmt = self._bmt
        self.groups = param_groups(self.model, step_math.lr_scale_width(self.model))
        if not self.groups:
            raise ValueError("the model has no trainable parameters")
        # fp32 parameters go through torch's Adam inside bmtrain, whose weight decay is L2
        # (coupled); the decay is applied here instead (decoupled, as AdamW and bmtrain's bf16 kernels).
        self._decay_here = self.dtype == torch.float32
        wd = 0.0 if self._decay_here else self.weight_decay
        opt_groups = [{"params": g["params"], "lr": config.lr * g["lr_scale"], "lr_scale": g["lr_scale"],
                       "names": g["names"], "weight_decay": wd} for g in self.groups]
        opt_cls = bmt.optim.AdamOffloadOptimizer if self.offload else bmt.optim.AdamOptimizer
        self.optimizer = opt_cls(opt_groups, lr=config.lr, betas=tuple(config.adam_betas), eps=config.adam_eps,
                                 weight_decay=wd)
        # the gradients are summed across ranks (each rank backpropagates sum/N_global): grad_scale=1
        self.optim_manager = bmt.optim.OptimManager(loss_scale=None, grad_scale=1)
        self.optim_manager.add_optimizer(self.optimizer)
        self._order = [(n, p) for g in self.optimizer.param_groups for n, p in zip(g["names"], g["params"])]
        for name, p in self._order:  # optimizer state now, with the fp32 master from the built model
            self._init_state(p, masters.pop(name, None))  # popping frees the original as we go
        masters.clear()
        torch.cuda.empty_cache()

    # ------------------------------------------------------------------ protocol basics
    @property
    def is_main(self) -> bool:
        """True on the process that logs and writes shared files."""
        return self.rank == 0

    def barrier(self) -> None:
        """All ranks wait for each other."""
        if self.world_size > 1:
            self._bmt.synchronize()

    def all_reduce(self, values: dict[str, float], op: str = "sum") -> dict[str, float]:
        """``values`` reduced across ranks (``op``: one of :data:`fm9g.training.engine.REDUCE_OPS`,
        as in every engine; ``"mean"`` is bmtrain's ``"avg"``)."""
        if op not in REDUCE_OPS:
            raise ValueError(f"all_reduce op={op!r}: expected one of {', '.join(REDUCE_OPS)}")
        if self.world_size == 1 or not values:
            return dict(values)
        keys = list(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.device)
        t = self._bmt.distributed.all_reduce(t, "avg" if op == "mean" else op)
        return dict(zip(keys, t.tolist()))

    def _sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return t
        return self._bmt.distributed.all_reduce(t.contiguous(), "sum")

    def memory_stats(self) -> dict[str, float]:
        """GPU memory in GiB: ``allocated``, ``peak``."""
        return {"allocated": torch.cuda.memory_allocated(self.device) / 2**30,
                "peak": torch.cuda.max_memory_allocated(self.device) / 2**30}

    def peak_flops(self) -> float | None:
        """Dense bf16 peak FLOP/s of the GPU (for MFU), or None if unknown."""
        if self._peak:
            return self._peak
        return step_math.peak_flops_of(self.device)

    # ------------------------------------------------------------------ optimizer state
    def _init_state(self, p: torch.Tensor, master_full: torch.Tensor | None) -> None:
        """Create bmtrain's state for ``p`` (zero moments, step 0) with the fp32 master taken from
        ``master_full`` (the full parameter; None: from ``p`` itself)."""
        part = _partition(p)
        if part is None:
            return
        if master_full is not None:
            master = master_full.reshape(-1)[part[0]:part[1]].float()
        else:
            master = p.detach().reshape(-1).float()
        self._set_state(p, 0, None, None, master)

    def _set_state(self, p: torch.Tensor, step: int, exp_avg: torch.Tensor | None,
                   exp_avg_sq: torch.Tensor | None, master: torch.Tensor | None) -> None:
        """Write ``optimizer.state[p]`` in the layout bmtrain's optimizers create lazily."""
        n = p.numel()
        host = self.offload
        pin = self.device.type == "cuda"  # page-locked host buffers for the GPU <-> host copies
        where = torch.device("cpu") if host else p.device

        def f32(t: torch.Tensor | None) -> torch.Tensor:
            if t is None:
                return torch.zeros(n, dtype=torch.float32, device=where)
            out = t.detach().reshape(-1).to(device=where, dtype=torch.float32)
            # A tensor that is (a view of) the caller's is copied; one that is the whole of a
            # fresh host tensor (a loaded checkpoint's) is adopted: no second copy of the moments.
            if out.data_ptr() == t.data_ptr() and out.untyped_storage().nbytes() != n * 4:
                out = out.clone()
            return out

        st: dict[str, Any] = {"step": int(step), "exp_avg": f32(exp_avg), "exp_avg_sq": f32(exp_avg_sq)}
        if master is None:
            master = p.detach().reshape(-1).float()
        if host:
            if p.dtype == torch.float32:
                st["_param_fp32"] = torch.empty(n, dtype=torch.float32, pin_memory=pin)
                st["_param_fp32"].copy_(master.reshape(-1))
                st["_grad_fp32"] = torch.empty(n, dtype=torch.float32, pin_memory=pin)
            else:
                st["_param_fp32"] = master.reshape(-1).to("cpu", torch.float32, copy=True)
                # The CPU Adam reads each gradient element before it writes the updated bf16
                # weight at the same index, so one pinned buffer serves both (half the pinned memory).
                buf = torch.empty(n, dtype=p.dtype, pin_memory=pin)
                st["_param_fp16"] = buf
                st["_grad_fp16"] = buf
        elif p.dtype != torch.float32:
            st["_param_fp32"] = master.reshape(-1).to(p.device, torch.float32).clone()
        else:
            with torch.no_grad():
                p.copy_(master.reshape(p.shape).to(p.device))
        self.optimizer.state[p] = st

    def _master(self, p: torch.Tensor) -> torch.Tensor:
        """This rank's fp32 master shard of ``p`` (flat), or its bf16 data as fp32 (frozen)."""
        st = self.optimizer.state.get(p) if p.requires_grad else None
        if st and "_param_fp32" in st:
            return st["_param_fp32"].reshape(-1)
        return p.detach().reshape(-1).float() if p.requires_grad else p.detach().reshape(-1)

    def optimizer_state_dict(self) -> dict[str, Any]:
        """This rank's optimizer state, in torch AdamW's layout (plain tensors and numbers).

        ``state[i]`` = ``{"step", "exp_avg", "exp_avg_sq"}`` for the i-th trainable parameter (in
        group order); with one process the moments have the parameter's full shape, so the torch
        engine loads this state; with several they are this rank's flat shard, and
        ``fm9g_bmtrain`` records the layout (a resume needs the same number of ranks).
        """
        ref = torch.optim.AdamW([torch.zeros(1)], lr=1.0, fused=True)  # the keys a torch engine's groups hold
        base = {k: v for k, v in ref.param_groups[0].items() if k != "params"}
        state: dict[int, dict[str, Any]] = {}
        groups: list[dict[str, Any]] = []
        idx = 0
        parts: dict[int, list[int]] = {}
        for g in self.optimizer.param_groups:
            ids = []
            for name, p in zip(g["names"], g["params"]):
                st = self.optimizer.state.get(p)
                part = _partition(p)
                if st and part is not None:
                    shape = self._shapes[name] if self.world_size == 1 else (part[1] - part[0],)
                    # host moments (offload) are handed out as views, not copies (the writer saves
                    # them before the next step; a 7B's moments are 61 GB)
                    state[idx] = {
                        "step": torch.tensor(float(st["step"])),
                        "exp_avg": st["exp_avg"].detach().to("cpu", torch.float32).reshape(shape),
                        "exp_avg_sq": st["exp_avg_sq"].detach().to("cpu", torch.float32).reshape(shape),
                    }
                    parts[idx] = [part[0], part[1]]
                ids.append(idx)
                idx += 1
            group = dict(base)
            group.update(lr=float(g["lr"]), betas=tuple(g["betas"]), eps=float(g["eps"]),
                         weight_decay=self.weight_decay, lr_scale=float(g["lr_scale"]), params=ids)
            groups.append(group)
        return {"state": state, "param_groups": groups,
                "fm9g_bmtrain": {"world_size": self.world_size, "rank": self.rank, "partitions": parts}}

    def load_optimizer_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`optimizer_state_dict` of this engine, or of the torch engine (AdamW).

        The fp32 master weights come from the model (load the model state first, as the Trainer
        does). Raises ValueError when the state belongs to another model / LoRA setting or to a
        run with another number of ranks (sharded moments).
        """
        check_optimizer_state(state, self.optimizer.param_groups)
        groups, mine = state.get("param_groups", []), self.optimizer.param_groups
        meta = state.get("fm9g_bmtrain") or {"world_size": 1}
        sharded = int(meta.get("world_size", 1)) > 1
        if sharded and int(meta["world_size"]) != self.world_size:
            raise ValueError(
                f"the optimizer state was saved by {meta['world_size']} ranks and is sharded; resume with the same "
                f"number of GPUs ({meta['world_size']}), or use only_load_model=true to start the optimizer afresh"
            )
        saved = state.get("state", {})
        for (name, p), (g_saved, i) in zip(self._order, ((g, i) for g in groups for i in g["params"])):
            part = _partition(p)
            if part is None:
                continue
            st = saved.get(i, saved.get(str(i)))
            if st is None:  # no step taken yet for it
                self._set_state(p, 0, None, None, self._master(p))
                continue
            m, v = st["exp_avg"], st["exp_avg_sq"]
            if not sharded:
                if tuple(m.shape) != self._shapes[name]:
                    raise ValueError(f"optimizer state for {name}: shape {tuple(m.shape)}, expected {self._shapes[name]}")
                m, v = m.reshape(-1)[part[0]:part[1]], v.reshape(-1)[part[0]:part[1]]
            step = st["step"]
            step = int(step.item() if isinstance(step, torch.Tensor) else step)
            self._set_state(p, step, m, v, self._master(p))
        for g, gs in zip(mine, groups):  # hyper-parameters of the run (the lr is set every step)
            g["lr_scale"] = float(gs.get("lr_scale", g["lr_scale"]))

    # ------------------------------------------------------------------ model state
    def _full_tensor(self, name: str, p: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """The full parameter ``name`` from each rank's flat shard ``values`` (collective)."""
        shape = self._shapes[name]
        n = math.prod(shape)
        part = _partition(p)
        if self.world_size == 1 and part == (0, n):
            return values.reshape(shape)  # stays where it is (host masters are not moved to the GPU)
        full = torch.zeros(n, dtype=values.dtype, device=self.device)
        if part is not None:
            full[part[0]:part[1]] = values.to(self.device)
        return self._sum(full).reshape(shape)

    def model_state_dict(self, *, lora_only: bool = False) -> dict[str, torch.Tensor]:
        """The full state (original names, CPU; trainable tensors fp32 from the master weights) on
        rank 0, ``{}`` on the others. Every rank must call it."""
        keys = self._lora_keys if lora_only else list(self._shapes)
        if lora_only and not keys:
            raise ValueError("lora_only=True but the model has no LoRA layers")
        out: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for k in keys:
                p = self._params[k]
                t = self._full_tensor(k, p, self._master(p))
                if self.is_main:  # with offload, host masters are handed out as views (no 30 GB copy for a 7B)
                    out[k] = t.detach().to("cpu", copy=not (self.offload and t.device.type == "cpu"))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return out

    def load_model_state_dict(self, state: Mapping[str, torch.Tensor], *, lora_only: bool = False) -> None:
        """Load a full state (or only the LoRA tensors), strict: every rank passes it and keeps its
        shard; trainable tensors also become the optimizer's fp32 master weights."""
        expected = {k: self._shapes[k] for k in (self._lora_keys if lora_only else self._shapes)}
        problem = state_dict_mismatch(expected, {k: tuple(state[k].shape) for k in state.keys()},
                                      source="checkpoint")
        if problem:
            raise ValueError(f"the checkpoint does not fit the model ({problem}); check that the model config "
                             "(dims, layers, vocab, tie_lm_head, qkv_bias, LoRA targets and r) is the one it was "
                             "trained with")
        with torch.no_grad():
            for k in expected:
                p = self._params[k]
                part = _partition(p)
                if part is None:
                    continue
                flat = state[k].reshape(-1)[part[0]:part[1]]
                p.data.copy_(self._param_value(flat.to(self.device), p).reshape(p.data.shape))
                if p.requires_grad and p in self.optimizer.state:
                    st = self.optimizer.state[p]
                    master = flat.to(torch.float32)
                    if "_param_fp32" in st:
                        st["_param_fp32"].copy_(master.to(st["_param_fp32"].device))
                    else:  # fp32 parameters are their own master
                        p.data.copy_(master.to(self.device).reshape(p.data.shape))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _param_value(self, master: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """``master`` in ``p``'s dtype, rounded the way this engine's optimizer rounds its updates:
        bmtrain's CPU Adam (offload) truncates fp32 to bf16, its GPU Adam rounds to nearest. So a
        resumed run holds bit-identical bf16 weights."""
        if self.offload and p.dtype == torch.bfloat16 and master.dtype == torch.float32:
            return torch.bitwise_right_shift(master.contiguous().view(torch.int32), 16).to(torch.int16).view(torch.bfloat16)
        return master.to(p.dtype)

    # ------------------------------------------------------------------ the step
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "bf16":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: (v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
                for k, v in batch.items()}

    def train_step(self, micro_batches: list[dict[str, Any]], lr: float) -> StepOutput:
        """One optimizer step over ``micro_batches`` (this rank's packed batches).

        Every micro-batch backpropagates ``sum(token_loss) / N`` with N the labelled tokens of the
        step on ALL ranks; the gradients are summed across ranks by the blocks' reduce-scatter.
        The figures returned are global.
        """
        n_local = torch.tensor([float(sum(step_math.num_label_tokens(b) for b in micro_batches)),
                                float(sum(step_math.num_tokens(b) for b in micro_batches))],
                               dtype=torch.float64, device=self.device)
        n_label, n_tokens = (int(x) for x in self._sum(n_local).tolist())
        denom = float(max(n_label, 1))
        self.model.train()
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float32)
        task_sums: list[torch.Tensor] = []
        n_tasks = None
        for batch in micro_batches:
            b = self._to_device(batch)
            extra = {"max_seqlen": int(b["max_seqlen"])} if b.get("max_seqlen") else {}
            with self._autocast():
                out = self.model(b["input_ids"], position_ids=b.get("position_ids"), cu_seqlens=b.get("cu_seqlens"),
                                 labels=b["labels"], **extra)
            s = out.token_loss.float().sum()
            self.optim_manager.backward(s / denom)
            loss_sum += s.detach()
            if b.get("task_ids") is not None:
                n_tasks = len(b["task_names"]) if b.get("task_names") else None
                task_sums.append(step_math.task_sums(out.token_loss.detach(), b["labels"], b["task_ids"], n_tasks))
        loss = float(self._sum(loss_sum.reshape(1)).item()) / denom
        task_loss, task_lab, task_tok = step_math.merge_task_sums(self._global_task_sums(task_sums, n_tasks))
        result = StepOutput(loss=loss, num_label_tokens=n_label, num_tokens=n_tokens,
                            task_loss_sum=task_loss, task_label_tokens=task_lab, task_tokens=task_tok)
        if not math.isfinite(loss):
            self.zero_grad()
            result.skipped = "nonfinite"
            return result
        max_norm = self.clip_grad if self.clip_grad and self.clip_grad > 0 else float("inf")
        grad_norm = float(self.optim_manager.clip_grad_norm(self.optimizer.param_groups, max_norm=max_norm))  # pre-clip
        result.grad_norm = grad_norm
        if not math.isfinite(grad_norm):
            self.zero_grad()
            result.skipped = "nonfinite"
            return result
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g["lr_scale"]
        if self._decay_here and self.weight_decay:
            self._decoupled_decay()
        self.optim_manager.step()
        self.zero_grad()
        return result

    @torch.no_grad()
    def _decoupled_decay(self) -> None:
        """p *= 1 - lr·wd on the fp32 master (before the Adam update, as AdamW)."""
        for g in self.optimizer.param_groups:
            factor = 1.0 - g["lr"] * self.weight_decay
            for p in g["params"]:
                if p.grad is None or p.numel() == 0:
                    continue
                st = self.optimizer.state.get(p, {})
                target = st.get("_param_fp32", p)
                target.mul_(factor)

    def _global_task_sums(self, parts: list[torch.Tensor], n_tasks: int | None) -> list[torch.Tensor]:
        """The per-task [K, 3] sums of every rank added together (K agreed across ranks)."""
        local = torch.zeros(0, 3, dtype=torch.float64, device=self.device)
        for t in parts:
            if t.shape[0] > local.shape[0]:
                local = torch.cat([local, local.new_zeros(t.shape[0] - local.shape[0], 3)])
            local[: t.shape[0]] += t
        if self.world_size == 1:
            return [local] if local.numel() else []
        k = int(self.all_reduce({"k": float(local.shape[0])}, "max")["k"])
        if k == 0:
            return []
        if local.shape[0] < k:
            local = torch.cat([local, local.new_zeros(k - local.shape[0], 3)])
        return [self._sum(local)]

    def zero_grad(self) -> None:
        """Zero every gradient (bmtrain keeps the gradient buffers allocated)."""
        self.optim_manager.zero_grad()

