"""FSDP2 engine: the ``torch`` engine across processes (``torchrun``), see docs/distributed.md.

Every decoder layer (``model.encoder.layers[i]``) is one ``fully_shard`` unit and the root (input
embedding, final norm, lm_head) another, so a rank holds ``1 / shard_group`` of every weight,
gradient and AdamW moment, and gathers one layer at a time for compute. On CUDA the gathered
weights are bf16 and gradients are reduced in fp32 (``MixedPrecisionPolicy``); the master weights
and optimizer state stay fp32. On CPU (gloo, the tests) everything is fp32.

The loss of a step is the mean over all labelled tokens of the step across all ranks: the label
count is all-reduced before backward, each micro-batch backpropagates ``sum(token_loss) / N_global``
and the gradient reduction SUMS over ranks (divide factor 1), so N ranks x B rows compute the
gradient of one process with N*B rows (up to the order of fp32 additions).

LoRA: the frozen base and the LoRA tensors are sharded alike (one rule for every parameter; the
LoRA tensors are small, so sharding them saves little but costs nothing either).

The step itself is :meth:`TorchEngine.train_step <fm9g.training.torch_engine.TorchEngine.train_step>`:
this class overrides only its hooks (the label count and the figures summed over ranks, gradient
sync on the last micro-batch, the norm of the shards, and an update that reads the non-finite flag
before stepping), so every change to the step applies to both engines.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from fm9g.training.distributed import build_mesh, check_same_config, init_distributed
from fm9g.training.torch_engine import TorchEngine

__all__ = ["FSDPEngine", "load_full_state_into_shards"]


def _layers(model: nn.Module) -> list[nn.Module]:
    layers = getattr(getattr(model, "encoder", None), "layers", None)
    return list(layers) if layers is not None else []


def load_full_state_into_shards(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str = "checkpoint",
                                names: list[str] | None = None) -> None:
    """Copy each rank's slice of a full state (original names; may be memory-mapped) into the model's shards.

    Only the slice a rank owns is read from ``state`` (rows of dim 0), so a memory-mapped ``.pt``
    never comes into memory whole. Strict: missing / unexpected keys or other shapes raise.

    Args:
        model: a ``fully_shard``-ed model (parameters are DTensors) or a plain one.
        state: ``{name: tensor}`` in full shapes.
        names: the keys to load (default: every parameter and persistent buffer of the model).
    """
    own = dict(model.named_parameters())
    own.update({n: b for n, b in model.named_buffers()})
    wanted = list(own) if names is None else list(names)
    missing = [k for k in wanted if k not in state]
    unexpected = [k for k in state if k not in own or (names is not None and k not in names)]
    wrong = [f"{k}: {tuple(state[k].shape)} in {source} vs {tuple(own[k].shape)} in the model"
             for k in wanted if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append("shape mismatch: " + "; ".join(wrong[:5]))
        if missing:
            parts.append(f"missing keys: {missing[:5]}")
        if unexpected:
            parts.append(f"unexpected keys: {unexpected[:5]}")
        raise ValueError(
            f"the {source} does not fit the model ({'; '.join(parts)}); check that the model config "
            "(dims, layers, vocab, tie_lm_head, qkv_bias) is the one the weights were trained with"
        )
    with torch.no_grad():
        for name in wanted:
            target = own[name]
            full = state[name]
            if isinstance(target, DTensor):
                # each rank reads only its own block (no communication, no full copy)
                shape, offset = compute_local_shape_and_global_offset(full.shape, target.device_mesh, target.placements)
                piece = full[tuple(slice(o, o + n) for o, n in zip(offset, shape))]
                target.to_local().copy_(piece)
            else:
                target.copy_(full)


class FSDPEngine(TorchEngine):
    """FSDP2 (``fully_shard``) data-parallel engine; implements the Engine protocol of engine.py.

    Args:
        config: the TrainConfig (optimiser, precision, sharding settings are read from it).
        model: a built model (every rank built the same one; it is sharded in place), or None to
            build it here on the ``meta`` device and load ``pretrained_model`` shard by shard.
        lora_only: only LoRA tensors train / are saved.
    """

    name = "torch"
    _supports_launch_ahead = False  # each step waits for the one before (not measured across ranks)

    def __init__(self, config: Any, model: nn.Module | None = None, *, lora_only: bool = False) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        self.rank, self.world_size, self.device = init_distributed(
            "gloo" if str(config.device) == "cpu" else None)
        check_same_config(config.to_dict())
        self.config = config
        self.lora_only = lora_only
        precision = config.precision
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        self.precision = precision
        self.clip_grad = config.clip_grad
        self._peak = config.peak_flops
        self.mesh = build_mesh(config.data_parallel_shard, self.world_size, device_type=self.device.type)
        on_meta = model is None
        if model is None:
            model = self._build_on_meta(config)
        model.float()
        if config.use_checkpoint is not None and hasattr(model, "set_activation_checkpointing"):
            model.set_activation_checkpointing(bool(config.use_checkpoint))
        compile_ = config.compile
        if config.cuda_graphs is True:
            warnings.warn("cuda_graphs=true is not used under torchrun (FSDP2 gathers each layer's weights inside "
                          "its forward); the layers run compiled without graphs", stacklevel=2)
        if compile_ == "auto":
            compile_ = self.device.type == "cuda"
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16" \
            else MixedPrecisionPolicy()
        if not on_meta:
            model.to(self.device)
        layers = _layers(model)
        for layer in layers:
            if compile_:
                layer.compile()
            fully_shard(layer, mesh=self.mesh, mp_policy=mp, reshard_after_forward=bool(config.reshard_after_forward))
        # the root: embedding, final norm, lm_head; kept gathered after forward (backward needs it at once)
        fully_shard(model, mesh=self.mesh, mp_policy=mp, reshard_after_forward=False)
        for module in [*layers, model]:
            module.set_gradient_divide_factor(1.0)  # SUM over ranks: the loss is already divided by N_global
            module.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM)
        self.model = model
        if on_meta:
            model.to_empty(device=self.device)
            self._load_pretrained_or_init(config)
        scale_width = 1.0
        mc = getattr(model, "config", None)
        if mc is not None and getattr(mc, "scale", False):
            scale_width = float(getattr(mc, "scale_width", 1.0))
        self._setup_optimizer(lr=config.lr, betas=tuple(config.adam_betas), eps=config.adam_eps,
                              weight_decay=config.weight_decay, lr_scale_width=scale_width)

    def _setup_optimizer(self, *, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                         lr_scale_width: float, fused: bool = True) -> None:
        """muP groups over the sharded parameters; fused AdamW on CUDA only. The update reads the
        non-finite flag on the host (``found_inf`` is not passed to a kernel over DTensors)."""
        super()._setup_optimizer(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                 lr_scale_width=lr_scale_width, fused=fused and self.device.type == "cuda")
        self._skip_on_device = False

    # ------------------------------------------------------------------ building
    def _build_on_meta(self, config: Any) -> nn.Module:
        from fm9g.training.builders import build_model

        model = build_model(config, device="meta", load_weights=False)
        if config.lora is not None:
            from fm9g.models.lora import LoraConfig, apply_lora

            lcfg = config.lora if isinstance(config.lora, LoraConfig) else LoraConfig.from_dict(config.lora)
            with torch.device("meta"):
                apply_lora(model, lcfg)
        return model.train()

    def _load_pretrained_or_init(self, config: Any) -> None:
        """Fill the freshly materialised shards: from ``pretrained_model`` (each rank reads its
        slice of a memory-mapped file), else the one-process random init (built on CPU, sliced)."""
        model = self.model
        pre = config.resolve_path(config.pretrained_model) if config.pretrained_model else None
        lora_names = [n for n, _ in model.named_parameters() if ".lora." in n or "lora_" in n.rsplit(".", 1)[-1]]
        base_names = [n for n, _ in model.named_parameters() if n not in lora_names]
        if pre is None or lora_names:
            # the one-process init: every rank builds the same model on CPU from the same seed,
            # keeps its slice and frees the rest (see docs/distributed.md, "Fresh runs")
            from fm9g.models.fm9g import FM9GModel
            from fm9g.training.trainer import seed_everything

            seed_everything(config.seed)
            ref = FM9GModel(model.config)
            if lora_names:
                from fm9g.models.lora import LoraConfig, apply_lora

                lcfg = config.lora if isinstance(config.lora, LoraConfig) else LoraConfig.from_dict(config.lora)
                apply_lora(ref, lcfg)
            load_full_state_into_shards(model, ref.state_dict(), source="initial weights")
            del ref
        if pre is not None:
            from fm9g.convert.hf import read_bmt_checkpoint

            with ExitStack() as stack:
                state = read_bmt_checkpoint(pre, stack)
                if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
                    state = state["state_dict"]
                load_full_state_into_shards(model, state, source=f"pretrained_model {pre}", names=base_names)
                del state

    # ------------------------------------------------------------------ protocol
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ hooks of TorchEngine.train_step
    def _autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # the MixedPrecisionPolicy gathers bf16 weights on CUDA

    def _step_counts(self, micro_batches: list[dict[str, Any]]) -> torch.Tensor:
        """Before backward: every rank divides by the global label count (float64 device tensor [2])."""
        counts = super()._step_counts(micro_batches)
        if not isinstance(counts, torch.Tensor):
            host = torch.tensor(counts, dtype=torch.float64)
            if self.device.type == "cuda":
                host = host.pin_memory()
            counts = host.to(self.device, non_blocking=self.device.type == "cuda")
        dist.all_reduce(counts)
        return counts

    def _before_micro_batch(self, batch: dict[str, Any], last: bool) -> None:
        trace = os.environ.get("FM9G_TRACE_BATCHES")
        if trace:
            self._trace(trace, batch)
        self.model.set_requires_gradient_sync(last)  # reduce-scatter once per step

    def _sum_across_ranks(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t)
        return t

    def _global_norm(self, norm: torch.Tensor) -> torch.Tensor:
        return norm.full_tensor() if isinstance(norm, DTensor) else norm  # all-reduced over the shards

    def _trace(self, folder: str, batch: dict[str, Any]) -> None:
        """Debugging aid (env ``FM9G_TRACE_BATCHES=<folder>``): append a hash of every document this
        rank trains on to ``<folder>/rank-<r>.txt``, to check that ranks read disjoint data."""
        import hashlib

        ids, labels = batch["input_ids"], batch["labels"]
        cu = batch.get("cu_seqlens")
        flat = ids.reshape(-1)
        bounds = cu.tolist() if cu is not None else [r * ids.shape[1] for r in range(ids.shape[0] + 1)]
        lab = (labels.reshape(-1) != -100)
        lines = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            if b > a and bool(lab[a:b].any()):  # a document (padding segments carry no labels)
                lines.append(hashlib.sha1(flat[a:b].numpy().tobytes()).hexdigest())
        Path(folder).mkdir(parents=True, exist_ok=True)
        with open(Path(folder) / f"rank-{self.rank}.txt", "a", encoding="utf-8") as f:
            f.write("".join(h + "\n" for h in lines))

    def model_state_dict(self, *, lora_only: bool = False) -> dict[str, torch.Tensor]:
        """The full state in the original names on rank 0 (CPU), ``{}`` elsewhere. Collective."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if lora_only:
            sd = {k: v for k, v in sd.items() if k.endswith(("lora.lora_A", "lora.lora_B"))}
        return sd if self.is_main else {}

    def load_model_state_dict(self, state: Mapping[str, torch.Tensor], *, lora_only: bool = False) -> None:
        """Strict load of a full state (every rank passes it; it may be memory-mapped)."""
        names = None
        if lora_only:
            names = [n for n, _ in self.model.named_parameters() if n.endswith(("lora.lora_A", "lora.lora_B"))]
        load_full_state_into_shards(self.model, state, names=names)

    def optimizer_state_dict(self) -> dict[str, Any]:
        """This rank's optimizer state with plain (local-shard) tensors: loads with weights_only=True."""
        sd = self.optimizer.state_dict()
        state = {k: {n: (v.to_local().detach().cpu().clone() if isinstance(v, DTensor) else v) for n, v in s.items()}
                 for k, s in sd["state"].items()}
        return {"state": state, "param_groups": sd["param_groups"], "world_size": self.world_size, "rank": self.rank}

    def load_optimizer_state_dict(self, state: dict[str, Any]) -> None:
        saved_world = state.get("world_size", self.world_size)
        if saved_world != self.world_size:
            raise ValueError(
                f"the optimizer state was saved by {saved_world} ranks but this run has {self.world_size}; "
                "the per-rank optimizer files only fit the same world size: resume with the same number of "
                "processes, or set only_load_model=true (weights only, fresh optimizer) - see docs/distributed.md"
            )
        groups, mine = state.get("param_groups", []), self.optimizer.param_groups
        if len(groups) != len(mine) or any(len(a["params"]) != len(b["params"]) for a, b in zip(groups, mine)):
            raise ValueError(
                "the optimizer state in the checkpoint does not match this model's trainable parameters "
                f"({[len(g['params']) for g in groups]} vs {[len(g['params']) for g in mine]} per group); "
                "use only_load_model=true to skip it"
            )
        params = [p for g in mine for p in g["params"]]
        ids = [i for g in groups for i in g["params"]]
        by_id = dict(zip(ids, params))
        wrapped: dict[Any, dict[str, Any]] = {}
        for k, s in state["state"].items():
            p = by_id[k]
            wrapped[k] = {}
            for n, v in s.items():
                if isinstance(v, torch.Tensor) and isinstance(p, DTensor) and v.dim() > 0:
                    v = DTensor.from_local(v.to(self.device), p.device_mesh, p.placements,
                                           shape=p.shape, stride=p.stride(), run_check=False)
                wrapped[k][n] = v
        self.optimizer.load_state_dict({"state": wrapped, "param_groups": groups})

    def barrier(self) -> None:
        dist.barrier()

    def all_reduce(self, values: dict[str, float], op: str = "sum") -> dict[str, float]:
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.device)
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        if op == "mean":
            dist.all_reduce(t)
            t /= self.world_size
        else:
            dist.all_reduce(t, op=ops[op])
        return dict(zip(keys, t.tolist()))

    # ------------------------------------------------------------------ sharded checkpoints (DCP)
    def save_sharded(self, folder: str | os.PathLike) -> None:
        """Every rank writes its shards of model + optimizer with ``torch.distributed.checkpoint``."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(folder))

    def load_sharded(self, folder: str | os.PathLike, *, model_only: bool = False) -> None:
        """Load what :meth:`save_sharded` wrote (re-sharded when the world size differs)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_model_state_dict, set_state_dict

        msd, osd = get_state_dict(self.model, self.optimizer)
        if model_only:
            sd = {"model": msd}
            dcp.load(sd, checkpoint_id=str(Path(folder)))
            set_model_state_dict(self.model, sd["model"])
            return
        sd = {"model": msd, "optim": osd}
        dcp.load(sd, checkpoint_id=str(Path(folder)))
        set_state_dict(self.model, self.optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
